"""Generation fan-out: the signs of a large vocabulary split into shards that run as separate
flow runs of the deployment ``gsp-shard/describe`` on the ``cpu`` pool, so several workers on
several machines share the work; the ``gsp`` flow then merges the shards into one description run.

The endpoint's limits hold across all shards together: every request of a shard first takes a
slot of a Prefect global rate limit (:data:`REQUESTS_LIMIT`, :data:`TOKENS_LIMIT`, made from the
``GSP_LLM_REQUESTS_PER_MINUTE`` / ``GSP_LLM_TOKENS_PER_MINUTE`` settings by :func:`ensure_rate_limits`,
which ``gsp up`` and the ``gsp`` flow call). A per-process limiter alone would let N shards send
N times the allowed rate.

Shards hand their rows back through files (``<descriptions root>/.shards/<run id>/``): a flow's
result cannot travel between machines without shared result storage, and the artifacts folder
(descriptions, index, response cache) must be shared by every worker anyway. A re-run of an
interrupted fan-out repeats no answered request: the answers are in the shared response cache.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

from flows import warn_unknown_settings
from flows.progress import DescribeProgress
from gsp.atomic import write_json_atomic
from gsp.generate import GenerationError, claim_descriptions_root, describe_planned
from gsp.schema import STATUS_OK

SHARD_DEPLOYMENT = "gsp-shard/describe"
REQUESTS_LIMIT = "gsp-llm-requests"
TOKENS_LIMIT = "gsp-llm-tokens"
SHARDS_FOLDER = ".shards"


def shard_labels(labels: list[int], shards: int) -> list[list[int]]:
    """``labels`` in at most ``shards`` contiguous parts of near-equal size (none empty)."""
    shards = max(1, min(shards, len(labels)))
    size = math.ceil(len(labels) / shards)
    return [labels[i : i + size] for i in range(0, len(labels), size)]


def rate_limit_shapes(requests_per_minute: float | None, tokens_per_minute: float | None) -> dict[str, dict]:
    """The global limits for an endpoint's per-minute limits: slots that decay at the allowed rate
    per second. The request limit allows a burst of one second's worth (providers often enforce
    RPM over shorter windows); the token limit a minute's worth, since one request takes many."""
    shapes = {}
    if requests_per_minute:
        shapes[REQUESTS_LIMIT] = {"limit": max(1, math.ceil(requests_per_minute / 60)),
                                  "slot_decay_per_second": requests_per_minute / 60}
    if tokens_per_minute:
        shapes[TOKENS_LIMIT] = {"limit": max(1, int(tokens_per_minute)),
                                "slot_decay_per_second": tokens_per_minute / 60}
    return shapes


async def ensure_rate_limits(client, requests_per_minute: float | None,
                             tokens_per_minute: float | None) -> dict[str, dict]:
    """Create or update the global rate limits on ``client``'s server to match the settings."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    shapes = rate_limit_shapes(requests_per_minute, tokens_per_minute)
    for name, shape in shapes.items():
        try:
            await client.read_global_concurrency_limit_by_name(name)
            await client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(**shape, active=True))
        except ObjectNotFound:
            await client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, **shape))
    return shapes


def global_throttle(llm: dict[str, Any]):
    """What a shard's client awaits before each request (None when the endpoint has no limits):
    a slot of each global rate limit the settings ``llm`` call for."""
    from prefect.concurrency.asyncio import rate_limit

    shapes = rate_limit_shapes(llm.get("requests_per_minute"), llm.get("tokens_per_minute"))
    if not shapes:
        return None
    token_cap = shapes.get(TOKENS_LIMIT, {}).get("limit")

    async def throttle(tokens: int) -> None:
        if REQUESTS_LIMIT in shapes:
            await rate_limit(REQUESTS_LIMIT, occupy=1, strict=True)
        if token_cap:  # one take can never exceed the limit's size
            await rate_limit(TOKENS_LIMIT, occupy=max(1, min(tokens, token_cap)), strict=True)

    return throttle


@flow(name="gsp-shard", flow_run_name="shard-{shard}-of-{run_id}")
async def shard_flow(plan: dict[str, Any], labels: list[int], shard: int, run_id: str, out: str) -> dict[str, Any]:
    """P1–P4 for ``labels`` of the planned run ``plan``; the rows go to the file ``out``."""
    warn_unknown_settings()
    throttle = global_throttle(plan["settings"]["llm"])
    # No session of the parent is open in this process: describe_planned opens its own.
    result = await describe_planned(plan, labels, session_id="", throttle=throttle,
                                    on_done=DescribeProgress(f"shard {shard}", len(labels), get_run_logger()))
    write_json_atomic(Path(out), result)
    failed = sum(r["status"] != STATUS_OK for rows in result["rows"].values() for r in rows)
    get_run_logger().info("shard %d: %d sign(s), %d failed row(s) → %s", shard, len(labels), failed, out)
    return {"out": out, "signs": len(labels), "failed": failed}


async def fan_out(plan: dict[str, Any], shards: int) -> list[dict[str, Any]]:
    """Run the plan's signs as ``shards`` flow runs of :data:`SHARD_DEPLOYMENT`, wait for all of
    them, and return their results (the batches :func:`gsp.generate.finalize_planned` merges)."""
    from prefect.exceptions import ObjectNotFound

    llm = plan["settings"]["llm"]
    async with get_client() as client:
        await ensure_rate_limits(client, llm.get("requests_per_minute"), llm.get("tokens_per_minute"))
    # The shard files live in the descriptions folder, so it becomes ours now (checked when planned).
    claim_descriptions_root(Path(plan["out_root"]))
    folder = shards_folder(plan)
    parts = shard_labels(plan["labels"], shards)
    files = [folder / f"shard-{i:03d}.json" for i in range(len(parts))]
    get_run_logger().info("run %s: %d sign(s) in %d shard(s)", plan["run_id"], len(plan["labels"]), len(parts))
    try:
        runs = await asyncio.gather(*(
            run_deployment(SHARD_DEPLOYMENT, parameters={"plan": plan, "labels": parts[i], "shard": i,
                                                         "run_id": plan["run_id"], "out": str(files[i])},
                           as_subflow=True, timeout=None)
            for i in range(len(parts))))
    except ObjectNotFound:
        raise GenerationError(f"shards={shards} needs the deployment {SHARD_DEPLOYMENT} on the Prefect server "
                              "(gsp up deploys it; elsewhere: prefect deploy --all)") from None
    bad = [f"shard {i}: {run.state.name if run.state else '?'}" for i, run in enumerate(runs)
           if not (run.state and run.state.is_completed())]
    if bad:
        raise GenerationError(f"run {plan['run_id']}: {', '.join(bad)} (a re-run asks the endpoint only what "
                              "no shard got an answer to: answers are in the shared response cache)")
    return [json.loads(f.read_text(encoding="utf-8")) for f in files]


def shards_folder(plan: dict[str, Any]) -> Path:
    return Path(plan["out_root"]) / SHARDS_FOLDER / plan["run_id"]


def remove_shards(plan: dict[str, Any]) -> None:
    """Once the merged run is written, its shard files have served their purpose."""
    shutil.rmtree(shards_folder(plan), ignore_errors=True)
