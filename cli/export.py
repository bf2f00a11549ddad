"""``gsp export``: a training run's inference export (``export.pt``) and its ONNX form
(``model.onnx``); a thin typer wrapper over :mod:`mc.onnx_export`."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.common import fail


def export_cmd(
    run: Path = typer.Argument(..., metavar="RUN", help="A training run folder (with checkpoints/last.pt)."),
    onnx: bool = typer.Option(
        False, "--onnx", help="Also write the ONNX model (dynamic batch and frame count, label names and "
        "preprocessing as metadata) for `gsp predict MODEL.onnx` and ONNX Runtime."),
    out: Path | None = typer.Option(
        None, "--out", help="Where the asked-for file goes: the .onnx with --onnx, else the .pt.",
        show_default="RUN/model.onnx with --onnx, else RUN/export.pt"),
) -> None:
    """(Re)write RUN/export.pt from the run's last checkpoint; with --onnx also model.onnx."""
    from gsp.errors import GspError
    from mc.onnx_export import export_run

    if out is not None and out.is_dir():
        fail(f"--out {out}: is a folder; give the path of the file to write")
    try:  # an ExportError is one line, exit 2
        written = export_run(run, onnx=onnx, out=out, notify=lambda message: typer.echo(message, err=True))
    except GspError:
        raise  # already one line naming the run or the path (cli.main prints it)
    except (RuntimeError, OSError) as exc:
        fail(f"{run}: export failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    for path in written:
        typer.echo(str(path))


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)
