"""The description-artifact schema: the one home of the Tb/Ts/Tg/Tp parquet layout.

A description run is a folder ``artifacts/descriptions/<run_id>/`` holding ``Tb.parquet``,
``Ts.parquet``, ``Tg.parquet``, ``Tp.parquet`` and ``manifest.json``. Every row carries a stable
``key`` (same sign, kind and ordinal → same key in every run) so linguists can diff runs, and the
provenance of the text (prompt, model, sources, request hash, tokens). The generator writes these
files, the trainer and the review tools read them; both import this module.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, get_args

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gsp.atomic import atomic_path
from gsp.errors import GspError

Kind = Literal["Tb", "Ts", "Tg", "Tp"]
KINDS: tuple[Kind, ...] = get_args(Kind)
#: The five body parts, in the order of the skeleton's contiguous keypoint groups.
BodyPart = Literal["body", "left_hand", "right_hand", "mouth", "face"]
BODY_PARTS: tuple[BodyPart, ...] = get_args(BodyPart)
STATUS_OK = "ok"
STATUS_FAILED = "failed"
MANIFEST = "manifest.json"
LATEST_POINTER = "LATEST"

SOURCE_TYPE = pa.struct([("chunk_id", pa.string()), ("file", pa.string()), ("page", pa.int32())])

DESCRIPTION_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("label", pa.int64()),
        ("gloss", pa.string()),
        ("lang", pa.string()),
        ("kind", pa.string()),
        ("variant", pa.int32()),
        ("text", pa.string()),
        ("body_parts", pa.list_(pa.string())),
        ("prompt_id", pa.string()),
        ("prompt_sha", pa.string()),
        ("model", pa.string()),
        ("temperature", pa.float64()),
        ("sources", pa.list_(SOURCE_TYPE)),
        ("request_hash", pa.string()),
        ("response_id", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("created_at", pa.string()),
        # Review provenance (nullable; runs written before review existed lack them and read as
        # null): "approved" / "edited" rows were kept from a reviewed run without an LLM call,
        # "regenerated" rows were asked again with the reviewer's note; original_text is the LLM's
        # text of an edited row (what the rows that depend on it were generated from).
        ("review", pa.string()),
        ("review_note", pa.string()),
        ("reviewer", pa.string()),
        ("original_text", pa.string()),
        # Confusion-driven refinement (P5; nullable, absent from older runs): the sign this row's
        # text was rewritten to be told apart from, as "label:gloss" (its Tg and the Tp split from it).
        ("contrast_with", pa.string()),
    ]
)
COLUMNS = tuple(DESCRIPTION_SCHEMA.names)
REVIEW_COLUMNS = ("review", "review_note", "reviewer", "original_text")
#: Columns a run written before they existed lacks; read as None.
OPTIONAL_COLUMNS = (*REVIEW_COLUMNS, "contrast_with")
REQUIRED_COLUMNS = tuple(c for c in COLUMNS if c not in OPTIONAL_COLUMNS)
REVIEW_KEPT = ("approved", "edited")
REVIEW_REGENERATED = "regenerated"


def row_key(label: int, kind: str, variant: int = 0) -> str:
    """Stable row key: the same sign/kind/ordinal gives the same key in every run.

    ``variant`` is the synonym index for Ts, the part ordinal for Tp and 0 for Tb/Tg.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    return f"{int(label):06d}:{kind}:{int(variant):02d}"


class SchemaError(GspError, ValueError):
    """A description run breaks the artifact contract; the message names the file and row."""


def validate_table(table: pa.Table, kind: str, source: str = "<rows>") -> None:
    """Raise SchemaError naming ``source`` and the row/field that breaks the contract. Checked on
    the arrow columns, so that writing a run needs no DataFrame (converting one was a third of
    writing a run; bench/generate.py)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise SchemaError(f"{source}: missing columns {missing}")
    _check_values(table, kind, source)


#: The columns whose values the contract checks (the others only have to exist).
_CHECKED_COLUMNS = ("key", "kind", "status", "body_parts")


def _check_values(table: pa.Table, kind: str, source: str) -> None:
    kinds = _text_column(table, "kind", source)
    bad = _first_true(pc.invert(pc.fill_null(pc.equal(kinds, pa.scalar(kind, kinds.type)), False)))
    if bad is not None:
        raise SchemaError(f"{source}: row {bad} has kind {kinds[bad].as_py()!r}, expected {kind!r}")
    statuses = _text_column(table, "status", source)
    bad = _first_true(pc.invert(pc.is_in(statuses, value_set=pa.array([STATUS_OK, STATUS_FAILED],
                                                                        statuses.type))))
    if bad is not None:
        raise SchemaError(f"{source}: row {bad} has status {statuses[bad].as_py()!r}")
    keys = table.column("key")
    if len(pc.unique(keys)) < len(keys):
        seen: set = set()
        dup = next(k for k in keys.to_pylist() if k in seen or seen.add(k))
        raise SchemaError(f"{source}: duplicate key {dup!r}")
    if kind == "Tp":
        _check_body_parts(table, source)


def _check_body_parts(table: pa.Table, source: str) -> None:
    parts = table.column("body_parts").combine_chunks()
    if pa.types.is_null(parts.type):  # every row without parts
        return
    if not pa.types.is_list(parts.type) or not (pa.types.is_string(parts.type.value_type)
                                                or pa.types.is_null(parts.type.value_type)):
        raise SchemaError(f"{source}: body_parts holds {parts.type}, not lists of body parts")
    flat = pc.list_flatten(parts).cast(pa.string())
    bad = _first_true(pc.invert(pc.is_in(flat, value_set=pa.array(BODY_PARTS, flat.type))))
    if bad is not None:
        row = pc.list_parent_indices(parts)[bad].as_py()
        unknown = set(parts[row].as_py()) - set(BODY_PARTS)
        raise SchemaError(f"{source}: row {row} (key {table.column('key')[row].as_py()}) "
                          f"has unknown body parts {sorted(unknown, key=str)}")


def _text_column(table: pa.Table, name: str, source: str) -> pa.ChunkedArray:
    """Column ``name`` as plain strings (from a category or all-null column too), or SchemaError."""
    values = table.column(name)
    if pa.types.is_dictionary(values.type):
        values = values.cast(values.type.value_type)
    if pa.types.is_null(values.type):
        values = values.cast(pa.string())
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        raise SchemaError(f"{source}: column {name} holds {values.type}, not text")
    return values


def _first_true(mask: pa.Array | pa.ChunkedArray) -> int | None:
    """The position of the first true value of ``mask``, or None."""
    at = pc.index(mask, True).as_py()
    return None if at < 0 else at


def validate_rows(df: pd.DataFrame, kind: str, source: str = "<rows>") -> None:
    """:func:`validate_table` for a DataFrame (row numbers are positions, as in its parquet file)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise SchemaError(f"{source}: missing columns {missing}")
    try:
        table = pa.Table.from_pandas(df[list(_CHECKED_COLUMNS)], preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise SchemaError(f"{source}: {str(exc).splitlines()[0]}") from None
    _check_values(table, kind, source)


def sort_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Deterministic row order (by key) so two runs diff line by line."""
    return df.sort_values("key", kind="stable").reset_index(drop=True)


def rows_to_table(rows: Iterable[dict] | pd.DataFrame) -> pa.Table:
    """The rows as a table of :data:`DESCRIPTION_SCHEMA`, sorted by key (:func:`sort_rows`)."""
    if not isinstance(rows, pd.DataFrame):
        rows = list(rows)
        try:
            return _plain_rows_to_table(rows)
        except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError, TypeError):  # values only pandas takes (NaN, no key)
            rows = pd.DataFrame(rows, columns=list(COLUMNS))
    return _frame_to_table(rows)


def _plain_rows_to_table(rows: list[dict]) -> pa.Table:
    # Straight to arrow, the dicts read by arrow's C++ converter: the generator's rows are plain
    # Python values, and the detour through a DataFrame was two thirds of writing a run (28 of 45
    # ms at 3,500 rows; bench/generate.py). A missing field is null; NaN is null as pandas has it.
    rows = sorted(rows, key=lambda r: r["key"])  # stable, as sort_rows
    table = pa.Table.from_struct_array(pa.array(rows, type=_ROW_TYPE, from_pandas=True))
    for col in ("body_parts", "sources"):  # a missing list is an empty list, as in _frame_to_table
        values = table.column(col)
        if values.null_count:
            empty = pa.scalar([], type=values.type)
            table = table.set_column(table.schema.get_field_index(col), col,
                                     pc.if_else(pc.is_null(values), empty, values))
    return table


_ROW_TYPE = pa.struct(list(DESCRIPTION_SCHEMA))


def _frame_to_table(df: pd.DataFrame) -> pa.Table:
    df = df.copy()
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = None
    # List columns: a missing value is an empty list (pyarrow cannot infer a list type from all-None).
    for col in ("body_parts", "sources"):
        df[col] = [v if v is not None else [] for v in df[col]]
    df = sort_rows(df[list(COLUMNS)])
    return pa.Table.from_pandas(df, schema=DESCRIPTION_SCHEMA, preserve_index=False)


def write_kind(run_dir: Path, kind: str, rows: Iterable[dict] | pd.DataFrame, *,
               staged_for: Path | None = None) -> Path:
    """Validate and write ``<run_dir>/<kind>.parquet``: atomically, or straight into ``run_dir``
    when it is a staging folder that :func:`gsp.atomic.publish_staged_folder` publishes as
    ``staged_for`` (the run folder an error names: the staging folder's hidden name is gone by the
    time anyone looks)."""
    table = rows_to_table(rows)
    validate_table(table, kind, source=f"{staged_for or run_dir}/{kind}.parquet")
    target = Path(run_dir) / f"{kind}.parquet"
    if staged_for is not None:
        pq.write_table(table, target)
        return target
    with atomic_path(target, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)
    return target


def read_kind(run_dir: Path, kind: str, ok_only: bool = False) -> pd.DataFrame:
    path = Path(run_dir) / f"{kind}.parquet"
    if not path.is_file():
        raise SchemaError(f"{path}: missing (a description run needs {', '.join(k + '.parquet' for k in KINDS)})")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise SchemaError(f"{path}: not a readable parquet file: {exc}") from exc
    validate_table(table, kind, source=str(path))
    df = table.to_pandas()
    for col in OPTIONAL_COLUMNS:  # missing in a run from before they existed; None, never NaN
        df[col] = df[col].astype(object).where(df[col].notna(), None) if col in df.columns else None
    if ok_only:
        df = df[df["status"] == STATUS_OK].reset_index(drop=True)
    return df


def read_run(run_dir: Path, ok_only: bool = True) -> dict[str, pd.DataFrame]:
    """All four kinds of one description run, keyed by kind."""
    return {kind: read_kind(run_dir, kind, ok_only=ok_only) for kind in KINDS}


def read_manifest(run_dir: Path) -> dict:
    path = Path(run_dir) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SchemaError(f"{path}: {exc}") from exc


def resolve_run_dir(path: Path) -> Path:
    """Accept a run folder or the descriptions root (then follow its LATEST pointer)."""
    path = Path(path)
    if (path / "Tg.parquet").is_file():
        return path
    pointer = path / LATEST_POINTER
    if pointer.is_file():
        return path / pointer.read_text(encoding="utf-8").strip()
    raise SchemaError(f"{path}: neither a description run nor a folder with a {LATEST_POINTER} pointer")


def content_fingerprint(run_dir: Path) -> str:
    """A hash of what a description run says (keys, texts, body parts, statuses, after its review), not of when or
    how it was made: two runs that produced the same descriptions (e.g. a fully cached re-run)
    have the same fingerprint, so downstream work keyed on it (training folders) is reused."""
    import hashlib

    h = hashlib.sha256()
    # what training reads: with the run's review applied (a review changes the fingerprint)
    frames = read_reviewed_run(Path(run_dir), ok_only=False)
    for kind in KINDS:
        df = frames[kind]
        for key, text, parts, status in zip(df["key"], df["text"], df["body_parts"], df["status"]):
            parts_txt = ",".join(parts) if parts is not None else ""
            h.update(f"{key}\x1f{text}\x1f{parts_txt}\x1f{status}\x1e".encode())
    return h.hexdigest()


# --- review decisions (written by gsp.review, honoured by generation and training) ----------

REVIEW_FILE = "review.json"
DECISIONS = ("approve", "reject", "edit")


def read_review(run_dir: Path) -> dict[str, dict]:
    """The review decisions stored with a run (``review.json``, see :mod:`gsp.review`), by row
    key: ``{"decision", "edited_text", "reviewer", "note"}``; empty when the run was not reviewed."""
    path = Path(run_dir) / REVIEW_FILE
    if not path.is_file():
        return {}
    try:
        decisions = json.loads(path.read_text(encoding="utf-8"))["decisions"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SchemaError(f"{path}: not a review file written by `gsp review apply`: {exc}") from exc
    bad = [k for k, d in decisions.items() if not isinstance(d, dict) or d.get("decision") not in DECISIONS
           or (d["decision"] == "edit" and not d.get("edited_text"))]
    if bad:
        raise SchemaError(f"{path}: key {bad[0]!r} has no valid decision (one of {', '.join(DECISIONS)}; "
                          "edit with edited_text)")
    return decisions


def apply_review(frames: dict[str, pd.DataFrame], decisions: dict[str, dict]) -> dict[str, pd.DataFrame]:
    """A run's rows as its review leaves them: rejected rows dropped, edited rows with the
    reviewer's text (the LLM's kept in ``original_text``), approved and edited rows marked in
    ``review``; rows without a decision unchanged. The one place review decisions reach rows:
    generation keeps what this returns as reviewed, training encodes what it returns."""
    out = {}
    for kind, df in frames.items():
        df = df.copy()
        for col in REVIEW_COLUMNS:
            if col not in df.columns:
                df[col] = None
        df[list(REVIEW_COLUMNS)] = df[list(REVIEW_COLUMNS)].astype(object)
        keep = []
        for i, key in zip(df.index, df["key"]):
            d = decisions.get(key)
            keep.append(d is None or d["decision"] != "reject")
            if d is None or d["decision"] == "reject":
                continue
            if d["decision"] == "edit":
                if df.at[i, "original_text"] is None or pd.isna(df.at[i, "original_text"]):
                    df.at[i, "original_text"] = df.at[i, "text"]
                df.at[i, "text"] = d["edited_text"]
            df.at[i, "review"] = "edited" if d["decision"] == "edit" else "approved"
            df.at[i, "reviewer"] = d.get("reviewer") or None
            df.at[i, "review_note"] = d.get("note") or None
        out[kind] = df[keep].reset_index(drop=True)
    return out


def read_reviewed_run(run_dir: Path, ok_only: bool = True) -> dict[str, pd.DataFrame]:
    """:func:`read_run` with the run's review decisions applied (:func:`apply_review`)."""
    return apply_review(read_run(run_dir, ok_only=ok_only), read_review(run_dir))
