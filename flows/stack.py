"""The single-machine Prefect stack behind ``gsp up`` / ``gsp status`` / ``gsp down``.

``up`` starts a Prefect server on loopback, or on the address ``--host`` names so that workers on
other machines (a GPU host) reach it, then only with a password (SQLite in a project-local Prefect
home, ``<artifacts>/prefect``), creates the process work pools ``cpu`` and ``gpu``, deploys everything
in ``prefect.yaml`` and starts one worker per pool in the background, each in its own session
(process group) and with the environment ``up`` was started with, so ``GSP_*`` settings reach
deployment runs. What it started is recorded in ``stack.json`` in that home.

``down`` stops workers first — a flow run left ``Running`` by a killed worker would hold its
deployment's concurrency slot forever — marks the runs they were executing ``Crashed``, then
stops the server. Processes that ignore SIGTERM (Prefect 3.8's process worker sometimes does)
get SIGKILL after a grace period. A stack whose processes were killed by hand is found and
cleaned by either command.

Process supervision is written here by hand (psutil for the process trees): Prefect has no
command that runs a server and workers in the background and stops them again.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

from flows.deploy_steps import project_root
from flows.fanout import ensure_rate_limits
from gsp.atomic import write_json_atomic
from gsp.errors import GspError

POOLS = ("cpu", "gpu")
LOOPBACK = "127.0.0.1"
WILDCARD = "0.0.0.0"  # --host for every interface
#: The server's password ("user:password", Prefect's basic authentication), which ``up`` requires
#: before it serves other machines; read from the environment, never written to stack.json.
SERVER_AUTH_VARIABLE = "PREFECT_SERVER_API_AUTH_STRING"
CLIENT_AUTH_VARIABLE = "PREFECT_API_AUTH_STRING"
STATE_FILE = "stack.json"
#: GSP_* variables that hold paths: given to workers as absolute paths, since a flow run works
#: in the project folder (flows/deploy_steps.py), not where `gsp up` was started.
PATH_VARIABLES = ("GSP_CONFIG", "GSP_KB_DIR", "GSP_ARTIFACTS_DIR", "GSP_PROMPTS_DIR", "GSP_INDEX_DIR",
                  "GSP_CACHE_DIR", "GSP_LLM_LOCAL_MODEL_PATH", "GSP_MC_CLIP_WEIGHTS")


class StackError(GspError, RuntimeError):
    """The stack cannot start or be reached (one line for the user)."""


@dataclass
class StackState:
    """What ``gsp up`` started: written to ``<home>/stack.json`` and read by status and down."""

    home: str
    port: int
    server_pid: int
    workers: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    host: str = LOOPBACK  # what the server listens on (a record from before --host: loopback)

    @property
    def local_host(self) -> str:
        """The address this machine reaches the server at (loopback when it listens on all)."""
        return LOOPBACK if self.host == WILDCARD else self.host

    @property
    def api_url(self) -> str:
        return f"http://{self.local_host}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{self.local_host}:{self.port}"

    def remote_api_urls(self) -> list[str]:
        """The API's addresses for other machines (none when the server listens on loopback)."""
        if self.host == WILDCARD:
            return [f"http://{a}:{self.port}/api" for a in machine_addresses()]
        return [] if is_loopback(self.host) else [f"http://{self.host}:{self.port}/api"]

    def pids(self) -> dict[str, int]:
        return {**{f"worker {p}": pid for p, pid in self.workers.items()}, "server": self.server_pid}


def state_path(home: Path) -> Path:
    return home / STATE_FILE


def read_state(home: Path) -> StackState | None:
    try:
        return StackState(**json.loads(state_path(home).read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        raise StackError(f"{state_path(home)}: unreadable stack record ({exc}); delete it after checking "
                         "that no Prefect server or worker of this project runs") from None


def write_state(state: StackState) -> None:
    write_json_atomic(state_path(Path(state.home)), asdict(state))


# --- processes ------------------------------------------------------------------------------

def prefect_command(*args: str) -> list[str]:
    """The ``prefect`` CLI of this interpreter's environment (not whatever is first on PATH)."""
    return [sys.executable, "-m", "prefect", *args]


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def process_tree(pid: int) -> list[psutil.Process]:
    """``pid`` and all its descendants (empty when it is gone)."""
    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_tree(pid: int, grace_s: float) -> list[int]:
    """SIGTERM to ``pid``'s process group and tree; SIGKILL to whatever is left after ``grace_s``.
    Returns the pids that were running. The tree is read first: a worker's flow-run subprocesses
    must go too, and may already have been orphaned by the time the worker exits."""
    procs = process_tree(pid)
    running = [p.pid for p in procs]
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        _signal_group(pid, sig)
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, procs = psutil.wait_procs(procs, timeout=wait_s)
        if not procs:
            break
    return running


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        if os.getpgid(pid) == pid:  # started with start_new_session: the group is ours alone
            os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def port_in_use(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex((LOOPBACK if host == WILDCARD else host, port)) == 0


def is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


def machine_addresses() -> list[str]:
    """This machine's IPv4 addresses other machines may reach it at (all but loopback)."""
    return sorted({a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                   if a.family == socket.AF_INET and not is_loopback(a.address)})


def check_host(host: str, env: dict[str, str]) -> None:
    """Refuse, in one line, an address the server cannot listen on, and one that other machines
    reach while the server has no password (Prefect's server has no other access control: anyone
    who reaches it can start flow runs, which run code with this shell's settings and keys)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise StackError(f"--host {host}: not an IPv4 address (e.g. {WILDCARD} for every interface, "
                         f"or one of {', '.join(machine_addresses()) or 'this machine’s addresses'})") from None
    if address.version != 4:
        raise StackError(f"--host {host}: only IPv4 addresses are supported")
    if host != WILDCARD and not address.is_loopback and host not in machine_addresses():
        raise StackError(f"--host {host}: not an address of this machine "
                         f"({', '.join(machine_addresses()) or 'it has none but loopback'})")
    if not address.is_loopback and not env.get(SERVER_AUTH_VARIABLE):
        raise StackError(f"--host {host} lets other machines reach the Prefect server, which then needs a "
                         f"password: set {SERVER_AUTH_VARIABLE}=user:password here, and "
                         f"{CLIENT_AUTH_VARIABLE} to the same on every machine whose workers join")


def auth_string(env: dict[str, str] | None = None) -> str | None:
    """The server's password as the stack's own clients send it (from the environment)."""
    env = os.environ if env is None else env
    return env.get(CLIENT_AUTH_VARIABLE) or env.get(SERVER_AUTH_VARIABLE) or None


def healthy(state: StackState, timeout_s: float = 2.0) -> bool:
    try:
        return httpx.get(f"{state.api_url}/health", timeout=timeout_s).status_code == 200  # needs no password
    except httpx.HTTPError:
        return False


#: How long ``gsp down`` waits for a busy server before giving up on marking runs Crashed: a
#: server sharing two cores with a training run missed the 2 s health check (test_stack caught it).
SERVER_ANSWER_S = 30.0


def answers_within(state: StackState, seconds: float) -> bool:
    """Whether the server answers its health check within ``seconds`` (asked again until then)."""
    deadline = time.monotonic() + seconds
    while True:
        if healthy(state):
            return True
        if time.monotonic() >= deadline or not alive(state.server_pid):
            return False
        time.sleep(0.5)


def stack_env(home: Path, api_url: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every process of the stack: the caller's (so ``GSP_*`` settings, the
    endpoint and its key reach deployment runs), its path settings made absolute, and a Prefect
    home, API address and database of the stack's own."""
    env = dict(os.environ if base is None else base)
    for name in PATH_VARIABLES:
        if env.get(name):
            env[name] = str(Path(env[name]).expanduser().resolve())
    if auth_string(env):  # the workers and `prefect deploy` are clients of the server too
        env[CLIENT_AUTH_VARIABLE] = auth_string(env)
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _spawn(args: list[str], env: dict[str, str], log: Path, cwd: Path) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return proc.pid


def _last_line(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


# --- the Prefect API ------------------------------------------------------------------------

def _client(state: StackState):
    """A Prefect client of the stack's server, whatever ``PREFECT_API_URL`` says in this process."""
    from prefect.client.orchestration import PrefectClient

    return PrefectClient(state.api_url, auth_string=auth_string())


async def _create_pools(state: StackState, rate_limits: dict[str, float | None]) -> None:
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    async with _client(state) as client:
        for pool in POOLS:
            try:
                await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            except ObjectAlreadyExists:
                pass
        await ensure_rate_limits(client, rate_limits.get("requests_per_minute"), rate_limits.get("tokens_per_minute"))


async def _online_workers(state: StackState) -> dict[str, list[dict[str, Any]]]:
    async with _client(state) as client:
        out = {}
        for pool in POOLS:
            try:
                workers = await client.read_workers_for_work_pool(pool)
            except httpx.HTTPStatusError as exc:  # a pool that is missing shows as no workers
                if exc.response.status_code != 404:
                    raise  # a 401 is a missing password (:func:`_run` says so), not an empty pool
                workers = []
            out[pool] = [{"name": w.name, "status": str(getattr(w.status, "value", w.status)),
                          "last_heartbeat": w.last_heartbeat_time.isoformat() if w.last_heartbeat_time else None}
                         for w in workers]
        return out


async def _crash_runs_of(state: StackState, pids: set[int], reason: str, since: datetime) -> list[str]:
    """Mark ``Crashed`` the runs the stopped processes were executing (their infrastructure pid),
    which releases the deployment concurrency slot each held. A run whose own engine already said
    Crashed when the signal reached it (since ``since``) is named too: it was running, and is
    Crashed now either way."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    crashed = []
    candidates = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
        any_=[StateType.RUNNING, StateType.PENDING, StateType.CANCELLING, StateType.CRASHED])))
    async with _client(state) as client:
        for run in await client.read_flow_runs(flow_run_filter=candidates):
            pid = _infrastructure_pid(run.infrastructure_pid)
            if pid is None or pid not in pids:
                continue
            if run.state_type == StateType.CRASHED:
                if run.state is not None and run.state.timestamp >= since:
                    crashed.append(run.name)
                continue
            await client.set_flow_run_state(run.id, Crashed(message=reason), force=True)
            crashed.append(run.name)
    return crashed


async def _held_slots(state: StackState) -> dict[str, int]:
    """Deployment concurrency slots still taken (each should have been released with its run)."""
    async with _client(state) as client:
        return {d.name: d.global_concurrency_limit.active_slots for d in await client.read_deployments()
                if d.global_concurrency_limit and d.global_concurrency_limit.active_slots}


def _infrastructure_pid(value: str | None) -> int | None:
    """Prefect records a process worker's run as "<host>:<pid>" (or the pid alone)."""
    if not value:
        return None
    host, _, pid = value.rpartition(":")
    if host and host != socket.gethostname():
        return None
    return int(pid) if pid.isdigit() else None


async def _overview(state: StackState, last_runs: int) -> dict[str, Any]:
    from prefect.client.schemas.sorting import FlowRunSort

    async with _client(state) as client:
        pools = [{"name": p.name, "type": p.type, "paused": p.is_paused} for p in await client.read_work_pools()]
        flows_by_id = {f.id: f.name for f in await client.read_flows()}
        deployments = []
        for d in await client.read_deployments():
            deployments.append({
                "name": f"{flows_by_id.get(d.flow_id, '?')}/{d.name}", "pool": d.work_pool_name, "paused": d.paused,
                "schedules": [{"schedule": _describe_schedule(s.schedule), "active": s.active} for s in d.schedules],
            })
        names = {}
        runs = []
        for r in await client.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=last_runs):
            if r.deployment_id and r.deployment_id not in names:
                dep = await client.read_deployment(r.deployment_id)
                names[r.deployment_id] = f"{flows_by_id.get(dep.flow_id, '?')}/{dep.name}"
            runs.append({"name": r.name, "deployment": names.get(r.deployment_id, "-"),
                         "state": r.state.name if r.state else "?",
                         "start": r.start_time.isoformat(timespec="seconds") if r.start_time else None,
                         "parameters": r.parameters})
    return {"pools": pools, "deployments": deployments, "runs": runs}


def _describe_schedule(schedule: Any) -> str:
    for attr in ("cron", "interval", "rrule"):
        value = getattr(schedule, attr, None)
        if value is not None:
            return f"{attr} {value}"
    return str(schedule)


def _run(coro):
    import asyncio

    try:
        return asyncio.run(coro)
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code != 401:
            raise
        raise StackError(f"the Prefect server at {exc.request.url.host}:{exc.request.url.port} asks for its "
                         f"password: set {CLIENT_AUTH_VARIABLE} (or {SERVER_AUTH_VARIABLE}) to it") from None


# --- up / status / down ---------------------------------------------------------------------

@dataclass
class UpResult:
    state: StackState
    already_up: bool
    cleaned: list[str] = field(default_factory=list)


def up(home: Path, port: int = 4200, *, host: str | None = None,
       rate_limits: dict[str, float | None] | None = None, startup_timeout_s: float = 120.0) -> UpResult:
    """Start the stack (see the module docstring); a stack already up is left as it is. ``host``:
    the address the server listens on (:data:`WILDCARD` for every interface; see
    :func:`check_host`); None: loopback for a new stack, whatever a running one listens on.
    ``rate_limits`` (``requests_per_minute``, ``tokens_per_minute`` of the endpoint) become the
    Prefect global rate limits that fanned-out generation shares (flows.fanout)."""
    home = home.resolve()
    check_host(host or LOOPBACK, dict(os.environ))
    state = read_state(home)
    if state is not None:
        dead = [name for name, pid in state.pids().items() if not alive(pid)]
        if not dead and healthy(state):
            if host is not None and state.host != host:  # not where the user's workers would look for it
                raise StackError(f"the stack is already up, listening on {state.host}: `gsp down` first to "
                                 f"start it on {host}")
            return UpResult(state, already_up=True)
        # Whatever is left of it (a worker that outlived its server) is stopped before starting.
        _stop(state, grace_s=5.0, reason="stack cleaned: its other processes were stopped outside gsp down")
        cleaned = [f"{name} (pid {state.pids()[name]}) was gone" for name in dead] or ["the server did not answer"]
    else:
        cleaned = []
    state = StackState(home=str(home), port=port, server_pid=0, host=host or LOOPBACK)
    if port_in_use(port, state.host):
        raise StackError(f"port {port} on {state.local_host} is in use by another program: pick another with --port")
    logs = home / "logs"
    env = stack_env(home, state.api_url)
    root = project_root()
    state.server_pid = _spawn(prefect_command("server", "start", "--host", state.host, "--port", str(port)),
                              env, logs / "server.log", root)
    write_state(state)  # from here on, `gsp down` can clean up whatever happens next
    _wait_for(lambda: healthy(state), startup_timeout_s, state, "server", logs / "server.log")
    _run(_create_pools(state, rate_limits or {}))
    _deploy(env, root, logs / "deploy.log")
    for pool in POOLS:
        state.workers[pool] = _spawn(prefect_command("worker", "start", "--pool", pool, "--name", f"gsp-{pool}"),
                                     env, logs / f"worker-{pool}.log", root)
    write_state(state)
    _wait_for(lambda: _all_online(state), startup_timeout_s, state, "workers", logs / "worker-cpu.log")
    return UpResult(state, already_up=False, cleaned=cleaned)


def _all_online(state: StackState) -> bool:
    if not all(alive(pid) for pid in state.workers.values()):
        raise StackError("a worker exited while starting: see " + ", ".join(
            str(Path(state.home) / "logs" / f"worker-{p}.log") for p, pid in state.workers.items() if not alive(pid)))
    online = _run(_online_workers(state))
    return all(any(w["name"] == f"gsp-{p}" and w["status"] == "ONLINE" for w in online[p]) for p in POOLS)


def _wait_for(ready, timeout_s: float, state: StackState, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if what == "server" and not alive(state.server_pid):
            raise StackError(f"the Prefect server exited while starting: {_last_line(log)} (log: {log})")
        if ready():
            return
        time.sleep(0.5)
    raise StackError(f"the {what} did not come up within {timeout_s:.0f} s (log: {log}); `gsp down` cleans up")


def _deploy(env: dict[str, str], root: Path, log: Path) -> None:
    prefect_file = root / "prefect.yaml"
    if not prefect_file.is_file():
        raise StackError(f"{prefect_file}: missing; gsp up deploys from the project's prefect.yaml "
                         "(install the project from its clone: README, Set-up)")
    with open(log, "ab") as out:
        done = subprocess.run(prefect_command("--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)),
                              env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise StackError(f"deploying {prefect_file} failed: {_last_line(log)} (log: {log}); `gsp down` cleans up")


def status(home: Path, last_runs: int = 10) -> dict[str, Any]:
    """The stack as it is: processes (alive or not), and from the server its pools, workers,
    deployments with their schedules and the last runs."""
    state = read_state(home.resolve())
    if state is None:
        return {"up": False, "home": str(home)}
    processes = {name: {"pid": pid, "alive": alive(pid)} for name, pid in state.pids().items()}
    report: dict[str, Any] = {"up": healthy(state), "home": state.home, "ui": state.ui_url, "api": state.api_url,
                              "listening_on": state.host, "remote_api": state.remote_api_urls(),
                              "processes": processes}
    if report["up"]:
        report["workers"] = _run(_online_workers(state))
        report.update(_run(_overview(state, last_runs)))
    return report


def down(home: Path, *, grace_s: float = 10.0) -> dict[str, Any]:
    """Stop the workers (their flow runs marked Crashed), then the server; forget the stack."""
    home = home.resolve()
    state = read_state(home)
    if state is None:
        return {"was_up": False, "stopped": [], "crashed_runs": []}
    if healthy(state):
        # Before anything stops: without the password, the workers would be stopped but their
        # runs not marked Crashed, and a later `gsp down` no longer knows which runs those were.
        _run(_check_access(state))
    return {"was_up": True, **_stop(state, grace_s, reason="stopped by gsp down")}


async def _check_access(state: StackState) -> None:
    """Raise (StackError, through :func:`_run`) when the server refuses this process's password."""
    async with _client(state) as client:
        await client.read_work_pools()


def _stop(state: StackState, grace_s: float, reason: str) -> dict[str, Any]:
    started = datetime.now(UTC)
    stopped: list[str] = []
    killed: set[int] = set()
    for pool, pid in state.workers.items():
        if alive(pid):
            killed.update(stop_tree(pid, grace_s))
            stopped.append(f"worker {pool} (pid {pid})")
    crashed: list[str] = []
    held: dict[str, int] = {}
    unmarked = False
    if answers_within(state, SERVER_ANSWER_S if killed else 0.0):
        if killed:
            crashed = _run(_crash_runs_of(state, killed, f"its worker was {reason}", started))
        held = _run(_held_slots(state))
    else:
        unmarked = bool(killed)  # the runs those workers executed may still read Running
    if alive(state.server_pid):
        stop_tree(state.server_pid, grace_s)
        stopped.append(f"server (pid {state.server_pid})")
    left = [pid for pid in [state.server_pid, *state.workers.values(), *killed] if alive(pid)]
    if left:
        raise StackError(f"processes {left} did not stop; stop them by hand, then run gsp down again")
    state_path(Path(state.home)).unlink(missing_ok=True)
    return {"stopped": stopped, "crashed_runs": crashed, "held_slots": held, "runs_unmarked": unmarked}
