"""Benchmark: generation throughput against the loopback server with a fixed per-request latency.

For N signs at concurrency C it prints the wall time of the whole run (``generate_descriptions``:
plan, endpoint check, requests, writing the run) next to the ideal N·calls·latency/C (efficiency =
ideal / wall), and apart from it the wall time of the requests alone (``describe_batch``: what the
client decides) with its own efficiency; the wall time of a fully cached re-run; and the CPU the
client and the server spent per request (process time / requests), so that a cost growing with the
run's size shows as a growing figure between a small and a large run; and, as the floor the server
and the machine leave, the wall time of as many bare POSTs at the same concurrency through the same
HTTP carrier, with no pipeline around them ("bare s"). Writes only to a temp folder.

    .venv/bin/python bench/generate.py            # the standard rows (and their aims)
    .venv/bin/python bench/generate.py --vocab data/vocab/slr500.csv --signs 500 --concurrency 64 --latency 0.05

The server runs in its own process, so its threads do not compete with the client for the GIL;
on a 2-core machine both share the cores with whatever else runs: read ``uptime`` first.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]

from gsp.generate import (  # noqa: E402
    RunResult,
    describe_batch,
    finalize_run,
    generate_descriptions,
    generation_session,
    long_lived_objects_frozen,
    prepare_run,
)
from gsp.llm.server import free_port, stop_process, wait_until_ready  # noqa: E402
from gsp.llm.transport import PlainHttpTransport, json_body  # noqa: E402
from gsp.settings import Settings  # noqa: E402

CALLS_PER_SIGN = 4  # P1, P2, P3, P4
AUTSL = ROOT / "data" / "vocab" / "autsl.csv"
SLR500 = ROOT / "data" / "vocab" / "slr500.csv"


@dataclass(frozen=True)
class Config:
    vocab: Path
    signs: int
    concurrency: int
    latency: float
    aim: str = ""


#: The issue's aims (issue 13), and a smaller SLR500 run beside the full one: the CPU per request
#: of the two must not differ by more than noise if no cost grows with the run's size.
STANDARD = (
    Config(AUTSL, 226, 16, 0.2, "efficiency ≥ 0.95"),
    Config(SLR500, 100, 64, 0.05, "CPU/req as at 500"),
    Config(SLR500, 500, 64, 0.05, "efficiency ≥ 0.9, cached < 5 s"),
)


@dataclass
class Row:
    config: Config
    signs: int
    requests: int
    wall_s: float
    requests_s: float
    cached_s: float
    client_cpu_ms: float
    server_cpu_ms: float
    failed: int
    bare_s: float

    @property
    def ideal_s(self) -> float:
        return self.signs * CALLS_PER_SIGN * self.config.latency / self.config.concurrency


def cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def timed_run(config: Config, settings: Settings) -> tuple[RunResult, float, float]:
    """``generate_descriptions`` in its parts: (the run, its wall time, the wall time of its requests)."""
    t0 = time.perf_counter()
    with long_lived_objects_frozen():  # as generate_descriptions does
        plan = prepare_run(config.vocab, settings=settings, use_index=False, limit=config.signs)

        async def describe_and_write() -> tuple[RunResult, float]:
            async with generation_session(settings) as session:
                t1 = time.perf_counter()
                result = await describe_batch(plan, session.client, plan.entries)
                requests_s = time.perf_counter() - t1
                return finalize_run(plan, result, session), requests_s

        run, requests_s = asyncio.run(describe_and_write())
    return run, time.perf_counter() - t0, requests_s


def bare_requests(config: Config, base_url: str, requests: int) -> float:
    """Wall time of ``requests`` POSTs at the run's concurrency with nothing around them: what the
    fake server, the carrier and the machine allow (each a distinct ~1.3 KB body, as a run's are)."""
    async def post_all() -> float:
        transport = PlainHttpTransport(base_url, timeout_s=30)
        slots = asyncio.Semaphore(config.concurrency)
        schema = {"type": "object", "properties": {"description": {"type": "string"}}}

        async def post(i: int) -> None:
            body = json_body({"model": "fake-model", "max_tokens": 256, "messages": [
                {"role": "user", "content": f"Sign: {i}\n" + "Describe the sign. " * 60}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "d", "schema": schema}}})
            async with slots:
                answer = await transport.post(body, {"Content-Type": "application/json"})
            if answer.status != 200:  # a floor of error answers would be no floor
                raise SystemExit(f"bare POST {i}: HTTP {answer.status} from the fake server")
        t0 = time.perf_counter()
        try:
            await asyncio.gather(*(post(i) for i in range(requests)))
        finally:
            await transport.aclose()
        return time.perf_counter() - t0
    return asyncio.run(post_all())


def measure(config: Config) -> Row:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_openai.py"), "--port", str(port),
                               "--latency", str(config.latency)], stdout=subprocess.DEVNULL)
    try:
        wait_until_ready(base_url, server, 30, None)
        with tempfile.TemporaryDirectory() as tmp:
            settings = Settings(paths={"artifacts_dir": Path(tmp)},
                                llm={"base_url": base_url, "model": "fake-model", "structured_output": "json_schema",
                                     "concurrency": config.concurrency})
            me, them = psutil.Process(), psutil.Process(server.pid)
            cpu0, server0 = cpu_s(me), cpu_s(them)
            run, wall, requests_s = timed_run(config, settings)
            client_cpu, server_cpu = cpu_s(me) - cpu0, cpu_s(them) - server0
            t1 = time.perf_counter()
            cached = generate_descriptions(config.vocab, settings=settings, use_index=False, limit=config.signs)
            cached_wall = time.perf_counter() - t1
        bare = bare_requests(config, base_url, run.manifest["requests"])
    finally:
        stop_process(server)
    if cached.manifest["requests"]:
        raise SystemExit(f"the cached re-run made {cached.manifest['requests']} request(s)")
    requests = run.manifest["requests"]
    return Row(config, run.manifest["vocabulary"]["signs_run"], requests, wall, requests_s, cached_wall,
               1e3 * client_cpu / requests, 1e3 * server_cpu / requests, run.failed + cached.failed, bare)


def print_table(rows: list[Row]) -> None:
    print(f"{'vocab':<11} {'signs':>5} {'conc':>4} {'latency':>7} {'requests':>8} {'ideal s':>7} {'wall s':>7} "
          f"{'efficiency':>10} {'requests s':>10} {'req. eff.':>9} {'cached s':>8} {'client CPU ms/req':>17} "
          f"{'server CPU ms/req':>17} {'bare s':>6} {'bare eff.':>9} {'failed':>6}  aim")
    for r in rows:
        c = r.config
        print(f"{c.vocab.name:<11} {r.signs:>5} {c.concurrency:>4} {c.latency:>7.3f} {r.requests:>8} {r.ideal_s:>7.2f} "
              f"{r.wall_s:>7.2f} {r.ideal_s / r.wall_s:>10.2f} {r.requests_s:>10.2f} {r.ideal_s / r.requests_s:>9.2f} "
              f"{r.cached_s:>8.2f} {r.client_cpu_ms:>17.2f} {r.server_cpu_ms:>17.2f} {r.bare_s:>6.2f} "
              f"{r.ideal_s / r.bare_s:>9.2f} {r.failed:>6}  {c.aim}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=Path, help="one row for this vocabulary instead of the standard rows")
    parser.add_argument("--signs", type=int, default=226)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--repeat", type=int, default=1, help="measure each row this many times (machine noise)")
    args = parser.parse_args()
    configs = [Config(args.vocab, args.signs, args.concurrency, args.latency)] if args.vocab else list(STANDARD)
    print_table([measure(c) for _ in range(args.repeat) for c in configs])


if __name__ == "__main__":
    main()
