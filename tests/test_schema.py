"""The description-artifact schema: keys, validation, atomic writes, fingerprints."""

import math

import pandas as pd
import pytest

from gsp.schema import (
    COLUMNS,
    KINDS,
    SchemaError,
    content_fingerprint,
    read_kind,
    row_key,
    rows_to_table,
    validate_rows,
    write_kind,
)


def _row(label, kind, variant=0, text="t", **extra):
    row = {c: None for c in COLUMNS}
    row.update(key=row_key(label, kind, variant), label=label, gloss=f"g{label}", lang="tr", kind=kind,
               variant=variant, text=text, status="ok", prompt_tokens=1, completion_tokens=1)
    row.update(extra)
    return row


def test_row_keys_are_stable_and_sortable():
    assert row_key(7, "Ts", 2) == row_key(7, "Ts", 2)
    assert sorted([row_key(10, "Tb"), row_key(9, "Tb")]) == [row_key(9, "Tb"), row_key(10, "Tb")]
    with pytest.raises(ValueError):
        row_key(1, "Tx")


def test_write_sorts_rows_and_fills_missing_lists(tmp_path):
    rows = [_row(3, "Tb"), _row(1, "Tb")]  # sources/body_parts left as None
    write_kind(tmp_path, "Tb", rows)
    df = read_kind(tmp_path, "Tb")
    assert list(df["label"]) == [1, 3]
    assert all(len(v) == 0 for v in df["sources"])


def test_plain_rows_become_the_table_a_data_frame_becomes():
    """Rows of plain values go straight to arrow; the result must be what the DataFrame path makes."""
    rows = [_row(5, "Tp", 1, body_parts=["left_hand", "face"],
                 sources=[{"chunk_id": "c1", "file": "d.pdf", "page": 3}]),
            _row(5, "Tp", 0, text=None, status="failed", error="HTTP 500", temperature=0.2, body_parts=None),
            _row(2, "Tp", 0, text="çay 茶", review="edited", review_note="n", original_text="o"),
            {k: v for k, v in _row(9, "Tp").items() if k not in ("reviewer", "contrast_with")}]  # keys missing
    plain = rows_to_table(rows)
    assert plain.equals(rows_to_table(pd.DataFrame(rows, columns=list(COLUMNS))))
    assert plain.column("key").to_pylist() == sorted(r["key"] for r in rows)
    # a value only pandas' conversion takes (NaN where a text is missing) goes the DataFrame way
    odd = [*rows[:2], {**rows[2], "text": math.nan}]
    assert rows_to_table(odd).column("text").to_pylist()[0] is None
    nan_temperature = [{**rows[0], "temperature": math.nan}]
    assert rows_to_table(nan_temperature).equals(rows_to_table(pd.DataFrame(nan_temperature, columns=list(COLUMNS))))
    assert rows_to_table(nan_temperature).column("temperature").to_pylist() == [None]

def test_validation_names_the_bad_row(tmp_path):
    with pytest.raises(SchemaError, match=r"row 1 \(key 000002:Tp:00\) has unknown body parts \['elbow'\]"):
        write_kind(tmp_path, "Tp", [_row(1, "Tp", body_parts=["face"]),
                                    _row(2, "Tp", body_parts=["left_hand", "elbow"])])
    with pytest.raises(SchemaError, match="duplicate key '000001:Tb:00'"):
        write_kind(tmp_path, "Tb", [_row(2, "Tb"), _row(1, "Tb"), _row(1, "Tb")])
    with pytest.raises(SchemaError, match="row 1 has kind 'Tg', expected 'Tb'"):
        write_kind(tmp_path, "Tb", [_row(1, "Tb"), {**_row(2, "Tb"), "kind": "Tg"}])
    with pytest.raises(SchemaError, match="row 0 has kind None"):
        write_kind(tmp_path, "Tb", [{**_row(1, "Tb"), "kind": None}])
    with pytest.raises(SchemaError, match="row 1 has status 'done'"):
        write_kind(tmp_path, "Tb", [_row(1, "Tb"), _row(2, "Tb", status="done")])
    assert not (tmp_path / "Tb.parquet").exists()  # nothing half-written


def test_a_data_frame_is_checked_by_the_same_rules():
    rows = [_row(1, "Tp", body_parts=["face"]), _row(2, "Tp", body_parts=None), _row(3, "Tp", body_parts=["knee"])]
    with pytest.raises(SchemaError, match=r"f.parquet: row 2 \(key 000003:Tp:00\) has unknown body parts \['knee'\]"):
        validate_rows(pd.DataFrame(rows), "Tp", source="f.parquet")
    validate_rows(pd.DataFrame(rows[:2]), "Tp")  # a row without parts is fine
    with pytest.raises(SchemaError, match=r"missing columns \['status'\]"):
        validate_rows(pd.DataFrame(rows).drop(columns=["status"]), "Tp")
    with pytest.raises(SchemaError, match="f.parquet: column kind holds int64, not text"):
        validate_rows(pd.DataFrame(rows).assign(kind=7), "Tp", source="f.parquet")
    with pytest.raises(SchemaError, match="row 0 has status None"):
        validate_rows(pd.DataFrame(rows).assign(status=None), "Tp")
    validate_rows(pd.DataFrame(rows[:2]).astype({"kind": "category", "status": "category"}), "Tp")
    with pytest.raises(SchemaError, match=r"f.parquet: body_parts holds list<item: int64>, not lists of body parts"):
        validate_rows(pd.DataFrame([_row(1, "Tp", body_parts=[3, 4])]), "Tp", source="f.parquet")
    validate_rows(pd.DataFrame([_row(1, "Tp", body_parts=[])]), "Tp")  # lists that are all empty


def test_fingerprint_follows_content_not_metadata(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for run, created in ((a, "2026-01-01"), (b, "2026-02-02")):
        for kind in KINDS:
            write_kind(run, kind, [_row(1, kind, created_at=created, body_parts=["body"] if kind == "Tp" else [])])
    assert content_fingerprint(a) == content_fingerprint(b)
    write_kind(b, "Tg", [_row(1, "Tg", text="changed")])
    assert content_fingerprint(a) != content_fingerprint(b)
