"""``gsp retrieve`` (text → clip search) and the output of ``gsp eval RUN --zero-shot``: thin
wrappers over :mod:`mc.zeroshot`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cli.common import fail


def _cache_and_device(device: str | None) -> tuple[Path, str]:
    from gsp.settings import get_settings

    settings = get_settings()
    return settings.paths.cache, device or settings.mc.device


def zero_shot_eval(run: Path, descriptions: Path | None, data: Path | None, split: str, out: Path | None,
                   device: str, as_json: bool, skip_bad: bool = False) -> None:
    """``gsp eval RUN --zero-shot``: evaluate, write ``metrics.json``, print JSON or a table."""
    from mc.device import resolve_device
    from mc.zeroshot import evaluate_zero_shot

    cache, _ = _cache_and_device(device)
    try:
        m = evaluate_zero_shot(run, cache, descriptions=descriptions, data=data, split=split,
                               device=resolve_device(device), out=out, skip_bad=skip_bad)
    except (ValueError, RuntimeError, OSError) as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(m, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"zero-shot {run} [{split}]: {m['num_classes']} held-out classes, {m['num_samples']} clips")
    for col in ("", "top-1", "top-5"):
        table.add_column(col, justify="right" if col else "left")
    table.add_row("descriptions", f"{m['top1']:.3f}", f"{m['top5']:.3f}")
    table.add_row("shuffled control", f"{m['control']['top1']:.3f}", f"{m['control']['top5']:.3f}")
    table.add_row("chance", f"{m['chance']:.3f}", f"{m['chance_top5']:.3f}")
    for term, top1 in m["top1_by_term"].items():
        table.add_row(f"  {term} only", f"{top1:.3f}", "")
    Console(stderr=True).print(table)
    if m["skipped"]:
        typer.echo(f"skipped {len(m['skipped'])} bad clip(s); they are listed in metrics.json", err=True)


def retrieve_cmd(
    query: str = typer.Argument(
        ..., metavar="QUERY", help="A description, e.g. \"the right hand circles in front of the body\"."),
    run: Path = typer.Option(..., "--run", help="A GSP-MC training run folder (trained with --descriptions)."),
    data: Path | None = typer.Option(
        None, "--data", help="Clips to search.", show_default="the data the run was trained on"),
    k: int = typer.Option(5, "-k", "--top", min=1, help="How many clips to list."),
    split: str = typer.Option("test", "--split", help="Which split of the data to search."),
    device: str | None = typer.Option(
        None, "--device", help="auto, cpu, cuda, cuda:N or mps.", show_default="GSP_MC_DEVICE, else auto"),
    as_json: bool = typer.Option(False, "--json", help="Print the hits as JSON."),
) -> None:
    """The clips that best match a text: cosine between the run's projected global skeleton feature
    and the query encoded by the run's own text encoder."""
    from mc.device import resolve_device
    from mc.zeroshot import retrieve

    _, device = _cache_and_device(device)
    try:
        hits = retrieve(run, data, query, k=k, split=split, device=resolve_device(device))
    except (ValueError, RuntimeError, OSError) as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(hits, ensure_ascii=False))
        return
    for h in hits:
        name = f" {h['name']}" if h["name"] else ""
        typer.echo(f"{h['rank']:>3}  {h['score']:+.4f}  {h['sample_id']}\t{h['label']}{name}")


def register(app: typer.Typer) -> None:
    app.command("retrieve")(retrieve_cmd)
