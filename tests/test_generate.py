"""Generation end to end against the loopback server with the real demo index: every sign gets
all four kinds or explicit failed rows, re-runs make zero requests, references are resolved for
P3 from the knowledge base, glosses without a hit are recorded, the key never leaks."""

import asyncio
import json
import logging

import pandas as pd
import pytest
from fake_openai import FakeOpenAI, Fault

from gsp.generate import (
    GenerationError,
    describe_planned,
    finalize_planned,
    generate_descriptions,
    generation_session,
    prepare_run,
)
from gsp.schema import BODY_PARTS, KINDS, read_kind, read_manifest, read_run, resolve_run_dir
from gsp.settings import PROJECT_ROOT, Settings
from gsp.vocab import load_vocabulary

DEMO_VOCAB = PROJECT_ROOT / "knowledge_base" / "demo_vocab.csv"
KEY = "sk-UNIT-TEST-SECRET-0123456789"


@pytest.fixture
def srv():
    with FakeOpenAI() as server:
        yield server


def settings_for(srv, tmp_path, **llm):
    llm = {"base_url": srv.base_url, "api_key": KEY, "model": "fake", "structured_output": "json_schema",
           "retry_initial_s": 0.02, "retry_max_s": 0.5, "timeout_s": 10.0, **llm}
    return Settings(paths={"artifacts_dir": tmp_path / "artifacts"}, llm=llm)


def test_demo_vocabulary_with_real_index(srv, tmp_path, demo_index, caplog):
    caplog.set_level(logging.DEBUG)
    vocab = tmp_path / "vocab.csv"
    # the demo signs plus one gloss the dictionary does not have
    vocab.write_text(DEMO_VOCAB.read_text(encoding="utf-8").rstrip("\n") + "\n900,zzqx,quokka_dance\n",
                     encoding="utf-8")
    settings = settings_for(srv, tmp_path)
    run = generate_descriptions(vocab, settings=settings, index_dir=demo_index, labels=[4, 900, 0, 139, 179])
    assert run.failed == 0
    frames = read_run(run.run_dir, ok_only=False)
    labels = {0, 4, 139, 179, 900}
    for kind in KINDS:
        assert set(frames[kind]["label"]) == labels, kind
        assert (frames[kind]["status"] == "ok").all()
        assert list(frames[kind]["key"]) == sorted(frames[kind]["key"])
    assert len(frames["Ts"]) == 5 * settings.llm.synonyms
    for parts in frames["Tp"]["body_parts"]:
        assert len(parts) and set(parts) <= set(BODY_PARTS)

    manifest = read_manifest(run.run_dir)
    assert [h["gloss"] for h in manifest["no_retrieval_hit"]] == ["zzqx"]
    assert manifest["index"]["manifest_id"]
    assert manifest["vocabulary"]["sha256"] == load_vocabulary(vocab).sha256
    assert manifest["endpoint"] == srv.base_url and manifest["counts"]["Tb"] == {
        "rows": 5, "ok": 5, "failed": 0, "signs": 5}
    tb = frames["Tb"].set_index("label")
    sister_sources = list(tb.loc[0, "sources"])
    assert sister_sources and all(s["file"].endswith(".pdf") and s["page"] >= 1 for s in sister_sources)
    assert len(tb.loc[900, "sources"]) == 0
    assert manifest["prompts"]["P1"]["sha"] == tb.loc[0, "prompt_sha"]

    # P3 for a compound sign ("Make the sign for MOTHER, then …") saw the MOTHER entry itself
    p3_bodies = [b for b in srv.bodies.values() if "refined, self-contained" in b["messages"][-1]["content"]]
    compound = [b for b in p3_bodies if "grandmother" in b["messages"][-1]["content"].lower()]
    assert compound and "entry: mother" in compound[0]["messages"][-1]["content"].lower()

    # the key is nowhere: artifacts, manifest, logs
    for path in run.run_dir.iterdir():
        assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in caplog.text and KEY not in json.dumps(manifest)
    assert resolve_run_dir(run.run_dir.parent) == run.run_dir

    # a second run: zero requests, the same content, a new run folder
    before = srv.request_count
    again = generate_descriptions(vocab, settings=settings, index_dir=demo_index, labels=[4, 900, 0, 139, 179])
    assert srv.request_count == before
    assert again.run_dir != run.run_dir and again.manifest["requests"] == 0
    for kind in KINDS:
        a = read_kind(run.run_dir, kind).drop(columns="created_at")
        b = read_kind(again.run_dir, kind).drop(columns="created_at")
        pd.testing.assert_frame_equal(a, b)


def test_failures_become_explicit_rows_and_other_signs_complete(srv, tmp_path):
    vocab = PROJECT_ROOT / "data" / "vocab" / "autsl.csv"
    # every answer for "hurry" is garbage, every answer for "hungry" schema-invalid; five 500s on the way
    srv.faults = [Fault("invalid_json", times=None, only_if="Sign: hurry"),
                  Fault("schema_invalid", times=None, only_if="Sign: hungry"),
                  Fault("500", times=1, total=5)]
    settings = settings_for(srv, tmp_path, repair_attempts=1)
    run = generate_descriptions(vocab, settings=settings, use_index=False, limit=4)
    frames = read_run(run.run_dir, ok_only=False)
    for kind in KINDS:
        assert set(frames[kind]["label"]) == {0, 1, 2, 3}, kind
    by = {k: f.set_index("key") for k, f in frames.items()}
    tb_hurry = by["Tb"].loc["000001:Tb:00"]
    assert tb_hurry["status"] == "failed" and "not valid JSON" in tb_hurry["error"]
    assert pd.isna(tb_hurry["text"])
    assert by["Tg"].loc["000001:Tg:00"]["error"].startswith("upstream Tb failed")
    assert by["Tp"].loc["000001:Tp:00"]["error"].startswith("upstream Tb failed")
    # Ts needs no Tb: its variants come from the label alone
    hurry_ts = frames["Ts"][frames["Ts"]["label"] == 1]
    assert (hurry_ts["status"] == "failed").sum() == 3  # all prompts of 'hurry' answer garbage
    # 'hungry': everything schema-invalid → every kind failed with the reason
    assert (frames["Tb"].set_index("label").loc[2, "status"]) == "failed"
    assert "does not match the schema" in frames["Tb"].set_index("label").loc[2, "error"]
    for label in (0, 3):
        for kind in KINDS:
            rows = frames[kind][frames[kind]["label"] == label]
            assert (rows["status"] == "ok").all(), (label, kind)
    assert run.failed == sum(len(f[f["status"] == "failed"]) for f in frames.values())
    assert {f["key"] for f in run.manifest["failures"]} == set(
        pd.concat(frames.values()).query("status == 'failed'")["key"])
    assert "failed row(s)" in run.summary()


def test_no_selection_is_an_error(srv, tmp_path):
    with pytest.raises(GenerationError, match="no signs selected"):
        generate_descriptions(DEMO_VOCAB, settings=settings_for(srv, tmp_path), use_index=False, limit=0)
    assert srv.request_count == 0


def test_missing_index_is_a_clear_error(srv, tmp_path):
    from gsp.retrieval import IndexNotFoundError

    with pytest.raises(IndexNotFoundError):
        generate_descriptions(DEMO_VOCAB, settings=settings_for(srv, tmp_path), index_dir=tmp_path / "none")
    assert srv.request_count == 0


def test_price_table_gives_cost(srv, tmp_path):
    settings = settings_for(srv, tmp_path, price_input_per_mtok=2.0, price_output_per_mtok=10.0)
    run = generate_descriptions(DEMO_VOCAB, settings=settings, use_index=False, limit=2)
    t = run.manifest["tokens"]
    assert t["prompt"] > 0
    assert run.manifest["cost"] == pytest.approx((2.0 * t["prompt"] + 10.0 * t["completion"]) / 1e6)
    frames = read_run(run.run_dir, ok_only=False)
    assert sum(int(f["prompt_tokens"].sum()) for f in frames.values()) == t["prompt"]


def test_flow_pieces_take_plain_data_and_share_one_session(srv, tmp_path):
    """What the Prefect tasks do: the plan travels as JSON, batches find the flow's session by its
    id; a batch in a process without that session (a remote worker) opens its own, and its usage
    still reaches the manifest."""
    settings = settings_for(srv, tmp_path)
    plan = json.loads(json.dumps(prepare_run(DEMO_VOCAB, settings=settings, use_index=False, limit=4).to_dict()))
    assert KEY not in json.dumps(plan)

    async def flow_like():
        async with generation_session(settings) as session:
            shared = await describe_planned(plan, plan["labels"][:2], session.id)
            elsewhere = await describe_planned(plan, plan["labels"][2:], "gen-in-another-process")
            return finalize_planned(plan, [shared, elsewhere], session), shared, elsewhere

    run, shared, elsewhere = asyncio.run(flow_like())
    assert "usage" not in shared and elsewhere["usage"]["Tb"]["requests"] == 2
    assert run.failed == 0 and run.manifest["requests"] == srv.request_count == 4 * 4
    assert run.manifest["run_id"] == plan["run_id"]
    assert sorted(read_kind(run.run_dir, "Tb")["label"]) == plan["labels"]


def test_an_endpoints_passage_budget_limits_what_the_gloss_retrieves(srv, tmp_path, demo_index):
    """The embedded model's endpoint carries local_retrieval_k (Endpoint.passages): P1 of every
    sign sees at most that many passages, and the manifest records the k that was used."""
    from gsp.generate import describe_batch, run_manifest
    from gsp.llm.client import Endpoint, LLMClient

    settings = settings_for(srv, tmp_path)
    plan = prepare_run(DEMO_VOCAB, settings=settings, index_dir=demo_index, labels=[0, 139, 179])

    def tb_sources(passages):
        async def go():
            client = LLMClient(Endpoint(srv.base_url, "fake", KEY, "json_schema", passages=passages), settings.llm)
            try:
                result = await describe_batch(plan, client, plan.entries)
                return result, run_manifest(plan, result, client, is_local=False)
            finally:
                await client.aclose()
        result, manifest = asyncio.run(go())
        return {r["label"]: len(r["sources"]) for r in result.rows["Tb"]}, manifest["retrieval_k"]

    wide, k_wide = tb_sources(None)
    narrow, k_narrow = tb_sources(1)
    assert (k_wide, k_narrow) == (settings.llm.retrieval_k, 1)
    assert max(wide.values()) > 1  # the settings' k finds several passages for these signs
    assert narrow == {label: min(n, 1) for label, n in wide.items()}


def test_writing_a_run_leaves_no_half_run_and_clears_what_a_killed_run_of_its_id_left(srv, tmp_path):
    """finalize_run writes into a hidden staging folder: a failure there (here a row the schema
    refuses) removes it, publishes nothing and names the run's file, not the staging one; a
    staging folder (or file, or link) that a killed run of the same id left is cleared, not a
    FileExistsError."""
    from gsp.generate import describe_batch, finalize_run
    from gsp.schema import SchemaError

    settings = settings_for(srv, tmp_path)
    vocab = PROJECT_ROOT / "data" / "vocab" / "autsl.csv"

    async def describe_and_write(plan, spoil):
        async with generation_session(settings) as session:
            result = await describe_batch(plan, session.client, plan.entries)
            if spoil:
                result.rows["Tg"][0]["status"] = "bogus"
            return finalize_run(plan, result, session)

    bad = prepare_run(vocab, settings=settings, use_index=False, limit=2, run_id="spoiled")
    with pytest.raises(SchemaError, match="status") as raised:
        asyncio.run(describe_and_write(bad, spoil=True))
    assert str(raised.value).startswith(f"{bad.out_root / 'spoiled' / 'Tg.parquet'}:")  # not the staging name
    assert sorted(p.name for p in bad.out_root.iterdir() if "spoiled" in p.name) == []

    good = prepare_run(vocab, settings=settings, use_index=False, limit=2, run_id="resumed")
    (good.out_root / ".resumed.partial").mkdir()
    (good.out_root / ".resumed.partial" / "Tb.parquet").write_bytes(b"half")
    run = asyncio.run(describe_and_write(good, spoil=False))
    assert run.run_dir.name == "resumed" and not (good.out_root / ".resumed.partial").exists()
    assert len(read_kind(run.run_dir, "Tb")) == 2

    # a leftover that is a file, or a link, in the staging folder's place is ours to delete too
    (good.out_root / ".filed.partial").write_bytes(b"half")
    (good.out_root / ".linked.partial").symlink_to(tmp_path)
    for run_id in ("filed", "linked"):
        plan = prepare_run(vocab, settings=settings, use_index=False, limit=2, run_id=run_id)
        run = asyncio.run(describe_and_write(plan, spoil=False))
        leftover = good.out_root / f".{run_id}.partial"
        assert run.run_dir.name == run_id and not leftover.is_symlink() and not leftover.exists()
    assert tmp_path.is_dir()  # the link's target is not ours: it stays
