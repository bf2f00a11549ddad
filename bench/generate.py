"""Benchmark: generation throughput against the loopback server with a fixed per-request latency.

Prints wall time for N signs at concurrency C next to the ideal N·calls·latency/C (efficiency =
ideal / wall), and the wall time of a fully cached re-run. Writes only to a temp folder.

    .venv/bin/python bench/generate.py [--signs 226] [--concurrency 16] [--latency 0.2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import subprocess  # noqa: E402

from gsp.generate import generate_descriptions  # noqa: E402
from gsp.llm.server import free_port, stop_process, wait_until_ready  # noqa: E402
from gsp.settings import Settings  # noqa: E402

CALLS_PER_SIGN = 4  # P1, P2, P3, P4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=Path, default=ROOT / "data" / "vocab" / "autsl.csv")
    parser.add_argument("--signs", type=int, default=226)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency", type=float, default=0.2)
    args = parser.parse_args()

    # the server in its own process, so its threads do not compete with the client for the GIL
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_openai.py"), "--port", str(port),
                               "--latency", str(args.latency)], stdout=subprocess.DEVNULL)
    try:
        wait_until_ready(base_url, server, 30, None)
        run_bench(args, base_url)
    finally:
        stop_process(server)


def run_bench(args: argparse.Namespace, base_url: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(paths={"artifacts_dir": Path(tmp)},
                            llm={"base_url": base_url, "model": "fake", "structured_output": "json_schema",
                                 "concurrency": args.concurrency})
        t0 = time.perf_counter()
        run = generate_descriptions(args.vocab, settings=settings, use_index=False, limit=args.signs)
        wall = time.perf_counter() - t0
        n = run.manifest["vocabulary"]["signs_run"]
        requests = run.manifest["requests"]
        ideal = n * CALLS_PER_SIGN * args.latency / args.concurrency
        t1 = time.perf_counter()
        cached = generate_descriptions(args.vocab, settings=settings, use_index=False, limit=args.signs)
        cached_wall = time.perf_counter() - t1
        assert cached.manifest["requests"] == 0, "cached re-run made requests"

    print(f"{'signs':>6} {'conc':>5} {'latency':>8} {'requests':>9} {'ideal s':>8} {'wall s':>8} "
          f"{'efficiency':>10} {'cached s':>9} {'failed':>7}")
    print(f"{n:>6} {args.concurrency:>5} {args.latency:>8.3f} {requests:>9} {ideal:>8.2f} {wall:>8.2f} "
          f"{ideal / wall:>10.2f} {cached_wall:>9.2f} {run.failed + cached.failed:>7}")


if __name__ == "__main__":
    main()
