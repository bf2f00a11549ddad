"""`gsp synth`: the synthetic demo skeleton data set (pyskl format)."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.common import fail


def synth_cmd(
    out: Path = typer.Option(..., "--out", help="The pyskl pickle to write."),
    samples_per_class: int = typer.Option(30, "--samples-per-class", min=1, help="Clips per sign."),
    frames: int = typer.Option(48, "--frames", min=4, help="Frames per clip."),
    signers: int = typer.Option(8, "--signers", min=2, help="Synthetic signers (body shapes and styles)."),
    test_signers: int = typer.Option(2, "--test-signers", min=1, help="Signers held out as the test split."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
) -> None:
    """Write a synthetic whole-body skeleton data set for the demo signs (pyskl format)."""
    from demo.synthetic import write_synthetic_dataset

    try:
        path = write_synthetic_dataset(out, samples_per_class=samples_per_class, frames=frames, signers=signers,
                                       test_signers=test_signers, seed=seed)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    typer.echo(str(path))


def register(app: typer.Typer) -> None:
    app.command("synth")(synth_cmd)
