"""The README's deployment route, end to end, on a real Prefect server on loopback:
`gsp up` → `prefect deployment run gsp/generate` → `mc/train` starts by itself on the gpu pool →
`gsp down` leaves no process behind. Also how the stack copes with processes killed by hand."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
from fake_openai import FakeOpenAI
from stack_helpers import GSP, PREFECT, flow_run_logs, flow_runs, free_port, run, stack_processes, wait_for_runs

from gsp.schema import read_manifest
from mc.report import confused_pairs, load_run


def test_deployment_route_generate_then_train_then_down(stack_env, tmp_path):
    env = stack_env
    home = Path(env["GSP_ARTIFACTS_DIR"]) / "prefect"
    # The README's route as written: the demo vocabulary, the one the demo skeletons are drawn
    # for, so the refinement below finds every sign of the confused pairs described.
    vocab = "knowledge_base/demo_vocab.csv"
    port = free_port()
    with FakeOpenAI() as llm:
        env["GSP_LLM_BASE_URL"] = llm.base_url
        up = run(GSP + ["up", "--port", str(port)], env)
        api = f"http://127.0.0.1:{port}/api"
        assert f"export PREFECT_API_URL={api}" in up.stdout.splitlines()
        env["PREFECT_API_URL"] = api
        try:
            state = json.loads((home / "stack.json").read_text())
            again = run(GSP + ["up", "--port", str(port)], env)
            assert "already up" in again.stdout
            assert json.loads((home / "stack.json").read_text()) == state

            # The README's route, as written: training follows by itself.
            run(PREFECT + ["deployment", "run", "gsp/generate", "--param", f"vocab={vocab}"], env)
            [generated] = wait_for_runs(env, "gsp/generate", 1, 240)
            assert generated["state"] == "COMPLETED", generated
            descriptions = Path(env["GSP_ARTIFACTS_DIR"]) / "descriptions"
            latest = descriptions / (descriptions / "LATEST").read_text().strip()
            assert {p.name for p in latest.glob("*.parquet")} == {"Tb.parquet", "Ts.parquet", "Tg.parquet",
                                                                 "Tp.parquet"}
            # the run's summary is in the flow run's logs (the CLI keeps it off its console only)
            summary_end = f"status: complete; manifest: {latest / 'manifest.json'}"
            assert any(summary_end in m for m in flow_run_logs(env, generated["id"], summary_end))
            [trained] = wait_for_runs(env, "mc/train", 1, 300)
            assert trained["state"] == "COMPLETED", trained
            epoch_line = "joint: epoch 1/1, loss "  # the training's progress, in its flow run's logs
            assert any(m.startswith(epoch_line) for m in flow_run_logs(env, trained["id"], epoch_line))
            assert trained["parameters"]["descriptions"] == str(latest)
            [run_folder] = (Path(env["GSP_ARTIFACTS_DIR"]) / "runs").iterdir()
            metrics = json.loads((run_folder / "joint" / "metrics.json").read_text())
            assert metrics["epochs"] == 1 and 0 <= metrics["top1"] <= 1
            assert list((run_folder / "joint").glob("*.pt")), "no checkpoint or export"

            # One refinement step on the server: gsp/refine on that training's confusion writes a
            # new description run, and mc/train retrains on exactly it.
            pairs = confused_pairs(load_run(run_folder / "joint").confusion, 10)
            assert pairs, "the 1-epoch training confused no two signs: nothing to refine"
            # (the vocabulary: the one the refined run was generated from)
            run(PREFECT + ["deployment", "run", "gsp/refine", "--param", f"training_run={run_folder / 'joint'}"], env)
            [refined] = wait_for_runs(env, "gsp/refine", 1, 240)
            assert refined["state"] == "COMPLETED", refined
            refined_run = descriptions / (descriptions / "LATEST").read_text().strip()
            manifest = read_manifest(refined_run)
            assert refined_run != latest and manifest["refine"]["base_run"] == str(latest)
            assert manifest["refine"]["trained_on"] == str(latest)  # as the training run records it
            assert [(p["a"], p["b"], p["count"]) for p in manifest["refine"]["pairs"]] == pairs
            assert {r["label"] for r in manifest["refine"]["refined"]} == {lab for a, b, _ in pairs for lab in (a, b)}
            retrained = wait_for_runs(env, "mc/train", 2, 300)
            assert [r["state"] for r in retrained] == ["COMPLETED"] * 2, retrained
            assert sorted(r["parameters"]["descriptions"] for r in retrained) == sorted([str(latest), str(refined_run)])

            # A generation that fails (its vocabulary is missing) ends Failed and starts nothing.
            failed = run(PREFECT + ["deployment", "run", "gsp/generate", "--param", "vocab=missing.csv"], env)
            assert failed.returncode == 0
            runs = wait_for_runs(env, "gsp/generate", 2, 120)
            assert sorted(r["state"] for r in runs) == ["COMPLETED", "FAILED"]
            time.sleep(8)  # a trigger fires within a second or two of its event
            assert len(flow_runs(env, "mc/train")) == 2
            assert (descriptions / "LATEST").read_text().strip() == refined_run.name

            status = json.loads(run(GSP + ["status", "--json"], env).stdout)
            assert status["up"] and {d["name"] for d in status["deployments"]} >= {"gsp/generate", "gsp/refine",
                                                                                   "mc/train"}
            [schedule] = next(d for d in status["deployments"] if d["name"] == "mc/train")["schedules"]
            assert schedule["active"] is False
        finally:
            down = run(GSP + ["down"], env, check=False)
    assert down.returncode == 0, down.stderr
    assert not (home / "stack.json").exists()
    assert stack_processes(home) == []


def test_a_stack_killed_by_hand_is_found_and_cleaned(stack_env):
    env = stack_env
    home = Path(env["GSP_ARTIFACTS_DIR"]) / "prefect"
    port = free_port()
    run(GSP + ["up", "--port", str(port)], env)
    try:
        for proc in stack_processes(home):
            proc.kill()
        psutil.wait_procs(stack_processes(home), timeout=10)
        status = run(GSP + ["status"], env)
        assert "does not answer" in status.stdout
        # gsp up on a dead stack cleans it and starts afresh.
        up = run(GSP + ["up", "--port", str(port)], env)
        assert "cleaned a stack" in up.stdout and "stack up" in up.stdout
        assert json.loads(run(GSP + ["status", "--json"], env).stdout)["up"]
        shown = run(GSP + ["status"], {**env, "COLUMNS": "200"}).stdout
        for expected in ("work pools", "gsp-cpu ONLINE", "gsp-gpu ONLINE", "gsp/generate", "mc/train", "inactive"):
            assert expected in shown, shown
    finally:
        down = run(GSP + ["down"], env, check=False)
    assert down.returncode == 0, down.stderr
    assert stack_processes(home) == []
    assert "no stack is up" in run(GSP + ["down"], env).stdout


def test_up_for_other_machines_needs_a_password_and_the_stack_works_with_it(stack_env):
    """`gsp up --host 0.0.0.0` (a GPU host's worker joins, README: A GPU host joins): refused in
    one line without a server password; with one, the server answers on every address of this
    machine, asks every client but the health check for the password, and the stack's own
    clients (workers, status, down) have it."""
    import secrets

    import httpx

    from flows.stack import SERVER_AUTH_VARIABLE, machine_addresses, port_in_use

    env = stack_env
    home = Path(env["GSP_ARTIFACTS_DIR"]) / "prefect"
    port = free_port()
    refused = run(GSP + ["up", "--host", "0.0.0.0", "--port", str(port)], env, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert f"set {SERVER_AUTH_VARIABLE}=user:password" in refused.stderr
    assert not (home / "stack.json").exists() and not port_in_use(port)

    user, password = "gsp", secrets.token_hex(8)
    env[SERVER_AUTH_VARIABLE] = f"{user}:{password}"
    up = run(GSP + ["up", "--host", "0.0.0.0", "--port", str(port)], env)
    try:
        api = f"http://127.0.0.1:{port}/api"
        assert f"export PREFECT_API_URL={api}" in up.stdout.splitlines()
        assert password not in up.stdout + up.stderr + (home / "stack.json").read_text()
        for address in machine_addresses():  # what a worker on another machine is told and reaches
            assert f"PREFECT_API_URL=http://{address}:{port}/api .venv/bin/prefect worker start --pool gpu" \
                in up.stdout.splitlines()
            assert httpx.get(f"http://{address}:{port}/api/health", timeout=10).status_code == 200
        assert httpx.post(f"{api}/work_pools/filter", json={}, timeout=10).status_code == 401
        pools = httpx.post(f"{api}/work_pools/filter", json={}, auth=(user, password), timeout=10)
        assert {p["name"] for p in pools.json()} >= {"cpu", "gpu"}
        status = json.loads(run(GSP + ["status", "--json"], env).stdout)
        assert status["listening_on"] == "0.0.0.0"
        shown = run(GSP + ["status"], {**env, "COLUMNS": "300"}).stdout
        assert all(f"PREFECT_API_URL={url}" in shown for url in status["remote_api"])
        assert "listening on 0.0.0.0" in shown
        assert all(any(w["status"] == "ONLINE" for w in status["workers"][pool]) for pool in ("cpu", "gpu"))

        without = {k: v for k, v in env.items() if k != SERVER_AUTH_VARIABLE}
        denied = run(GSP + ["status"], without, check=False)
        assert denied.returncode == 2 and "asks for its password" in denied.stderr
        assert "Traceback" not in denied.stderr
        assert "already up" in run(GSP + ["up", "--port", str(port)], env).stdout  # where it is, as it is
        elsewhere = run(GSP + ["up", "--host", "127.0.0.1", "--port", str(port)], env, check=False)
        assert elsewhere.returncode == 2 and "already up, listening on 0.0.0.0" in elsewhere.stderr
        # down without the password stops nothing (it could not mark the workers' runs Crashed)
        alive_before = sorted(p.pid for p in stack_processes(home))
        refused_down = run(GSP + ["down"], without, check=False)
        assert refused_down.returncode == 2 and "asks for its password" in refused_down.stderr
        assert sorted(p.pid for p in stack_processes(home)) == alive_before and (home / "stack.json").exists()
    finally:
        down = run(GSP + ["down"], env, check=False)
    assert down.returncode == 0, down.stderr
    assert stack_processes(home) == []


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace_period():
    from flows.stack import alive, stop_tree

    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
         "print('ready', flush=True)\ntime.sleep(600)"],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert stubborn.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    stopped = stop_tree(stubborn.pid, grace_s=2.0)
    # psutil reaps its children itself, so Popen cannot see the signal; the time shows it was not SIGTERM.
    assert stopped == [stubborn.pid] and not alive(stubborn.pid)
    assert time.monotonic() - t0 >= 2.0

    obedient = subprocess.Popen([sys.executable, "-c", "print('ready', flush=True)\nimport time\ntime.sleep(600)"],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert obedient.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    stop_tree(obedient.pid, grace_s=30.0)
    assert not alive(obedient.pid) and time.monotonic() - t0 < 10


def test_the_port_in_use_is_one_line(stack_env):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        done = run(GSP + ["up", "--port", str(busy.getsockname()[1])], stack_env, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: port") and "Traceback" not in done.stderr


def test_down_marks_a_running_training_crashed_and_frees_its_slot(stack_env):
    """The Prefect pitfall: a worker killed mid-run leaves the run Running, holding mc/train's
    only concurrency slot, so every later training waits for ever."""
    env = stack_env
    home = Path(env["GSP_ARTIFACTS_DIR"]) / "prefect"
    port = free_port()
    run(GSP + ["up", "--port", str(port)], env)
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    try:
        run(PREFECT + ["deployment", "run", "mc/train", "--param", "contrastive=false", "--param", "epochs=500"], env)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and [r["state"] for r in flow_runs(env, "mc/train")] != ["RUNNING"]:
            time.sleep(2)
        assert [r["state"] for r in flow_runs(env, "mc/train")] == ["RUNNING"]
    finally:
        down = run(GSP + ["down", "--grace", "5"], env, check=False)
    assert down.returncode == 0, down.stderr
    assert "marked Crashed" in down.stdout and "still holds" not in down.stdout
    assert stack_processes(home) == []

    # The same server again (its database is kept): the run is Crashed and the slot is free.
    run(GSP + ["up", "--port", str(port)], env)
    try:
        assert [r["state"] for r in flow_runs(env, "mc/train")] == ["CRASHED"]
        assert deployment_slots(env, "mc/train") == 0
    finally:
        run(GSP + ["down"], env, check=False)
    assert stack_processes(home) == []


def deployment_slots(env, name: str) -> int:
    from prefect.client.orchestration import PrefectClient

    async def read() -> int:
        async with PrefectClient(env["PREFECT_API_URL"]) as client:
            deployment = await client.read_deployment_by_name(name)
            return deployment.global_concurrency_limit.active_slots

    return asyncio.run(read())
