"""Benchmark: do the descriptions help, where they should? GSP-MC against CE only, with controls.

Builds a synthetic data set of the demo signs that have a minimal-pair twin (derived from the
sign source: handshape, non-manual, location and direction pairs; 18 signs, 24 clips each by
8 signers, the last 2 signers for the test: 18 training clips per sign), writes the reference
descriptions (from the sign source: an upper bound on description quality) and the shuffled
reference (each sign gets another sign's texts: any gain that survives it is not from the texts),
and runs one experiment grid (:mod:`mc.experiment`):

    K = 2, 4, 8, all training clips per sign
    × {CE only, CE + L_con with reference, with shuffled reference, [with --descriptions RUN]}
    × seeds 0, 1, 2

Every cell trains for about the same number of optimisation steps (``--steps``; epochs =
ceil(steps / steps per epoch), so K=2 trains ~10× the epochs of K=all, and the LR schedule is
stretched to the epochs). It prints the summary: top-1 and minimal-pair accuracy per kind with
95% t intervals over seeds, the paired-seed difference to CE only, and the cosine similarity
of the minimal pairs' Tg features in the frozen text encoder's space.

    .venv/bin/python bench/description_benchmark.py --out /tmp/desc-bench --steps 320 --frames 8 --threads 1
    .venv/bin/python bench/description_benchmark.py --seeds 0 --k 2,all --steps 20   # a smoke run, ~3 min

Re-running with the same ``--out`` skips finished cells and resumes a killed one. Without
``--out`` everything goes to a temporary folder, removed at the end; nothing is written into the
repo. Measured on one quiet core of a 2-core AMD EPYC (``--threads 1 --frames 8``): about 3 min per
cell at 320 steps and 9 min at 1024, so the README's grid (36 cells at 320 steps) takes about
1¾ hours in one process, or about an hour as two (``--k 2,4`` and ``--k 8,all`` with their own
``--out``), and its K=all check at 1024 steps (9 cells) about 80 minutes in one process.
320 steps do not converge the tiny model at K=8 and K=all (train top-1 about 0.5); 1024 steps at
K=all reach about 0.7.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def _ks(text: str) -> list[int | None]:
    return [None if t.strip() == "all" else int(t) for t in text.split(",") if t.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2", help="Comma-separated training seeds.")
    ap.add_argument("--k", default="2,4,8,all", help="Training clips per sign, comma-separated (all: 18).")
    ap.add_argument("--steps", type=int, default=128, help="Optimisation steps per cell (batch 16).")
    ap.add_argument("--signs", choices=("pairs", "all"), default="pairs",
                    help="pairs: the 18 signs with a minimal-pair twin; all: every demo sign (46).")
    ap.add_argument("--samples-per-class", type=int, default=24)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--descriptions", type=Path, default=None, help="A generated run to compare as well.")
    ap.add_argument("--ablation", default="all", help="Which L_con terms (see gsp train --ablation).")
    ap.add_argument("--out", type=Path, default=None, help="Keep data, texts, runs and tables here (resumable).")
    ap.add_argument("--frames", type=int, default=None, help="Frames per clip in training (default: the preset's, "
                    "16 for tiny); fewer make a step cheaper.")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default torch's; 1 on a machine shared with other work).")
    args = ap.parse_args()

    work = args.out or Path(tempfile.mkdtemp(prefix="gsp-desc-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["GSP_ARTIFACTS_DIR"] = str(work / "artifacts")  # text-feature cache outside the repo

    from demo.experiment_inputs import CONTROL_BUILDERS, data_minimal_pairs, minimal_pairs
    from demo.sign_source import load_sign_source
    from demo.synthetic import write_synthetic_dataset
    from gsp.errors import GspError
    from gsp.settings import get_settings
    from mc.experiment import ExperimentSpec, run_experiment

    t0 = time.perf_counter()
    source = load_sign_source()
    glosses = None if args.signs == "all" else sorted({g for _, a, b in minimal_pairs(source) for g in (a, b)},
                                                       key=[s.gloss for s in source.signs].index)
    data = work / f"skeletons-{args.signs}-s{args.samples_per_class}.pkl"
    if not data.is_file():  # deterministic in its arguments, which name it
        write_synthetic_dataset(data, source, samples_per_class=args.samples_per_class, glosses=glosses)
    entries = ["reference", "shuffled:reference"] + ([f"generated={args.descriptions}"] if args.descriptions else [])
    spec = ExperimentSpec(data=data, out=work / "experiment", descriptions=[],
                          seeds=[int(s) for s in args.seeds.split(",")], ablations=["ce", args.ablation],
                          ks=_ks(args.k), preset=args.preset, steps=args.steps, pairs=data_minimal_pairs(data, source),
                          train_overrides={k: v for k, v in (("threads", args.threads), ("frames", args.frames)) if v})
    try:
        result = run_experiment(spec, get_settings(), lambda line: print(line, flush=True), entries, CONTROL_BUILDERS)
    except GspError as exc:
        sys.exit(f"error: {exc}")
    n_signs = len(glosses) if glosses else len(source.signs)
    print(f"\n{n_signs} signs, {args.samples_per_class} clips each (3/4 of the signers train), preset {args.preset}, "
          f"{args.steps} steps per cell, seeds {args.seeds}, ablation {args.ablation}; "
          f"{len(result['results'])} cells in {time.perf_counter() - t0:.0f} s\n")
    print((work / "experiment" / "summary.md").read_text(encoding="utf-8"))
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"tables and runs: {work / 'experiment'}")


if __name__ == "__main__":
    main()
