"""Benchmark: inference samples/s of the exported model in PyTorch (eager, ``export.pt``) and in ONNX
Runtime (``model.onnx`` from ``gsp export --onnx``), for the tiny and the full-size model.

Each size gets a randomly initialised ``export.pt`` (same format as training writes), which is
loaded by :func:`mc.evaluate.load_inference` and exported by :func:`mc.onnx_export.export_onnx`,
so both sides run the same weights through the project's own code. Calls are interleaved
(eager, ORT all, ORT basic, ORT none, eager, …) so a busy machine slows them alike; the table
gives the median call. Prints one table (temporary files only):

- ``eager/s`` — PyTorch eager samples/s (``torch.inference_mode``, ``--threads`` threads);
- ``ort all/s``, ``ort basic/s``, ``ort none/s`` — ONNX Runtime samples/s at graph optimisation
  level ALL (what ``gsp predict`` uses), BASIC and none, ``--threads`` intra-op threads;
- ``ort/eager`` — time per sample of ORT (ALL) over eager (the issue's aim: ≤ 0.6);
- ``max |Δ|`` — the largest logit difference between the two, over the largest logit;
- ``cuda/s`` (with ``--cuda`` on a machine with a GPU) — PyTorch eager on the GPU, for reference.

    .venv/bin/python bench/inference.py                       # tiny and full, batch 1 and 16
    .venv/bin/python bench/inference.py --sizes full --batches 16 --threads 2 --repeats 5
    .venv/bin/python bench/inference.py --cuda                  # plus eager on the GPU
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mc.evaluate import EXPORT_FORMAT, load_inference
from mc.keypoints import DEFAULT_KEYPOINT_SET, get_layout
from mc.model import SkeletonClassifier, model_config_for
from mc.onnx_export import OnnxPredictor, export_onnx
from mc.presets import get_recipe

ORT_LEVELS = ("all", "basic", "none")


def size_settings(size: str) -> tuple[int, int]:
    """(base_channels, frames) of a benchmark size: ``tiny`` is the tiny preset, ``full`` the
    full-size model of the issue (base 64, T=64)."""
    if size == "tiny":
        recipe = get_recipe("tiny")
        return recipe.base_channels, recipe.frames
    return 64, 64


def write_export(folder: Path, base_channels: int, frames: int, num_classes: int) -> Path:
    """A randomly initialised ``export.pt`` in the format ``gsp train`` writes."""
    torch.manual_seed(0)
    cfg = model_config_for(get_layout(DEFAULT_KEYPOINT_SET), num_classes, base_channels=base_channels)
    model = SkeletonClassifier(cfg).eval()
    path = folder / "export.pt"
    torch.save({"format": EXPORT_FORMAT, "model_config": cfg.to_dict(), "state_dict": model.state_dict(),
                "stream": "joint", "frames": frames, "layout": DEFAULT_KEYPOINT_SET, "labels": []}, path)
    return path


def median_seconds(calls: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved, one warm-up call each."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call()
    for _ in range(repeats):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def cuda_call(model: torch.nn.Module, x: np.ndarray):
    """Eager inference on the GPU (weights and input already there), synchronised so it is timed."""
    gpu_model = copy.deepcopy(model).cuda()
    xg = torch.from_numpy(x).cuda()

    def call():
        gpu_model(xg)
        torch.cuda.synchronize()

    return call


def bench_size(size: str, batches: list[int], threads: int, repeats: int, num_classes: int,
               cuda: bool = False) -> list[dict]:
    base, frames = size_settings(size)
    with tempfile.TemporaryDirectory() as tmp:
        export_pt = write_export(Path(tmp), base, frames, num_classes)
        t0 = time.perf_counter()
        onnx_path = export_onnx(export_pt, Path(tmp) / "model.onnx")
        export_s = time.perf_counter() - t0
        model, _ = load_inference(export_pt)
        sessions = {level: OnnxPredictor(onnx_path, threads=threads, optimization=level) for level in ORT_LEVELS}
        rows = []
        for batch in batches:
            x = np.random.default_rng(0).normal(size=(batch, 3, frames, 87, 1)).astype(np.float32)
            xt = torch.from_numpy(x)
            with torch.inference_mode():
                calls = {"eager": lambda xt=xt: model(xt)}
                calls.update({level: (lambda s=s, x=x: s.logits(x)) for level, s in sessions.items()})
                if cuda:
                    calls["cuda"] = cuda_call(model, x)
                seconds = median_seconds(calls, repeats)
                want = model(xt).numpy()
            diff = float(np.abs(sessions["all"].logits(x) - want).max() / max(np.abs(want).max(), 1e-12))
            rows.append({"size": f"{size} (base {base}, T={frames})", "batch": batch, "export_s": export_s,
                         **{name: batch / s for name, s in seconds.items()},
                         "ratio": seconds["all"] / seconds["eager"], "diff": diff})
        return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,full", help="comma-separated: tiny, full")
    ap.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads and ONNX Runtime intra-op threads")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per variant (after one warm-up)")
    ap.add_argument("--num-classes", type=int, default=46, help="classifier outputs (46: the demo vocabulary)")
    ap.add_argument("--cuda", action="store_true", help="also time PyTorch eager on the GPU")
    args = ap.parse_args()
    if args.cuda and not torch.cuda.is_available():
        ap.error("--cuda: no CUDA device here")
    torch.set_num_threads(args.threads)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if not set(sizes) <= {"tiny", "full"}:
        ap.error(f"--sizes {args.sizes!r}: choose from tiny, full")
    batches = [int(b) for b in args.batches.split(",")]
    rows = [r for size in sizes
            for r in bench_size(size, batches, args.threads, args.repeats, args.num_classes, args.cuda)]

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"inference samples/s, {args.threads} thread(s), median of {args.repeats} "
                        f"(torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__})")
    columns = ["model", "batch", "eager/s", "ort all/s", "ort basic/s", "ort none/s", "ort/eager", "max |Δ|",
               "export s"] + (["cuda/s"] if args.cuda else [])
    for col in columns:
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        cells = [r["size"], str(r["batch"]), f"{r['eager']:.2f}", f"{r['all']:.2f}", f"{r['basic']:.2f}",
                 f"{r['none']:.2f}", f"{r['ratio']:.2f}×", f"{r['diff']:.1e}", f"{r['export_s']:.0f}"]
        table.add_row(*cells, *([f"{r['cuda']:.1f}"] if args.cuda else []))
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
