"""Generation fan-out across workers: shards as separate flow runs on a real Prefect server, one
merged description run equal to a one-process run, and the endpoint's request rate held across
all shards by a Prefect global rate limit."""

from __future__ import annotations

import os
import signal
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI
from stack_helpers import GSP, PREFECT, demo_vocab, free_port, run, stack_processes, wait_for_runs

from flows.fanout import REQUESTS_LIMIT, TOKENS_LIMIT, rate_limit_shapes, shard_labels
from gsp.schema import KINDS, read_kind, resolve_run_dir


@pytest.mark.parametrize("n,shards", [(1, 4), (7, 2), (10, 3), (500, 8), (5, 5)])
def test_shards_cover_every_label_once_in_order(n, shards):
    labels = list(range(100, 100 + n))
    parts = shard_labels(labels, shards)
    assert [x for part in parts for x in part] == labels
    assert 1 <= len(parts) <= shards and all(parts)
    assert max(map(len, parts)) - min(map(len, parts)) <= max(map(len, parts)) // 2 + 1


def test_rate_limit_shapes_follow_the_settings():
    assert rate_limit_shapes(None, None) == {}
    shapes = rate_limit_shapes(120, 60_000)
    assert shapes[REQUESTS_LIMIT] == {"limit": 2, "slot_decay_per_second": 2.0}
    assert shapes[TOKENS_LIMIT] == {"limit": 60_000, "slot_decay_per_second": 1000.0}
    assert rate_limit_shapes(30, None)[REQUESTS_LIMIT]["limit"] == 1


def max_in_window(times: list[float], window_s: float) -> int:
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] < t - window_s:
            j += 1
        best = max(best, i - j + 1)
    return best


def texts(run_dir: Path) -> dict[str, dict[str, tuple]]:
    out = {}
    for kind in KINDS:
        df = read_kind(run_dir, kind)
        out[kind] = {r.key: (r.text, tuple(r.body_parts) if kind == "Tp" else None, r.status)
                     for r in df.itertuples()}
    return out


def test_two_workers_share_shards_and_the_rate_limit(stack_env, tmp_path):
    env = stack_env
    rpm = 60  # 1 request/s for both shards together; unthrottled they send 14 in 5 s here
    env["GSP_LLM_REQUESTS_PER_MINUTE"] = str(rpm)
    home = Path(env["GSP_ARTIFACTS_DIR"]) / "prefect"
    vocab = demo_vocab(tmp_path, 4)
    port = free_port()
    with FakeOpenAI() as llm:
        env["GSP_LLM_BASE_URL"] = llm.base_url
        run(GSP + ["up", "--port", str(port)], env)
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
        # A second cpu worker, as another machine would join the pool.
        second_log = tmp_path / "second-worker.log"
        second = subprocess.Popen(PREFECT + ["worker", "start", "--pool", "cpu", "--name", "second-machine"],
                                  env={**env, "PREFECT_HOME": str(home)}, cwd=tmp_path, stdout=second_log.open("wb"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:
            run(PREFECT + ["deployment", "run", "gsp/generate", "--param", f"vocab={vocab}", "--param", "shards=2"],
                env)
            [generated] = wait_for_runs(env, "gsp/generate", 1, 300)
            logs = [second_log, home / "logs" / "worker-cpu.log"]
            assert generated["state"] == "COMPLETED", "\n".join(p.read_text()[-3000:] for p in logs)
            shards = wait_for_runs(env, "gsp-shard/describe", 2, 60)
            assert [s["state"] for s in shards] == ["COMPLETED", "COMPLETED"]
            request_times = [r.t for r in llm.records]
            spans = shard_spans(env)
        finally:
            second.terminate()
            try:
                second.wait(timeout=60)
            except subprocess.TimeoutExpired:  # Prefect's worker can be slow to stop on a loaded machine;
                os.killpg(second.pid, signal.SIGKILL)  # how it stops is not what this test checks
                second.wait(timeout=30)
            run(GSP + ["down"], env, check=False)
    assert stack_processes(home) == []

    descriptions = Path(env["GSP_ARTIFACTS_DIR"]) / "descriptions"
    merged = resolve_run_dir(descriptions)
    assert not (descriptions / ".shards" / merged.name).exists()
    # Both shards were at work at the same time, and together they kept to the endpoint's rate:
    # at most one second's burst (1) plus 1 per second over any 5 s.
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1, spans
    assert len(request_times) >= 16
    assert max_in_window(request_times, 5.0) <= 1 + 1 * 5, sorted(request_times)

    # The merged run says what a one-process run says, key for key.
    single_env = {**os.environ, **{k: v for k, v in env.items() if k.startswith("GSP_")},
                  "GSP_LLM_BASE_URL": "", "GSP_CACHE_DIR": str(tmp_path / "fresh-cache")}
    single_env.pop("GSP_LLM_REQUESTS_PER_MINUTE")
    with FakeOpenAI() as llm:
        single_env["GSP_LLM_BASE_URL"] = llm.base_url
        single_out = tmp_path / "single"
        run(GSP + ["generate", "--vocab", str(vocab), "--out", str(single_out)], single_env)
    assert texts(resolve_run_dir(single_out)) == texts(merged)


def shard_spans(env) -> list[tuple]:
    import asyncio

    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    async def read():
        async with PrefectClient(env["PREFECT_API_URL"]) as client:
            runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["gsp-shard"])))
            return sorted((r.start_time, r.end_time or r.start_time + timedelta(days=1)) for r in runs)

    return asyncio.run(read())

