"""`gsp run`: the main job — the whole GSP-MC DAG on embedded defaults.

Bundled demo dictionary → index → descriptions of the demo vocabulary (the local LLM when no
endpoint is configured) → synthetic skeletons of the same signs → text features → training with
the tiny preset → evaluation; then a table of where every artifact landed.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cli.common import fail
from flows import use_local_prefect

if TYPE_CHECKING:
    from gsp.settings import KnowledgeBaseSettings

console = Console(stderr=True)
SAMPLE_GLOSS = "love"


def _print_search(index_dir: Path, query: str, kb: KnowledgeBaseSettings, k: int = 3) -> None:
    from gsp.retrieval import HybridRetriever

    hits = HybridRetriever.load(index_dir, kb).search(query, k=k)
    table = Table(title=f"knowledge base: top {k} for {query!r}")
    for col in ("#", "headword", "citation", "score", "text"):
        table.add_column(col)
    for i, h in enumerate(hits, 1):
        table.add_row(str(i), h.headword or "—", h.citation(), f"{h.score:.2f}",
                      escape(h.text[:90].replace("\n", " ") + ("…" if len(h.text) > 90 else "")))
    Console().print(table)


def run_cmd(
    vocab: Path | None = typer.Option(None, "--vocab", help="Vocabulary CSV (default: the demo vocabulary)."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Describe only the first N signs."),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="Training epochs (default: the preset's)."),
    samples_per_class: int = typer.Option(
        24, "--samples-per-class", min=8, help="Synthetic clips per sign (8 signers, 2 of them test)."),
    streams: str = typer.Option("joint", "--streams", help="Comma-separated: joint,bone,joint_motion,bone_motion."),
    search: str = typer.Option(SAMPLE_GLOSS, "--search", help="Gloss to look up after ingest."),
    onnx: bool = typer.Option(
        False, "--onnx", help="Also write each stream's model.onnx for ONNX Runtime (`gsp predict`); "
        "tracing adds about half a minute."),
) -> None:
    """Run the whole pipeline end to end on embedded defaults and say where everything landed."""
    from cli.kb import run_ingest
    from gsp.settings import get_settings

    t0 = time.perf_counter()
    settings = get_settings()
    vocab_path = vocab or settings.paths.kb_dir / "demo_vocab.csv"
    if not Path(vocab_path).is_file():
        fail(f"vocabulary not found: {vocab_path}")
    stream_list = _stream_names(streams)  # checked before anything runs: a typo must not cost a generation

    console.rule("[bold]1/3 knowledge base")
    report = run_ingest(None, None)
    if report.failed:
        console.print(f"[yellow]{len(report.failed)} document(s) failed; continuing with the rest[/yellow]")
    _print_search(report.index_dir, search, settings.kb)

    console.rule("[bold]2/3 descriptions, skeletons, training (Prefect flow gsp-mc)")
    if not settings.llm.base_url:
        console.print("no GSP_LLM_BASE_URL: using the embedded local LLM (SmolLM2-135M; poor text, real pipeline)")
    use_local_prefect()
    from flows.gsp_flow import hide_what_the_cli_prints
    from flows.pipeline import pipeline_flow
    from gsp.generate import RunFailed

    hide_what_the_cli_prints()
    try:
        result = asyncio.run(pipeline_flow(
            vocab=str(vocab_path), artifacts_dir=str(settings.paths.artifacts_dir), limit=limit,
            samples_per_class=samples_per_class, epochs=epochs, preset=settings.mc.preset,
            streams=stream_list, onnx=onnx,
        ))
    except RunFailed as exc:
        # The descriptions failed: training on them would be training on nothing. Any other
        # GspError (bad input, a refused endpoint) is one line from cli.main as it is.
        raise RunFailed(f"{exc}; stopped before training") from None

    console.rule("[bold]3/3 summary")
    _print_summary(result, report.index_dir, time.perf_counter() - t0)


def _stream_names(streams: str) -> list[str]:
    from mc.transforms import STREAMS

    names = [s.strip() for s in streams.split(",") if s.strip()]
    unknown = [s for s in names if s not in STREAMS]
    if unknown or not names:
        fail(f"--streams {streams!r}: unknown {', '.join(unknown) or 'empty'}; choose from {', '.join(STREAMS)}")
    return names


def _print_summary(result: dict, index_dir: Path, seconds: float) -> None:
    """The descriptions' summary, the test metrics, and where every artifact landed."""
    gen, trained = result["descriptions"], result["training"]
    console.print(gen["summary"])
    metrics = Table(title="test metrics")
    for col in ("stream", "loss", "top1", "top5", "epochs", "seconds"):
        metrics.add_column(col, justify="right")
    for name, m in trained["streams"].items():
        metrics.add_row(name, "CE + L_con" if m["contrastive"] else "CE only", f"{m['top1']:.3f}",
                        f"{m['top5']:.3f}", str(m["epochs"]), f"{m['seconds']:.0f}")
    if trained.get("ensemble"):
        e = trained["ensemble"]
        metrics.add_row("ensemble", "", f"{e['top1']:.3f}", f"{e['top5']:.3f}", "", "")
    Console().print(metrics)
    where = Table(title=f"artifacts ({seconds:.0f} s)")
    where.add_column("what")
    where.add_column("path", overflow="fold")
    where.add_row("knowledge-base index", str(index_dir))
    where.add_row("descriptions (Tb/Ts/Tg/Tp parquet)", gen["run_dir"])
    where.add_row("synthetic skeletons (pyskl)", result["skeletons"])
    for name, path in trained["metrics_files"].items():
        where.add_row(f"training run ({name}): checkpoints, TensorBoard, metrics", str(Path(path).parent))
    for name, path in trained["exports"].items():
        where.add_row(f"inference export ({name})", path)
    for name, path in trained.get("onnx", {}).items():
        where.add_row(f"ONNX export ({name})", path)
    Console().print(where)
    if (trained.get("text_features") or {}).get("error"):
        console.print(f"[yellow]{escape(trained['text_features']['error'])}: trained with cross-entropy only"
                      "[/yellow]", soft_wrap=True)
    if gen.get("failure_line"):
        console.print(f"[yellow]{escape(gen['failure_line'])}[/yellow]", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)
