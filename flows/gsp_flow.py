"""The Prefect flow ``gsp``: ingest the knowledge base (incremental), then generate the sign
descriptions P1–P4 in batches of signs, then write the run and publish a summary.

Thin wiring around :mod:`gsp.generate` (usable without Prefect). Tasks take and return plain data:
the plan as a dict (:meth:`gsp.generate.RunPlan.to_dict`), label lists, row dicts, paths, and the
id of the generation session the flow opened. The flow is async and opens one
:func:`gsp.generate.generation_session`, so all batch tasks share one event loop, one LLM client
and therefore one set of concurrency and rate limits. A run with too many failed rows is written
and reported, then the flow raises :class:`gsp.generate.RunFailed`, so the flow run ends Failed
and a deployment alarms.

A run started from a deployment announces a written, not-failed run with the event
:data:`DESCRIPTIONS_EVENT` (payload: the run folder); the ``mc/train`` deployment's trigger in
``prefect.yaml`` starts training on exactly that folder. A failed run announces nothing.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event
from prefect.runtime import deployment as current_deployment
from prefect.runtime import flow_run as current_flow_run

from flows import warn_unknown_settings
from flows.fanout import fan_out, remove_shards
from flows.ingest import ingest_task
from flows.progress import DescribeProgress
from gsp.diff import diff_summary_markdown
from gsp.errors import GspError
from gsp.generate import (
    GenerationError,
    RunFailed,
    describe_planned,
    finalize_planned,
    generation_session,
    open_session,
    prepare_run,
)
from gsp.schema import KINDS, LATEST_POINTER, STATUS_OK
from gsp.settings import Settings

#: Emitted when a deployment's description run is written and did not fail; prefect.yaml's
#: ``mc/train`` trigger expects it and takes ``payload.run_dir`` as its ``descriptions``.
DESCRIPTIONS_EVENT = "gsp.descriptions.completed"


#: A log record's attribute marking what the CLI prints itself when it runs the flow (a run's
#: summary, on stdout): :func:`hide_what_the_cli_prints` keeps it off the console, Prefect's API
#: log handler keeps it in the flow run's logs on a server.
PRINTED_BY_CLI = "gsp_printed_by_cli"


def log_run_summary(summary: str) -> None:
    """A description run's summary into the flow run's logs (where a deployment run shows it)."""
    get_run_logger().info("%s", summary, extra={PRINTED_BY_CLI: True})


class _HideWhatTheCliPrints(logging.Filter):
    """Console only: drops Prefect's records of an expected failure, a :class:`GspError` (its
    traceback, and the "Finished in state Failed(...)" repeat of the message), which the CLI
    prints as one line, and the records marked :data:`PRINTED_BY_CLI`, which it prints on stdout.
    The API log handler has no such filter, so the flow run's logs in Prefect keep everything."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            return True
        if getattr(record, PRINTED_BY_CLI, False):
            return False
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            return not isinstance(exc, GspError)
        message = record.getMessage()
        return not any(f"{name}{sep}" in message for name in _error_names() for sep in (":", "("))


def _error_names() -> set[str]:
    """GspError and every subclass imported so far (a flow may import mc's errors after the
    filter is installed, so they are looked up when a record comes)."""
    names: set[str] = set()
    todo: list[type[BaseException]] = [GspError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


def hide_what_the_cli_prints() -> None:
    """Keep Prefect's console from repeating what the CLI prints itself: a traceback for failures
    it reports as one line (every :class:`gsp.errors.GspError`: bad input, an unreachable
    endpoint, a failed description run), and the run's summary. Call after importing the flows."""
    from prefect.logging.handlers import APILogHandler

    quiet = _HideWhatTheCliPrints()
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler, APILogHandler):
                handler.addFilter(quiet)


def build_settings(*, base_url: str | None = None, model: str | None = None, structured_output: str | None = None,
                   concurrency: int | None = None, synonyms: int | None = None,
                   artifacts_dir: str | None = None, prompts_dir: str | None = None) -> Settings:
    """Settings from the environment/config with the flow's explicit overrides on top."""
    llm = {k: v for k, v in {"base_url": base_url, "model": model, "structured_output": structured_output,
                             "concurrency": concurrency, "synonyms": synonyms}.items() if v is not None}
    paths = {k: v for k, v in {"artifacts_dir": artifacts_dir, "prompts_dir": prompts_dir}.items() if v is not None}
    return Settings(llm=llm, paths=paths)


@task(name="plan-description-run")
def plan_task(vocab: str, settings: dict[str, Any], index_dir: str | None, use_index: bool, out_dir: str | None,
              labels: list[int] | None, limit: int | None, base: str | None = None) -> dict[str, Any]:
    plan = prepare_run(vocab, settings=Settings(**settings), index_dir=index_dir, use_index=use_index,
                       out_dir=out_dir, labels=labels, limit=limit, base=base)
    get_run_logger().info("run %s: %d sign(s) from %s", plan.run_id, len(plan.entries), vocab)
    return plan.to_dict()


@task(name="generate-batch", task_run_name="generate-batch-{index:03d}")
async def batch_task(session_id: str, plan: dict[str, Any], labels: list[int], index: int) -> dict[str, Any]:
    result = await describe_planned(plan, labels, session_id,
                                    on_done=DescribeProgress(f"batch {index}", len(labels), get_run_logger()))
    failed = sum(r["status"] != STATUS_OK for rows in result["rows"].values() for r in rows)
    get_run_logger().info("batch %d: labels %d–%d, %d failed row(s)", index, labels[0], labels[-1], failed)
    return result


@task(name="write-description-run")
def write_task(session_id: str, plan: dict[str, Any], batches: list[dict[str, Any]]) -> dict[str, Any]:
    run = finalize_planned(plan, batches, open_session(session_id))
    log_run_summary(run.summary())
    return {"run_dir": str(run.run_dir), "manifest": run.manifest, "failed": run.failed, "summary": run.summary(),
            "run_failed": run.run_failed, "failure_line": run.failure_line(),
            "manifest_path": str(run.manifest_path), "samples": _samples(batches)}


@task(name="publish-report")
def publish_task(written: dict[str, Any]) -> None:
    m = written["manifest"]
    table = []
    for kind in KINDS:
        u = m["usage"].get(kind, {})
        c = m["counts"][kind]
        table.append({"kind": kind, "rows": c["rows"], "ok": c["ok"], "failed": c["failed"],
                      "requests": u.get("requests", 0), "cached": u.get("cached", 0),
                      "prompt_tokens": u.get("prompt_tokens", 0), "completion_tokens": u.get("completion_tokens", 0),
                      "cost": u.get("cost")})
    create_table_artifact(key="gsp-descriptions", table=table,
                          description=f"Description run {m['run_id']} ({m['model']} at {m['endpoint']})")
    if written["run_failed"]:
        create_markdown_artifact(key="gsp-description-samples", markdown=_failure_markdown(written),
                                 description=f"Description run {m['run_id']} FAILED")
        return
    lines = [f"# Description run `{m['run_id']}`", "", f"Written to `{written['run_dir']}`.", ""]
    for s in written["samples"]:
        lines += [f"## {s['label']} · {s['gloss']}", ""]
        if s.get("contrast_with"):
            lines += [f"Rewritten to be told apart from {s['contrast_with']}.", ""]
        for kind in ("Tb", "Tg"):
            if s.get(kind):
                lines.append(f"- **{kind}**: {s[kind]}")
        for part in s.get("Tp", []):
            lines.append(f"- **Tp** [{', '.join(part['body_parts'])}]: {part['text']}")
        lines.append("")
    create_markdown_artifact(key="gsp-description-samples", markdown="\n".join(lines),
                             description="A few generated descriptions")


def previous_latest(out_root: str) -> str | None:
    """The run ``LATEST`` names before this run is written (None for a first run)."""
    pointer = Path(out_root) / LATEST_POINTER
    if not pointer.is_file():
        return None
    run_dir = Path(out_root) / pointer.read_text(encoding="utf-8").strip()
    return str(run_dir) if run_dir.is_dir() else None


@task(name="publish-diff")
def publish_diff_task(previous: str, run_dir: str) -> None:
    """What changed against the previous latest run, for reviewers in the UI (gsp diff has the rest)."""
    try:
        markdown = diff_summary_markdown(Path(previous), Path(run_dir))
    except GspError as exc:  # an unreadable previous run costs the report, not the run
        get_run_logger().warning("no diff against %s: %s", previous, exc)
        return
    create_markdown_artifact(key="gsp-description-diff", markdown=markdown,
                             description=f"Changes against the previous latest run {Path(previous).name}")


def _failure_markdown(written: dict[str, Any]) -> str:
    m = written["manifest"]
    lines = [f"# Description run `{m['run_id']}` failed", "", m["failure_reason"], "",
             f"Manifest: `{written['manifest_path']}`. `LATEST` still names the previous good run.", "",
             "| cause | rows |", "|---|---|"]
    lines += [f"| {c['cause'].replace('|', '/')} | {c['rows']} |" for c in m["failure_causes"][:10]]
    return "\n".join(lines)


def _samples(batches: list[dict[str, Any]], n: int = 3) -> list[dict[str, Any]]:
    """A few signs with every text ok, for the report."""
    rows = {kind: [r for b in batches for r in b["rows"][kind] if r["status"] == STATUS_OK] for kind in KINDS}
    out = []
    for label in sorted({r["label"] for r in rows["Tg"]})[:n]:
        pick = {kind: [r for r in rows[kind] if r["label"] == label] for kind in KINDS}
        out.append({"label": label, "gloss": pick["Tg"][0]["gloss"],
                    "Tb": pick["Tb"][0]["text"] if pick["Tb"] else None, "Tg": pick["Tg"][0]["text"],
                    "Tp": [{"text": r["text"], "body_parts": list(r["body_parts"])} for r in pick["Tp"]]})
    return out


def announce(written: dict[str, Any]) -> None:
    """Tell the server a description run is ready (deployment runs only: `gsp run` trains on its
    run itself, and a local `gsp generate` should not start training on a shared server)."""
    if current_deployment.id is None:
        return
    run_id = written["manifest"]["run_id"]
    emit_event(event=DESCRIPTIONS_EVENT,
               resource={"prefect.resource.id": f"gsp.descriptions.{run_id}", "prefect.resource.name": run_id},
               payload={"run_dir": written["run_dir"], "failed_rows": written["failed"],
                        "flow_run_id": str(current_flow_run.id)})
    get_run_logger().info("announced %s (%s)", written["run_dir"], DESCRIPTIONS_EVENT)


@flow(name="gsp")
async def gsp_flow(vocab: str, labels: list[int] | None = None, limit: int | None = None,
                   index_dir: str | None = None, kb_dir: str | None = None, out_dir: str | None = None,
                   ingest: bool = True, use_index: bool = True, base_url: str | None = None,
                   model: str | None = None, structured_output: str | None = None,
                   concurrency: int | None = None, synonyms: int | None = None, shards: int = 1,
                   base: str | None = None) -> dict[str, Any]:
    """Ingest (incremental) → P1–P4 per batch of signs → Tb/Ts/Tg/Tp parquet + manifest.

    Model settings not given here come from the environment (``GSP_LLM_*``); with no endpoint
    configured the embedded local llama.cpp server is started for the run. ``shards`` > 1 splits
    the signs into that many flow runs of ``gsp-shard/describe`` (flows.fanout), for several
    workers; they share the endpoint's limits through Prefect global rate limits."""
    warn_unknown_settings()
    settings = build_settings(base_url=base_url, model=model, structured_output=structured_output,
                              concurrency=concurrency, synonyms=synonyms)
    if use_index and ingest:
        report = ingest_task(str(kb_dir or settings.paths.kb_dir), str(index_dir or settings.paths.index),
                             settings.kb.model_dump(mode="json"))
        index_dir = report["index_dir"]
    plan = plan_task(vocab, settings.public_dict(), index_dir, use_index, out_dir, labels, limit, base)
    if shards > 1 and not settings.llm.base_url:
        raise GenerationError("shards > 1 needs an endpoint (GSP_LLM_BASE_URL) that every worker shares; "
                              "the embedded model answers one machine")
    previous = previous_latest(plan["out_root"])
    async with generation_session(settings) as session:
        if shards > 1:
            results = await fan_out(plan, shards)
        else:
            # The batch tasks find this session by its id: they share its client (one set of limits).
            batches = [plan["labels"][i : i + settings.llm.batch_size]
                       for i in range(0, len(plan["labels"]), settings.llm.batch_size)]
            results = await asyncio.gather(*(batch_task(session.id, plan, b, i) for i, b in enumerate(batches)))
        written = write_task(session.id, plan, list(results))
    remove_shards(plan)
    publish_task(written)
    if written["run_failed"]:
        raise RunFailed(written["failure_line"])
    if previous and previous != written["run_dir"]:
        publish_diff_task(previous, written["run_dir"])
    announce(written)
    return {k: written[k] for k in ("run_dir", "failed", "summary", "failure_line", "manifest_path")}
