"""Benchmark: the backbone's fast formulation against the reference one, same weights, same input.

Prints one table (nothing is written): seconds per iteration of a training step's forward +
backward and of inference, for the reference formulation (the reference CTR-GCN's operations,
``mc.model.set_formulation(model, "reference")``), the fast one in eager mode, the fast one under
``torch.compile`` (``--no-compile`` leaves it out) and, with ``--bf16``, both formulations under
bfloat16 autocast on the CPU (``amp="on"`` in training). Each ratio is against the reference in
eager float32. Variants are timed interleaved (one iteration of each in turn), so background load
hits them alike; the median of ``--iters`` iterations is shown (inference: ``INFER_REPEATS`` per
training round), and each ratio is the median of the rounds' own ratios (a variant's time over
the reference's in the same round: this machine's speed drifts by up to a third for tens of
seconds at a time, and a round's variants run within seconds of each other). A progress bar
(gone when done) counts the warm-ups and rounds.

``--fresh N`` times instead inference alone in a fresh process (what ``gsp eval`` and ``gsp
predict`` do once per call, and what a process that only serves the model keeps doing): N rounds
of one subprocess per formulation, each building the model and running one forward pass, with its
seconds, peak memory and page faults, then ``--iters`` more passes (their median: "warm");
medians over the rounds shown. The in-process table's inference column is measured after
training steps in the same process, which leave the allocator in another state.

    .venv/bin/python bench/backbone.py                                  # the issue's full size
    .venv/bin/python bench/backbone.py --batch 4 --frames 32 --iters 3  # quicker
    .venv/bin/python bench/backbone.py --fresh 3 --no-compile           # first pass in a fresh process
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mc.keypoints import DEFAULT_KEYPOINT_SET, get_layout
from mc.model import SkeletonClassifier, compile_backbone, model_config_for, set_formulation


def train_iteration(model: torch.nn.Module, x: torch.Tensor, bf16: bool) -> None:
    """Forward and backward of a training step (no optimizer step: the backbone is what differs)."""
    model.train()
    model.zero_grad(set_to_none=True)
    with _autocast(bf16):
        out = model(x)
    out.float().sum().backward()


@torch.no_grad()
def infer_iteration(model: torch.nn.Module, x: torch.Tensor, bf16: bool) -> None:
    model.eval()
    with _autocast(bf16):
        model(x)


def _autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()


def _timed(step: Callable[..., None], *args) -> float:
    t0 = time.perf_counter()
    step(*args)
    return time.perf_counter() - t0


def variants(model: SkeletonClassifier, compile_: bool, bf16: bool) -> dict[str, tuple[torch.nn.Module, bool]]:
    """name → (module, bf16 autocast); every module holds the same weights."""
    reference = set_formulation(copy.deepcopy(model), "reference")
    fast = set_formulation(model, "fast")
    out = {"reference, eager": (reference, False), "fast, eager": (fast, False)}
    if compile_:
        compiled = set_formulation(copy.deepcopy(model), "fast")
        if compile_backbone(compiled):  # else it said why, in one line
            out["fast, torch.compile"] = (compiled, False)
    if bf16:
        out["reference, eager, bf16 autocast"] = (reference, True)
        out["fast, eager, bf16 autocast"] = (fast, True)
    return out


#: Inference rounds per training round: an inference pass costs a tenth of a training step, and
#: more paired rounds steady its ratio.
INFER_REPEATS = 3


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True)


def measure(runs: dict[str, tuple[torch.nn.Module, bool]], x: torch.Tensor, iters: int) -> dict[str, dict]:
    """Per variant and kind (training, inference): the median seconds per iteration, and the median
    over rounds of its time relative to the first variant's in the same round; interleaved."""
    times = {name: {"train": [], "infer": []} for name in runs}
    with _progress() as bar:  # a full-size run takes minutes (compiling alone 2-4)
        task = bar.add_task("warm-up and compilation", total=len(runs) + iters)
        for module, bf16 in runs.values():  # outside the timing
            train_iteration(module, x, bf16)
            infer_iteration(module, x, bf16)
            bar.advance(task)
        bar.update(task, description="timed rounds")
        for _ in range(iters):
            for kind, step, repeats in (("train", train_iteration, 1), ("infer", infer_iteration, INFER_REPEATS)):
                for _ in range(repeats):
                    for name, (module, bf16) in runs.items():
                        times[name][kind].append(_timed(step, module, x, bf16))
            bar.advance(task)
    base = times[next(iter(runs))]
    return {name: {**{k: statistics.median(v) for k, v in t.items()},
                   **{f"{k}_ratio": statistics.median(a / b for a, b in zip(v, base[k])) for k, v in t.items()}}
            for name, t in times.items()}


def fresh_inference(args: argparse.Namespace) -> dict:
    """One forward pass of formulation ``args.one_fresh`` in this (fresh) process: seconds, and
    the peak memory and page faults it added."""
    layout = get_layout(args.layout)
    torch.manual_seed(0)
    model = set_formulation(SkeletonClassifier(model_config_for(layout, 46, base_channels=args.channels)),
                            args.one_fresh).eval()
    x = torch.randn(args.batch, 3, args.frames, layout.num_nodes, 1)
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    with torch.no_grad():
        model(x)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    with torch.no_grad():  # then the same process keeps serving: what a warm inference pass costs
        warm = [_timed(model, x) for _ in range(args.iters)]
    return {"seconds": seconds, "warm_seconds": statistics.median(warm), "peak_mb": after.ru_maxrss / 1024,
            "added_mb": (after.ru_maxrss - before.ru_maxrss) / 1024, "faults": after.ru_minflt - before.ru_minflt}


def measure_fresh(args: argparse.Namespace) -> dict[str, dict]:
    """Medians over ``args.fresh`` rounds of :func:`fresh_inference`, one subprocess per
    formulation and round, the formulations alternating."""
    runs: dict[str, list[dict]] = {name: [] for name in ("reference", "fast")}
    with _progress() as bar:
        task = bar.add_task("fresh processes", total=args.fresh * len(runs))
        for _ in range(args.fresh):
            for name, results in runs.items():
                command = [sys.executable, __file__, "--one-fresh", name, "--batch", str(args.batch), "--frames",
                           str(args.frames), "--channels", str(args.channels), "--layout", args.layout,
                           "--iters", str(args.iters)]
                if args.threads:
                    command += ["--threads", str(args.threads)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:  # its own error, not CalledProcessError over a swallowed stderr
                    tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                    raise SystemExit(f"the fresh {name} process failed (exit {done.returncode}): {tail}")
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
                bar.advance(task)
    return {name: {k: statistics.median(r[k] for r in results) for k in results[0]} for name, results in runs.items()}


def print_fresh(args: argparse.Namespace, result: dict[str, dict]) -> None:
    base = result["reference"]
    print(f"inference in a fresh process, V={get_layout(args.layout).num_nodes}, T={args.frames}, "
          f"batch {args.batch}, base_channels {args.channels}, median of {args.fresh} process(es) each; "
          f"first pass, then the median of {args.iters} more")
    print(f"{'formulation':<14}{'first s':>9}{'ratio':>8}{'warm s':>9}{'ratio':>8}{'peak MB':>9}{'added MB':>10}"
          f"{'page faults':>13}")
    for name, r in result.items():
        print(f"{name:<14}{r['seconds']:>9.2f}{r['seconds'] / base['seconds']:>7.2f}x{r['warm_seconds']:>9.2f}"
              f"{r['warm_seconds'] / base['warm_seconds']:>7.2f}x{r['peak_mb']:>9.0f}"
              f"{r['added_mb']:>10.0f}{r['faults']:>13.0f}")
    print("(page faults and peak memory: of the first pass)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--channels", type=int, default=64, help="base_channels (the paper's width is 64)")
    ap.add_argument("--iters", type=int, default=3, help="timed iterations per variant (after one warm-up)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--layout", default=DEFAULT_KEYPOINT_SET)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the fast formulation under torch.compile")
    ap.add_argument("--bf16", action="store_true", help="also time both formulations under bf16 autocast")
    ap.add_argument("--fresh", type=int, default=0, metavar="N",
                    help="time the first inference pass in N fresh processes per formulation instead")
    ap.add_argument("--one-fresh", choices=("reference", "fast"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one_fresh:
        print(json.dumps(fresh_inference(args)))
        return
    if args.fresh:
        print_fresh(args, measure_fresh(args))
        return
    layout = get_layout(args.layout)
    torch.manual_seed(0)
    model = SkeletonClassifier(model_config_for(layout, 46, base_channels=args.channels))
    x = torch.randn(args.batch, 3, args.frames, layout.num_nodes, 1)
    result = measure(variants(model, args.compile, args.bf16), x, args.iters)

    print(f"backbone V={layout.num_nodes} ({layout.name}), T={args.frames}, batch {args.batch}, "
          f"base_channels {args.channels}, threads {torch.get_num_threads()}, median of {args.iters} "
          f"(inference: {args.iters * INFER_REPEATS})")
    print(f"{'formulation':<34}{'fwd+bwd s/it':>14}{'ratio':>8}{'inference s/it':>16}{'ratio':>8}")
    for name, r in result.items():
        print(f"{name:<34}{r['train']:>14.3f}{r['train_ratio']:>7.2f}x{r['infer']:>16.3f}{r['infer_ratio']:>7.2f}x")
    print("(ratio = median over rounds of the time relative to the reference formulation in eager float32 "
          "in the same round; aims: fast eager <= 0.8x, torch.compile <= 0.6x fwd+bwd)")


if __name__ == "__main__":
    main()
