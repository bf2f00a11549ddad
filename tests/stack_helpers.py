"""Helpers of the tests that run a real Prefect stack (`gsp up`): commands, processes, runs."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
GSP = [sys.executable, "-m", "cli.main"]
PREFECT = [sys.executable, "-m", "prefect"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stack_processes(home: Path) -> list[psutil.Process]:
    """Every process on this machine that belongs to the stack in ``home`` (by its environment)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("PREFECT_HOME") == str(home):
                found.append(proc)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def run(args: list[str], env: dict[str, str], timeout: float = 240, check: bool = True, **kw):
    done = subprocess.run(args, env=env, cwd=kw.pop("cwd", ROOT), capture_output=True, text=True,
                          timeout=timeout, **kw)
    if check and done.returncode != 0:
        raise AssertionError(f"{args} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def flow_runs(env: dict[str, str], deployment: str) -> list[dict]:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    async def read() -> list[dict]:
        async with PrefectClient(env["PREFECT_API_URL"]) as client:
            d = await client.read_deployment_by_name(deployment)
            runs = await client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[d.id])))
        return [{"id": str(r.id), "state": r.state.type.value if r.state else None, "parameters": r.parameters}
                for r in runs]

    return asyncio.run(read())


def flow_run_logs(env: dict[str, str], flow_run_id: str, containing: str, timeout_s: float = 20) -> list[str]:
    """The messages of a flow run's logs on the server, once one contains ``containing`` (a
    worker's subprocess sends its last records as it exits, so they may follow the final state
    by a moment); the messages as they are when ``timeout_s`` runs out otherwise."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async def read() -> list[str]:
        async with PrefectClient(env["PREFECT_API_URL"]) as client:
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        return [log.message for log in logs]

    deadline = time.monotonic() + timeout_s
    messages = asyncio.run(read())
    while not any(containing in m for m in messages) and time.monotonic() < deadline:
        time.sleep(1)
        messages = asyncio.run(read())
    return messages


def wait_for_runs(env, deployment: str, count: int, timeout_s: float) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = flow_runs(env, deployment)
        if len(runs) >= count and all(r["state"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in runs):
            return runs
        time.sleep(3)
    raise AssertionError(f"{deployment}: no {count} finished run(s) within {timeout_s} s: {runs}")




def demo_vocab(folder: Path, signs: int) -> Path:
    """The first ``signs`` signs of the bundled demo vocabulary, as a CSV of their own."""
    path = folder / f"vocab{signs}.csv"
    lines = (ROOT / "knowledge_base" / "demo_vocab.csv").read_text().splitlines()
    path.write_text("\n".join(lines[: signs + 1]) + "\n")
    return path
