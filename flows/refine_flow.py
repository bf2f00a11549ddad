"""The Prefect flow ``gsp`` in its refinement form (the ``gsp/refine`` deployment): the confused
class pairs of a training run → P5 rewrites of those signs' descriptions → a new description run.

Thin wiring around :func:`gsp.generate.prepare_refine` / :func:`gsp.generate.arefine` (usable
without Prefect; ``gsp generate --refine-confused --no-prefect`` calls them directly). The pairs
are read here, on the flows side, with :mod:`mc.report` (gsp does not import mc), and handed on
as plain ``[a, b, count]`` lists. A written, not-failed run is announced like a ``gsp/generate``
run (:func:`flows.gsp_flow.announce`), so the ``mc/train`` deployment retrains on it: the loop
train → refine → train runs on the server, one step per deployment run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from flows import warn_unknown_settings
from flows.gsp_flow import announce, build_settings, log_run_summary, publish_diff_task, publish_task
from flows.ingest import ingest_task
from gsp.generate import DEFAULT_TOP, RunFailed, arefine, check_top, prepare_refine
from gsp.schema import STATUS_OK, read_run
from gsp.settings import Settings


@task(name="read-confused-pairs")
def confused_pairs_task(training_run: str) -> dict[str, Any]:
    """The confused class pairs of a finished training run, most first, as ``[a, b, count]`` (at
    most one per misclassified test clip; the refinement takes the first it can refine), and the
    description run it records it was trained on (None where it does not)."""
    from mc.report import confused_pairs, load_run, recorded_descriptions

    trained = load_run(training_run)  # a ReportError names the folder
    pairs = confused_pairs(trained.confusion)
    get_run_logger().info("%s: %d confused pair(s)", training_run, len(pairs))
    trained_on = recorded_descriptions(trained)
    return {"pairs": [list(p) for p in pairs], "trained_on": str(trained_on) if trained_on else None}


@task(name="refine-descriptions")
async def refine_task(vocab: str | None, confused: dict[str, Any], top: int, settings: dict[str, Any],
                      training_run: str, base: str | None, out_dir: str | None, index_dir: str | None,
                      use_index: bool) -> dict[str, Any]:
    """P5 and P4 for the signs of the confused pairs in one generation session; the run written
    and summed up."""
    plan = prepare_refine(vocab, [tuple(p) for p in confused["pairs"]], settings=Settings(**settings),
                          training_run=training_run, base=base, out_dir=Path(out_dir) if out_dir else None,
                          index_dir=Path(index_dir) if index_dir else None, use_index=use_index,
                          trained_on=confused["trained_on"], top=top)
    for line in plan.warnings():
        get_run_logger().warning("%s", line)
    run = await arefine(plan)
    log_run_summary(run.summary())
    return {"run_dir": str(run.run_dir), "base_run": str(plan.plan.base_dir), "manifest": run.manifest,
            "failed": run.failed, "summary": run.summary(), "run_failed": run.run_failed,
            "failure_line": run.failure_line(), "manifest_path": str(run.manifest_path),
            "samples": refined_samples(run.run_dir)}


def refined_samples(run_dir: Path, n: int = 3) -> list[dict[str, Any]]:
    """A few rewritten signs with their new Tg and Tp, for the report."""
    rows = read_run(run_dir, ok_only=False)
    tg = rows["Tg"][rows["Tg"]["contrast_with"].notna() & (rows["Tg"]["status"] == STATUS_OK)]
    out = []
    for r in tg.sort_values("label").head(n).to_dict("records"):
        parts = rows["Tp"][(rows["Tp"]["label"] == r["label"]) & (rows["Tp"]["status"] == STATUS_OK)]
        out.append({"label": int(r["label"]), "gloss": r["gloss"], "Tg": r["text"], "contrast_with": r["contrast_with"],
                    "Tp": [{"text": p["text"], "body_parts": list(p["body_parts"])}
                           for p in parts.to_dict("records")]})
    return out


@flow(name="gsp", flow_run_name="refine")
async def refine_flow(training_run: str, vocab: str | None = None, top: int = DEFAULT_TOP, base: str | None = None,
                      index_dir: str | None = None, kb_dir: str | None = None, out_dir: str | None = None,
                      ingest: bool = True, use_index: bool = True, base_url: str | None = None,
                      model: str | None = None, structured_output: str | None = None,
                      concurrency: int | None = None) -> dict[str, Any]:
    """Ingest (incremental) → the ``top`` most confused pairs of ``training_run`` (a `gsp train` or
    ``mc/train`` run folder) whose signs the base run describes (those with a sign it leaves out
    are passed over, in a warning and the manifest) → P5 rewrites of both signs of each pair,
    split again with P4 → a new description run in ``out_dir`` refining ``base`` (default: that
    folder's LATEST run); every other row is carried from the base without a request. ``vocab``:
    the vocabulary the model was trained on (default: the one the base run was generated from).
    Model settings as in :func:`flows.gsp_flow.gsp_flow`."""
    warn_unknown_settings()
    check_top(top)  # before the ingest and the training run are read
    settings = build_settings(base_url=base_url, model=model, structured_output=structured_output,
                              concurrency=concurrency)
    if use_index and ingest:
        report = ingest_task(str(kb_dir or settings.paths.kb_dir), str(index_dir or settings.paths.index),
                             settings.kb.model_dump(mode="json"))
        index_dir = report["index_dir"]
    confused = confused_pairs_task(training_run)
    written = await refine_task(vocab, confused, top, settings.public_dict(), training_run, base, out_dir, index_dir,
                                use_index)
    publish_task(written)
    if written["run_failed"]:
        raise RunFailed(written["failure_line"])
    publish_diff_task(written["base_run"], written["run_dir"])  # exactly the rewritten rows
    announce(written)
    return {k: written[k] for k in ("run_dir", "base_run", "failed", "summary", "failure_line", "manifest_path")}
