"""The whole DAG as one Prefect flow, ``gsp-mc``: what `gsp run` executes.

    ingest (incremental) → P1–P4 descriptions → synthetic skeletons → text features →
    training (one or more streams) → evaluation → ensemble

Each stage is an existing flow or library call; this module only orders them and passes paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from flows import warn_unknown_settings
from flows.gsp_flow import gsp_flow
from flows.mc_flow import DEMO_FRAMES, DEMO_SAMPLES_PER_CLASS, DEMO_SEED, demo_data_path, mc_flow, synth_task


@flow(name="gsp-mc")
async def pipeline_flow(
    vocab: str,
    artifacts_dir: str,
    limit: int | None = None,
    samples_per_class: int = DEMO_SAMPLES_PER_CLASS,
    synth_frames: int = DEMO_FRAMES,
    preset: str | None = None,
    streams: list[str] | None = None,
    epochs: int | None = None,
    seed: int | None = None,
    synth_seed: int = DEMO_SEED,
    onnx: bool = False,
) -> dict[str, Any]:
    """The main job: every stage of GSP-MC, end to end, on the given vocabulary. ``preset``,
    ``epochs`` and the training ``seed`` default (None) to ``GSP_MC_PRESET`` / ``GSP_MC_EPOCHS`` /
    ``GSP_MC_SEED``, and the device and loader workers come from ``GSP_MC_DEVICE`` /
    ``GSP_MC_NUM_WORKERS`` (:func:`flows.mc_flow.mc_flow`); ``synth_seed`` draws the synthetic clips;
    ``onnx`` also writes each stream's ``model.onnx``.
    The training folder is named by what it trains on (:func:`flows.mc_flow.run_folder_name`), so a
    re-run after a kill, whose generation is all cache hits, resumes it from its last checkpoint."""
    warn_unknown_settings()
    # A failed description run raises RunFailed here, so nothing is trained on it.
    generated = await gsp_flow(vocab=vocab, limit=limit)
    data = synth_task(str(demo_data_path(Path(artifacts_dir), samples_per_class, synth_frames, synth_seed)),
                      samples_per_class, synth_frames, synth_seed)
    trained = mc_flow(descriptions=generated["run_dir"], data=data, preset=preset, streams=streams or ["joint"],
                      epochs=epochs, seed=seed, onnx=onnx)
    return {"descriptions": generated, "skeletons": data, "training": trained}
