"""The Prefect flow ``mc``: encode texts → train one or more streams → evaluate → ensemble →
publish a metrics table.

Thin wiring: every step is :mod:`mc.text_features`, :mod:`mc.train` or :mod:`mc.evaluate`.
Streams train one after another (one process owns the accelerator); each stream's run folder is
``<out>/<stream>`` and resumes from its last checkpoint when the flow is re-run.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

#: Default ensemble weights per stream (CTR-GCN's 4-stream fusion: joint/bone 1, motions 0.5).
DEFAULT_STREAM_WEIGHTS = {"joint": 1.0, "bone": 1.0, "joint_motion": 0.5, "bone_motion": 0.5}


@task(name="encode-texts", cache_policy=NO_CACHE)
def encode_texts_task(descriptions: str) -> dict[str, Any]:
    """Encode the run's Tg/Ts/Tp once into the text-feature cache (training then only loads)."""
    from mc.text_features import TextFeatureError, build_text_bank

    try:
        summary = build_text_bank(descriptions).summary()
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

    # A fresh process per stream: in `gsp run`, training in the process that had just run the
    # generation flow went 2.5x slower than the same training alone (cause not pinned down).
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        metrics = pool.submit(train, {**config, "stream": stream, "progress": False}).result()
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
    preset: str = "tiny",
    streams: list[str] | None = None,
    epochs: int | None = None,
    seed: int = 0,
    contrastive: bool = True,
    ablation: str = "all",
    weights: list[float] | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Train ``streams`` (default: joint) on ``data`` with the descriptions, evaluate, ensemble."""
    streams = streams or ["joint"]
    out_dir = Path(out)
    text = encode_texts_task(descriptions) if (descriptions and contrastive) else None
    if text is not None and "error" in text:
        contrastive = False
    base = {"data": data, "descriptions": descriptions, "preset": preset, "epochs": epochs, "seed": seed,
            "contrastive": contrastive, "ablation": ablation, "device": device}
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
        "metrics_files": {s: str(out_dir / s / "metrics.json") for s in streams},
        "exports": {s: str(out_dir / s / "export.pt") for s in streams},
    }
