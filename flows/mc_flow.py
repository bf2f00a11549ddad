"""The Prefect flow ``mc``: encode texts → train one or more streams → evaluate → ensemble →
publish a metrics table.

Thin wiring: every step is :mod:`mc.text_features`, :mod:`mc.train` or :mod:`mc.evaluate`.
Streams train one after another (one process owns the accelerator); each stream's run folder is
``<out>/<stream>`` and resumes from its last checkpoint when the flow is re-run.

Every input has a default, so the deployment ``mc/train`` runs with no parameters at all (a
schedule) or with only ``descriptions`` (the trigger after a generation run):

- ``descriptions``: the latest complete description run (``LATEST`` under the artifacts folder);
- ``data``: the demo synthetic skeleton set, built when missing;
- ``out``: a run folder under ``<artifacts>/runs`` named by what it trains on (so a re-run of the
  same inputs resumes it instead of training again).

Settings are read here, once, by :meth:`mc.train.TrainConfig.from_settings`: a parameter left at
None (preset, epochs, seed, device, num_workers) comes from ``GSP_MC_*``. Tasks get plain data.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows import warn_unknown_settings
from flows.progress import TrainingProgress
from mc.run_folder import RunFolder

#: Default ensemble weights per stream (CTR-GCN's 4-stream fusion: joint/bone 1, motions 0.5).
DEFAULT_STREAM_WEIGHTS = {"joint": 1.0, "bone": 1.0, "joint_motion": 0.5, "bone_motion": 0.5}

#: The demo synthetic skeleton set a run without ``data`` trains on (demo.synthetic).
DEMO_SAMPLES_PER_CLASS = 24
DEMO_FRAMES = 48
DEMO_SEED = 0


def demo_data_path(artifacts_dir: Path, samples_per_class: int = DEMO_SAMPLES_PER_CLASS,
                   frames: int = DEMO_FRAMES, seed: int = DEMO_SEED) -> Path:
    """Where the demo synthetic set of these arguments lives (they name the file)."""
    return artifacts_dir / "skeletons" / f"demo-s{samples_per_class}-f{frames}-seed{seed}.pkl"


@task(name="synthesize-skeletons", cache_policy=NO_CACHE)
def synth_task(out_path: str, samples_per_class: int, frames: int, seed: int) -> str:
    """Synthetic whole-body clips of the demo signs (the same source as the demo dictionary).
    Skipped when the file exists: it is deterministic in its arguments, which name the file."""
    from demo.synthetic import write_synthetic_dataset

    path = Path(out_path)
    if path.is_file():
        get_run_logger().info("synthetic skeletons already at %s", path)
        return str(path)
    return str(write_synthetic_dataset(path, samples_per_class=samples_per_class, frames=frames, seed=seed))


def run_folder_name(descriptions: Path | None, data: Path, preset: str, epochs: int | None, seed: int,
                    contrastive: bool = True) -> str:
    """``<data>-<fingerprint>``: keyed on what the descriptions say and how we train, so a re-run
    after a kill resumes the same folder from its last checkpoint, and another seed never resumes
    (or reports) a run trained with a different one. Seed 0 and the contrastive default add
    nothing, so folders named before they were part of the key keep their names."""
    from gsp.schema import content_fingerprint

    texts = content_fingerprint(descriptions) if descriptions is not None else "no-descriptions"
    key = f"{texts}|{data.name}|{preset}|{epochs}" + (f"|seed{seed}" if seed else "") + ("" if contrastive else "|ce")
    prefix = "demo" if data.name.startswith("demo-") else data.stem
    return f"{prefix}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


@task(name="resolve-inputs", cache_policy=NO_CACHE)
def resolve_inputs_task(descriptions: str | None, data: str | None, contrastive: bool) -> dict[str, Any]:
    """The description run and the skeleton data this run trains on, as absolute paths."""
    from gsp.schema import LATEST_POINTER, SchemaError, resolve_run_dir
    from gsp.settings import get_settings

    paths = get_settings().paths
    artifacts = paths.artifacts_dir
    run_dir = None
    if descriptions is None and contrastive:
        # No run named: the latest complete one (LATEST moves only when a run did not fail).
        if not (paths.descriptions / LATEST_POINTER).is_file():
            raise SchemaError(f"no complete description run under {paths.descriptions} yet: run gsp/generate "
                              "first, or pass descriptions=RUN_DIR (or contrastive=false for CE only)")
        descriptions = str(paths.descriptions)
    if descriptions is not None:
        run_dir = str(resolve_run_dir(Path(descriptions)))
    if data is None:
        data = synth_task(str(demo_data_path(artifacts)), DEMO_SAMPLES_PER_CLASS, DEMO_FRAMES, DEMO_SEED)
    get_run_logger().info("training on %s with descriptions %s", data, run_dir)
    return {"descriptions": run_dir, "data": str(Path(data).resolve())}


@task(name="encode-texts", cache_policy=NO_CACHE)
def encode_texts_task(descriptions: str, text_encoder: dict[str, Any], text_cache: str) -> dict[str, Any]:
    """Encode the run's Tg/Ts/Tp once into the text-feature cache (training then only loads)."""
    from pydantic import TypeAdapter

    from mc.text_features import EncoderSpec, TextFeatureError, build_text_bank

    spec = TypeAdapter(EncoderSpec).validate_python(text_encoder)
    try:
        # Training says what the texts cover, counted against its own classes: not said twice.
        summary = build_text_bank(descriptions, spec, Path(text_cache), log_coverage=False).summary()
    except TextFeatureError as exc:
        # A run with no usable text (e.g. every answer of the embedded model rejected by the
        # quality check) still trains: CE only, said here and recorded in the flow's result.
        get_run_logger().warning("%s: training CE only", exc)
        return {"error": str(exc)}
    get_run_logger().info("text features: %d text(s) of %s, %d encoded now, %d from the cache (%s)",
                          summary["texts"], summary["run_dir"], summary["encoded_now"] or 0,
                          summary["from_cache"] or 0, summary["encoder_id"])
    return summary


@task(name="train-stream", cache_policy=NO_CACHE, task_run_name="train-{stream}")
def train_task(stream: str, config: dict[str, Any], nproc_per_node: int = 1) -> dict[str, Any]:
    from mc.distributed import launch_training

    logger = get_run_logger()
    progress = TrainingProgress(stream, logger)  # the flow run's log shows the training go on
    # In-process when nproc_per_node is 1. Training inside `gsp run` used to run 1.5-2.5x slower
    # than alone: retrieval threads left alive after generation made libgomp stop spinning (see
    # gsp.generate SignDescriber.search); never leave a thread that ran torch work alive here.
    metrics = launch_training({**config, "stream": stream, "progress": False}, nproc_per_node,
                              on_epoch=progress.epoch, on_step=progress.step)
    logger.info("%s: top1 %.4f top5 %.4f (%s epochs, %.0f s)", stream, metrics["top1"], metrics["top5"],
                metrics["epochs"], metrics["seconds"])
    return {k: v for k, v in metrics.items() if k not in ("history", "per_class_accuracy", "skipped")}


@task(name="export-onnx", cache_policy=NO_CACHE, task_run_name="onnx-{stream}")
def onnx_task(stream: str, run_dir: str) -> str:
    """``model.onnx`` beside the stream's ``export.pt`` (torch.export traces the model: tens of
    seconds on a CPU, which is why it is asked for, not done by default)."""
    from mc.onnx_export import export_run

    path = next(p for p in export_run(run_dir, onnx=True) if p.suffix == ".onnx")  # written beside export.pt
    get_run_logger().info("%s: ONNX export %s", stream, path)
    return str(path)


@task(name="ensemble-streams", cache_policy=NO_CACHE)
def ensemble_task(run_dirs: list[str], weights: list[float], out: str) -> dict[str, Any]:
    from mc.evaluate import ensemble

    metrics = ensemble([Path(d) for d in run_dirs], weights, out_dir=Path(out))
    return {k: v for k, v in metrics.items() if k != "per_class_accuracy"}


@task(name="publish-metrics", cache_policy=NO_CACHE)
def publish_task(rows: list[dict[str, Any]], inputs: dict[str, Any], out: str) -> None:
    """A metrics table that names what was trained on, and where the run folders are."""
    create_table_artifact(key="mc-metrics", table=rows,
                          description=f"Test metrics per stream and ensemble; descriptions "
                          f"{inputs['descriptions'] or '(none: CE only)'}; data {inputs['data']}")
    lines = ["# Training run", "", f"- descriptions: `{inputs['descriptions'] or 'none (CE only)'}`",
             f"- data: `{inputs['data']}`", f"- run folder: [{out}]({Path(out).as_uri()})", ""]
    lines += [f"- {r['stream']}: top-1 {r['top1']:.4f}, top-5 {r['top5']:.4f}" for r in rows]
    create_markdown_artifact(key="mc-run", markdown="\n".join(lines), description="What this training run used")


@flow(name="mc")
def mc_flow(
    descriptions: str | None = None,
    data: str | None = None,
    out: str | None = None,
    preset: str | None = None,
    streams: list[str] | None = None,
    epochs: int | None = None,
    seed: int | None = None,
    contrastive: bool = True,
    ablation: str = "all",
    weights: list[float] | None = None,
    device: str | None = None,
    num_workers: int | None = None,
    nproc_per_node: int = 1,
    onnx: bool = False,
) -> dict[str, Any]:
    """Train ``streams`` (default: joint) on ``data`` with the descriptions, evaluate, ensemble.

    ``descriptions`` defaults to the latest complete description run, ``data`` to the demo
    synthetic set (built when missing), ``out`` to a folder under ``<artifacts>/runs`` named by
    the inputs. ``preset``, ``epochs``, ``seed``, ``device`` and ``num_workers`` default (None) to
    the ``GSP_MC_*`` settings. ``nproc_per_node`` > 1 trains each stream with DDP under torchrun.
    ``onnx``: also write each stream's ``model.onnx`` for ONNX Runtime (``gsp predict``)."""
    warn_unknown_settings()
    from gsp.settings import get_settings
    from mc.train import TrainConfig

    settings = get_settings()
    streams = streams or ["joint"]
    inputs = resolve_inputs_task(descriptions, data, contrastive)
    cfg = TrainConfig.from_settings(settings, data=inputs["data"], out=out or ".", descriptions=inputs["descriptions"],
                                    preset=preset, epochs=epochs, seed=seed, contrastive=contrastive,
                                    ablation=ablation, device=device, num_workers=num_workers)
    out_dir = Path(out) if out else settings.paths.artifacts_dir / "runs" / run_folder_name(
        Path(inputs["descriptions"]) if inputs["descriptions"] else None, Path(inputs["data"]), cfg.preset,
        cfg.epochs, cfg.seed, cfg.contrastive)
    base = {**cfg.model_dump(mode="json"), "out": str(out_dir)}
    text = None
    if cfg.uses_contrastive:
        text = encode_texts_task(inputs["descriptions"], base["text_encoder"], base["text_cache"])
        if "error" in text:
            base["contrastive"] = False
    results = {stream: train_task(stream, {**base, "out": str(out_dir / stream)}, nproc_per_node)
               for stream in streams}
    rows = [{"stream": s, "top1": round(m["top1"], 4), "top5": round(m["top5"], 4), "epochs": m["epochs"],
             "seconds": m["seconds"], "contrastive": m["contrastive"]} for s, m in results.items()]
    fused = None
    if len(streams) > 1:
        w = weights or [DEFAULT_STREAM_WEIGHTS.get(s, 1.0) for s in streams]
        fused = ensemble_task([str(out_dir / s) for s in streams], w, str(out_dir / "ensemble"))
        rows.append({"stream": "ensemble(" + ",".join(streams) + ")", "top1": round(fused["top1"], 4),
                     "top5": round(fused["top5"], 4), "epochs": None, "seconds": None, "contrastive": None})
    publish_task(rows, inputs, str(out_dir))
    onnx_files = {s: onnx_task(s, str(out_dir / s)) for s in streams} if onnx else {}
    return {
        "out": str(out_dir),
        "descriptions": inputs["descriptions"],
        "data": inputs["data"],
        "streams": results,
        "ensemble": fused,
        "text_features": text,
        "table": rows,
        "metrics_files": {s: str(RunFolder(out_dir / s).metrics) for s in streams},
        "exports": {s: str(RunFolder(out_dir / s).export) for s in streams},
        "onnx": onnx_files,
    }
