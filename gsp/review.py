"""Linguist review of a description run: a CSV to read and decide in a spreadsheet, and the
decisions stored back with the run.

``export_review`` writes one line per description (ok rows) with empty ``decision``,
``edited_text``, ``reviewer`` and ``note`` columns (pre-filled from the run's earlier review, if
any). ``apply_review_file`` checks the whole file first and stores nothing unless every line is
valid; then it writes ``<run>/review.json`` (the parquet files are never touched). What the
decisions do to rows is :func:`gsp.schema.apply_review`, used by generation and training alike.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from gsp.atomic import check_replaceable, sha256_file, write_bytes_atomic, write_json_atomic
from gsp.errors import GspError, did_you_mean
from gsp.schema import DECISIONS, KINDS, REVIEW_FILE, read_review, read_run, resolve_run_dir

EXPORT_COLUMNS = ("key", "label", "gloss", "kind", "body_parts", "text", "contrast_with", "review",
                  "decision", "edited_text", "reviewer", "note")
#: What `apply` needs of a file; the other columns are there for the reader and are ignored.
REQUIRED_COLUMNS = ("key", "decision", "edited_text", "reviewer", "note")
FIELDS = ("decision", "edited_text", "reviewer", "note")


class ReviewFileError(GspError, ValueError):
    """A review file has errors; the message has one line per error, each naming file and line."""


@dataclass
class ApplySummary:
    run_dir: Path
    counts: Counter = field(default_factory=Counter)
    unreviewed: int = 0
    replaced: bool = False
    changed: int = 0

    def lines(self) -> list[str]:
        c = self.counts
        out = [f"review of {self.run_dir}: {c['approve']} approved, {c['edit']} edited, {c['reject']} rejected, "
               f"{self.unreviewed} not reviewed → {self.run_dir / REVIEW_FILE}"]
        if self.replaced:
            out.append(f"replaced the earlier review: {self.changed} decision(s) changed")
        if c["reject"]:
            out.append("the next `gsp generate` into this run's folder (or with --base) asks the rejected rows "
                       "again with their notes; training leaves them out now")
        return out


def _ordered(frames: dict) -> list[dict]:
    """Rows sign by sign, each sign's kinds in P1–P4 order, so a reviewer reads a sign at once."""
    rows = [r for kind in KINDS for r in frames[kind].to_dict("records")]
    return sorted(rows, key=lambda r: (int(r["label"]), KINDS.index(r["kind"]), int(r["variant"])))


#: What a spreadsheet reads as the start of a formula (OWASP "CSV injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def inert_cell(value: str | None) -> str:
    """A read-only cell (an LLM's text, a gloss) that a spreadsheet shows and never evaluates: a
    text starting like a formula gets a leading apostrophe. Only for columns apply never reads."""
    value = value or ""
    return "'" + value if value.startswith(_FORMULA_START) else value


def export_review(run: Path | str, out: Path | str, force: bool = False) -> tuple[Path, int]:
    """Write the review CSV of ``run`` (a run folder or a descriptions folder's LATEST) to ``out``.
    An existing non-empty ``out`` is refused unless ``force``: it may hold a reviewer's work."""
    run_dir = resolve_run_dir(Path(run))
    out = Path(out)
    if not force:
        check_replaceable(out, lambda p: False, "a review file (use --force to replace it)", folder=False)
    earlier = read_review(run_dir)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(EXPORT_COLUMNS)
    rows = _ordered(read_run(run_dir, ok_only=True))
    for r in rows:
        parts = ", ".join(r["body_parts"]) if r["kind"] == "Tp" and r["body_parts"] is not None else ""
        d = earlier.get(r["key"], {})
        writer.writerow([r["key"], int(r["label"]), inert_cell(r["gloss"]), r["kind"], parts, inert_cell(r["text"]),
                         inert_cell(r.get("contrast_with")),  # a P5 text: the sign it must be told apart from
                         r.get("review") or "",
                         *(d.get(f) or "" for f in FIELDS)])
    # The BOM makes Excel read the file as UTF-8 (Turkish and Chinese glosses intact).
    write_bytes_atomic(out, ("\ufeff" + buf.getvalue()).encode("utf-8"))
    return out, len(rows)


def _decode(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise ReviewFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ReviewFileError(f"{path}: line {line}: not UTF-8 text; save the sheet as 'CSV UTF-8'") from None


def _delimiter(header_line: str) -> str:
    """Spreadsheets in many locales save CSV with ';' (or tabs); the header tells which."""
    if "," in header_line:
        return ","
    return ";" if ";" in header_line else "\t" if "\t" in header_line else ","


def read_review_csv(path: Path) -> tuple[list[tuple[int, dict[str, str]]], list[str]]:
    """(line number, row) for every non-blank data row, and the errors of the header."""
    text = _decode(path)
    if not text.strip():
        return [], [f"{path}: line 1: empty file; expected a header with {', '.join(REQUIRED_COLUMNS)}"]
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(text.splitlines()[0]))
    try:
        header = [h.strip().lower() for h in next(reader)]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            return [], [f"{path}: line 1: missing column(s) {', '.join(missing)}; "
                        f"a review file needs {', '.join(REQUIRED_COLUMNS)}"]
        rows, errors, prev = [], [], reader.line_num
        for fields in reader:
            line, prev = prev + 1, reader.line_num
            if not any(f.strip() for f in fields):
                continue
            if len(fields) > len(header):
                errors.append(f"{path}: line {line}: {len(fields)} fields but the header has {len(header)}")
                continue
            rows.append((line, dict(zip(header, fields + [""] * (len(header) - len(fields))))))
    except csv.Error as exc:
        return [], [f"{path}: line {reader.line_num}: not a readable CSV: {exc}"]
    return rows, errors


def _check_row(path: Path, line: int, row: dict[str, str], known: set[str], seen: dict[str, int]) -> str | None:
    """The error of one row, or None. A row with an error is not looked at further."""
    key, decision = row["key"].strip(), row["decision"].strip().lower()
    where = f"{path}: line {line}"
    if not key:
        return f"{where}: empty key"
    if key in seen:
        return f"{where}: key {key} appears again (first on line {seen[key]})"
    seen[key] = line
    if key not in known:
        return f"{where}: unknown key {key!r}: not a description of this run"
    if decision and decision not in DECISIONS:
        return (f"{where} (key {key}): decision {row['decision'].strip()!r} is not one of "
                f"{', '.join(DECISIONS)} (blank: not reviewed){did_you_mean(decision, DECISIONS)}")
    edited = row["edited_text"].strip()
    if decision == "edit" and not edited:
        return f"{where} (key {key}): decision edit needs the new text in edited_text"
    if edited and decision != "edit":
        return (f"{where} (key {key}): edited_text is given but decision is {decision or 'blank'!r}; "
                "set decision to edit to use it, or clear edited_text")
    return None


def validate_review(path: Path, run_dir: Path) -> dict[str, dict]:
    """Every decision of ``path`` by key, after checking every line against ``run_dir``; raises
    ReviewFileError listing every bad line (nothing is stored then)."""
    rows, errors = read_review_csv(path)
    known = {k for df in read_run(run_dir, ok_only=True).values() for k in df["key"]}
    seen: dict[str, int] = {}
    decisions: dict[str, dict] = {}
    for line, row in rows:
        problem = _check_row(path, line, row, known, seen)
        if problem:
            errors.append(problem)
            continue
        decision = row["decision"].strip().lower()
        if decision:
            decisions[row["key"].strip()] = {
                "decision": decision, "edited_text": row["edited_text"].strip() or None,
                "reviewer": row["reviewer"].strip() or None, "note": row["note"].strip() or None, "line": line}
    if errors:
        raise ReviewFileError("\n".join(errors))
    return decisions


def _changed(old: dict[str, dict], new: dict[str, dict]) -> int:
    def same(a: dict | None, b: dict | None) -> bool:
        return a is not None and b is not None and all(a.get(f) == b.get(f) for f in FIELDS)

    return sum(not same(old.get(k), new.get(k)) for k in set(old) | set(new))


def apply_review_file(run: Path | str, path: Path | str) -> ApplySummary:
    """Validate ``path`` as a whole, then store its decisions as ``<run>/review.json`` (atomically,
    replacing an earlier review of the run)."""
    run_dir = resolve_run_dir(Path(run))
    path = Path(path)
    decisions = validate_review(path, run_dir)
    earlier_exists = (run_dir / REVIEW_FILE).is_file()
    earlier = read_review(run_dir)
    known = sum(len(df) for df in read_run(run_dir, ok_only=True).values())
    write_json_atomic(run_dir / REVIEW_FILE, {
        "format_version": 1, "run_id": run_dir.name, "applied_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": str(path), "source_sha256": sha256_file(path), "decisions": dict(sorted(decisions.items()))})
    return ApplySummary(run_dir=run_dir, counts=Counter(d["decision"] for d in decisions.values()),
                        unreviewed=known - len(decisions), replaced=earlier_exists,
                        changed=_changed(earlier, decisions))
