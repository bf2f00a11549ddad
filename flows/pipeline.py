"""The whole DAG as one Prefect flow, ``gsp-mc``: what `gsp run` executes.

    ingest (incremental) → P1–P4 descriptions → synthetic skeletons → text features →
    training (one or more streams) → evaluation → ensemble

Each stage is an existing flow or library call; this module only orders them and passes paths.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.gsp_flow import gsp_flow
from flows.mc_flow import mc_flow
from gsp.schema import content_fingerprint


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


@flow(name="gsp-mc")
async def pipeline_flow(
    vocab: str,
    artifacts_dir: str,
    limit: int | None = None,
    samples_per_class: int = 24,
    synth_frames: int = 48,
    preset: str | None = None,
    streams: list[str] | None = None,
    epochs: int | None = None,
    seed: int | None = None,
    synth_seed: int = 0,
) -> dict[str, Any]:
    """The main job: every stage of GSP-MC, end to end, on the given vocabulary. ``preset`` and
    the training ``seed`` default (None) to ``GSP_MC_PRESET`` / ``GSP_MC_SEED``, and the device and
    loader workers come from ``GSP_MC_DEVICE`` / ``GSP_MC_NUM_WORKERS`` (:func:`flows.mc_flow.mc_flow`);
    ``synth_seed`` draws the synthetic clips."""
    from gsp.settings import get_settings

    mc_settings = get_settings().mc
    preset = preset or mc_settings.preset
    seed = mc_settings.seed if seed is None else seed
    artifacts = Path(artifacts_dir)
    # A failed description run raises RunFailed here, so nothing is trained on it.
    generated = await gsp_flow(vocab=vocab, limit=limit)
    data = synth_task(
        str(artifacts / "skeletons" / f"demo-s{samples_per_class}-f{synth_frames}-seed{synth_seed}.pkl"),
        samples_per_class, synth_frames, synth_seed,
    )
    # Keyed on what the descriptions say and how we train, so a re-run after a kill (whose
    # generation is all cache hits) resumes the same training folder from its last checkpoint, and
    # another seed never resumes (or reports) a run trained with a different one. Seed 0 adds
    # nothing, so run folders made before the seed was a setting keep their names.
    seed_key = f"|seed{seed}" if seed else ""
    fingerprint = hashlib.sha256(
        f"{content_fingerprint(Path(generated['run_dir']))}|{Path(data).name}|{preset}|{epochs}{seed_key}".encode()
    ).hexdigest()[:12]
    trained = mc_flow(
        data=data,
        descriptions=generated["run_dir"],
        out=str(artifacts / "runs" / f"demo-{fingerprint}"),
        preset=preset,
        streams=streams or ["joint"],
        epochs=epochs,
        seed=seed,
    )
    return {"descriptions": generated, "skeletons": data, "training": trained}
