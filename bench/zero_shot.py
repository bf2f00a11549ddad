"""Benchmark: zero-shot recognition of signs never trained on, from their descriptions alone.

On the synthetic demo signs (``demo.synthetic``, 46 signs, signer-split), for each seed:

1. train GSP-MC (CE + the multi-positive contrastive loss, ``--ablation all``) with the reference
   descriptions (``demo.reference_texts``: written from the sign source) and ``--holdout-fraction``
   of the signs held out (0.2 → 9 signs, drawn with the seed);
2. ``gsp eval RUN --zero-shot``: the held-out signs' test clips (other signers) against the 9
   held-out signs' descriptions (:mod:`mc.zeroshot`), with the shuffled-description control
   (the held-out signs' texts deranged among them) and chance;
3. with ``--descriptions RUN_DIR`` (a generated run, e.g. from ``gsp run``) the same again,
   trained and evaluated with those texts.

Prints one table: zero-shot top-1/top-5 as mean ± 95 % t-interval over seeds (per seed too), the
control, chance, the paired gain over the control, the seen signs' classifier top-1, and text →
clip retrieval (each sign's Tg as the query among all signs' test clips: the share of the top 5
that are of that sign, for seen and held-out signs; chance 1/46). All files
go to a temporary folder, removed at the end (``--keep DIR`` keeps them).

    .venv/bin/python bench/zero_shot.py                         # 3 seeds: ~12 min on 2 cores
    .venv/bin/python bench/zero_shot.py --seeds 0               # one seed: ~4 min
    .venv/bin/python bench/zero_shot.py --descriptions artifacts/descriptions   # + generated texts
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def interval(values: list[float]) -> str:
    """'mean ± half-width' of a 95 % Student-t interval over seeds ('mean' alone for one seed)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{mean:.3f}"
    from scipy.stats import t

    half = t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return f"{mean:.3f} ± {half:.3f}"


def tg_retrieval_precision(run_dir: Path, texts: Path, cache_root: Path, k: int = 5) -> dict[str, float]:
    """Text → clip retrieval with each sign's Tg as the query: the share of the top-``k`` test clips
    (all signs' clips) that are of that sign, averaged over the seen and over the held-out signs."""
    import numpy as np

    from mc.text_features import build_text_bank
    from mc.zeroshot import clip_dataset, embed_clips, load_run

    run = load_run(run_dir)
    clips = embed_clips(run.model, clip_dataset(run, None, "test")[0])
    present = set(clips.labels.tolist())
    bank = build_text_bank(texts, run.encoder_spec(), cache_root, num_classes=run.model.cfg.num_classes,
                           classes=present)
    labels = [c for c in sorted(bank.tg_rows) if c in present]
    queries = bank.features[[bank.tg_rows[c][0] for c in labels]].float()
    top = (queries @ clips.global_.t()).topk(k, dim=1).indices.numpy()
    hits = {c: float((clips.labels[top[i]] == c).mean()) for i, c in enumerate(labels)}
    held = set(run.holdout)
    return {"seen": float(np.mean([v for c, v in hits.items() if c not in held])),
            "held_out": float(np.mean([v for c, v in hits.items() if c in held])),
            "chance": 1.0 / len(present)}


def run_condition(name: str, texts: Path, data: Path, work: Path, seed: int, args) -> dict:
    """Train one GSP-MC run with held-out signs, then evaluate it zero-shot."""
    from gsp.settings import get_settings
    from mc.train import TrainConfig, train
    from mc.zeroshot import evaluate_zero_shot

    settings = get_settings()
    out = work / "runs" / f"{name}-seed{seed}"
    t0 = time.perf_counter()
    seen = train(TrainConfig.from_settings(
        settings, data=data, descriptions=texts, preset=args.preset, epochs=args.epochs, seed=seed, out=out,
        holdout_fraction=args.holdout_fraction, threads=args.threads, progress=False))
    zs = evaluate_zero_shot(out, settings.paths.cache, descriptions=texts)
    p5 = tg_retrieval_precision(out, texts, settings.paths.cache)
    print(f"  {name:<10} seed {seed}: zero-shot top1 {zs['top1']:.3f} top5 {zs['top5']:.3f} "
          f"(control {zs['control']['top1']:.3f}/{zs['control']['top5']:.3f}, chance {zs['chance']:.3f}) "
          f"over {zs['num_classes']} held-out signs, {zs['num_samples']} clips; seen top1 {seen['top1']:.3f}; "
          f"Tg retrieval P@5 seen {p5['seen']:.3f} held-out {p5['held_out']:.3f}; "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return {"zs": zs, "seen_top1": seen["top1"], "p5": p5, "seconds": time.perf_counter() - t0}


def print_table(results: dict[str, list[dict]], args, seeds: list[int]) -> None:
    print(f"\nzero-shot on the synthetic demo signs: preset {args.preset}, epochs {args.epochs or 'preset'}, "
          f"{args.samples_per_class} clips per sign, holdout fraction {args.holdout_fraction}, seeds {seeds}")
    print(f"{'texts':<12}{'row':<22}{'top-1':>16}{'top-5':>16}   top-1 per seed")
    for name, rows in results.items():
        if not rows:
            continue
        zs = [r["zs"] for r in rows]
        table = {
            "descriptions": ([z["top1"] for z in zs], [z["top5"] for z in zs]),
            "shuffled control": ([z["control"]["top1"] for z in zs], [z["control"]["top5"] for z in zs]),
            "chance": ([z["chance"] for z in zs], [z["chance_top5"] for z in zs]),
            "gain over control": ([z["top1"] - z["control"]["top1"] for z in zs],
                                  [z["top5"] - z["control"]["top5"] for z in zs]),
            "seen signs (classifier)": ([r["seen_top1"] for r in rows], None),
            "Tg→clip P@5 seen": ([r["p5"]["seen"] for r in rows], None),
            "Tg→clip P@5 held-out": ([r["p5"]["held_out"] for r in rows], None),
            "P@5 chance": ([r["p5"]["chance"] for r in rows], None),
        }
        for row, (top1, top5) in table.items():
            per_seed = " ".join(f"{v:.3f}" for v in top1)
            print(f"{name:<12}{row:<22}{interval(top1):>16}{interval(top5) if top5 else '':>16}   {per_seed}")
        terms = {t: [z["top1_by_term"].get(t, float("nan")) for z in zs] for t in zs[0]["top1_by_term"]}
        print(f"{name:<12}{'top-1 by term':<22}" + ", ".join(f"{t} {interval(v)}" for t, v in terms.items()))
        print(f"{name:<12}{'seconds per seed':<22}{statistics.mean(r['seconds'] for r in rows):>16.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2", help="Comma-separated training seeds.")
    ap.add_argument("--epochs", type=int, default=None, help="Default: the preset's.")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--samples-per-class", type=int, default=24)
    ap.add_argument("--holdout-fraction", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    ap.add_argument("--descriptions", type=Path, default=None, help="A generated run to measure as well.")
    ap.add_argument("--keep", type=Path, default=None, help="Keep data, texts and runs here.")
    args = ap.parse_args()

    if args.descriptions is not None:
        from gsp.schema import SchemaError, resolve_run_dir

        try:  # fail now, not after the first trainings
            args.descriptions = resolve_run_dir(args.descriptions)
        except SchemaError as exc:
            raise SystemExit(f"--descriptions: {exc}") from exc
    work = args.keep or Path(tempfile.mkdtemp(prefix="gsp-bench-zeroshot-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["GSP_ARTIFACTS_DIR"] = str(work / "artifacts")  # text-feature cache outside the repo

    from demo.reference_texts import write_reference_run
    from demo.synthetic import write_synthetic_dataset
    from gsp.errors import GspError

    t0 = time.perf_counter()
    data = write_synthetic_dataset(work / "skeletons.pkl", samples_per_class=args.samples_per_class, seed=0)
    print(f"synthetic data: {time.perf_counter() - t0:.0f} s", flush=True)
    conditions = {"reference": write_reference_run(work / "reference_run")}
    if args.descriptions:
        conditions["generated"] = args.descriptions
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    results: dict[str, list[dict]] = {name: [] for name in conditions}
    for seed in seeds:
        for name, texts in conditions.items():
            try:
                results[name].append(run_condition(name, texts, data, work, seed, args))
            except GspError as exc:  # e.g. a generated run without texts for a held-out sign
                print(f"  {name:<10} seed {seed}: not measured: {exc}", flush=True)
    print_table(results, args, seeds)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
