"""The experiment runner as the Prefect flow ``mc`` of the deployment ``mc/experiment``: the grid
of :mod:`mc.experiment` (one process trains every cell in turn, so the deployment takes the
``gpu`` pool one run at a time, like ``mc/train``), then the summary as a table artifact.

Thin wiring: settings are read here, controls and minimal pairs of the demo signs come from
:mod:`demo.experiment_inputs`, everything else is :func:`mc.experiment.run_experiment`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows import warn_unknown_settings

SUMMARY_ARTIFACT = "experiment-summary"


@task(name="run-grid", cache_policy=NO_CACHE)
def grid_task(spec: dict[str, Any], descriptions: list[str]) -> dict[str, Any]:
    from demo.experiment_inputs import CONTROL_BUILDERS, data_minimal_pairs
    from gsp.settings import get_settings
    from mc.experiment import ExperimentSpec, run_experiment

    spec = ExperimentSpec(**{**spec, "data": Path(spec["data"]), "out": Path(spec["out"])},
                          pairs=data_minimal_pairs(spec["data"]))
    logger = get_run_logger()
    return run_experiment(spec, get_settings(), logger.info, descriptions, CONTROL_BUILDERS)


@task(name="publish-summary", cache_policy=NO_CACHE)
def publish_task(summary: list[dict[str, Any]], out: str) -> None:
    """The summary table (NaN as empty: JSON has no NaN) and the markdown summary."""
    rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in summary]
    create_table_artifact(key=SUMMARY_ARTIFACT, table=rows,
                          description=f"Experiment summary over seeds (mean, sd, 95% CI; Δ to CE only): {out}")
    create_markdown_artifact(key="experiment-summary-md", markdown=(Path(out) / "summary.md").read_text("utf-8"),
                             description=f"Experiment summary: {out}")


@flow(name="mc", flow_run_name="experiment")
def experiment_flow(
    data: str,
    out: str,
    descriptions: list[str] | None = None,
    seeds: list[int] | None = None,
    ablations: list[str] | None = None,
    keypoints: list[str] | None = None,
    train_per_class: list[int | None] | None = None,
    preset: str | None = None,
    epochs: int | None = None,
    steps: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """``gsp experiment ablation`` as a flow: the same grid (``descriptions`` entries as its
    ``--descriptions``; ``train_per_class`` with null for all), then a table artifact of the
    summary. Defaults: seeds 0,1,2; ablations ce and all; keypoints and preset from settings;
    ``threads``: torch CPU threads (torch's default)."""
    warn_unknown_settings()
    from gsp.settings import get_settings

    settings = get_settings()
    spec = {"data": data, "out": out, "descriptions": [], "seeds": seeds if seeds is not None else [0, 1, 2],
            "ablations": ablations or ["ce", "all"], "keypoints": keypoints or [settings.mc.keypoint_preset],
            "ks": train_per_class or [None], "preset": preset or settings.mc.preset, "epochs": epochs,
            "steps": steps, "train_overrides": {"threads": threads} if threads else {}}
    result = grid_task(spec, descriptions or [])
    publish_task(result["summary"], result["out"])
    return {"out": result["out"], "summary": result["summary"], "results": result["results"]}
