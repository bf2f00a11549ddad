"""The embedded local LLM for real: llama.cpp's llama-server with SmolLM2-135M, two signs through P1–P4."""

import asyncio
import json

import httpx
import pytest
from typer.testing import CliRunner

from cli.main import app
from gsp.generate import generate_descriptions
from gsp.llm.server import LocalServerError, local_llm_server, served_weights, server_command, smollm2_gguf_path
from gsp.llm.structured import response_format
from gsp.prompts import DescriptionOut, PartsOut, synonyms_model
from gsp.quality import text_problem
from gsp.schema import BODY_PARTS, KINDS, read_run
from gsp.settings import PROJECT_ROOT, Settings

pytestmark = [pytest.mark.llm, pytest.mark.slow]


def test_local_server_replicas_start_answer_and_stop(tmp_path):
    with local_llm_server(log_dir=tmp_path, replicas=2, slots=3) as server:
        assert server.model == "smollm2" and len(set(server.base_urls)) == 2
        assert server.replicas == server.base_urls[1:]
        assert server.slots == 6
        for url in server.base_urls:
            models = httpx.get(f"{url}/models", timeout=10).json()
            assert [m["id"] for m in models["data"]] == ["smollm2"]
        processes = server.processes
        assert sorted(p.name for p in tmp_path.iterdir()) == ["llama_server.1.log", "llama_server.log"]
        # each process reports the slots it was asked for, each with the context one request gets
        log_text = (tmp_path / "llama_server.log").read_text(errors="replace")
        assert "n_slots = 3" in log_text and "n_ctx_slot = 4096" in log_text, log_text[-2000:]
    assert all(p.poll() is not None for p in processes)  # all stopped on exit


def test_slots_answer_concurrent_schema_requests_together(tmp_path):
    """One 1-thread server with 4 slots takes 4 grammar-constrained requests at once: all come back
    as schema-valid JSON, and its log shows a second request launched before the first released."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}

    async def ask_all(url: str) -> list[dict]:
        async with httpx.AsyncClient(timeout=300) as client:
            bodies = [{"model": "smollm2", "max_tokens": 30, "temperature": 0.3, "seed": i,
                       "messages": [{"role": "user", "content": f"Is {i} even? Answer as JSON."}],
                       "response_format": response_format("json_object_schema", "ok", schema)} for i in range(4)]
            answers = await asyncio.gather(*(client.post(f"{url}/chat/completions", json=b) for b in bodies))
            return [a.raise_for_status().json() for a in answers]

    with local_llm_server(log_dir=tmp_path, replicas=1, slots=4) as server:
        answers = asyncio.run(ask_all(server.base_url))
    for answer in answers:
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        assert isinstance(json.loads(choice["message"]["content"])["ok"], bool), choice
    events = [line for line in (tmp_path / "llama_server.log").read_text(errors="replace").splitlines()
              if "launch_slot_" in line or "stop processing" in line]
    launched_together = next(i for i, line in enumerate(events) if "stop processing" in line)
    assert launched_together > 1, events


def test_weights_are_converted_once_and_served(tmp_path):
    """Q8_0 (the default local_weights): llama-quantize writes the copy once into the weights folder,
    the server loads that copy, and the cache identity names it, so answers of the shipped Q4_1 file
    are never replayed as the copy's."""
    weights_dir = tmp_path / "llm"
    with local_llm_server(log_dir=tmp_path, replicas=1, slots=1, weights="Q8_0", weights_dir=weights_dir) as server:
        copies = list(weights_dir.iterdir())
        assert len(copies) == 1 and copies[0].name.endswith(".Q8_0.gguf"), copies
        assert copies[0].name.startswith(smollm2_gguf_path().stem)
        assert f"loading model '{copies[0]}'" in (tmp_path / "llama_server.log").read_text(errors="replace")
        assert copies[0].name in server.identity
        converted_identity = server.identity
        answer = httpx.post(f"{server.base_url}/chat/completions", timeout=120, json={
            "model": "smollm2", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "Say hello."}]}).raise_for_status().json()
        assert answer["choices"][0]["message"]["content"].strip()
    made = copies[0].stat().st_mtime_ns
    assert served_weights(smollm2_gguf_path(), "Q8_0", weights_dir) == copies[0]
    assert copies[0].stat().st_mtime_ns == made  # reused, not converted again
    assert served_weights(smollm2_gguf_path(), "source", weights_dir) == smollm2_gguf_path()
    with local_llm_server(log_dir=tmp_path / "source", replicas=1, slots=1) as server:
        assert server.identity != converted_identity and smollm2_gguf_path().name in server.identity


def test_a_gguf_that_cannot_be_converted_is_one_named_error_and_leaves_nothing(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    weights_dir = tmp_path / "llm"
    with pytest.raises(LocalServerError, match=r"bad.gguf: llama-quantize could not convert it to Q8_0 \(.+\); "
                       "set GSP_LLM_LOCAL_WEIGHTS=source"):
        served_weights(bad, "Q8_0", weights_dir)
    assert list(weights_dir.iterdir()) == []  # no half-written copy, no temp file
    with pytest.raises(LocalServerError, match="unknown weight type 'Q3'"):
        served_weights(bad, "Q3", weights_dir)


def test_missing_model_file_is_one_named_error(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(LocalServerError, match="nope.gguf: GGUF model file not found"):
        with local_llm_server(model_path=missing):
            pass
    command = server_command(missing, 8080, ctx=1024, threads=1, slots=2)
    assert command[command.index("--parallel") + 1] == "2"
    assert command[command.index("--ctx-size") + 1] == "2048"  # shared by the slots: 1024 each


def test_two_signs_p1_to_p4_with_smollm2(tmp_path, monkeypatch):
    monkeypatch.delenv("GSP_LLM_BASE_URL", raising=False)
    # the embedded model's 200-token answers keep the test to about a minute; the grammar keeps them schema-valid
    settings = Settings(paths={"artifacts_dir": tmp_path / "artifacts"},
                        llm={"local_servers": 2, "local_slots": 2})
    run = generate_descriptions(PROJECT_ROOT / "knowledge_base" / "demo_vocab.csv", settings=settings,
                                use_index=False, limit=2)
    m = run.manifest
    assert m["local_server"] is True and m["model"] == "smollm2" and m["structured_output"] == "json_object_schema"
    assert m["endpoint"].startswith("http://127.0.0.1:")
    assert m["servers"] == 2
    assert [p.name.endswith(".Q8_0.gguf") for p in (settings.paths.cache / "llm").iterdir()] == [True]
    logs = settings.paths.cache / "logs"
    for name in ("llama_server.log", "llama_server.1.log"):  # both replicas answered requests
        assert "total time" in (logs / name).read_text(errors="replace"), name
    assert m["sampling"] == {"frequency_penalty": settings.llm.local_frequency_penalty}
    frames = read_run(run.run_dir, ok_only=False)
    for kind in KINDS:
        assert frames[kind]["label"].nunique() == 2, kind
    # P1 and P2 are asked for every sign; the embedded model gets no re-asks (local_repair_attempts)
    assert m["requests"] >= 4 and m["tokens"]["completion"] > 0
    assert m["repair_attempts"] == settings.llm.local_repair_attempts == 0
    assert all(u["repairs"] == 0 for u in m["usage"].values()), m["usage"]
    # whatever the 135M model says, what is marked ok obeys the schema
    ok = {k: f[f["status"] == "ok"] for k, f in frames.items()}
    for text in list(ok["Tb"]["text"]) + list(ok["Tg"]["text"]):
        DescriptionOut(description=text)
    for _label, group in ok["Ts"].groupby("label"):
        synonyms_model(settings.llm.synonyms)(variants=list(group.sort_values("variant")["text"]))
    for parts in ok["Tp"]["body_parts"]:
        assert 1 <= len(parts) and set(parts) <= set(BODY_PARTS)
    if len(ok["Tp"]):
        PartsOut(parts=[{"text": t, "body_parts": list(b)} for t, b in zip(ok["Tp"]["text"], ok["Tp"]["body_parts"])])
    # ... and passes the quality check; the rest (most of a 135M model's answers) failed with a reason
    for kind, frame in frames.items():
        for text, status, error in zip(frame["text"], frame["status"], frame["error"]):
            if status == "ok":
                assert text_problem(text, kind) is None, (kind, text)
            else:
                assert error, kind

    # A second run hits the response cache although the local server listens on a new port.
    again = generate_descriptions(PROJECT_ROOT / "knowledge_base" / "demo_vocab.csv", settings=settings,
                                  use_index=False, limit=2)
    assert again.manifest["requests"] == 0, again.manifest["usage"]
    again_frames = read_run(again.run_dir, ok_only=False)
    for kind in KINDS:
        cols = ["key", "text", "status", "request_hash"]
        assert again_frames[kind][cols].equals(frames[kind][cols]), kind


def test_llm_serve_with_a_missing_model_is_one_line_exit_2(tmp_path):
    result = CliRunner().invoke(app, ["llm", "serve", "--model", str(tmp_path / "nope.gguf"), "--parallel", "2"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"error: --model {tmp_path / 'nope.gguf'}: GGUF model file not found"], lines


def test_llm_serve_with_an_unknown_weight_type_is_one_line_exit_2():
    result = CliRunner().invoke(app, ["llm", "serve", "--weights", "Q3"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["error: --weights Q3: choose one of source, Q8_0, BF16, F16, Q4_0"], lines
