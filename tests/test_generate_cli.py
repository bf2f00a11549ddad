"""``gsp generate`` as a user runs it, in a subprocess against the loopback server: the Prefect
flow over the whole AUTSL vocabulary, exit statuses, and kill -9 in the middle of a run."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from fake_openai import FakeOpenAI, Fault

from gsp.llm.cache import ResponseCache
from gsp.schema import KINDS, read_kind, read_manifest, resolve_run_dir
from gsp.settings import PROJECT_ROOT

AUTSL = PROJECT_ROOT / "data" / "vocab" / "autsl.csv"
GSP = [sys.executable, "-m", "cli.main"]
KEY = "sk-CLI-SECRET-9876543210"


def cli_env(srv, tmp_path, cache="cache", **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GSP_", "PREFECT_"))}
    env.update({
        "GSP_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
        "GSP_CACHE_DIR": str(tmp_path / cache),
        "GSP_LLM_BASE_URL": srv.base_url,
        "GSP_LLM_API_KEY": KEY,
        "GSP_LLM_MODEL": "fake",
        "GSP_LLM_STRUCTURED_OUTPUT": "json_schema",
        "GSP_LLM_RETRY_INITIAL_S": "0.05",
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_LOGGING_LEVEL": "WARNING",
        **extra,
    })
    return env


def run_cli(args, env, timeout=300):
    return subprocess.run(GSP + args, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout)


def test_whole_autsl_vocabulary_through_the_prefect_flow(tmp_path):
    with FakeOpenAI() as srv:
        env = cli_env(srv, tmp_path, PREFECT_LOGGING_LEVEL="INFO")  # the flow's log, as a user sees it
        proc = run_cli(["generate", "--vocab", str(AUTSL), "--no-index", "--out", str(tmp_path / "runs")], env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        run_dir = resolve_run_dir(tmp_path / "runs")
        for kind in KINDS:
            df = read_kind(run_dir, kind)
            assert df["label"].nunique() == 226 and (df["status"] == "ok").all()
        manifest = read_manifest(run_dir)
        assert manifest["requests"] == 226 * 4 and manifest["vocabulary"]["signs_run"] == 226
        assert "Tb: 226 ok, 0 failed" in proc.stdout
        assert "Tb: 226 ok" not in proc.stderr  # the summary once: not repeated by Prefect's console log
        # each batch's log says how far it is at every quarter of its signs (its last line says done)
        quarters: dict[tuple[int, int], set[int]] = {}  # (batch, its signs) -> the quarters logged
        for index, tp, signs in re.findall(r"batch (\d+): \d+ s, done Tb \d+/\d+, Ts \d+/\d+, Tg \d+/\d+, "
                                           r"Tp (\d+)/(\d+)", proc.stderr):
            quarters.setdefault((int(index), int(signs)), set()).add(4 * int(tp) // int(signs))
        ends = {int(i) for i in re.findall(r"batch (\d+): labels \d+–\d+, \d+ failed row\(s\)", proc.stderr)}
        assert len(ends) > 1 and {i for i, _ in quarters} == ends, quarters
        assert all(logged >= {4 * t // n for t in range(1, n)} - {0} for (_, n), logged in quarters.items())
        assert KEY not in proc.stdout + proc.stderr
        assert all(KEY.encode() not in p.read_bytes() for p in run_dir.iterdir())
        assert all(r.authorization == f"Bearer {KEY}" for r in srv.records[:3])  # the key did reach the server


def test_exit_status_reports_failures_and_bad_input(tmp_path):
    with FakeOpenAI() as srv:
        srv.faults = [Fault("schema_invalid", times=None, only_if="Sign: hurry")]
        env = cli_env(srv, tmp_path, GSP_LLM_REPAIR_ATTEMPTS="0")
        proc = run_cli(["generate", "--vocab", str(AUTSL), "--no-index", "--no-prefect", "--labels", "0,1"], env)
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert "row(s) failed" in proc.stderr and "Tb: 1 ok, 1 failed" in proc.stdout

        bad = tmp_path / "bad.csv"
        bad.write_text("ClassId,TR,EN\n0,abla,sister\n0,acele,hurry\n", encoding="utf-8")
        proc = run_cli(["generate", "--vocab", str(bad), "--no-index", "--no-prefect"], env)
        assert proc.returncode == 2
        assert "duplicate ClassId 0" in proc.stderr and "bad.csv" in proc.stderr


def _frames(run_dir: Path) -> dict[str, pd.DataFrame]:
    return {k: read_kind(run_dir, k).drop(columns="created_at") for k in KINDS}


def test_kill_9_mid_run_resumes_without_repeating_completed_requests(tmp_path):
    args = ["generate", "--vocab", str(AUTSL), "--no-index", "--no-prefect", "--limit", "30"]
    with FakeOpenAI(latency_s=0.05) as srv:
        env = cli_env(srv, tmp_path, GSP_LLM_CONCURRENCY="4")
        proc = subprocess.Popen(GSP + args + ["--out", str(tmp_path / "killed")], env=env, cwd=PROJECT_ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while len(srv.completed()) < 40 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        served_before = len(srv.completed())
        assert 40 <= served_before < 120  # killed in the middle (30 signs need 120 requests)
        assert not (tmp_path / "killed").exists() or not any(
            p.is_dir() and not p.name.startswith(".") for p in (tmp_path / "killed").iterdir())

        cache = ResponseCache(tmp_path / "cache")
        cached_ids = cache.response_ids()
        cache.close()
        assert len(cached_ids) >= 35  # everything answered before the kill, minus what was in flight

        srv.reset()
        resumed = run_cli(args + ["--out", str(tmp_path / "resumed")], env)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        repeated = [r for r in srv.records if "chatcmpl-" + r.body_hash[:24] in cached_ids]
        assert repeated == []
        resumed_hashes = {r.body_hash for r in srv.records}

        # an uninterrupted run with its own empty cache
        srv.reset()
        fresh = run_cli(args + ["--out", str(tmp_path / "fresh")], cli_env(srv, tmp_path, cache="cache2"))
        assert fresh.returncode == 0
        all_hashes = {r.body_hash for r in srv.records}
        assert len(all_hashes) == 120
        assert resumed_hashes | {h for h in all_hashes if "chatcmpl-" + h[:24] in cached_ids} == all_hashes

    a, b = _frames(resolve_run_dir(tmp_path / "resumed")), _frames(resolve_run_dir(tmp_path / "fresh"))
    for kind in KINDS:
        # token counts may sit on different rows only if requests differ; here they must not
        pd.testing.assert_frame_equal(a[kind], b[kind])
