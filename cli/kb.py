"""`gsp ingest` and `gsp search`: build the knowledge base index and query it."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=True)


def run_ingest(kb_dir: Path | None, index_dir: Path | None, show_progress: bool = True):
    """Ingest with a progress bar and a summary table (default folders: the settings' paths);
    returns the IngestReport."""
    from gsp.index import ingest, prepare_ingest
    from gsp.settings import get_settings

    settings = get_settings()
    kb_dir = kb_dir or settings.paths.kb_dir
    index_dir = index_dir or settings.paths.index
    prepare_ingest(kb_dir, index_dir)  # a refusal is one line, not a line after an empty bar

    with Progress(
        TextColumn("[bold]embedding chunks"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not show_progress,
        transient=False,
    ) as bar:
        task = bar.add_task("embed", total=None)

        def on_progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        def on_document(doc) -> None:
            if doc.status != "ok":
                console.print(f"[red]failed[/red] {escape(doc.error or '')}", soft_wrap=True, highlight=False)

        report = ingest(kb_dir, index_dir, settings.kb, progress=on_progress, on_document=on_document)
        bar.update(task, total=report.embedded_chunks, completed=report.embedded_chunks)

    table = Table(title=f"ingest → {report.index_dir}")
    for col in ("documents", "embedded", "reused", "removed", "failed", "pages", "chunks", "seconds"):
        table.add_column(col, justify="right")
    table.add_row(
        str(len(report.documents)),
        str(sum(d.embedded for d in report.documents)),
        str(sum(1 for d in report.documents if d.status == "ok" and not d.embedded)),
        str(len(report.removed)),
        str(len(report.failed)),
        str(report.pages),
        str(report.chunks),
        f"{report.seconds:.1f}",
    )
    console.print(table)
    return report


def ingest_cmd(
    kb_dir: Path | None = typer.Argument(
        None, help="Folder of dictionary PDFs (default: the bundled knowledge_base/)."),
    index: Path | None = typer.Option(None, "--index", help="Index folder (default: artifacts/index)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Index dictionary PDFs (incremental: only new or changed files are embedded).

    --index may name a new or empty folder or an existing index; anything else is refused."""
    report = run_ingest(kb_dir, index, show_progress=not quiet)
    if not report.ok:
        console.print(f"[red]{len(report.failed)} document(s) failed[/red]; the others are indexed.")
        raise typer.Exit(1)


def search_cmd(
    query: str = typer.Argument(..., help="Gloss or text to look up."),
    index: Path | None = typer.Option(None, "--index", help="Index folder (default: artifacts/index)."),
    k: int = typer.Option(5, "-k", "--top-k", min=1, help="Number of hits."),
    as_json: bool = typer.Option(False, "--json", help="Print hits as a JSON list."),
) -> None:
    """Hybrid (dense + BM25 + headword) search of the knowledge base."""
    from gsp.retrieval import HybridRetriever
    from gsp.settings import get_settings

    settings = get_settings()
    hits = HybridRetriever.load(index or settings.paths.index, settings.kb).search(query, k=k)
    if as_json:
        typer.echo(json.dumps([h.to_dict() for h in hits], ensure_ascii=False, indent=2))
        return
    out = Console()
    if not hits:
        out.print(f"no hits for {query!r}")
    for rank, h in enumerate(hits, 1):
        out.rule(f"{rank}. {h.headword or '—'}  [{h.citation()}]  score {h.score:.3f}")
        out.print(h.text)


def register(app: typer.Typer) -> None:
    app.command("ingest")(ingest_cmd)
    app.command("search")(search_cmd)
