"""``gsp experiment ablation``: a grid of trainings with a summary over seeds; a thin typer
wrapper over :mod:`mc.experiment` (the controls and minimal pairs of the demo signs come from
:mod:`demo.experiment_inputs`)."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.common import fail

experiment_app = typer.Typer(help="Experiments: grids of trainings summarised over seeds.", no_args_is_help=True)


def _list(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _ints(option: str, text: str, allow_all: bool = False) -> list:
    out: list = []
    for t in _list(text):
        if allow_all and t == "all":
            out.append(None)
            continue
        try:
            value = int(t)
        except ValueError:
            fail(f"{option}: {t!r} is not a whole number; give comma-separated numbers"
                 + (" or all" if allow_all else "") + f", e.g. {'2,4,8,all' if allow_all else '0,1,2'}")
        if allow_all and value < 1:
            fail(f"{option}: {value} clips per class; give at least 1 (or all)")
        out.append(value)
    return out


def ablation_cmd(
    data: Path = typer.Option(..., "--data", help="pyskl pickle, labels CSV or folder of .npy files."),
    out: Path = typer.Option(..., "--out", help="Experiment folder: runs/, results.csv, summary.csv, summary.md."),
    descriptions: str = typer.Option(
        "", "--descriptions", help="Comma-separated description runs: PATH, NAME=PATH, reference (written from "
        "the demo sign source) or shuffled:ENTRY (that run's texts permuted among classes)."),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Comma-separated training seeds."),
    ablations: str = typer.Option(
        "ce,all", "--ablations", help="Comma-separated: ce, synonyms, prompt, multipart, synonyms+prompt, all."),
    keypoints: str | None = typer.Option(
        None, "--keypoints", help="Comma-separated keypoint sets: gsp87, base27, masa49, cosign76.",
        show_default="GSP_MC_KEYPOINT_PRESET, else gsp87"),
    preset: str | None = typer.Option(
        None, "--preset", help="Training recipe.", show_default="GSP_MC_PRESET, else tiny"),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="Epochs of every cell (the LR schedule "
                                      "is stretched to them).", show_default="the preset's"),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Instead of --epochs: optimisation steps per "
                                     "cell; each cell trains enough epochs for them (small K: more epochs)."),
    train_per_class: str = typer.Option(
        "all", "--train-per-class", help="Comma-separated clips per class, e.g. 2,4,8,all (drawn per seed)."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads.", show_default="torch's"),
) -> None:
    """Train every cell (ablation × keypoints × description run × K × seed), each in DIR/runs/<cell>;
    write results.csv and summary.csv/summary.md (mean, sd, 95% CI over seeds; the paired-seed
    difference to CE only). A re-run skips finished cells and resumes a killed one."""
    from demo.experiment_inputs import CONTROL_BUILDERS, data_minimal_pairs
    from gsp.settings import get_settings
    from mc.experiment import ExperimentSpec, run_experiment

    settings = get_settings()
    spec = ExperimentSpec(
        data=data, out=out, descriptions=[], seeds=_ints("--seeds", seeds), ablations=_list(ablations),
        keypoints=_list(keypoints) or [settings.mc.keypoint_preset], ks=_ints("--train-per-class", train_per_class,
                                                                              allow_all=True) or [None],
        preset=preset or settings.mc.preset, epochs=epochs, steps=steps,
        train_overrides={"threads": threads} if threads else {})
    spec.pairs = data_minimal_pairs(data)

    def report(line: str) -> None:
        typer.echo(line, err=True)

    try:
        result = run_experiment(spec, settings, report, _list(descriptions), CONTROL_BUILDERS)
    except (ValueError, RuntimeError, OSError) as exc:  # a GspError is one line from the root group
        fail(str(exc).splitlines()[0])
    typer.echo((Path(result["out"]) / "summary.md").read_text(encoding="utf-8"))


def register(app: typer.Typer) -> None:
    experiment_app.command("ablation")(ablation_cmd)
    app.add_typer(experiment_app, name="experiment")
