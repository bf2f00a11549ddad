"""Reference descriptions of the demo signs, written from their structured source.

What a perfect GSP would produce for the signs that ``demo.synthetic`` animates: Tg, Ts and Tp
(paper §3.2) that state exactly the handshapes, locations, movements and non-manual features the
clips show, with references to other signs resolved and chart handshapes spelled out. They are
not the pipeline's output; they exist to measure what the MC loss gains from good text
separately from the quality of the LLM that wrote the descriptions (``bench/contrastive_gain.py``).

Written by templates from :class:`demo.sign_source.Segment` fields; the rows follow the artifact
schema (:mod:`gsp.schema`), so :func:`mc.text_features.build_text_bank` reads them like any run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from demo.sign_source import HandAction, Segment, SignSource, load_sign_source
from gsp.schema import STATUS_OK, row_key, write_kind

MODEL_NAME = "reference-from-sign-source"

_LOCATION = {"neutral": "in front of the body", "head_top": "at the top of the head", "other_hand": "on the other hand"}
_MOVEMENT = {
    "none": "held still", "tap": "taps", "straight": "moves straight", "arc": "moves in an arc",
    "circle": "circles", "wiggle": "wiggles its fingers", "twist": "twists at the wrist",
    "open_close": "opens and closes", "shake": "shakes",
}
_MOUTH = {"open": "the mouth opens", "round": "the lips round", "spread": "the lips spread",
          "puffed": "the cheeks puff", "tongue": "the tongue shows", "pressed": "the lips press together",
          "blow": "the lips blow out"}
_FACE = {"brows_raised": "the eyebrows rise", "brows_furrowed": "the eyebrows furrow",
         "eyes_closed": "the eyes close", "squint": "the eyes squint", "smile": "the face smiles",
         "frown": "the face frowns"}
_HEAD = {"nod": "the head nods", "shake": "the head shakes", "tilt": "the head tilts"}
_BODY = {"lean_forward": "the body leans forward", "lean_back": "the body leans back",
         "shrug": "the shoulders shrug", "turn": "the upper body turns"}


def _place(location: str) -> str:
    return _LOCATION.get(location, f"at the {location.replace('_', ' ')}")


def hand_phrase(action: HandAction, side: str, source: SignSource) -> str:
    """One hand's part of a segment, e.g. "the right hand, in the 'L' handshape (<the chart's first
    sentence>), palm facing left, at the cheek, moves straight down"."""
    shape = source.handshape(action.handshape)
    # the chart's own words, since a letter alone ('A' vs 'L') says little to a text encoder
    how = shape.description.split(". ")[0].rstrip(".")
    move = _MOVEMENT[action.movement]
    if action.direction != "none" and action.movement != "none":
        move += f" {action.direction}"
    if action.repeat > 1:
        move += f" {action.repeat} times"
    return (f"the {side} hand, in the '{shape.id}' handshape ({how[:1].lower() + how[1:]}), palm facing {action.palm}, "
            f"{_place(action.location)}, {move}")


def segment_parts(seg: Segment, source: SignSource) -> dict[str, str]:
    """The phrases of one segment per body part (only the parts that do something)."""
    parts: dict[str, str] = {}
    if seg.right is not None:
        parts["right_hand"] = hand_phrase(seg.right, "right", source)
    if seg.left is not None:
        parts["left_hand"] = hand_phrase(seg.left, "left", source)
    if seg.mouth != "neutral":
        parts["mouth"] = _MOUTH[seg.mouth]
    face = [p for p in (_FACE.get(seg.face), _HEAD.get(seg.head)) if p]
    if face:
        parts["face"] = " and ".join(face)
    if seg.body != "none":
        parts["body"] = _BODY[seg.body]
    return parts


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def reference_rows(source: SignSource, synonyms: int = 3) -> dict[str, list[dict[str, Any]]]:
    """Tb/Tg (the whole sign), ``synonyms`` Ts variants (the same content in other orders and
    words) and one Tp row per body part per segment, as artifact-schema rows."""
    rows: dict[str, list[dict[str, Any]]] = {"Tb": [], "Tg": [], "Ts": [], "Tp": []}

    def row(sign, kind: str, variant: int, text: str, parts: list[str] | None = None) -> dict[str, Any]:
        return {"key": row_key(sign.class_id, kind, variant), "label": sign.class_id, "gloss": sign.gloss,
                "lang": "en", "kind": kind, "variant": variant, "text": text,
                "body_parts": parts if kind == "Tp" else None, "model": MODEL_NAME, "sources": [],
                "status": STATUS_OK, "error": None}

    for sign in source.signs:
        segments = [segment_parts(seg, source) for seg in source.expanded_segments(sign.gloss)]
        steps = ["; ".join(p.values()) for p in segments if p]
        whole = (" ".join(_sentence(("then " if i else "") + s) for i, s in enumerate(steps))
                 or "The sign is held still.")
        rows["Tb"].append(row(sign, "Tb", 0, whole))
        rows["Tg"].append(row(sign, "Tg", 0, whole))
        for v in range(synonyms):
            if v == 0:  # non-manual features first
                order = [dict(sorted(p.items(), key=lambda kv: kv[0] in ("right_hand", "left_hand"))) for p in segments]
                text = " ".join(_sentence(("next, " if i else "") + ", while ".join(p.values()))
                                for i, p in enumerate(p for p in order if p))
            elif v == 1:  # as a list of what each part does
                text = " ".join(_sentence(f"{part.replace('_', ' ')}: {phrase}")
                                for p in segments for part, phrase in p.items())
            else:  # counted steps
                text = " ".join(f"Step {i}: {_sentence(s)}" for i, s in enumerate(steps, 1))
            rows["Ts"].append(row(sign, "Ts", v, text or whole))
        variant = 0
        for step, p in enumerate(segments, 1):
            for part, phrase in p.items():
                prefix = f"In step {step}, " if len(segments) > 1 else ""
                rows["Tp"].append(row(sign, "Tp", variant, _sentence(prefix + phrase), [part]))
                variant += 1
    return rows


def write_reference_run(run_dir: Path, source: SignSource | Path | str | None = None, synonyms: int = 3) -> Path:
    """Write the reference descriptions as a description run folder (Tb/Tg/Ts/Tp parquet)."""
    src = source if isinstance(source, SignSource) else load_sign_source(source) if source else load_sign_source()
    run_dir = Path(run_dir)
    for kind, kind_rows in reference_rows(src, synonyms).items():
        write_kind(run_dir, kind, kind_rows)
    return run_dir
