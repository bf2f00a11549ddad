"""``gsp train``, ``gsp eval``, ``gsp ensemble``, ``gsp predict``, ``gsp synth`` and
``gsp model summary``: thin typer wrappers over :mod:`mc.train` and :mod:`mc.evaluate`."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import typer

from cli.common import fail
from mc.presets import DEFAULT_ALPHA, DEFAULT_TAU

model_app = typer.Typer(help="Inspect the skeleton model.", no_args_is_help=True)

AMP_CHOICES = ("auto", "on", "off")


def _check_choice(option: str, value: str, allowed: Iterable[str]) -> None:
    from gsp.errors import did_you_mean

    allowed = list(allowed)
    if value not in allowed:
        fail(f"{option} {value!r} is not valid{did_you_mean(value, allowed)}; choose one of {', '.join(allowed)}")


def _check_device(option: str, value: str) -> None:
    from gsp.settings import DEVICE_CHOICES, DEVICE_PATTERN

    if not DEVICE_PATTERN.fullmatch(value):
        fail(f"{option} {value!r} is not a device; use {DEVICE_CHOICES}")


def _check_names(preset: str | None = None, stream: str | None = None, layout: str | None = None,
                 ablation: str | None = None) -> None:
    """Refuse a misspelt name before anything loads (pydantic's report is a multi-line dump)."""
    from mc.keypoints import KEYPOINT_SETS
    from mc.presets import RECIPES
    from mc.transforms import STREAMS

    if preset is not None:
        _check_choice("--preset", preset, RECIPES)
    if stream is not None:
        _check_choice("--stream", stream, STREAMS)
    if layout is not None:
        _check_choice("--layout", layout, sorted(KEYPOINT_SETS))
    if ablation is not None:
        from mc.loss import ABLATIONS

        _check_choice("--ablation", ablation, ABLATIONS)


def _validation_line(exc) -> str:
    """A pydantic ValidationError of the CLI's options as one line naming each option."""
    parts = []
    for err in exc.errors(include_url=False):
        option = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else "options"
        parts.append(f"{option} {err.get('input')!r}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (rich's progress bar and test runners swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # logging must never break training
            self.handleError(record)


@contextmanager
def _mc_log_to_stderr():
    """INFO and above from the ``mc`` package (description coverage, resume) on stderr, for the
    duration of one command: a handler left behind would also print under later commands run in
    the same process (tests, notebooks), whose stderr must stay one line on a user's mistake."""
    logger = logging.getLogger("mc")
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def _print_metrics(metrics: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("top1", "top5", "mean_class_accuracy", "num_samples", "epochs", "seconds", "train_samples_per_s"):
        if key in metrics and metrics[key] is not None:
            v = metrics[key]
            table.add_row(key, f"{v:.4f}" if isinstance(v, float) else str(v))
    Console(stderr=True).print(table)


def _holdout_option(classes: str | None, fraction: float | None) -> list[int] | None:
    """``--holdout-classes 3,17,40`` as labels; refused with ``--holdout-fraction`` or when not integers."""
    if classes is None:
        return None
    if fraction is not None:
        fail("--holdout-classes and --holdout-fraction exclude each other; give one")
    try:
        return [int(v) for v in classes.split(",") if v.strip()]
    except ValueError:
        fail(f"--holdout-classes {classes!r}: give comma-separated label ids, e.g. 3,17,40")


def train_cmd(
    data: Path = typer.Option(..., "--data", help="pyskl pickle, labels CSV or folder of .npy or .pose files."),
    out: Path = typer.Option(..., "--out", help="Run folder (checkpoints, metrics.json, export.pt)."),
    descriptions: Path | None = typer.Option(
        None, "--descriptions", help="Description run (or root with LATEST). Without it: the CE-only baseline."),
    preset: str | None = typer.Option(
        None, "--preset", help="Training recipe: slr500, autsl or tiny.", show_default="GSP_MC_PRESET, else tiny"),
    stream: str = typer.Option("joint", "--stream", help="Input stream: joint, bone, joint_motion or bone_motion."),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="Epochs.", show_default="the preset's"),
    batch_size: int | None = typer.Option(None, "--batch-size", min=2, help="Batch size.", show_default="the preset's"),
    lr: float | None = typer.Option(None, "--lr", help="Base learning rate (SGD).", show_default="the preset's"),
    frames: int | None = typer.Option(None, "--frames", min=4, help="Frames per clip.", show_default="the preset's"),
    base_channels: int | None = typer.Option(
        None, "--base-channels", min=4, help="CTR-GCN width of the first units.", show_default="the preset's"),
    no_contrastive: bool = typer.Option(False, "--no-contrastive", help="CE-only baseline even with --descriptions."),
    train_per_class: int | None = typer.Option(
        None, "--train-per-class", min=1, help="Train on K clips per class (drawn by --seed; the same K "
        "clips for every run with that seed).", show_default="all"),
    holdout_classes: str | None = typer.Option(
        None, "--holdout-classes", help="Labels to leave out of training, e.g. 3,17,40 (at least 2), for "
        "`gsp eval RUN --zero-shot`; the test metrics then cover the other classes.", show_default="none"),
    holdout_fraction: float | None = typer.Option(
        None, "--holdout-fraction", help="Leave out this share of the classes (e.g. 0.2), drawn with --seed.",
        show_default="none"),
    ablation: str = typer.Option(
        "all", "--ablation", help="Text sets of the contrastive loss: ce, synonyms, prompt, multipart, "
        "synonyms+prompt, all."),
    alpha: float = typer.Option(DEFAULT_ALPHA, "--alpha", help="Weight of the contrastive loss (eq. 12)."),
    tau: float = typer.Option(DEFAULT_TAU, "--tau", help="Temperature of the contrastive loss (eqs. 7-8)."),
    layout: str | None = typer.Option(
        None, "--layout", help="Keypoint preset: gsp87, base27, masa49, cosign76.",
        show_default="GSP_MC_KEYPOINT_PRESET, else gsp87"),
    seed: int | None = typer.Option(None, "--seed", help="Random seed.", show_default="GSP_MC_SEED, else 0"),
    device: str | None = typer.Option(
        None, "--device", help="auto, cpu, cuda, cuda:N or mps.", show_default="GSP_MC_DEVICE, else auto"),
    amp: str = typer.Option("auto", "--amp", help="Mixed precision: auto (on for CUDA), on, off."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads.", show_default="torch's"),
    compile_: bool | None = typer.Option(
        None, "--compile/--no-compile", help="torch.compile the backbone (eager, with one warning, where it "
        "cannot compile).", show_default="GSP_MC_COMPILE, else off"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Log and skip bad samples instead of failing."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Ignore an existing checkpoint in --out."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar (for logs and CI)."),
    nproc_per_node: int = typer.Option(
        1, "--nproc-per-node", min=1, help="Training processes on this machine (DistributedDataParallel under "
        "torchrun; one GPU each on CUDA). --batch-size is the global batch, split over them."),
) -> None:
    """Train one stream; writes checkpoints, test scores and metrics.json into --out."""
    from pydantic import ValidationError

    from gsp.settings import get_settings
    from mc.distributed import launch_training
    from mc.run_folder import RunFolder
    from mc.train import TrainConfig

    settings = get_settings()
    _check_names(preset=preset, stream=stream, layout=layout, ablation=ablation)
    _check_choice("--amp", amp, AMP_CHOICES)
    if device is not None:
        _check_device("--device", device)
    held_out = _holdout_option(holdout_classes, holdout_fraction)
    with _mc_log_to_stderr():
        try:
            cfg = TrainConfig.from_settings(
                settings, data=data, out=out, descriptions=descriptions, preset=preset, stream=stream, epochs=epochs,
                batch_size=batch_size, lr=lr, frames=frames, base_channels=base_channels,
                train_per_class=train_per_class, holdout_classes=held_out, holdout_fraction=holdout_fraction,
                contrastive=not no_contrastive, ablation=ablation, alpha=alpha, tau=tau, layout=layout,
                seed=seed, device=device, amp=amp, threads=threads, compile=compile_, skip_bad=skip_bad,
                resume=not no_resume, progress=not no_progress,
            )
        except ValidationError as exc:
            fail(_validation_line(exc))
        try:
            metrics = launch_training(cfg, nproc_per_node)
        except (ValueError, RuntimeError, OSError) as exc:
            fail(str(exc))
        _print_metrics(
            metrics, f"{stream} ({'contrastive ' + metrics['ablation'] if metrics['contrastive'] else 'CE only'})")
        typer.echo(str(RunFolder(out).metrics))


def eval_cmd(
    run: Path = typer.Argument(..., help="A training run folder (with checkpoints/last.pt)."),
    data: Path | None = typer.Option(
        None, "--data", help="Data to evaluate on.", show_default="the data the run was trained on"),
    split: str = typer.Option("test", "--split", help="Which split of the data to evaluate on."),
    out: Path | None = typer.Option(
        None, "--out", help="Where scores, confusion and metrics go.", show_default="RUN/eval-SPLIT"),
    device: str | None = typer.Option(
        None, "--device", help="auto, cpu, cuda, cuda:N or mps.", show_default="GSP_MC_DEVICE, else auto"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Log and skip bad samples instead of failing."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    zero_shot: bool = typer.Option(
        False, "--zero-shot", help="Recognise the run's held-out classes (gsp train --holdout-classes) from their "
        "descriptions alone, against chance and a shuffled-description control."),
    descriptions: Path | None = typer.Option(
        None, "--descriptions", help="With --zero-shot: the description run (or root with LATEST) whose texts "
        "describe the held-out classes.", show_default="the run's own"),
) -> None:
    """Evaluate a run's last checkpoint: top-1/top-5, per-class accuracy, confusion matrix
    (or, with --zero-shot, zero-shot top-1/top-5 of its held-out classes)."""
    from gsp.settings import get_settings
    from mc.evaluate import evaluate_checkpoint

    if device is None:
        device = get_settings().mc.device
    _check_device("--device", device)
    if descriptions is not None and not zero_shot:
        fail("--descriptions is for --zero-shot (plain evaluation uses the classifier, not texts)")
    if zero_shot:
        from cli.retrieve import zero_shot_eval

        return zero_shot_eval(run, descriptions=descriptions, data=data, split=split, out=out, device=device,
                              as_json=as_json, skip_bad=skip_bad)
    try:
        metrics = evaluate_checkpoint(run, data=data, split=split, out=out, device=device, skip_bad=skip_bad)
    except (ValueError, RuntimeError, OSError) as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(metrics))
    else:
        _print_metrics(metrics, f"eval {run} [{split}]")


def ensemble_cmd(
    runs: list[Path] = typer.Argument(..., help="Run folders or test_scores.npz files, one per stream."),
    weights: str | None = typer.Option(
        None, "--weights", help="One weight per run, comma-separated, e.g. 1,1,0.5,0.5.", show_default="all 1"),
    out: Path | None = typer.Option(
        None, "--out", help="Write fused scores, confusion and metrics here.", show_default="print only"),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
) -> None:
    """Fuse several streams' saved test scores with configurable weights."""
    from mc.evaluate import ensemble

    try:
        w = [float(v) for v in weights.split(",")] if weights else None
    except ValueError:
        fail(f"--weights must be comma-separated numbers, got {weights!r}")
    try:
        metrics = ensemble(runs, w, out_dir=out)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps({k: v for k, v in metrics.items() if k != "per_class_accuracy"}))
    else:
        _print_metrics(metrics, f"ensemble of {len(runs)}")


def predict_cmd(
    model: Path = typer.Argument(
        ..., help="export.pt (or a run folder holding one), or model.onnx (`gsp export RUN --onnx`; run with "
        "ONNX Runtime)."),
    keypoints: Path = typer.Argument(..., help="A (T, 133, 3) .npy keypoint file or a .pose file."),
    topk: int = typer.Option(5, "--topk", min=1, help="How many classes to list."),
    as_json: bool = typer.Option(False, "--json", help="Print the predictions as JSON."),
) -> None:
    """Classify one keypoint file with an exported model (PyTorch, or ONNX Runtime for .onnx)."""
    if model.suffix.lower() == ".onnx":
        from mc.onnx_export import predict_onnx_file as predict_file
    else:
        from mc.evaluate import predict_file

    try:
        preds = predict_file(model, keypoints, topk=topk)
    except (ValueError, RuntimeError, OSError) as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(preds))
        return
    for p in preds:
        name = f" {p['name']}" if p["name"] else ""
        typer.echo(f"{p['label']:>5}{name}\t{p['probability']:.4f}")


def model_summary(
    num_classes: int = typer.Option(500, "--num-classes", min=1, help="Classifier outputs."),
    frames: int | None = typer.Option(None, "--frames", min=4, help="Frames per clip.", show_default="the preset's"),
    preset: str = typer.Option(
        "slr500", "--preset", help="Recipe whose width and frames to use: slr500, autsl or tiny."),
    base_channels: int | None = typer.Option(
        None, "--base-channels", min=4, help="CTR-GCN width of the first units.", show_default="the preset's"),
    text_dim: int = typer.Option(384, "--text-dim", min=1, help="Text-feature dimension (384 MiniLM, 512 CLIP)."),
    layout: str | None = typer.Option(
        None, "--layout", help="Keypoint preset: gsp87, base27, masa49, cosign76.",
        show_default="GSP_MC_KEYPOINT_PRESET, else gsp87"),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Parameters per component and inference FLOPs per sample."""
    from gsp.settings import get_settings
    from mc.keypoints import get_layout, layout_from_settings
    from mc.model import GSPMCModel, flops_per_sample, model_config_for, parameter_counts
    from mc.presets import get_recipe

    _check_names(preset=preset, layout=layout)
    try:
        p = get_recipe(preset)
        lay = get_layout(layout) if layout is not None else layout_from_settings(get_settings().mc)
    except ValueError as exc:
        fail(str(exc))
    frames = frames or p.frames
    model = GSPMCModel(model_config_for(lay, num_classes, base_channels=base_channels or p.base_channels,
                                        text_dim=text_dim))
    summary = {**parameter_counts(model), "flops_per_sample": flops_per_sample(model, frames, lay.num_nodes)}
    summary["total"] = summary["backbone"] + summary["classifier"] + summary["projections"]
    summary["inference_parameters"] = summary["backbone"] + summary["classifier"]
    if as_json:
        typer.echo(json.dumps({**summary, "frames": frames, "num_classes": num_classes, "num_nodes": lay.num_nodes}))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"CTR-GCN ({preset}, {lay.name}, {frames} frames, {num_classes} classes)")
    t.add_column("component")
    t.add_column("count", justify="right")
    for k, v in summary.items():
        t.add_row(k, f"{v:,}")
    Console().print(t)


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)
    app.command("eval")(eval_cmd)
    app.command("ensemble")(ensemble_cmd)
    app.command("predict")(predict_cmd)
    model_app.command("summary")(model_summary)
    app.add_typer(model_app, name="model")
