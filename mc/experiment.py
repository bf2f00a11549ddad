"""The experiment runner: every cell of a grid (ablation × keypoint set × description run × clips
per class K × seed) trained in its own run folder, then a table per cell and a summary per
condition with intervals over seeds (the paper's Tables 4, 5 and 6 are each one grid).

Layout of an experiment folder ``DIR``::

    DIR/
      .gsp-experiment          marker: this folder is a gsp experiment (a re-run may write here)
      runs/<cell>/             one training run per cell (mc.run_folder), e.g. all-gsp87-reference-k4-seed1
      descriptions/<name>/     control description runs written for this experiment (shuffled, reference)
      results.csv              one row per finished cell
      summary.csv, summary.md  one row per condition (a cell without its seed)
      pair_similarity.csv      cosine of the Tg features of each minimal pair, per description run
      grid.json                the grid as given (data, runs, seeds, ablations, K, preset, epochs or steps)

A CE-only cell does not read descriptions, so it is trained once per keypoints × K × seed and
is the baseline of every condition with that keypoints × K. A re-run skips cells whose
``metrics.json`` exists and resumes an unfinished cell from its checkpoint (:mod:`mc.train`).

Controls: ``shuffled:RUN`` is RUN with its texts permuted among classes (:func:`write_shuffled_run`);
other named runs (the reference descriptions of the demo signs) are written by builders the
entry point passes in, since they come from layers above this one.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gsp.atomic import claim_folder, write_json_atomic, write_text_atomic
from gsp.errors import GspError
from gsp.schema import KINDS, SchemaError, read_reviewed_run, resolve_run_dir, row_key, write_kind
from mc.stats import Estimate, pair_accuracy, paired_difference, t_interval

log = logging.getLogger(__name__)

EXPERIMENT_MARKER = ".gsp-experiment"
RESULTS_FILE, SUMMARY_CSV, SUMMARY_MD, SIMILARITY_FILE, GRID_FILE = (
    "results.csv", "summary.csv", "summary.md", "pair_similarity.csv", "grid.json")
CE = "ce"
NO_TEXTS = "none"
SHUFFLED_PREFIX = "shuffled:"


class ExperimentError(GspError, ValueError):
    """A grid that cannot run as given; the message names the option and what is allowed."""


@dataclass(frozen=True)
class MinimalPair:
    """Two classes whose signs differ in one thing only (``kind``: handshape, nonmanual, …)."""

    kind: str
    a: int
    b: int
    name_a: str = ""
    name_b: str = ""


@dataclass(frozen=True)
class DescriptionRun:
    name: str  # short, for folder names and tables
    path: Path


@dataclass(frozen=True)
class Cell:
    ablation: str
    keypoints: str
    descriptions: DescriptionRun | None  # None: CE only
    k: int | None  # clips per class; None: all
    seed: int

    @property
    def texts(self) -> str:
        return self.descriptions.name if self.descriptions else NO_TEXTS

    @property
    def condition(self) -> tuple[str, str, str, str]:
        return (self.ablation, self.keypoints, self.texts, k_name(self.k))

    @property
    def name(self) -> str:
        return f"{self.ablation}-{self.keypoints}-{self.texts}-k{k_name(self.k)}-seed{self.seed}"


def k_name(k: int | None) -> str:
    return "all" if k is None else str(k)


@dataclass
class ExperimentSpec:
    data: Path
    out: Path
    descriptions: list[DescriptionRun]
    seeds: list[int]
    ablations: list[str] = field(default_factory=lambda: [CE, "all"])
    keypoints: list[str] = field(default_factory=lambda: ["gsp87"])
    ks: list[int | None] = field(default_factory=lambda: [None])
    preset: str = "tiny"
    epochs: int | None = None  # None: the preset's, or from ``steps``
    steps: int | None = None  # optimisation steps per cell: epochs scale with the training set
    pairs: list[MinimalPair] = field(default_factory=list)
    train_overrides: dict[str, Any] = field(default_factory=dict)  # any other TrainConfig field


# --------------------------------------------------------------------------- controls


def derangement(n: int, seed: int) -> list[int]:
    """A seeded random permutation π of 0..n-1 with no fixed point (Sattolo's algorithm: one
    cycle through all n), so with n ≥ 2 no class keeps its own texts."""
    perm = list(range(n))
    rng = np.random.default_rng([seed, 11])
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def write_shuffled_run(source: Path, out: Path, seed: int = 0, only: set[int] | None = None) -> Path:
    """The shuffled-descriptions control: ``source``'s Tb/Ts/Tg/Tp (as its review leaves them)
    with class c given every row of class π(c) (a seeded derangement of the labels that have
    rows, of ``only`` those when given: the data's classes), written as a description run at
    ``out``. Keys, labels and glosses are c's, texts and body parts π(c)'s: any gain that
    survives it does not come from what the texts say."""
    frames = read_reviewed_run(resolve_run_dir(source), ok_only=False)
    labels = sorted({int(v) for df in frames.values() for v in df["label"]})
    if only is not None:
        labels = [label for label in labels if label in only]
    if len(labels) < 2:
        raise ExperimentError(f"{source}: shuffling needs descriptions of at least 2 classes, found {len(labels)}")
    perm = derangement(len(labels), seed)
    donor_of = {labels[i]: labels[perm[i]] for i in range(len(labels))}
    for kind in KINDS:
        df = frames[kind]
        gloss = dict(zip(df["label"].astype(int), df["gloss"]))
        rows = []
        for label in labels:
            for row in df[df["label"] == donor_of[label]].to_dict("records"):
                rows.append({**row, "label": label, "gloss": gloss.get(label, row["gloss"]),
                             "key": row_key(label, kind, int(row["variant"]))})
        write_kind(out, kind, rows)
    return out


def restrict_run(run_dir: Path, labels: set[int]) -> Path:
    """Keep only the rows of ``labels`` in a description run written for this experiment (a
    control made for every demo sign, trained on data of a few)."""
    frames = read_reviewed_run(run_dir, ok_only=False)
    for kind in KINDS:
        df = frames[kind]
        write_kind(run_dir, kind, df[df["label"].astype(int).isin(labels)])
    return run_dir


def resolve_descriptions(entries: Sequence[str], control_dir: Path,
                         builders: Mapping[str, Callable[[Path], Path]] | None = None,
                         shuffle_seed: int = 0, labels: set[int] | None = None) -> list[DescriptionRun]:
    """Turn ``--descriptions`` entries into runs: ``PATH`` (a run or a root with LATEST; named by
    its folder), ``NAME=PATH``, a builder's name (e.g. ``reference``, written under
    ``control_dir``) and ``shuffled:ENTRY`` (that run shuffled, :func:`write_shuffled_run`).
    Controls written here keep only ``labels`` (the data's classes) when given."""
    builders = dict(builders or {})
    runs: dict[str, DescriptionRun] = {}
    for entry in (e.strip() for e in entries):
        if not entry:
            continue
        run = _resolve_entry(entry, runs, control_dir, builders, shuffle_seed, labels)
        if run.name in runs and runs[run.name].path != run.path:
            raise ExperimentError(f"--descriptions: two runs are named {run.name!r}; name them (NAME=PATH)")
        runs[run.name] = run
    return list(runs.values())


def _resolve_entry(entry: str, known: dict[str, DescriptionRun], control_dir: Path,
                   builders: dict[str, Callable[[Path], Path]], shuffle_seed: int,
                   labels: set[int] | None) -> DescriptionRun:
    if entry.startswith(SHUFFLED_PREFIX):
        inner = _resolve_entry(entry[len(SHUFFLED_PREFIX):], known, control_dir, builders, shuffle_seed, labels)
        name = f"shuffled-{inner.name}"
        # written every time (deterministic, a second): never a stale copy of a changed run
        return DescriptionRun(name, write_shuffled_run(inner.path, control_dir / name, shuffle_seed, labels))
    if entry in known:
        return known[entry]
    if entry in builders:
        out = control_dir / entry
        builders[entry](out)
        if labels is not None:
            restrict_run(out, labels)
        return DescriptionRun(entry, out)
    name, _, path = entry.rpartition("=") if "=" in entry else ("", "", entry)
    try:
        run_dir = resolve_run_dir(Path(path))
    except SchemaError as exc:
        extra = f" or one of {', '.join(sorted(builders))}" if builders else ""
        raise ExperimentError(f"--descriptions {entry!r}: not a description run ({exc}); give a run folder, "
                              f"NAME=PATH, shuffled:ENTRY{extra}") from None
    return DescriptionRun(_safe_name(name or run_dir.name), run_dir)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+]+", "-", name).strip("-") or "run"


# --------------------------------------------------------------------------- the grid


def spec_record(spec: ExperimentSpec) -> dict:
    """What the grid is, as JSON (``DIR/grid.json``)."""
    return {"data": str(spec.data), "descriptions": {r.name: str(r.path) for r in spec.descriptions},
            "seeds": spec.seeds, "ablations": spec.ablations, "keypoints": spec.keypoints,
            "train_per_class": [k_name(k) for k in spec.ks], "preset": spec.preset, "epochs": spec.epochs,
            "steps": spec.steps, "pairs": [vars(p) for p in spec.pairs],
            "train_overrides": {k: str(v) for k, v in spec.train_overrides.items()}}


def plan_cells(spec: ExperimentSpec) -> list[Cell]:
    """Every cell, seed outermost (a killed run leaves whole seeds done first); CE-only cells
    once per keypoints × K × seed, whatever the description runs."""
    cells: list[Cell] = []
    for seed in spec.seeds:
        for k in spec.ks:
            for keypoints in spec.keypoints:
                for ablation in spec.ablations:
                    runs: list[DescriptionRun | None] = [None] if ablation == CE else list(spec.descriptions)
                    cells += [Cell(ablation, keypoints, run, k, seed) for run in runs]
    return cells


def check_spec(spec: ExperimentSpec, train_counts: Mapping[int, int], needs_texts: bool = True) -> None:
    """Refuse a grid before any training: unknown ablation or keypoint set, contrastive
    ablations without a description run (``needs_texts``), no seeds, K larger than the
    smallest class."""
    from mc.keypoints import KEYPOINT_SETS
    from mc.loss import ABLATIONS
    from mc.presets import RECIPES

    for option, values, allowed in (("--ablations", spec.ablations, ABLATIONS),
                                    ("--keypoints", spec.keypoints, KEYPOINT_SETS),
                                    ("--preset", [spec.preset], RECIPES)):
        for v in values:
            if v not in allowed:
                from gsp.errors import did_you_mean

                raise ExperimentError(f"{option}: unknown {v!r}{did_you_mean(v, allowed)}; "
                                      f"choose from {', '.join(allowed)}")
    if not spec.seeds:
        raise ExperimentError("--seeds: give at least one seed, e.g. 0,1,2")
    if needs_texts and any(a != CE for a in spec.ablations) and not spec.descriptions:
        raise ExperimentError("--descriptions: the ablations other than ce need at least one description run")
    if spec.epochs is not None and spec.steps is not None:
        raise ExperimentError("--epochs and --steps: give one of them")
    smallest = min(train_counts.values())
    too_big = [k for k in spec.ks if k is not None and k > smallest]
    if too_big:
        label = min(train_counts, key=train_counts.get)
        raise ExperimentError(f"--train-per-class {too_big[0]}: class {label} of {spec.data} has only {smallest} "
                              f"training clips; use at most {smallest} (or all)")


def cell_epochs(spec: ExperimentSpec, recipe: Mapping[str, Any], train_size: int) -> int:
    """Epochs of a cell with ``train_size`` training clips: ``spec.epochs``, else enough epochs
    for ``spec.steps`` optimisation steps (so K=2 trains as many steps as K=all), else the
    preset's."""
    if spec.epochs is not None:
        return spec.epochs
    if spec.steps is None:
        return int(recipe["epochs"])
    batch = int(recipe["batch_size"])
    per_epoch = max(train_size // batch, 1) if train_size >= batch else 1
    return max(1, math.ceil(spec.steps / per_epoch))


def stretched_schedule(recipe: Mapping[str, Any], epochs: int) -> dict[str, Any]:
    """The preset's LR schedule stretched to ``epochs``: warm-up and LR drops at the same
    fractions of training as in the preset (tiny: warm-up 1/8, drop at 6/8), so a cell trained
    for 10× the epochs does not spend nine tenths of them at the dropped rate."""
    scale = epochs / int(recipe["epochs"])
    warmup = min(round(int(recipe["warmup_epochs"]) * scale), epochs - 1)
    milestones = tuple(sorted({max(1, min(epochs, round(m * scale))) for m in recipe["milestones"]}))
    return {"epochs": epochs, "warmup_epochs": max(warmup, 1 if recipe["warmup_epochs"] else 0),
            "milestones": milestones}


# --------------------------------------------------------------------------- running


def run_experiment(spec: ExperimentSpec, settings: Any, report: Callable[[str], None] = log.info,
                   description_entries: Sequence[str] = (),
                   builders: Mapping[str, Callable[[Path], Path]] | None = None) -> dict:
    """Check the grid, claim ``spec.out``, add the runs named by ``description_entries``
    (:func:`resolve_descriptions`; controls are written under ``DIR/descriptions``), train every
    cell not yet finished, then write results, summary and the pair diagnostic. ``settings`` (a
    ``gsp.settings.Settings``) supplies what TrainConfig.from_settings reads. Returns
    {"results": rows, "summary": rows, "similarity": rows, "out": DIR}."""
    from mc.data import load_splits
    from mc.presets import get_recipe

    splits = load_splits(spec.data, ("train", "test"))
    counts: dict[int, int] = {}
    for s in splits["train"]:
        counts[int(s.label)] = counts.get(int(s.label), 0) + 1
    check_spec(spec, counts, needs_texts=not description_entries)
    claim_folder(spec.out, EXPERIMENT_MARKER, "a gsp experiment folder",
                 lambda p: (p / RESULTS_FILE).is_file())
    if description_entries:
        labels = set(counts) | {int(s.label) for s in splits["test"]}
        spec.descriptions += resolve_descriptions(description_entries, spec.out / "descriptions", builders,
                                                  labels=labels)
        check_spec(spec, counts)
    recipe = get_recipe(spec.preset).model_dump()
    recipe.update({k: v for k, v in spec.train_overrides.items() if k in recipe and v is not None})
    cells = plan_cells(spec)
    write_json_atomic(spec.out / GRID_FILE, spec_record(spec))
    rows: list[dict] = []
    for i, cell in enumerate(cells, 1):
        train_size = sum(min(n, cell.k) if cell.k else n for n in counts.values())
        epochs = cell_epochs(spec, recipe, train_size)
        rows.append(_run_cell(spec, settings, cell, stretched_schedule(recipe, epochs), f"[{i}/{len(cells)}]", report))
        _write_results(spec.out, rows)
    summary = summarize(rows, _metrics(spec.pairs))
    similarity = pair_text_similarity(spec, settings) if spec.pairs and spec.descriptions else []
    write_summary(spec.out, summary, similarity, _metrics(spec.pairs))
    return {"results": rows, "summary": summary, "similarity": similarity, "out": str(spec.out)}


def _run_cell(spec: ExperimentSpec, settings: Any, cell: Cell, schedule: dict, where: str,
              report: Callable[[str], None]) -> dict:
    from mc.run_folder import RunFolder
    from mc.train import TrainConfig, train

    run = RunFolder(spec.out / "runs" / cell.name)
    if run.metrics.is_file():
        metrics = json.loads(run.metrics.read_text(encoding="utf-8"))
        _check_same_cell(run.metrics, metrics, cell, schedule["epochs"], spec.train_overrides.get("frames"))
        report(f"{where} {cell.name}: finished before, skipped (top-1 {metrics['top1']:.3f})")
    else:
        report(f"{where} {cell.name}: training {schedule['epochs']} epochs")
        cfg = TrainConfig.from_settings(
            settings, **{**spec.train_overrides, **schedule}, data=spec.data, out=run.root,
            descriptions=cell.descriptions.path if cell.descriptions else None, contrastive=cell.ablation != CE,
            ablation=cell.ablation, layout=cell.keypoints, preset=spec.preset,
            seed=cell.seed, train_per_class=cell.k, progress=False)
        metrics = train(cfg)
        report(f"{where} {cell.name}: top-1 {metrics['top1']:.3f} in {metrics['seconds']:.0f} s")
    return cell_row(cell, metrics, run.root, spec.pairs)


def _check_same_cell(path: Path, metrics: Mapping, cell: Cell, epochs: int, frames: int | None) -> None:
    """A finished run is reused only when it is this cell: same epochs, seed, K, keypoints (and
    frames, when the grid sets them)."""
    want = {"epochs": epochs, "seed": cell.seed, "train_per_class": cell.k, "layout": cell.keypoints}
    got = {k: metrics.get(k) for k in want}
    if frames is not None:
        want["frames"], got["frames"] = frames, metrics.get("recipe", {}).get("frames")
    if got != want:
        diff = next(k for k in want if got[k] != want[k])
        raise ExperimentError(f"{path}: this finished cell was trained with {diff}={got[diff]}, the grid asks "
                              f"{want[diff]}; use another --out for another grid")


def cell_row(cell: Cell, metrics: Mapping, run_dir: Path, pairs: Sequence[MinimalPair]) -> dict:
    """One results.csv row: the cell, its test accuracy and its minimal-pair accuracy per pair kind."""
    from mc.evaluate import load_scores

    row = {"cell": cell.name, "ablation": cell.ablation, "keypoints": cell.keypoints, "descriptions": cell.texts,
           "k": k_name(cell.k), "seed": cell.seed, "top1": metrics["top1"], "top5": metrics["top5"]}
    if pairs:
        scores, labels, _ = load_scores(run_dir)
        for kind in pair_kinds(pairs):
            row[f"pairs_{kind}"] = pair_accuracy(scores, labels, [(p.a, p.b) for p in pairs if p.kind == kind])
    row.update({"epochs": metrics["epochs"], "train_samples": metrics.get("train_samples"),
                "seconds": metrics["seconds"], "run": str(run_dir)})
    return row


def pair_kinds(pairs: Sequence[MinimalPair]) -> list[str]:
    return list(dict.fromkeys(p.kind for p in pairs))


def _metrics(pairs: Sequence[MinimalPair]) -> list[str]:
    return ["top1", "top5", *(f"pairs_{k}" for k in pair_kinds(pairs))]


# --------------------------------------------------------------------------- summary


def summarize(rows: Sequence[Mapping], metrics: Sequence[str]) -> list[dict]:
    """One row per condition: n seeds and, per metric, mean, sd and 95% t interval over seeds;
    for a condition with descriptions, the paired-seed difference to the CE-only condition of
    the same keypoints × K (:func:`mc.stats.paired_difference`)."""
    by_condition: dict[tuple, dict[int, Mapping]] = {}
    for r in rows:
        key = (r["ablation"], r["keypoints"], r["descriptions"], str(r["k"]))
        by_condition.setdefault(key, {})[int(r["seed"])] = r
    out = []
    for (ablation, keypoints, texts, k), seeds in by_condition.items():
        row: dict[str, Any] = {"ablation": ablation, "keypoints": keypoints, "descriptions": texts, "k": k,
                               "n": len(seeds)}
        baseline = by_condition.get((CE, keypoints, NO_TEXTS, k)) if ablation != CE else None
        for m in metrics:
            _put(row, m, t_interval([float(r[m]) for r in seeds.values()]))
            if baseline is not None:
                diff = paired_difference({s: float(r[m]) for s, r in seeds.items()},
                                         {s: float(r[m]) for s, r in baseline.items()})
                _put(row, f"d_{m}", diff)
        out.append(row)
    return out


def _put(row: dict, name: str, est: Estimate) -> None:
    row.update({name: est.mean, f"{name}_sd": est.sd, f"{name}_low": est.low, f"{name}_high": est.high})
    if name.startswith("d_"):
        row[f"{name}_n"] = est.n


def _fmt(row: Mapping, name: str, signed: bool = False) -> str:
    mean = row.get(name)
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return ""
    low, high = row.get(f"{name}_low"), row.get(f"{name}_high")
    s = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    if low is not None and not math.isnan(low):
        s += f" [{low:+.3f}, {high:+.3f}]" if signed else f" [{low:.3f}, {high:.3f}]"
    return s


def summary_markdown(summary: Sequence[Mapping], metrics: Sequence[str], similarity: Sequence[Mapping] = ()) -> str:
    """The summary as a markdown table (mean [95% CI] per metric; Δ vs CE with its paired CI),
    then the mean Tg cosine of minimal pairs per description run."""
    cols = ["ablation", "keypoints", "descriptions", "K", "n", "top-1", "Δ top-1 vs CE", "top-5"]
    pair_metrics = [m for m in metrics if m.startswith("pairs_")]
    for m in pair_metrics:
        cols += [m.removeprefix("pairs_") + " pairs", "Δ vs CE"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in summary:
        cells = [r["ablation"], r["keypoints"], r["descriptions"], r["k"], str(r["n"]), _fmt(r, "top1"),
                 _fmt(r, "d_top1", True), _fmt(r, "top5")]
        for m in pair_metrics:
            cells += [_fmt(r, m), _fmt(r, f"d_{m}", True)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Mean [95% t interval over seeds]; Δ: the mean of per-seed differences to the CE-only row of the "
              "same keypoints and K, with its paired t interval."]
    if similarity:
        lines += ["", "Cosine similarity of the Tg features of minimal pairs (frozen text encoder):", "",
                  "| descriptions | pair kind | mean cosine | pairs |", "|---|---|---|---|"]
        groups: dict[tuple[str, str], list[Mapping]] = {}
        for s in similarity:
            groups.setdefault((s["descriptions"], s["kind"]), []).append(s)
        for (texts, kind), group in groups.items():
            mean = np.mean([float(s["cosine"]) for s in group])
            lines.append(f"| {texts} | {kind} | {mean:.3f} | {sum(int(s['pairs']) for s in group)} |")
    return "\n".join(lines) + "\n"


def _csv_text(rows: Sequence[Mapping]) -> str:
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})
    return buf.getvalue()


def _write_results(out: Path, rows: Sequence[Mapping]) -> None:
    write_text_atomic(out / RESULTS_FILE, _csv_text(rows))


def write_summary(out: Path, summary: Sequence[Mapping], similarity: Sequence[Mapping],
                  metrics: Sequence[str]) -> None:
    write_text_atomic(out / SUMMARY_CSV, _csv_text(summary))
    write_text_atomic(out / SUMMARY_MD, summary_markdown(summary, metrics, similarity))
    if similarity:
        write_text_atomic(out / SIMILARITY_FILE, _csv_text(similarity))


# --------------------------------------------------------------------------- the text-space diagnostic


def pair_text_similarity(spec: ExperimentSpec, settings: Any) -> list[dict]:
    """For each description run and minimal pair, the cosine similarity of the two classes' Tg
    features under the frozen text encoder training uses (the same cache), and, as a yardstick,
    the mean over every other pair of classes (kind ``all classes``). Near 1 for a pair: the
    contrastive targets of its two classes are almost the same point, so L_con cannot pull their
    skeleton features apart."""
    from mc.text_features import EncoderSpec, build_text_bank

    spec_enc = EncoderSpec.from_settings(settings.mc)
    out = []
    for run in spec.descriptions:
        bank = build_text_bank(run.path, spec_enc, settings.paths.cache)
        tg = {label: bank.features[rows[0]].numpy() for label, rows in bank.tg_rows.items()}
        for p in spec.pairs:
            if p.a in tg and p.b in tg:
                out.append({"descriptions": run.name, "kind": p.kind, "a": p.a, "b": p.b, "name_a": p.name_a,
                            "name_b": p.name_b, "cosine": float(tg[p.a] @ tg[p.b]), "pairs": 1})
        labels = sorted(tg)
        if len(labels) > 1:
            feats = np.stack([tg[label] for label in labels])
            sims = feats @ feats.T
            off = sims[~np.eye(len(labels), dtype=bool)]
            out.append({"descriptions": run.name, "kind": "all classes", "a": "", "b": "", "name_a": "",
                        "name_b": "", "cosine": float(off.mean()), "pairs": len(labels) * (len(labels) - 1) // 2})
    return out

