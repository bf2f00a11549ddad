"""The embedded local LLM for real: llama.cpp's server with SmolLM2-135M, two signs through P1–P4."""

import httpx
import pytest

from gsp.generate import generate_descriptions
from gsp.llm.server import local_llm_server
from gsp.prompts import DescriptionOut, PartsOut, synonyms_model
from gsp.quality import text_problem
from gsp.schema import BODY_PARTS, KINDS, read_run
from gsp.settings import PROJECT_ROOT, Settings

pytestmark = [pytest.mark.llm, pytest.mark.slow]


def test_local_server_replicas_start_answer_and_stop(tmp_path):
    with local_llm_server(log_dir=tmp_path, replicas=2) as server:
        assert server.model == "smollm2" and len(set(server.base_urls)) == 2
        assert server.replicas == server.base_urls[1:]
        for url in server.base_urls:
            models = httpx.get(f"{url}/models", timeout=10).json()
            assert [m["id"] for m in models["data"]] == ["smollm2"]
        processes = server.processes
        assert sorted(p.name for p in tmp_path.iterdir()) == ["llama_server.1.log", "llama_server.log"]
    assert all(p.poll() is not None for p in processes)  # all stopped on exit


def test_two_signs_p1_to_p4_with_smollm2(tmp_path, monkeypatch):
    monkeypatch.delenv("GSP_LLM_BASE_URL", raising=False)
    # short answers keep the test to about a minute; the grammar keeps them schema-valid
    settings = Settings(paths={"artifacts_dir": tmp_path / "artifacts"}, llm={"max_tokens": 300, "local_servers": 2})
    run = generate_descriptions(PROJECT_ROOT / "knowledge_base" / "demo_vocab.csv", settings=settings,
                                use_index=False, limit=2)
    m = run.manifest
    assert m["local_server"] is True and m["model"] == "smollm2" and m["structured_output"] == "json_object_schema"
    assert m["endpoint"].startswith("http://127.0.0.1:")
    assert m["servers"] == 2
    logs = settings.paths.cache / "logs"
    for name in ("llama_server.log", "llama_server.1.log"):  # both replicas answered requests
        assert "total time" in (logs / name).read_text(errors="replace"), name
    assert m["sampling"] == {"frequency_penalty": settings.llm.local_frequency_penalty}
    frames = read_run(run.run_dir, ok_only=False)
    for kind in KINDS:
        assert frames[kind]["label"].nunique() == 2, kind
    assert m["requests"] >= 8 and m["tokens"]["completion"] > 0
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
