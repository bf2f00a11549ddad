"""Compare two description runs (or two parquet files of one kind) row by row, for linguists.

Rows are matched by their stable ``key`` (gsp.schema.row_key), never by position, so a run that
wrote the same rows in another order shows no change. A failed row has no text: a row that failed
in one run and has text in the other counts as added or removed, and the output says it failed.
This module is the library behind ``gsp diff`` (terminal, JSON, HTML), ``gsp diff --textconv``
(what git shows for a versioned parquet), ``gsp git-setup`` and the flow's diff summary artifact.
"""

from __future__ import annotations

import difflib
import re
import subprocess
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from gsp.atomic import write_text_atomic
from gsp.errors import GspError, did_you_mean
from gsp.schema import (
    BODY_PARTS,
    COLUMNS,
    KINDS,
    MANIFEST,
    STATUS_FAILED,
    SchemaError,
    read_kind,
    read_manifest,
    resolve_run_dir,
    validate_rows,
)

Change = Literal["added", "removed", "changed", "unchanged"]
CHANGE_TYPES: tuple[Change, ...] = ("added", "removed", "changed", "unchanged")
ABSENT, FAILED, OK = "absent", "failed", "ok"
GITATTRIBUTES_LINE = "*.parquet diff=gsp"
TEXTCONV_COMMAND = "gsp diff --textconv"
#: What the diff reads of a row; a file without them is not a description parquet.
DIFF_COLUMNS = ("key", "label", "gloss", "kind", "text", "body_parts", "status")


class DiffError(GspError, ValueError):
    """What was given to compare is not two runs or two parquet files of one kind (one line)."""


# --- loading ---------------------------------------------------------------------------------

@dataclass
class Side:
    """One side of a diff: the rows of each kind it holds, and its manifest when it is a run."""

    path: Path
    frames: dict[str, pd.DataFrame]
    manifest: dict | None
    is_file: bool


def _kind_of_file(path: Path, df: pd.DataFrame) -> str | None:
    kinds = sorted(set(df["kind"].dropna()))
    if len(kinds) > 1:
        raise DiffError(f"{path}: holds rows of several kinds {kinds}; a description parquet holds one kind")
    if kinds:
        if kinds[0] not in KINDS:
            raise DiffError(f"{path}: kind {kinds[0]!r} is not one of {', '.join(KINDS)}")
        return kinds[0]
    # An empty file says nothing about its kind; its name may (Tg.parquet, or git's tmp_Tg.parquet).
    match = re.search(r"(Tb|Ts|Tg|Tp)\.parquet$", path.name)
    return match.group(1) if match else None


def read_parquet_file(path: Path) -> tuple[str | None, pd.DataFrame]:
    """A single description parquet: its kind (None for an empty file whose name does not say it)
    and its validated rows."""
    path = Path(path)
    try:
        df = pq.read_table(path).to_pandas()
    except (pa.ArrowInvalid, OSError) as exc:
        raise DiffError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
    missing = [c for c in DIFF_COLUMNS if c not in df.columns]
    if missing:
        raise DiffError(f"{path}: not a description parquet of gsp's schema (missing columns {missing}; "
                        f"a Tb/Ts/Tg/Tp.parquet of a description run has {', '.join(DIFF_COLUMNS)} and more)")
    kind = _kind_of_file(path, df)
    for col in COLUMNS:  # an older file may lack provenance columns; the diff does not need them
        if col not in df.columns:
            df[col] = None
    try:
        if len(df):
            validate_rows(df, kind or "", source=str(path))
    except SchemaError as exc:
        raise DiffError(f"not a description parquet of gsp's schema: {exc}") from None
    return kind, df


def load_side(path: Path) -> Side:
    """A run folder (or the descriptions root with LATEST), or one parquet file of one kind."""
    path = Path(path)
    if path.is_file():
        kind, df = read_parquet_file(path)
        return Side(path, {kind or "": df}, None, True)
    if not path.exists():
        raise DiffError(f"{path}: no such file or folder (give a description run folder or a .parquet file)")
    try:
        run = resolve_run_dir(path)
        frames = {kind: read_kind(run, kind) for kind in KINDS}
    except SchemaError as exc:
        raise DiffError(f"{str(exc).splitlines()[0]} (give a description run folder, the descriptions "
                        f"folder with LATEST, or a .parquet file)") from None
    manifest = read_manifest(run) if (run / MANIFEST).is_file() else None
    return Side(run, frames, manifest, False)


def align_sides(old: Side, new: Side) -> tuple[Side, Side]:
    """Two files must hold the same kind; a file against a run compares only the file's kind.
    An empty file of unknown kind takes the other side's."""
    def only(side: Side) -> str:
        return next(iter(side.frames))

    if old.is_file and new.is_file:
        a, b = only(old), only(new)
        if a and b and a != b:
            raise DiffError(f"{old.path} holds {a} rows but {new.path} holds {b} rows; "
                            f"two files must be of one kind")
        kind = a or b or "Tg"
        return _rekey(old, kind), _rekey(new, kind)
    if old.is_file or new.is_file:
        file_side, run_side = (old, new) if old.is_file else (new, old)
        kind = only(file_side) or "Tg"
        run_side = Side(run_side.path, {kind: run_side.frames[kind]}, run_side.manifest, False)
        file_side = _rekey(file_side, kind)
        return (file_side, run_side) if old.is_file else (run_side, file_side)
    return old, new


def _rekey(side: Side, kind: str) -> Side:
    return Side(side.path, {kind: next(iter(side.frames.values()))}, side.manifest, side.is_file)


# --- matching and word/character diffs --------------------------------------------------------

CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\U00020000-\U0002ffff]")
# A word keeps its combining marks (decomposed Turkish or Vietnamese letters stay one word).
WORD_TOKENS = re.compile(r"[\w\u0300-\u036f]+|\s+|[^\w\s]")


def is_cjk(text: str) -> bool:
    return bool(CJK.search(text or ""))


def tokenize(text: str, chars: bool) -> list[str]:
    """Words, runs of spaces and single punctuation marks; every character for CJK text (it has
    no spaces between words, so a word-level diff would mark the whole sentence)."""
    return list(text) if chars else WORD_TOKENS.findall(text)


Segment = tuple[str, str]  # ("equal" | "delete" | "insert", text)


def word_diff(old: str, new: str) -> tuple[list[Segment], list[Segment]]:
    """The old text as equal/delete segments and the new one as equal/insert segments; character
    level when either text is CJK, word level otherwise."""
    chars = is_cjk(old) or is_cjk(new)
    a, b = tokenize(old, chars), tokenize(new, chars)
    old_segs: list[Segment] = []
    new_segs: list[Segment] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op == "equal":
            _append(old_segs, "equal", "".join(a[i1:i2]))
            _append(new_segs, "equal", "".join(b[j1:j2]))
            continue
        _append(old_segs, "delete", "".join(a[i1:i2]))
        _append(new_segs, "insert", "".join(b[j1:j2]))
    return old_segs, new_segs


def _append(segs: list[Segment], op: str, text: str) -> None:
    if not text:
        return
    if segs and segs[-1][0] == op:
        segs[-1] = (op, segs[-1][1] + text)
    else:
        segs.append((op, text))


@dataclass(frozen=True)
class RowState:
    """One row of one side as the diff sees it: its text is None when absent or failed."""

    status: str  # ok | failed | absent
    text: str | None = None
    body_parts: tuple[str, ...] = ()
    error: str | None = None
    contrast_with: str | None = None  # a refined (P5) text: the sign it must be told apart from


def _parts(value) -> tuple[str, ...]:
    # Body parts are a set; canonical order, so a reordered list is not a change.
    parts = set(value if value is not None else [])
    return tuple(p for p in BODY_PARTS if p in parts) + tuple(sorted(parts - set(BODY_PARTS)))


def row_states(df: pd.DataFrame) -> dict[str, tuple[RowState, dict]]:
    """key → (state, identity: label, gloss, lang) for every row of one kind."""
    out = {}
    for r in df.to_dict("records"):
        failed = r["status"] == STATUS_FAILED
        state = RowState(FAILED if failed else OK, None if failed else (r["text"] or ""),
                         _parts(r["body_parts"]), r.get("error") if failed else None,
                         None if failed else r.get("contrast_with"))
        out[r["key"]] = (state, {"label": int(r["label"]), "gloss": r["gloss"] or "", "lang": r.get("lang") or ""})
    return out


def classify(old: RowState, new: RowState) -> Change:
    if old.text is None and new.text is None:
        return "unchanged"  # no text on either side (absent or failed): nothing to review
    if old.text is None:
        return "added"
    if new.text is None:
        return "removed"
    if old.text != new.text or old.body_parts != new.body_parts:
        return "changed"
    return "unchanged"


@dataclass
class RowChange:
    key: str
    label: int
    gloss: str
    lang: str
    kind: str
    change: Change
    old: RowState
    new: RowState

    @property
    def segments(self) -> tuple[list[Segment], list[Segment]]:
        """The highlighted old and new text (whole texts for added/removed rows)."""
        if self.change == "changed" or self.change == "unchanged":
            return word_diff(self.old.text or "", self.new.text or "")
        # A whole added or removed text is said by its badge; marking every word would only blur it.
        return ([("equal", self.old.text)] if self.old.text else [],
                [("equal", self.new.text)] if self.new.text else [])

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "label": self.label, "gloss": self.gloss, "kind": self.kind,
                "change": self.change, "old": self.old.text, "new": self.new.text,
                "old_body_parts": list(self.old.body_parts), "new_body_parts": list(self.new.body_parts),
                "old_status": self.old.status, "new_status": self.new.status,
                "old_contrast_with": self.old.contrast_with, "new_contrast_with": self.new.contrast_with}


def diff_kind(kind: str, old_df: pd.DataFrame, new_df: pd.DataFrame) -> list[RowChange]:
    """Every key of either side, classified, in key order."""
    old, new = row_states(old_df), row_states(new_df)
    changes = []
    for key in sorted(set(old) | set(new)):
        o, ident_o = old.get(key, (RowState(ABSENT), None))
        n, ident_n = new.get(key, (RowState(ABSENT), None))
        ident = ident_n or ident_o
        changes.append(RowChange(key, ident["label"], ident["gloss"], ident["lang"], kind, classify(o, n), o, n))
    return changes


# --- filters, summary, the whole diff --------------------------------------------------------

def fold_gloss(gloss: str) -> str:
    """Case-insensitive in Turkish too: İ/i and I/ı are one letter pair each there, so a gloss typed
    in capitals (AÇILMAK, İÇMEK) finds its lower-case spelling."""
    folded = unicodedata.normalize("NFC", gloss).casefold()
    return folded.replace("i\u0307", "i").replace("ı", "i")


@dataclass(frozen=True)
class Filters:
    kind: str | None = None
    label: int | None = None
    gloss: str | None = None
    part: str | None = None
    show_all: bool = False

    def check(self) -> None:
        if self.kind is not None and self.kind not in KINDS:
            raise DiffError(f"--kind {self.kind!r}: unknown kind{did_you_mean(self.kind, KINDS)}; "
                            f"choose one of {', '.join(KINDS)}")
        if self.part is not None and self.part not in BODY_PARTS:
            raise DiffError(f"--part {self.part!r}: unknown body part{did_you_mean(self.part, BODY_PARTS)}; "
                            f"choose one of {', '.join(BODY_PARTS)}")

    def keeps(self, c: RowChange) -> bool:
        if self.label is not None and c.label != self.label:
            return False
        if self.gloss is not None and fold_gloss(c.gloss) != fold_gloss(self.gloss):
            return False
        return self.part is None or self.part in c.old.body_parts or self.part in c.new.body_parts

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in (("kind", self.kind), ("label", self.label), ("gloss", self.gloss),
                                  ("part", self.part), ("all", self.show_all or None)) if v is not None}


@dataclass
class DiffResult:
    old: Side
    new: Side
    summary: dict[str, Any]
    rows: list[RowChange] = field(default_factory=list)  # what is shown (unchanged only with --all)

    @property
    def changes(self) -> list[RowChange]:
        return [r for r in self.rows if r.change != "unchanged"]

    def to_json(self) -> dict[str, Any]:
        return {"summary": self.summary, "changes": [r.to_json() for r in self.rows]}

    def by_sign(self) -> list[tuple[int, str, list[RowChange]]]:
        """(label, gloss, rows) per sign, in label order; rows in kind then key order."""
        signs: dict[int, list[RowChange]] = {}
        for r in self.rows:
            signs.setdefault(r.label, []).append(r)
        return [(label, rows[0].gloss, rows) for label, rows in sorted(signs.items())]


def manifest_changes(old: Side, new: Side) -> dict[str, Any]:
    """Model and prompt changes between two runs' manifests; a note when a side has none."""
    missing = [f"{s.path} is a single parquet file: it has no manifest, so prompt and model changes "
               f"are not known" if s.is_file else f"{s.path} has no {MANIFEST}: prompt and model changes are not known"
               for s in (old, new) if s.manifest is None]
    if missing:
        return {"compared": False, "notes": missing, "model": None, "prompts": []}
    mo, mn = old.manifest or {}, new.manifest or {}
    model = {"old": mo.get("model"), "new": mn.get("model"), "changed": mo.get("model") != mn.get("model")}
    po, pn = mo.get("prompts") or {}, mn.get("prompts") or {}
    prompts = []
    for name in sorted(set(po) | set(pn)):
        a, b = po.get(name) or {}, pn.get(name) or {}
        if (a.get("id"), a.get("sha")) != (b.get("id"), b.get("sha")):
            prompts.append({"prompt": name, "old": {"id": a.get("id"), "sha": a.get("sha")} if a else None,
                            "new": {"id": b.get("id"), "sha": b.get("sha")} if b else None})
    return {"compared": True, "notes": [], "model": model, "prompts": prompts,
            "old_run": mo.get("run_id"), "new_run": mn.get("run_id")}


def prompt_change_text(p: dict[str, Any]) -> str:
    """``P3: P3_refine@1 (sha 1a2b3c4d) → P3_refine@2 (sha 5e6f7a8b)``; the hash tells apart two
    edits of a prompt file that kept its id."""
    def side(v: dict | None) -> str:
        return f"{v.get('id')} (sha {str(v.get('sha'))[:8]})" if v else "—"

    return f"{p['prompt']}: {side(p['old'])} → {side(p['new'])}"


def summarize(old: Side, new: Side, rows: list[RowChange], kinds: list[str], filters: Filters) -> dict[str, Any]:
    counts = {k: dict.fromkeys(CHANGE_TYPES, 0) for k in kinds}
    for r in rows:
        counts[r.kind][r.change] += 1
    totals = {t: sum(c[t] for c in counts.values()) for t in CHANGE_TYPES}
    touched = sorted({r.label for r in rows if r.change != "unchanged"})
    failed = {"old": sum(r.old.status == FAILED for r in rows), "new": sum(r.new.status == FAILED for r in rows)}
    notes = []
    if failed["old"] or failed["new"]:
        notes.append(f"failed rows count as no text: {failed['old']} in the old run, {failed['new']} in the new "
                     f"(a row that failed on one side and has text on the other is added or removed)")
    runs = manifest_changes(old, new)
    return {"old": str(old.path), "new": str(new.path), "kinds": kinds, "filters": filters.as_dict(),
            "counts": counts, "totals": totals, "signs_touched": len(touched), "touched_labels": touched,
            "failed_rows": failed, "model": runs["model"], "prompts": runs["prompts"],
            "manifests_compared": runs["compared"], "notes": runs["notes"] + notes}


def diff_sides(old: Side, new: Side, filters: Filters = Filters()) -> DiffResult:
    filters.check()
    old, new = align_sides(old, new)
    kinds = [k for k in KINDS if k in old.frames]
    if filters.kind is not None:
        if filters.kind not in kinds:
            raise DiffError(f"--kind {filters.kind}: the files given hold {kinds[0]} rows only")
        kinds = [filters.kind]
    if filters.part is not None:
        if "Tp" not in kinds:
            raise DiffError(f"--part {filters.part}: only Tp rows name body parts, and the "
                            f"{'--kind given' if filters.kind else 'files given'} hold {kinds[0]} rows")
        kinds = ["Tp"]
    rows = [c for k in kinds for c in diff_kind(k, old.frames[k], new.frames[k]) if filters.keeps(c)]
    summary = summarize(old, new, rows, kinds, filters)
    shown = rows if filters.show_all else [r for r in rows if r.change != "unchanged"]
    shown.sort(key=lambda r: (r.label, KINDS.index(r.kind), r.key))
    return DiffResult(old, new, summary, shown)


def diff_paths(old: Path, new: Path, filters: Filters = Filters()) -> DiffResult:
    """``gsp diff A B``: load both sides (runs or parquet files) and compare them."""
    filters.check()
    return diff_sides(load_side(old), load_side(new), filters)


# --- markdown summary (the flow's artifact) ---------------------------------------------------

def _md_cell(text: str | None, limit: int = 160) -> str:
    if text is None:
        return "—"
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    # Texts are LLM output: no markup of theirs may reach the rendered page.
    for ch, esc in (("\\", "\\\\"), ("|", "\\|"), ("<", "&lt;"), (">", "&gt;"), ("`", "\\`"),
                    ("*", "\\*"), ("_", "\\_"), ("[", "\\["), ("]", "\\]")):
        text = text.replace(ch, esc)
    return text


def summary_markdown(result: DiffResult, first: int = 10) -> str:
    s = result.summary
    lines = [f"### Description changes: `{_md_cell(s['old'])}` → `{_md_cell(s['new'])}`", "",
             "| kind | added | removed | changed | unchanged |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {k} | " + " | ".join(str(s["counts"][k][t]) for t in CHANGE_TYPES) + " |" for k in s["kinds"]]
    lines += ["", f"**{s['signs_touched']}** sign(s) touched."]
    if s["model"] and s["model"]["changed"]:
        lines.append(f"Model: `{_md_cell(s['model']['old'])}` → `{_md_cell(s['model']['new'])}`.")
    lines += [f"Prompt changed: {_md_cell(prompt_change_text(p))}." for p in s["prompts"]]
    lines += [f"_{_md_cell(n, 400)}_" for n in s["notes"]]
    changes = result.changes
    if changes:
        lines += ["", f"First {min(first, len(changes))} of {len(changes)} change(s):", "",
                  "| key | gloss | change | old | new |", "|---|---|---|---|---|"]
        lines += [f"| `{c.key}` | {_md_cell(c.gloss)} | {c.change} | {_md_cell(_shown_text(c.old))} | "
                  f"{_md_cell(_shown_text(c.new))} |" for c in changes[:first]]
    else:
        lines += ["", "No description changed."]
    return "\n".join(lines) + "\n"


def _shown_text(state: RowState) -> str | None:
    if state.status == FAILED:
        return f"(failed: {state.error or 'no text'})"
    return state.text


def diff_summary_markdown(old_run: Path, new_run: Path, first: int = 10) -> str:
    """Counts per kind and change type and the first ``first`` changes of ``new_run`` against
    ``old_run``, as markdown (the generation flow publishes it as an artifact)."""
    return summary_markdown(diff_paths(Path(old_run), Path(new_run)), first=first)


# --- git textconv and setup -------------------------------------------------------------------

def _one_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


def textconv_lines(path: Path) -> list[str]:
    """One line per row, sorted by key: ``key  gloss  [body parts]  text`` (a failed row shows its
    error instead of a text). Nothing that changes between identical runs (times, hashes) is in it,
    so git shows only what a reader would call a change."""
    _, df = read_parquet_file(Path(path))
    lines = []
    for r in sorted(df.to_dict("records"), key=lambda r: r["key"]):
        parts = _parts(r["body_parts"])
        head = f"{r['key']}  {_one_line(r['gloss'] or '')}" + (f"  [{', '.join(parts)}]" if parts else "")
        body = (f"FAILED: {_one_line(r.get('error') or 'no text')}" if r["status"] == STATUS_FAILED
                else _one_line(r["text"] or ""))
        lines.append(f"{head}  {body}")
    return lines


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise DiffError("git: not found on PATH (gsp git-setup configures a git repository)") from None


def _is_our_textconv(value: str) -> bool:
    words = value.split()
    return len(words) == 3 and Path(words[0]).name == "gsp" and words[1:] == ["diff", "--textconv"]


def _parquet_diff_lines(text: str) -> list[str]:
    """.gitattributes lines that set a diff driver for *.parquet."""
    return [ln.strip() for ln in text.splitlines()
            if ln.split()[:1] == ["*.parquet"] and any(a == "diff" or a.startswith(("diff=", "-diff", "!diff"))
                                                         for a in ln.split()[1:])]


def git_setup(repo: Path) -> str:
    """Make ``git diff`` show description parquet files as text in ``repo``: the line
    ``*.parquet diff=gsp`` in its top-level .gitattributes and ``diff.gsp.textconv`` in its local
    config. Idempotent; refuses (DiffError, nothing written) rather than overwrite another setting.
    Returns one line saying what it did."""
    repo = Path(repo)
    top = _git(repo, "rev-parse", "--show-toplevel")
    if not repo.is_dir() or top.returncode != 0 or not top.stdout.strip():
        raise DiffError(f"{repo}: not inside a git work tree (give the folder of a git repository)")
    root = Path(top.stdout.strip())
    attributes = root / ".gitattributes"
    text = attributes.read_text(encoding="utf-8") if attributes.is_file() else ""
    others = [ln for ln in _parquet_diff_lines(text) if ln.split() != GITATTRIBUTES_LINE.split()]
    if others:
        raise DiffError(f"{attributes}: already sets a diff driver for *.parquet ({others[0]!r}); "
                        f"left as it is (the line gsp needs is {GITATTRIBUTES_LINE!r})")
    current = _git(root, "config", "--local", "--get", "diff.gsp.textconv").stdout.strip()
    if current and not _is_our_textconv(current):
        raise DiffError(f"{root}: git config diff.gsp.textconv is already {current!r}; left as it is "
                        f"(gsp needs {TEXTCONV_COMMAND!r})")
    done = []
    if not _parquet_diff_lines(text):
        write_text_atomic(attributes, text + ("" if not text or text.endswith("\n") else "\n")
                          + GITATTRIBUTES_LINE + "\n")
        done.append(f"added '{GITATTRIBUTES_LINE}' to {attributes}")
    if not current:
        setting = _git(root, "config", "--local", "diff.gsp.textconv", TEXTCONV_COMMAND)
        if setting.returncode != 0:
            raise DiffError(f"{root}: git config failed: {setting.stderr.strip().splitlines()[0]}")
        done.append(f"set diff.gsp.textconv to '{TEXTCONV_COMMAND}'")
    if not done:
        return f"{root}: already set up for gsp diffs; nothing changed"
    return f"{root}: " + " and ".join(done)
