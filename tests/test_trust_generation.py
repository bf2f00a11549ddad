"""Issue 8, "a failed run is not a success" and "descriptions that are not descriptions", through
`gsp generate` as a user runs it (a subprocess against the loopback OpenAI server, or against a
closed port): the endpoint check, the circuit breaker, failed runs that do not become LATEST and
end their Prefect flow run Failed, and texts that fail the quality check."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI, Fault

from gsp.schema import LATEST_POINTER, read_kind, read_manifest, resolve_run_dir
from gsp.settings import PROJECT_ROOT

GSP = [sys.executable, "-m", "cli.main"]
KEY = "sk-TRUST-SECRET-24680"


@pytest.fixture
def vocab(tmp_path) -> Path:
    path = tmp_path / "vocab.csv"
    path.write_text("ClassId,TR,EN\n0,abla,sister\n1,acele,hurry\n2,acikmak,hungry\n", encoding="utf-8")
    return path


def cli_env(base_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GSP_", "PREFECT_"))}
    env.update({
        "GSP_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
        "GSP_LLM_BASE_URL": base_url,
        "GSP_LLM_API_KEY": KEY,
        "GSP_LLM_MODEL": "fake",
        "GSP_LLM_STRUCTURED_OUTPUT": "json_schema",
        "GSP_LLM_RETRY_INITIAL_S": "0.05",
        "GSP_LLM_RETRY_MAX_S": "0.2",
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "COLUMNS": "400",
        **extra,
    })
    return env


def gsp(args: list[str], env: dict[str, str], timeout: float = 240) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run(GSP + args, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - started


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate_args(vocab: Path, out: Path, *more: str) -> list[str]:
    return ["generate", "--vocab", str(vocab), "--no-index", "--out", str(out), *more]


# --- the endpoint check ----------------------------------------------------------------------

def test_refused_endpoint_ends_in_seconds_naming_host_and_cause(tmp_path, vocab):
    port = closed_port()
    env = cli_env(f"http://127.0.0.1:{port}/v1", tmp_path)
    proc, took = gsp(generate_args(vocab, tmp_path / "runs", "--no-prefect"), env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert took < 20  # before: seven attempts per request, minutes
    (line,) = error_lines(proc.stderr)
    assert f"127.0.0.1:{port}" in line and "connection refused" in line
    assert "Traceback" not in proc.stderr and KEY not in proc.stdout + proc.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())

    # the same through the Prefect flow (the default): one line, no traceback from Prefect
    proc, _ = gsp(generate_args(vocab, tmp_path / "runs"), env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = error_lines(proc.stderr)
    assert "connection refused" in line and "Traceback" not in proc.stderr


def test_rejected_key_ends_in_seconds_without_chat_requests(tmp_path, vocab):
    with FakeOpenAI(require_key="sk-the-right-one") as srv:
        proc, took = gsp(generate_args(vocab, tmp_path / "runs", "--no-prefect"), cli_env(srv.base_url, tmp_path))
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert took < 20
        (line,) = error_lines(proc.stderr)
        assert f"127.0.0.1:{srv.port}" in line and "HTTP 401" in line and "GSP_LLM_API_KEY" in line
        assert KEY not in proc.stdout + proc.stderr
        assert srv.gets == ["/v1/models"] and srv.request_count == 0


def test_server_without_models_endpoint_still_runs(tmp_path, vocab):
    with FakeOpenAI(models_endpoint=False) as srv:
        proc, _ = gsp(generate_args(vocab, tmp_path / "runs", "--no-prefect"), cli_env(srv.base_url, tmp_path))
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert srv.gets == ["/v1/models"] and srv.request_count == 3 * 4


# --- failed runs -----------------------------------------------------------------------------

def _latest(root: Path) -> str:
    return (root / LATEST_POINTER).read_text().strip()


def test_failing_endpoint_trips_the_breaker_and_the_run_fails_without_becoming_latest(tmp_path, vocab):
    runs = tmp_path / "runs"
    with FakeOpenAI() as srv:
        env = cli_env(srv.base_url, tmp_path, GSP_LLM_BREAKER_WINDOW="6", GSP_LLM_CONCURRENCY="2")
        good, _ = gsp(generate_args(vocab, runs, "--no-prefect"), env)
        assert good.returncode == 0, good.stderr[-2000:]
        good_run = _latest(runs)

        srv.reset()
        srv.faults = [Fault("500", times=None)]
        # a cache of its own, so that every request goes to the now failing server
        env = {**env, "GSP_CACHE_DIR": str(tmp_path / "cache2")}
        for mode in ("--no-prefect", "--prefect"):
            srv.reset()
            proc, took = gsp(generate_args(vocab, runs, mode), env)
            assert proc.returncode == 1, proc.stderr[-3000:]
            (line,) = error_lines(proc.stderr)
            assert "failed:" in line and "HTTP 500" in line and "not made LATEST" in line
            assert "Traceback" not in proc.stderr
            manifest_path = Path(line.rsplit("manifest: ", 1)[1].strip())
            manifest = json.loads(manifest_path.read_text())
            assert manifest["status"] == "failed" and "rows failed" in manifest["failure_reason"]
            assert manifest["failure_causes"][0]["rows"] >= 1
            assert _latest(runs) == good_run  # training keeps using the good run
            assert resolve_run_dir(runs).name == good_run
            # 3 signs: P1 and P2 each, 7 attempts apiece without a breaker (42 requests)
            assert srv.request_count <= 6 + 2, srv.request_count
            tb = read_kind(manifest_path.parent, "Tb")
            assert (tb["status"] == "failed").all()
            assert tb["error"].str.contains("circuit breaker").any()


def test_failed_run_ends_the_prefect_flow_run_failed(tmp_path, vocab, monkeypatch):
    from flows import use_local_prefect
    from gsp.generate import RunFailed
    from gsp.settings import get_settings

    with FakeOpenAI() as srv:
        srv.faults = [Fault("500", times=None)]
        for key, value in cli_env(srv.base_url, tmp_path, GSP_LLM_BREAKER_WINDOW="4").items():
            if key.startswith(("GSP_", "PREFECT_")):
                monkeypatch.setenv(key, value)
        get_settings.cache_clear()
        use_local_prefect()
        from flows.gsp_flow import gsp_flow

        state = asyncio.run(gsp_flow(vocab=str(vocab), use_index=False, out_dir=str(tmp_path / "runs"),
                                     return_state=True))
        assert state.is_failed()
        assert "not made LATEST" in state.message and "HTTP 500" in state.message
        with pytest.raises(RunFailed, match="manifest: "):
            state.result()
    assert not (tmp_path / "runs" / LATEST_POINTER).exists()


def test_gsp_run_stops_before_training_when_generation_failed(tmp_path):
    with FakeOpenAI() as srv:
        srv.faults = [Fault("500", times=None)]
        env = cli_env(srv.base_url, tmp_path, GSP_LLM_BREAKER_WINDOW="4")
        proc, _ = gsp(["run", "--limit", "2", "--epochs", "1", "--samples-per-class", "8"], env, timeout=400)
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = error_lines(proc.stderr)
    assert "HTTP 500" in line and "stopped before training" in line
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "artifacts" / "runs").exists()


# --- the quality check -----------------------------------------------------------------------

def _requests_for(srv: FakeOpenAI, needle: str) -> int:
    return sum(needle in json.dumps(srv.bodies[r.body_hash], ensure_ascii=False) for r in srv.records)


def test_bad_texts_are_re_asked_then_failed_and_a_good_partial_run_is_latest(tmp_path, vocab):
    runs = tmp_path / "runs"
    with FakeOpenAI() as srv:
        srv.faults = [Fault("bad_text", times=None, only_if="Sign: hurry", text="./home.json"),
                      Fault("bad_text", total=1, only_if="Sign: sister", text="sister (Turkish gloss: abla)")]
        env = cli_env(srv.base_url, tmp_path, GSP_LLM_REPAIR_ATTEMPTS="1")
        proc, _ = gsp(generate_args(vocab, runs), env)
        assert proc.returncode == 1, proc.stderr[-3000:]
        run_dir = resolve_run_dir(runs)
        assert _latest(runs) == run_dir.name  # under max_failed_share: the run is the new LATEST
        manifest = read_manifest(run_dir)
        assert manifest["status"] == "complete"
        # 'hurry': P1 and P2 each asked twice (the answer, one re-ask), then failed with the reason
        assert _requests_for(srv, "Sign: hurry") == 4
        tb = read_kind(run_dir, "Tb").set_index("label")
        assert tb.loc[1, "status"] == "failed"
        assert tb.loc[1, "error"].startswith("quality: looks like a file path: './home.json'")
        ts = read_kind(run_dir, "Ts")
        assert (ts[ts["label"] == 1]["status"] == "failed").all()
        # 'sister': the echoed gloss was re-asked once and the second answer kept
        assert tb.loc[0, "status"] == "ok" and tb.loc[0, "text"] != "sister (Turkish gloss: abla)"
        assert manifest["usage"]["Tb"]["rejected"] == 3 and manifest["usage"]["Tb"]["repairs"] == 2
        assert manifest["failure_causes"][0] == {"cause": "quality: looks like a file path", "rows": 6}
        (line,) = [ln for ln in proc.stderr.splitlines() if "row(s) failed" in ln]
        assert "6 row(s) failed (quality: looks like a file path ×6)" in line
        assert str(run_dir / "manifest.json") in line


def test_a_bad_cached_answer_is_re_asked_not_replayed_as_final(tmp_path, vocab):
    runs = tmp_path / "runs"
    with FakeOpenAI() as srv:
        # first run: no re-asks allowed, so the bad answers are cached and the rows fail
        srv.faults = [Fault("bad_text", times=None, only_if="Sign: hurry", text="treesignsigretextrange")]
        env = cli_env(srv.base_url, tmp_path, GSP_LLM_REPAIR_ATTEMPTS="0")
        first, _ = gsp(generate_args(vocab, runs, "--no-prefect"), env)
        assert first.returncode == 1
        assert "run together" in read_kind(resolve_run_dir(runs), "Tb").set_index("label").loc[1, "error"]

        # second run, server fixed: the cached bad answers come back, are rejected again and re-asked
        srv.faults, before = [], srv.request_count
        again, _ = gsp(generate_args(vocab, runs, "--no-prefect"), {**env, "GSP_LLM_REPAIR_ATTEMPTS": "1"})
        assert again.returncode == 0, again.stderr[-2000:]
        rerun = resolve_run_dir(runs)
        assert (read_kind(rerun, "Tb")["status"] == "ok").all()
        # only 'hurry' needed new requests: its two rejected answers re-asked, then its Tg and Tp
        assert srv.request_count - before == 4


def test_failure_causes_group_rows_that_failed_the_same_way():
    from gsp.generate import failed_run_reason, failure_causes

    errors = [
        "HTTP 500: internal error (after 7 attempt(s))",
        "upstream Tb failed: HTTP 500: internal error (after 3 attempt(s))",
        "not sent, endpoint failing: HTTP 500: internal error in 20 of the last 20 requests (circuit breaker)",
        "quality: looks like a file path: './home.json' (text 2 of 3) (still after 3 answer(s))",
        "upstream Tg failed: quality: looks like a file path: './a.json' (still after 1 answer(s))",
    ]
    assert failure_causes(errors) == [
        {"cause": "HTTP 500: internal error", "rows": 2},
        {"cause": "quality: looks like a file path", "rows": 2},
        {"cause": "not sent, endpoint failing: HTTP 500: internal error", "rows": 1},
    ]
    assert failed_run_reason(6, 12, 0.5) is None            # half is not more than half
    assert "7 of 12 rows failed" in failed_run_reason(7, 12, 0.5)
    assert failed_run_reason(1, 12, 0.0) is not None        # 0: any failed row fails the run
    assert failed_run_reason(0, 0, 0.5) == "the run produced no rows"
