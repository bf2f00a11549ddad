"""What the experiment runner (:mod:`mc.experiment`) gets from the demo sign source: its minimal
pairs, mapped onto a synthetic data set's labels, and the named control description runs.

Minimal pairs are derived from the source's structure, not listed: two signs whose expanded
segments line up one to one and differ in one kind of feature only — one field of a hand's
action (kind ``handshape``, ``location``, ``direction``, …) or only mouth, face, head or body
(kind ``nonmanual``). On the bundled source that finds the pairs its header names:
SISTER/BROTHER, MONDAY/TUESDAY, BE PLEASED/APOLOGIZE (handshape); HUNGRY/FULL, SWEET/HONEY,
SAD/TIRED (nonmanual); MOTHER/FATHER and GRANDMOTHER/GRANDFATHER (location); TOMORROW/YESTERDAY
(direction).
"""

from __future__ import annotations

from pathlib import Path

from demo.reference_texts import write_reference_run
from demo.sign_source import DEFAULT_SOURCE, Segment, SignSource, load_sign_source
from demo.synthetic import is_synthetic_dataset
from mc.experiment import MinimalPair

NONMANUAL = "nonmanual"
_NON_MANUAL_FIELDS = ("mouth", "face", "head", "body")

#: Control description runs the runner can write by name (``--descriptions reference``).
CONTROL_BUILDERS = {"reference": write_reference_run}


def _segment_differences(x: Segment, y: Segment) -> set[str]:
    """What kinds of difference two segments have: the one hand-action field that differs
    (handshape, location, …), nonmanual, or other (a hand present in one only, several fields)."""
    kinds = set()
    for side in ("right", "left"):
        hx, hy = getattr(x, side), getattr(y, side)
        if (hx is None) != (hy is None):
            kinds.add("other")
        elif hx is not None and hx != hy:
            changed = {f for f in type(hx).model_fields if getattr(hx, f) != getattr(hy, f)}
            kinds.add(changed.pop() if len(changed) == 1 else "other")
    if any(getattr(x, f) != getattr(y, f) for f in _NON_MANUAL_FIELDS):
        kinds.add(NONMANUAL)
    return kinds


def minimal_pairs(source: SignSource) -> list[tuple[str, str, str]]:
    """(kind, gloss a, gloss b) for every pair of signs that differ in exactly one kind of
    feature (one hand-action field, or non-manual features only), in source order."""
    found = []
    expanded = {s.gloss: source.expanded_segments(s.gloss) for s in source.signs}
    for i, a in enumerate(source.signs):
        for b in source.signs[i + 1:]:
            sa, sb = expanded[a.gloss], expanded[b.gloss]
            if len(sa) != len(sb):
                continue
            kinds = set().union(*(_segment_differences(x, y) for x, y in zip(sa, sb)))
            if len(kinds) == 1 and kinds != {"other"}:
                found.append((kinds.pop(), a.gloss, b.gloss))
    return found


def data_minimal_pairs(data: Path | str, source: SignSource | Path | str = DEFAULT_SOURCE) -> list[MinimalPair]:
    """The source's minimal pairs as labels of ``data``, when ``data`` is a synthetic data set
    (its ``classes`` list maps glosses to labels); none for any other data."""
    if not Path(data).is_file() or not is_synthetic_dataset(data):
        return []
    from mc.data import read_pickle_safely

    classes = read_pickle_safely(Path(data)).get("classes") or []
    label_of = {c["gloss"]: int(c["label"]) for c in classes}
    src = source if isinstance(source, SignSource) else load_sign_source(source)
    return [MinimalPair(kind, label_of[a], label_of[b], a, b) for kind, a, b in minimal_pairs(src)
            if a in label_of and b in label_of]
