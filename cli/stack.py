"""`gsp up`, `gsp status`, `gsp down`: a Prefect server, work pools, deployments and workers on
this machine (flows.stack), for `prefect deployment run gsp/generate` and scheduled retraining."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()


def _home() -> Path:
    from gsp.settings import get_settings

    return get_settings().paths.artifacts_dir / "prefect"


def up_cmd(port: int = typer.Option(4200, "--port", min=1, max=65535, help="Port of the Prefect server."),
           host: str | None = typer.Option(None, "--host", show_default="127.0.0.1", help=(
               "Address the server listens on: 0.0.0.0 (or one of this machine's addresses) lets workers "
               "on other machines, e.g. a GPU host, join; then PREFECT_SERVER_API_AUTH_STRING=user:password "
               "must be set."))) -> None:
    """Start a Prefect server (on 127.0.0.1 unless --host), the work pools cpu and gpu, the
    deployments of prefect.yaml and one worker per pool, in the background, with this shell's
    GSP_* settings."""
    from flows import stack
    from gsp.settings import get_settings
    from mc.device import resolve_device

    llm = get_settings().llm
    with console.status("starting the Prefect server, work pools, deployments and workers…"):
        result = stack.up(_home(), port, host=host, rate_limits={"requests_per_minute": llm.requests_per_minute,
                                                                 "tokens_per_minute": llm.tokens_per_minute})
    state = result.state
    if result.cleaned:
        console.print(f"cleaned a stack whose processes were stopped by hand: {'; '.join(result.cleaned)}")
    if result.already_up:
        console.print(f"the stack is already up (server pid {state.server_pid}); nothing changed")
    else:
        workers = ", ".join(f"{pool} pid {pid}" for pool, pid in state.workers.items())
        console.print(f"stack up: server pid {state.server_pid}, workers {workers}")
    console.print(f"UI:   {state.ui_url}\nhome: {escape(state.home)} (logs in logs/)")
    if resolve_device("auto").type != "cuda":
        console.print("no CUDA device here: the gpu pool's runs train on the CPU")
    console.print("Point the prefect CLI at it, then start a generation run (training follows by itself):")
    typer.echo(f"export PREFECT_API_URL={state.api_url}")
    if stack.auth_string():
        console.print(f"(and {stack.CLIENT_AUTH_VARIABLE} set to the server's password)", highlight=False)
    console.print("prefect deployment run gsp/generate --param vocab=knowledge_base/demo_vocab.csv", highlight=False)
    remote = state.remote_api_urls()
    if remote:
        console.print("Workers on other machines (README: A GPU host joins), with "
                      f"{stack.CLIENT_AUTH_VARIABLE} set to the server's password:", highlight=False)
        for url in remote:
            typer.echo(f"PREFECT_API_URL={url} .venv/bin/prefect worker start --pool gpu")


def status_cmd(runs: int = typer.Option(10, "--runs", min=0, help="How many of the last flow runs to list."),
               as_json: bool = typer.Option(False, "--json", help="Print the status as JSON.")) -> None:
    """The server, pools, workers (alive or not), deployments with schedules, and the last runs."""
    from flows import stack

    report = stack.status(_home(), runs)
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
        return
    if "processes" not in report:
        console.print("no stack is up (start one with gsp up)")
        return
    _print_processes(report)
    if not report["up"]:
        console.print("[yellow]the server does not answer: run gsp down to clean up, then gsp up[/yellow]")
        return
    _print_server(report)


def _print_processes(report: dict) -> None:
    table = Table(title=f"stack at {report['ui']}")
    for col in ("process", "pid", "alive", "prefect"):
        table.add_column(col)
    for name, proc in report["processes"].items():
        pool = name.removeprefix("worker ") if name.startswith("worker ") else None
        seen = [w["status"] for w in report.get("workers", {}).get(pool, []) if w["name"] == f"gsp-{pool}"]
        table.add_row(name, str(proc["pid"]), "yes" if proc["alive"] else "[red]no[/red]",
                      seen[0] if seen else ("healthy" if name == "server" and report["up"] else ""))
    console.print(table)
    if report.get("remote_api"):
        console.print(f"listening on {report['listening_on']}; other machines' workers use "
                      + ", ".join(f"PREFECT_API_URL={url}" for url in report["remote_api"]), highlight=False)


def _print_server(report: dict) -> None:
    pools = Table(title="work pools")
    for col in ("pool", "type", "workers"):
        pools.add_column(col)
    for p in report["pools"]:
        workers = report["workers"].get(p["name"], [])
        pools.add_row(p["name"] + (" (paused)" if p["paused"] else ""), p["type"],
                      ", ".join(f"{w['name']} {w['status']}" for w in workers) or "none")
    console.print(pools)
    deployments = Table(title="deployments")
    for col in ("deployment", "pool", "schedules"):
        deployments.add_column(col)
    for d in report["deployments"]:
        schedules = "; ".join(f"{s['schedule']} ({'active' if s['active'] else 'inactive'})" for s in d["schedules"])
        deployments.add_row(d["name"], d["pool"] or "", schedules or "-")
    console.print(deployments)
    runs = Table(title="last runs")
    for col in ("run", "deployment", "state", "started"):
        runs.add_column(col)
    for r in report["runs"]:
        runs.add_row(r["name"], r["deployment"], r["state"], r["start"] or "")
    console.print(runs)


def down_cmd(grace: float = typer.Option(10.0, "--grace", min=0,
                                         help="Seconds a process gets to stop after SIGTERM before SIGKILL.")) -> None:
    """Stop the workers (their running flow runs marked Crashed), then the server."""
    from flows import stack

    result = stack.down(_home(), grace_s=grace)
    if not result["was_up"]:
        console.print("no stack is up; nothing to stop")
        return
    for what in result["stopped"]:
        console.print(f"stopped {what}")
    if not result["stopped"]:
        console.print("its processes were already gone; forgot the stack")
    for name in result["crashed_runs"]:
        console.print(f"flow run {name} was running: marked Crashed")
    if result.get("runs_unmarked"):
        console.print("[yellow]the server did not answer, so the runs of the stopped workers were not marked "
                      "Crashed; if one still reads Running, set it Crashed in the UI to free its slot[/yellow]")
    for name, slots in result.get("held_slots", {}).items():
        console.print(f"[yellow]deployment {name} still holds {slots} concurrency slot(s): its next runs wait until "
                      "they are released (prefect gcl ls)[/yellow]")


def register(app: typer.Typer) -> None:
    app.command("up")(up_cmd)
    app.command("status")(status_cmd)
    app.command("down")(down_cmd)
