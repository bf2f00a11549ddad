"""Benchmark: what the multi-positive contrastive loss gains over CE only, by quality of text.

Trains the same model on the same synthetic clips (the demo signs, ``demo.synthetic``) with:

- ``ce``: cross-entropy only (the baseline of the paper's Table 5);
- ``reference``: CE + L_con with reference descriptions written from the sign source
  (``demo.reference_texts``: what a perfect GSP would say);
- ``run``: CE + L_con with a generated description run, when ``--descriptions RUN_DIR`` is given
  (e.g. the SmolLM2 run of ``gsp run``);

for each seed, and prints one table of test top-1/top-5 (mean and per seed) and seconds. All
files go to a temporary folder, removed at the end (``--keep DIR`` keeps them); nothing is written into
the repo.

    .venv/bin/python bench/contrastive_gain.py                       # ~10 min on 2 cores
    .venv/bin/python bench/contrastive_gain.py --seeds 0 --epochs 4 --descriptions artifacts/descriptions
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1", help="Comma-separated training seeds.")
    ap.add_argument("--epochs", type=int, default=None, help="Default: the preset's.")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--samples-per-class", type=int, default=24)
    ap.add_argument("--descriptions", type=Path, default=None, help="A generated run to compare as well.")
    ap.add_argument("--ablation", default="all", help="Which L_con terms (see gsp train --ablation).")
    ap.add_argument("--keep", type=Path, default=None, help="Keep data, texts and runs here.")
    args = ap.parse_args()

    if args.descriptions is not None:
        from gsp.schema import SchemaError, resolve_run_dir

        try:  # fail now, not after the first trainings
            args.descriptions = resolve_run_dir(args.descriptions)
        except SchemaError as exc:
            raise SystemExit(f"--descriptions: {exc}") from exc
    work = args.keep or Path(tempfile.mkdtemp(prefix="gsp-bench-gain-"))
    work.mkdir(parents=True, exist_ok=True)
    # caches (text features) under the work folder, not the repo's artifacts/
    os.environ["GSP_ARTIFACTS_DIR"] = str(work / "artifacts")

    from demo.reference_texts import write_reference_run
    from demo.synthetic import write_synthetic_dataset
    from gsp.settings import get_settings
    from mc.train import TrainConfig, train

    data = write_synthetic_dataset(work / "skeletons.pkl", samples_per_class=args.samples_per_class, seed=0)
    configs: dict[str, Path | None] = {"ce": None, "reference": write_reference_run(work / "reference_run")}
    if args.descriptions:
        configs["run"] = args.descriptions
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in configs}
    for seed in seeds:
        for name, texts in configs.items():
            t0 = time.perf_counter()
            m = train(TrainConfig.from_settings(
                get_settings(), data=data, descriptions=texts, contrastive=texts is not None, ablation=args.ablation,
                preset=args.preset, epochs=args.epochs, seed=seed, out=work / "runs" / f"{name}-seed{seed}",
                progress=False))
            results[name].append((m["top1"], m["top5"], time.perf_counter() - t0))
            print(f"  {name:<10} seed {seed}: top1 {m['top1']:.3f}  top5 {m['top5']:.3f}", flush=True)

    print(f"\npreset {args.preset}, {args.samples_per_class} clips per sign, seeds {seeds}, ablation {args.ablation}")
    print(f"{'texts':<12}{'top1 mean':>10}{'top5 mean':>10}{'top1 per seed':>24}{'s/run':>8}")
    for name, rows in results.items():
        top1 = [r[0] for r in rows]
        print(f"{name:<12}{statistics.mean(top1):>10.3f}{statistics.mean(r[1] for r in rows):>10.3f}"
              f"{' '.join(f'{x:.3f}' for x in top1):>24}{statistics.mean(r[2] for r in rows):>8.0f}")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
