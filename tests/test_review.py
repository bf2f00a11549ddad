"""Linguist review: `gsp review export` / `apply` on a real generated run, every review-file error
with its line, and a round trip whose next `gsp generate` asks the loopback server exactly what
the review rejected (and what depends on it), and whose training texts follow the review."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI, client_env
from toy_data import rows_by_key
from typer.testing import CliRunner

from cli.main import app
from gsp.atomic import sha256_file
from gsp.schema import KINDS, REVIEW_FILE, read_manifest, resolve_run_dir
from gsp.settings import PROJECT_ROOT
from mc.text_features import EncoderSpec, build_text_bank, text_sha256

AUTSL = PROJECT_ROOT / "data" / "vocab" / "autsl.csv"
GSP = [sys.executable, "-m", "cli.main"]
TB_NOTE = "it names the wrong handshape: the hand is a fist, not flat"
TG_NOTE = "too vague about where the movement ends"
EDITED_TG = "Both flat hands rest at the chest, palms in, then the right hand moves forward twice."


def cli_env(srv: FakeOpenAI, tmp_path: Path) -> dict[str, str]:
    return client_env(srv, tmp_path, api_key="sk-review-test")


def generate(env: dict[str, str], out: Path, *extra: str) -> Path:
    proc = subprocess.run(GSP + ["generate", "--vocab", str(AUTSL), "--labels", "0,1,2", "--no-index",
                                 "--no-prefect", "--out", str(out), *extra],
                          env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return resolve_run_dir(out)


def review(*args: str):
    return CliRunner().invoke(app, ["review", *map(str, args)])


def requests_by_sign_and_kind(srv: FakeOpenAI) -> list[tuple[str, str]]:
    """(gloss line, kind) of every request that reached the server, sorted."""
    return sorted((sign, schema.split("_")[0]) for sign, schema in srv.requests())


@pytest.fixture(scope="module")
def srv():
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def run_a(srv, tmp_path):
    env = cli_env(srv, tmp_path)
    return env, generate(env, tmp_path / "descriptions")


def write_csv(path: Path, header: list[str], rows: list[list[str]], delimiter: str = ",") -> Path:
    buf = io.StringIO()
    csv.writer(buf, delimiter=delimiter, lineterminator="\r\n").writerows([header, *rows])
    path.write_bytes(("\ufeff" + buf.getvalue()).encode("utf-8"))
    return path


HEADER = ["key", "label", "gloss", "kind", "body_parts", "text", "contrast_with", "review", "decision",
          "edited_text", "reviewer", "note"]
#: The columns of a sheet exported before contrast_with existed: such a sheet still applies.
HEADER_BEFORE_P5 = [c for c in HEADER if c != "contrast_with"]


def test_every_review_file_error_names_its_line_and_nothing_is_stored(run_a, tmp_path):
    _, run = run_a
    bad = write_csv(tmp_path / "bad.csv", HEADER_BEFORE_P5, [
        ["000000:Tb:00", "0", "abla", "Tb", "", "x", "", "approve", "", "ana", ""],      # line 2: fine
        ["000099:Tb:00", "99", "?", "Tb", "", "x", "", "approve", "", "ana", ""],        # 3: unknown key
        ["000000:Tg:00", "0", "abla", "Tg", "", "x", "", "aprove", "", "ana", ""],       # 4: bad decision
        ["000001:Tb:00", "1", "acele", "Tb", "", "x", "", "edit", "", "ana", ""],        # 5: edit, no text
        ["000000:Tb:00", "0", "abla", "Tb", "", "x", "", "reject", "", "ana", ""],       # 6: duplicate
        ["000002:Tb:00", "2", "acikmak", "Tb", "", "x", "", "approve", "new", "", ""],   # 7: text, no edit
    ])
    result = review("apply", run, bad)
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert lines == [
        f"error: {bad}: line 3: unknown key '000099:Tb:00': not a description of this run",
        f"error: {bad}: line 4 (key 000000:Tg:00): decision 'aprove' is not one of approve, reject, edit "
        "(blank: not reviewed) (did you mean 'approve'?)",
        f"error: {bad}: line 5 (key 000001:Tb:00): decision edit needs the new text in edited_text",
        f"error: {bad}: line 6: key 000000:Tb:00 appears again (first on line 2)",
        f"error: {bad}: line 7 (key 000002:Tb:00): edited_text is given but decision is 'approve'; "
        "set decision to edit to use it, or clear edited_text",
    ]
    assert "Traceback" not in result.output and not (run / REVIEW_FILE).exists()

    # a multi-line note moves the line numbers of what follows: the error names the line it starts on
    multi = write_csv(tmp_path / "multi.csv", HEADER_BEFORE_P5, [
        ["000000:Tb:00", "0", "abla", "Tb", "", "x", "", "reject", "", "ana", "first line\nsecond line"],
        ["000000:Tx:00", "0", "abla", "Tb", "", "x", "", "approve", "", "ana", ""],
    ])
    result = review("apply", run, multi)
    assert result.exit_code == 2 and f"{multi}: line 4: unknown key '000000:Tx:00'" in result.stderr

    missing = write_csv(tmp_path / "missing.csv", ["key", "decision", "note"], [["000000:Tb:00", "approve", ""]])
    result = review("apply", run, missing)
    assert result.exit_code == 2
    assert (f"error: {missing}: line 1: missing column(s) edited_text, reviewer; a review file needs key, "
            "decision, edited_text, reviewer, note") in result.stderr

    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("key,decision,edited_text,reviewer,note\n000000:Tb:00,approve,,Çelik,\n".encode("latin-1"))
    result = review("apply", run, latin1)
    assert result.exit_code == 2
    assert f"error: {latin1}: line 2: not UTF-8 text; save the sheet as 'CSV UTF-8'" in result.stderr
    assert not (run / REVIEW_FILE).exists()

    # a sheet saved with ';' (many locales) is read, and applying again says what changed
    good = write_csv(tmp_path / "good.csv", HEADER_BEFORE_P5,
                     [["000000:Tb:00", "0", "abla", "Tb", "", "x", "", "approve", "", "ana", ""]], delimiter=";")
    first = review("apply", run, good)
    assert first.exit_code == 0, first.output
    assert "1 approved, 0 edited, 0 rejected" in first.stdout and "replaced" not in first.stdout
    again = write_csv(tmp_path / "again.csv", HEADER_BEFORE_P5, [
        ["000000:Tb:00", "0", "abla", "Tb", "", "x", "", "reject", "", "ana", "wrong"],
        ["000001:Tb:00", "1", "acele", "Tb", "", "x", "", "approve", "", "ana", ""]])
    second = review("apply", run, again)
    assert second.exit_code == 0 and "replaced the earlier review: 2 decision(s) changed" in second.stdout
    stored = json.loads((run / REVIEW_FILE).read_text(encoding="utf-8"))["decisions"]
    assert {k: d["decision"] for k, d in stored.items()} == {"000000:Tb:00": "reject", "000001:Tb:00": "approve"}


def test_export_is_a_utf8_spreadsheet_file_and_never_overwrites_a_review(run_a, tmp_path):
    _, run = run_a
    out = tmp_path / "review.csv"
    result = review("export", run, "-o", out)
    assert result.exit_code == 0, result.output
    raw = out.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")
    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8-sig"))))
    expected = {k: r for k, r in rows_by_key(run).items() if r["status"] == "ok"}
    assert list(rows[0]) == HEADER and {r["key"] for r in rows} == set(expected)
    for r in rows:
        assert r["text"] == expected[r["key"]]["text"] and r["gloss"] == expected[r["key"]]["gloss"]
        assert r["decision"] == r["edited_text"] == r["reviewer"] == r["note"] == ""
        if r["kind"] == "Tp":
            assert r["body_parts"] == ", ".join(expected[r["key"]]["body_parts"])
    # sign by sign, P1–P4 order within a sign
    assert [r["kind"] for r in rows[:2]] == ["Tb", "Ts"] and rows[0]["label"] == "0"

    out.write_bytes(out.read_bytes().replace(b",,,,\r\n", b",approve,,ana,\r\n", 1))
    refused = review("export", run, "-o", out)
    assert refused.exit_code == 2 and f"{out}: is not empty" in refused.stderr
    assert ",approve,,ana," in out.read_text(encoding="utf-8-sig")


def decide(rows: list[dict], run: Path) -> dict[str, str]:
    """A linguist's pass over the sheet: sign 0's Tb rejected (Ts approved), sign 1's Tg rejected,
    sign 2's Tb and Tp approved and its Tg edited."""
    decided = {}
    for r in rows:
        label, kind = int(r["label"]), r["kind"]
        if (label, kind) == (0, "Tb"):
            r.update(decision="reject", note=TB_NOTE, reviewer="ayse")
        elif (label, kind) == (1, "Tg"):
            r.update(decision="REJECT ", note=TG_NOTE)
        elif (label, kind) == (2, "Tg"):
            r.update(decision="edit", edited_text=EDITED_TG, reviewer="ayse", note="said it more plainly")
        elif (label, kind) in {(0, "Ts"), (2, "Tb"), (2, "Tp")}:
            r.update(decision="approve", reviewer="ayse")
        decided[r["key"]] = r["decision"].strip().lower()
    return decided


def test_review_round_trip_regenerates_exactly_what_was_rejected(srv, run_a, tmp_path):
    env, run_a_dir = run_a
    before = rows_by_key(run_a_dir)
    parquet_sha = {k: sha256_file(run_a_dir / f"{k}.parquet") for k in KINDS}
    sheet = tmp_path / "review.csv"
    assert review("export", run_a_dir, "-o", sheet).exit_code == 0
    rows = list(csv.DictReader(io.StringIO(sheet.read_text(encoding="utf-8-sig"))))
    decided = decide(rows, run_a_dir)
    write_csv(sheet, HEADER, [[r[c] for c in HEADER] for r in rows])

    spec, cache = EncoderSpec(), tmp_path / "text-cache"
    bank_before = build_text_bank(run_a_dir, spec, cache)
    applied = review("apply", run_a_dir, sheet)
    assert applied.exit_code == 0, applied.output
    assert f"{len(decided) - sum(1 for d in decided.values() if d)} not reviewed" in applied.stdout
    assert "1 edited, 2 rejected" in applied.stdout

    check_training_follows_the_review(run_a_dir, before, bank_before, spec, cache)

    srv.reset()
    run_b = generate(env, tmp_path / "descriptions")
    assert run_b != run_a_dir
    assert requests_by_sign_and_kind(srv) == sorted([
        ("sister (Turkish gloss: abla)", "Tb"), ("sister (Turkish gloss: abla)", "Tg"),
        ("sister (Turkish gloss: abla)", "Tp"), ("hurry (Turkish gloss: acele)", "Tg"),
        ("hurry (Turkish gloss: acele)", "Tp")])
    asked = {}
    for record in srv.records:
        body = srv.bodies[record.body_hash]
        user = body["messages"][-1]["content"]
        asked[(body["response_format"]["json_schema"]["name"][:2], user.splitlines()[0])] = user
    assert TB_NOTE in asked[("Tb", "Sign: sister (Turkish gloss: abla)")]
    assert TG_NOTE in asked[("Tg", "Sign: hurry (Turkish gloss: acele)")]
    assert not any(TB_NOTE in u or TG_NOTE in u for (kind, _), u in asked.items() if kind == "Tp")
    check_run_b(read := rows_by_key(run_b), before)
    assert {k: sha256_file(run_a_dir / f"{k}.parquet") for k in KINDS} == parquet_sha  # the original kept
    manifest = read_manifest(run_b)
    assert manifest["review"]["base_run"] == str(run_a_dir) and manifest["review"]["regenerated"] == 1 + 1

    # --base into another folder honours the same review; the cache answers the regenerated rows
    srv.reset()
    run_c = generate(env, tmp_path / "elsewhere", "--base", str(run_a_dir))
    assert srv.records == [] and {k: r["text"] for k, r in rows_by_key(run_c).items()} == {
        k: r["text"] for k, r in read.items()}
    # and a plain re-run into the first folder (LATEST is the unreviewed run_b) keeps what the review
    # decided: kept rows stay kept, the regenerated Tb does not fall back to the rejected text
    srv.reset()
    run_d = generate(env, tmp_path / "descriptions")
    assert srv.records == [] and run_d != run_b
    again = rows_by_key(run_d)
    assert {k: (r["text"], r["review"]) for k, r in again.items()} == {
        k: (r["text"], r["review"]) for k, r in read.items()}


def check_run_b(after: dict[str, dict], before: dict[str, dict]) -> None:
    tb0, tg1, tg2 = "000000:Tb:00", "000001:Tg:00", "000002:Tg:00"
    assert after[tb0]["text"] != before[tb0]["text"]
    assert (after[tb0]["review"], after[tb0]["review_note"]) == ("regenerated", TB_NOTE)
    assert after["000000:Tg:00"]["text"] != before["000000:Tg:00"]["text"]  # depends on the rejected Tb
    assert after["000000:Tg:00"]["review"] is None
    assert after[tg1]["text"] != before[tg1]["text"] and after[tg1]["review_note"] == TG_NOTE
    assert after["000001:Tb:00"]["text"] == before["000001:Tb:00"]["text"]  # unreviewed, from the cache
    assert after["000001:Tb:00"]["review"] is None
    assert (after[tg2]["text"], after[tg2]["review"], after[tg2]["original_text"], after[tg2]["reviewer"]) == (
        EDITED_TG, "edited", before[tg2]["text"], "ayse")
    for key, row in before.items():
        label, kind = int(row["label"]), row["kind"]
        if (label, kind) in {(0, "Ts"), (2, "Tb"), (2, "Tp")}:
            assert (after[key]["text"], after[key]["review"]) == (row["text"], "approved"), key
            assert after[key]["prompt_id"] == row["prompt_id"] and after[key]["prompt_tokens"] == 0
        if label == 1 and kind == "Ts":
            assert after[key]["text"] == row["text"] and after[key]["review"] is None
    # sign 1's Tp was split again from its new Tg
    tp1_before = {k: r["text"] for k, r in before.items() if k.startswith("000001:Tp")}
    tp1_after = {k: r["text"] for k, r in after.items() if k.startswith("000001:Tp")}
    assert tp1_after and set(tp1_after.values()).isdisjoint(tp1_before.values())


def check_training_follows_the_review(run: Path, before: dict[str, dict], bank_before, spec, cache: Path) -> None:
    """The text bank of the reviewed run: no rejected row, the edited text instead of the LLM's,
    and only the edited text is encoded anew (the cache keys on the final texts)."""
    bank = build_text_bank(run, spec, cache)
    assert 1 in bank_before.tg_rows and 1 not in bank.tg_rows  # sign 1's Tg was rejected
    assert before["000001:Tg:00"]["text"] not in bank.texts
    assert EDITED_TG in bank.texts and before["000002:Tg:00"]["text"] not in bank.texts
    assert bank.texts[bank.tg_rows[2][0]] == EDITED_TG
    assert len(bank.texts) == len(bank_before.texts) - 1
    assert bank.stats.encoded == 1 and bank_before.stats.encoded == len(set(bank_before.texts))
    edited_hash = text_sha256(EDITED_TG)
    shards = b"".join(p.read_bytes() for p in (cache / "text_features" / bank.stats.encoder_id).glob("*"))
    assert edited_hash in shards


def test_rejected_synonym_and_part_are_asked_again_and_approved_parts_keep_their_keys(srv, run_a, tmp_path):
    env, run = run_a
    before = rows_by_key(run)
    tp2 = sorted(k for k in before if k.startswith("000002:Tp"))
    rows = [["000002:Ts:01", "", "", "", "", "", "", "reject", "", "", "adds a head nod"],
            [tp2[0], "", "", "", "", "", "", "reject", "", "", ""]]
    rows += [[k, "", "", "", "", "", "", "approve", "", "", ""] for k in tp2[1:]]
    assert review("apply", run, write_csv(tmp_path / "r.csv", HEADER_BEFORE_P5, rows)).exit_code == 0
    srv.reset()
    after = rows_by_key(generate(env, tmp_path / "descriptions"))
    assert requests_by_sign_and_kind(srv) == [("hungry (Turkish gloss: acikmak)", "Tp"),
                                              ("hungry (Turkish gloss: acikmak)", "Ts")]
    # the synonym: only the rejected variant changes; its note reached the request
    assert [after[f"000002:Ts:0{i}"]["text"] == before[f"000002:Ts:0{i}"]["text"] for i in range(3)] == [
        True, False, True]
    assert after["000002:Ts:01"]["review_note"] == "adds a head nod"
    # the parts: approved ones keep key and text; the new answer fills the rejected one's key and on
    for k in tp2[1:]:
        assert (after[k]["text"], after[k]["review"]) == (before[k]["text"], "approved")
    new = [k for k in after if k.startswith("000002:Tp") and after[k]["review"] == "regenerated"]
    assert tp2[0] in new and all(after[k]["text"] not in {before[t]["text"] for t in tp2} for k in new)
    assert after[tp2[0]]["review_note"] == "no reason was given; write a different answer"


EDITED_TB = "The right fist taps the chin twice, thumb up."


def test_an_edit_reaches_what_is_refined_or_split_from_it(srv, run_a, tmp_path):
    """An edited Tb's Tg is refined from the edited text, and that Tg's parts split from it; an
    edited Tg's parts are split from the edited text; Ts keeps paraphrasing the LLM's Tb; a sign
    whose every part was approved asks nothing, however its Tg changed."""
    env, run = run_a
    before = rows_by_key(run)
    tp2 = sorted(k for k in before if k.startswith("000002:Tp"))
    rows = [["000000:Tb:00", "", "", "", "", "", "", "edit", EDITED_TB, "ayse", ""],
            ["000001:Tg:00", "", "", "", "", "", "", "edit", EDITED_TG, "ayse", ""],
            ["000002:Tg:00", "", "", "", "", "", "", "reject", "", "", TG_NOTE]]
    rows += [[k, "", "", "", "", "", "", "approve", "", "", ""] for k in tp2]
    assert review("apply", run, write_csv(tmp_path / "r.csv", HEADER_BEFORE_P5, rows)).exit_code == 0
    srv.reset()
    after = rows_by_key(generate(env, tmp_path / "descriptions"))
    sister, hurry, hungry = ("sister (Turkish gloss: abla)", "hurry (Turkish gloss: acele)",
                             "hungry (Turkish gloss: acikmak)")
    assert requests_by_sign_and_kind(srv) == sorted([(sister, "Tg"), (sister, "Tp"), (hurry, "Tp"), (hungry, "Tg")])
    asked = {(srv.bodies[r.body_hash]["response_format"]["json_schema"]["name"][:2],
              srv.bodies[r.body_hash]["messages"][-1]["content"].splitlines()[0]):
             srv.bodies[r.body_hash]["messages"][-1]["content"] for r in srv.records}
    assert EDITED_TB in asked[("Tg", f"Sign: {sister}")]
    assert before["000000:Tb:00"]["text"] not in asked[("Tg", f"Sign: {sister}")]
    assert after["000000:Tg:00"]["text"] in asked[("Tp", f"Sign: {sister}")]
    assert EDITED_TG in asked[("Tp", f"Sign: {hurry}")]
    assert after["000000:Tg:00"]["text"] != before["000000:Tg:00"]["text"] and after["000000:Tg:00"]["review"] is None
    for label in (0, 1):  # new parts, split from the edited (or newly refined) text
        parts = {k: r["text"] for k, r in after.items() if k.startswith(f"00000{label}:Tp")}
        assert parts and set(parts.values()).isdisjoint(r["text"] for r in before.values())
    assert {k: after[k]["text"] for k in after if k.startswith("000000:Ts")} == {
        k: before[k]["text"] for k in before if k.startswith("000000:Ts")}
    assert {k: (after[k]["text"], after[k]["review"]) for k in after if k.startswith("000002:Tp")} == {
        k: (before[k]["text"], "approved") for k in tp2}


def test_a_run_from_before_review_is_read_exported_and_reviewed(run_a, tmp_path):
    import pyarrow.parquet as pq

    from gsp.schema import REVIEW_COLUMNS, read_reviewed_run

    _, run = run_a
    for kind in KINDS:  # as written before the review columns existed
        table = pq.read_table(run / f"{kind}.parquet")
        pq.write_table(table.drop_columns(list(REVIEW_COLUMNS)), run / f"{kind}.parquet")
    assert review("export", run, "-o", tmp_path / "old.csv").exit_code == 0
    sheet = write_csv(tmp_path / "r.csv", HEADER_BEFORE_P5,
                      [["000000:Tg:00", "", "", "", "", "", "", "edit", "new text here", "", ""]])
    assert review("apply", run, sheet).exit_code == 0
    tg = read_reviewed_run(run)["Tg"].set_index("key")
    assert tg.loc["000000:Tg:00", "text"] == "new text here" and tg.loc["000000:Tg:00", "review"] == "edited"
    assert tg.loc["000001:Tg:00", "review"] is None


def test_export_never_hands_a_spreadsheet_a_formula(tmp_path):
    """An LLM text starting with '=' would run as a formula when the sheet is opened."""
    from toy_data import toy_descriptions

    from gsp.schema import read_kind, read_reviewed_run, write_kind

    run = tmp_path / "run"
    toy_descriptions(run)
    tg = read_kind(run, "Tg")
    tg.loc[0, "text"] = '=HYPERLINK("http://example.invalid","click")'
    tg.loc[1, "text"] = "-the hand moves down"
    write_kind(run, "Tg", tg)
    assert review("export", run, "-o", tmp_path / "r.csv").exit_code == 0
    rows = list(csv.DictReader(io.StringIO((tmp_path / "r.csv").read_text(encoding="utf-8-sig"))))
    by_key = {r["key"]: r["text"] for r in rows}
    assert by_key[tg.loc[0, "key"]] == "'" + tg.loc[0, "text"]
    assert by_key[tg.loc[1, "key"]] == "'-the hand moves down"
    assert by_key[tg.loc[2, "key"]] == tg.loc[2, "text"]  # ordinary texts as they are
    # The apostrophe never reaches the run: apply reads decisions, not the text column.
    next(r for r in rows if r["key"] == tg.loc[0, "key"])["decision"] = "approve"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    (tmp_path / "r.csv").write_text(buf.getvalue(), encoding="utf-8")
    assert review("apply", run, tmp_path / "r.csv").exit_code == 0
    approved = read_reviewed_run(run)["Tg"].set_index("key").loc[tg.loc[0, "key"]]
    assert approved["review"] == "approved" and approved["text"] == tg.loc[0, "text"]
