"""The Prefect flow ``mc``: encode texts → train one or more streams → evaluate → ensemble →
publish a metrics table.

Thin wiring: every step is :mod:`mc.text_features`, :mod:`mc.train` or :mod:`mc.evaluate`.
Streams train one after another (one process owns the accelerator); each stream's run folder is
``<out>/<stream>`` and resumes from its last checkpoint when the flow is re-run.

Settings are read here, once, by :meth:`mc.train.TrainConfig.from_settings`: a parameter left at
None (preset, seed, device, num_workers) comes from ``GSP_MC_*``. Tasks get plain data (the
config as a JSON-ready dict).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from mc.run_folder import RunFolder

#: Default ensemble weights per stream (CTR-GCN's 4-stream fusion: joint/bone 1, motions 0.5).
DEFAULT_STREAM_WEIGHTS = {"joint": 1.0, "bone": 1.0, "joint_motion": 0.5, "bone_motion": 0.5}


@task(name="encode-texts", cache_policy=NO_CACHE)
def encode_texts_task(descriptions: str, text_encoder: dict[str, Any], text_cache: str) -> dict[str, Any]:
    """Encode the run's Tg/Ts/Tp once into the text-feature cache (training then only loads)."""
    from pydantic import TypeAdapter

    from mc.text_features import EncoderSpec, TextFeatureError, build_text_bank

    spec = TypeAdapter(EncoderSpec).validate_python(text_encoder)
    try:
        summary = build_text_bank(descriptions, spec, Path(text_cache)).summary()
    except TextFeatureError as exc:
        # A run with no usable text (e.g. every answer of the embedded model rejected by the
        # quality check) still trains: CE only, said here and recorded in the flow's result.
        get_run_logger().warning("%s: training CE only", exc)
        return {"error": str(exc)}
    get_run_logger().info("text features: %s", summary)
    return summary


@task(name="train-stream", cache_policy=NO_CACHE, task_run_name="train-{stream}")
def train_task(stream: str, config: dict[str, Any]) -> dict[str, Any]:
    from mc.train import train

    # In-process. Training inside `gsp run` used to run 1.5-2.5x slower than alone: retrieval
    # threads left alive after generation made libgomp stop spinning (see gsp.generate
    # SignDescriber.search); never leave a thread that ran torch work alive while training here.
    metrics = train({**config, "stream": stream, "progress": False})
    get_run_logger().info("%s: top1 %.4f top5 %.4f (%s epochs, %.0f s)", stream, metrics["top1"], metrics["top5"],
                          metrics["epochs"], metrics["seconds"])
    return {k: v for k, v in metrics.items() if k not in ("history", "per_class_accuracy", "skipped")}


@task(name="ensemble-streams", cache_policy=NO_CACHE)
def ensemble_task(run_dirs: list[str], weights: list[float], out: str) -> dict[str, Any]:
    from mc.evaluate import ensemble

    metrics = ensemble([Path(d) for d in run_dirs], weights, out_dir=Path(out))
    return {k: v for k, v in metrics.items() if k != "per_class_accuracy"}


@task(name="publish-metrics", cache_policy=NO_CACHE)
def publish_task(rows: list[dict[str, Any]]) -> None:
    create_table_artifact(key="mc-metrics", table=rows, description="GSP-MC test metrics per stream and ensemble")


@flow(name="mc")
def mc_flow(
    data: str,
    out: str,
    descriptions: str | None = None,
    preset: str | None = None,
    streams: list[str] | None = None,
    epochs: int | None = None,
    seed: int | None = None,
    contrastive: bool = True,
    ablation: str = "all",
    weights: list[float] | None = None,
    device: str | None = None,
    num_workers: int | None = None,
) -> dict[str, Any]:
    """Train ``streams`` (default: joint) on ``data`` with the descriptions, evaluate, ensemble.
    ``preset``, ``seed``, ``device`` and ``num_workers`` default (None) to the ``GSP_MC_*`` settings."""
    from gsp.settings import get_settings
    from mc.train import TrainConfig

    streams = streams or ["joint"]
    out_dir = Path(out)
    # One config for every stream (stream and out are set per task); checked before any work.
    cfg = TrainConfig.from_settings(get_settings(), data=data, out=out_dir, descriptions=descriptions,
                                    preset=preset, epochs=epochs, seed=seed, contrastive=contrastive,
                                    ablation=ablation, device=device, num_workers=num_workers)
    base = cfg.model_dump(mode="json")
    text = None
    if cfg.uses_contrastive:
        text = encode_texts_task(descriptions, base["text_encoder"], base["text_cache"])
        if "error" in text:
            base["contrastive"] = False
    results: dict[str, dict[str, Any]] = {}
    for stream in streams:
        results[stream] = train_task(stream, {**base, "out": str(out_dir / stream)})
    rows = [{"stream": s, "top1": round(m["top1"], 4), "top5": round(m["top5"], 4), "epochs": m["epochs"],
             "seconds": m["seconds"], "contrastive": m["contrastive"]} for s, m in results.items()]
    fused = None
    if len(streams) > 1:
        w = weights or [DEFAULT_STREAM_WEIGHTS.get(s, 1.0) for s in streams]
        fused = ensemble_task([str(out_dir / s) for s in streams], w, str(out_dir / "ensemble"))
        rows.append({"stream": "ensemble(" + ",".join(streams) + ")", "top1": round(fused["top1"], 4),
                     "top5": round(fused["top5"], 4), "epochs": None, "seconds": None, "contrastive": None})
    publish_task(rows)
    return {
        "out": str(out_dir),
        "streams": results,
        "ensemble": fused,
        "text_features": text,
        "table": rows,
        "metrics_files": {s: str(RunFolder(out_dir / s).metrics) for s in streams},
        "exports": {s: str(RunFolder(out_dir / s).export) for s in streams},
    }
