"""``gsp train``, ``gsp eval``, ``gsp ensemble``, ``gsp predict``, ``gsp synth`` and
``gsp model summary``: thin typer wrappers over :mod:`mc.train` and :mod:`mc.evaluate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

model_app = typer.Typer(help="Inspect the skeleton model.", no_args_is_help=True)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


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


def train_cmd(
    data: Path = typer.Option(..., "--data", help="pyskl pickle, labels CSV or folder of .npy files."),
    out: Path = typer.Option(..., "--out", help="Run folder (checkpoints, metrics.json, export.pt)."),
    descriptions: Optional[Path] = typer.Option(None, "--descriptions", help="Description run (or root with LATEST)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="slr500, autsl or tiny (default settings.mc.preset)."),
    stream: str = typer.Option("joint", "--stream", help="joint, bone, joint_motion or bone_motion."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=2),
    lr: Optional[float] = typer.Option(None, "--lr"),
    frames: Optional[int] = typer.Option(None, "--frames", min=4),
    base_channels: Optional[int] = typer.Option(None, "--base-channels", min=4),
    no_contrastive: bool = typer.Option(False, "--no-contrastive", help="CE-only baseline."),
    ablation: str = typer.Option("all", "--ablation", help="ce, synonyms, prompt, multipart, synonyms+prompt, all."),
    alpha: float = typer.Option(0.5, "--alpha"),
    tau: float = typer.Option(0.1, "--tau"),
    layout: Optional[str] = typer.Option(None, "--layout", help="Keypoint preset (default settings.mc)."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:1 …"),
    amp: str = typer.Option("auto", "--amp", help="auto (on for CUDA), on, off."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Log and skip bad samples instead of failing."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Ignore an existing checkpoint in --out."),
    no_progress: bool = typer.Option(False, "--no-progress"),
) -> None:
    """Train one stream; writes checkpoints, test scores and metrics.json into --out."""
    from pydantic import ValidationError

    from gsp.settings import get_settings
    from mc.train import TrainConfig, train

    s = get_settings().mc
    try:
        cfg = TrainConfig(
            data=data, out=out, descriptions=descriptions, preset=preset or s.preset, stream=stream, epochs=epochs,
            batch_size=batch_size, lr=lr, frames=frames, base_channels=base_channels,
            contrastive=not no_contrastive, ablation=ablation, alpha=alpha, tau=tau, layout=layout,
            seed=s.seed if seed is None else seed, device=device or s.device, amp=amp, threads=threads,
            num_workers=s.num_workers, skip_bad=skip_bad, resume=not no_resume, progress=not no_progress,
        )
    except ValidationError as exc:
        _fail(str(exc))
    try:
        metrics = train(cfg)
    except (ValueError, RuntimeError, OSError) as exc:
        _fail(str(exc))
    _print_metrics(metrics, f"{stream} ({'contrastive ' + metrics['ablation'] if metrics['contrastive'] else 'CE only'})")
    typer.echo(str(Path(out) / "metrics.json"))


def eval_cmd(
    run: Path = typer.Argument(..., help="A training run folder (with checkpoints/last.pt)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Default: the data the run was trained on."),
    split: str = typer.Option("test", "--split"),
    out: Optional[Path] = typer.Option(None, "--out", help="Default: RUN/eval-SPLIT."),
    device: str = typer.Option("auto", "--device"),
    skip_bad: bool = typer.Option(False, "--skip-bad"),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
) -> None:
    """Evaluate a run's last checkpoint: top-1/top-5, per-class accuracy, confusion matrix."""
    from mc.evaluate import evaluate_checkpoint

    try:
        metrics = evaluate_checkpoint(run, data=data, split=split, out=out, device=device, skip_bad=skip_bad)
    except (ValueError, RuntimeError, OSError) as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(metrics))
    else:
        _print_metrics(metrics, f"eval {run} [{split}]")


def ensemble_cmd(
    runs: list[Path] = typer.Argument(..., help="Run folders or test_scores.npz files, one per stream."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Comma-separated, e.g. 1,1,0.5,0.5."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write fused scores, confusion and metrics here."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Fuse several streams' saved test scores with configurable weights."""
    from mc.evaluate import ensemble

    try:
        w = [float(v) for v in weights.split(",")] if weights else None
    except ValueError:
        _fail(f"--weights must be comma-separated numbers, got {weights!r}")
    try:
        metrics = ensemble(runs, w, out_dir=out)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps({k: v for k, v in metrics.items() if k != "per_class_accuracy"}))
    else:
        _print_metrics(metrics, f"ensemble of {len(runs)}")


def predict_cmd(
    model: Path = typer.Argument(..., help="export.pt (or a run folder holding one)."),
    keypoints: Path = typer.Argument(..., help="A (T, 133, 3) .npy keypoint file."),
    topk: int = typer.Option(5, "--topk", min=1),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Classify one keypoint file with an exported model."""
    from mc.evaluate import predict_file

    try:
        preds = predict_file(model, keypoints, topk=topk)
    except (ValueError, RuntimeError, OSError) as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(preds))
        return
    for p in preds:
        name = f" {p['name']}" if p["name"] else ""
        typer.echo(f"{p['label']:>5}{name}\t{p['probability']:.4f}")


def synth_cmd(
    out: Path = typer.Option(..., "--out", help="The pyskl pickle to write."),
    samples_per_class: int = typer.Option(30, "--samples-per-class", min=1),
    frames: int = typer.Option(48, "--frames", min=4),
    signers: int = typer.Option(8, "--signers", min=2),
    test_signers: int = typer.Option(2, "--test-signers", min=1),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write a synthetic whole-body skeleton data set for the demo signs (pyskl format)."""
    from mc.synthetic import write_synthetic_dataset

    try:
        path = write_synthetic_dataset(out, samples_per_class=samples_per_class, frames=frames, signers=signers,
                                       test_signers=test_signers, seed=seed)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    typer.echo(str(path))


def model_summary(
    num_classes: int = typer.Option(500, "--num-classes", min=1),
    frames: Optional[int] = typer.Option(None, "--frames", min=4, help="Default: the preset's."),
    preset: str = typer.Option("slr500", "--preset"),
    base_channels: Optional[int] = typer.Option(None, "--base-channels", min=4),
    text_dim: int = typer.Option(384, "--text-dim", min=1, help="Text-feature dimension (384 MiniLM, 512 CLIP)."),
    layout: Optional[str] = typer.Option(None, "--layout"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Parameters per component and inference FLOPs per sample."""
    from mc.keypoints import get_layout
    from mc.model import GSPMCModel, flops_per_sample, model_config_for, parameter_counts
    from mc.presets import get_preset

    try:
        p = get_preset(preset)
        lay = get_layout(layout)
    except ValueError as exc:
        _fail(str(exc))
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
    app.command("synth")(synth_cmd)
    model_app.command("summary")(model_summary)
    app.add_typer(model_app, name="model")
