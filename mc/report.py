"""The class report: per-class test accuracy of two training runs side by side, each class joined
with its descriptions (Tg, and Tp with body parts) and with the classes it is most confused with,
theirs beside it (``gsp report classes``). It shows linguists which signs' descriptions help and
which hurt, so they know where to look first.

Inputs are what ``gsp train`` (or ``gsp eval``) leaves in a run folder (:mod:`mc.run_folder`):
``metrics.json`` (``per_class_accuracy``, None for a class without test clips) and
``confusion.csv`` (rows = true class). The page itself is :mod:`mc.report_html`'s.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gsp.errors import GspError
from gsp.schema import STATUS_OK, SchemaError, apply_review, read_kind, read_review, resolve_run_dir
from mc.run_folder import RunFolder, ScoresFolder

#: The kinds a class report shows: the refined description and the part-level ones.
REPORT_KINDS = ("Tg", "Tp")
DEFAULT_CONFUSED = 3


class ReportError(GspError, ValueError):
    """A run or description folder the report cannot use; the message names it."""


@dataclass(frozen=True)
class RunResult:
    """One run's test outcome per class."""

    path: Path
    metrics: dict
    confusion: np.ndarray  # K×K counts, rows = true class

    @property
    def num_classes(self) -> int:
        return int(self.confusion.shape[0])

    @property
    def support(self) -> np.ndarray:
        return self.confusion.sum(1)

    @property
    def accuracy(self) -> list[float | None]:
        return self.metrics["per_class_accuracy"]

    def labels_with_clips(self) -> set[int]:
        return {int(c) for c in np.flatnonzero(self.support)}


# --------------------------------------------------------------------------- reading


def read_confusion(path: Path) -> np.ndarray:
    """``confusion.csv`` as a K×K integer matrix; anything else is one line naming the file and row."""
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
    except OSError as exc:
        raise ReportError(f"{path}: cannot read the confusion matrix ({exc.strerror or exc})") from None
    if not rows or len(rows) != len(rows[0]):
        raise ReportError(f"{path}: not a confusion matrix (a header and one row per class, K+1 columns each)")
    k = len(rows) - 1
    matrix = np.zeros((k, k), dtype=np.int64)
    for i, row in enumerate(rows[1:]):
        try:
            if len(row) != k + 1 or int(row[0]) != i:
                raise ValueError
            matrix[i] = [int(v) for v in row[1:]]
        except ValueError:
            raise ReportError(f"{path}: line {i + 2} is not class {i} followed by {k} counts") from None
    return matrix


def load_run(path: Path | str) -> RunResult:
    """A training run (or evaluation) folder's metrics and confusion matrix, checked to agree."""
    folder = ScoresFolder(Path(path))
    if not folder.root.is_dir():
        raise ReportError(f"{folder.root}: no such folder (expected a training run folder from `gsp train`)")
    for f in (folder.metrics, folder.confusion):
        if not f.is_file():
            raise ReportError(f"{folder.root}: not a finished training run (no {f.name}; "
                              "`gsp train` writes it when training ends)")
    try:
        metrics = json.loads(folder.metrics.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{folder.metrics}: not readable JSON ({exc})") from None
    per_class = metrics.get("per_class_accuracy") if isinstance(metrics, dict) else None
    if not isinstance(per_class, list):
        raise ReportError(f"{folder.metrics}: no per_class_accuracy list (not a gsp training run's metrics)")
    confusion = read_confusion(folder.confusion)
    if len(per_class) != confusion.shape[0]:
        raise ReportError(f"{folder.root}: metrics.json has {len(per_class)} classes but confusion.csv "
                          f"{confusion.shape[0]}")
    return RunResult(folder.root, metrics, confusion)


def recorded_descriptions(run: RunResult) -> Path | None:
    """The description run ``run`` was trained on, as its metrics or checkpoint record it: the
    text bank's folder for a contrastive run, else the ``descriptions`` of its training config
    (a CE-only run given descriptions for its class names)."""
    bank = run.metrics.get("text_bank") or {}
    if bank.get("run_dir"):
        return Path(bank["run_dir"])
    checkpoint = RunFolder(run.path).checkpoint
    if not checkpoint.is_file():
        return None
    from mc.evaluate import load_checkpoint  # torch: only when the metrics do not say

    try:
        config = json.loads(load_checkpoint(checkpoint).get("train_config") or "{}")
    except (ValueError, TypeError):  # an unreadable checkpoint: the user can still pass --descriptions
        return None
    return Path(config["descriptions"]) if config.get("descriptions") else None


def _description_entry(row) -> dict:
    parts = row["body_parts"]
    ok = row["status"] == STATUS_OK
    return {"key": row["key"], "kind": row["kind"], "lang": row["lang"], "text": row["text"] if ok else None,
            "body_parts": [str(p) for p in parts] if parts is not None else [],
            "status": row["status"], "error": None if ok else row["error"], "review": row.get("review")}


def read_descriptions(path: Path) -> tuple[Path, dict[int, dict], dict[int, str]]:
    """The Tg and Tp rows of a description run by label, as its review leaves them (what training
    encodes: rejected rows dropped, edited texts; gsp.schema.apply_review), failed rows kept with
    their reason (a class that had no text is worth seeing), and the gloss of each label."""
    try:
        run_dir = resolve_run_dir(Path(path))
        frames = apply_review({kind: read_kind(run_dir, kind) for kind in REPORT_KINDS}, read_review(run_dir))
    except SchemaError as exc:
        raise ReportError(str(exc)) from None
    by_label: dict[int, dict] = {}
    glosses: dict[int, str] = {}
    for kind, df in frames.items():
        for _, row in df.sort_values("key", kind="stable").iterrows():
            label = int(row["label"])
            by_label.setdefault(label, {k: [] for k in REPORT_KINDS})[kind].append(_description_entry(row))
            if row["gloss"] and label not in glosses:
                glosses[label] = str(row["gloss"])
    return run_dir, by_label, glosses


# --------------------------------------------------------------------------- the join (pure)


def check_comparable(baseline: RunResult, run: RunResult) -> list[str]:
    """Refuse runs whose classes differ; return notes on what differs but still compares."""
    if baseline.num_classes != run.num_classes:
        raise ReportError(f"{baseline.path} has {baseline.num_classes} classes but {run.path} has "
                          f"{run.num_classes}: a class report compares runs over the same classes")
    a, b = baseline.labels_with_clips(), run.labels_with_clips()
    if a != b:
        only_a, only_b = sorted(a - b), sorted(b - a)
        raise ReportError(f"the runs' test sets hold different classes (only in {baseline.path}: "
                          f"{_short(only_a)}; only in {run.path}: {_short(only_b)}): compare runs on the same data")
    notes = []
    if not np.array_equal(baseline.support, run.support):
        notes.append(f"the test sets differ in size ({int(baseline.support.sum())} vs {int(run.support.sum())} "
                     "clips): accuracies are over different clips")
    return notes


def _short(labels: list[int], n: int = 8) -> str:
    if not labels:
        return "none"
    head = ", ".join(map(str, labels[:n]))
    return head + (f" and {len(labels) - n} more" if len(labels) > n else "")


def delta(baseline: float | None, run: float | None) -> float | None:
    """run − baseline; None (n/a) when either has no test clips for the class."""
    if baseline is None or run is None:
        return None
    return float(run) - float(baseline)


def most_confused(confusion: np.ndarray, label: int, top: int) -> list[tuple[int, int]]:
    """The classes ``label``'s clips were most often predicted as (count > 0, not itself), most
    first, ties by label: ``[(other, count), ...]``."""
    row = confusion[label]
    others = [(int(c), int(row[c])) for c in range(len(row)) if c != label and row[c] > 0]
    return sorted(others, key=lambda oc: (-oc[1], oc[0]))[:top]


def confused_pairs(confusion: np.ndarray, top: int | None = None) -> list[tuple[int, int, int]]:
    """The ``top`` (None: all) most confused class pairs of a confusion matrix (rows = true class), as
    ``[(a, b, count), ...]`` with a < b and count = confusion[a, b] + confusion[b, a]: clips of a
    predicted as b plus clips of b predicted as a. The pair is unordered because a description
    rewrite (``gsp generate --refine-confused``) tells both signs apart whichever way the model
    errs. Pairs never confused are left out; most first, ties by (a, b)."""
    if top is not None and top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    m = np.asarray(confusion, dtype=np.int64)
    a, b = np.triu_indices(m.shape[0], k=1)
    counts = m[a, b] + m[b, a]
    ranked = sorted((-int(n), int(i), int(j)) for n, i, j in zip(counts, a, b) if n > 0)
    return [(i, j, -n) for n, i, j in ranked[:top]]


def sort_key(cls: dict) -> tuple:
    """Most hurt first (where a linguist looks first), most helped last, n/a classes at the end."""
    d = cls["delta"]
    return (d is None, d if d is not None else 0.0, cls["label"])


def _summary(classes: list[dict]) -> dict:
    deltas = [c["delta"] for c in classes if c["delta"] is not None]
    eps = 1e-12
    return {
        "classes": len(classes),
        "with_test_clips": len(deltas),
        "without_test_clips": len(classes) - len(deltas),
        "helped": sum(d > eps for d in deltas),
        "hurt": sum(d < -eps for d in deltas),
        "unchanged": sum(abs(d) <= eps for d in deltas),
        "mean_delta": float(np.mean(deltas)) if deltas else None,
    }


def _run_info(run: RunResult) -> dict:
    m = run.metrics
    keys = ("top1", "top5", "mean_class_accuracy", "num_samples", "contrastive", "ablation", "epochs", "stream")
    info = {k: m.get(k) for k in keys}
    for k, v in info.items():  # JSON has no NaN
        if isinstance(v, float) and math.isnan(v):
            info[k] = None
    return {"path": str(run.path), **info}


# --------------------------------------------------------------------------- the report


def class_report(baseline_dir: Path | str, run_dir: Path | str, descriptions: Path | str | None = None,
                 confused: int = DEFAULT_CONFUSED) -> dict:
    """The report as plain data (what ``--json`` prints and the page shows).

    ``descriptions`` defaults to the description run ``run_dir`` was trained on."""
    baseline, run = load_run(baseline_dir), load_run(run_dir)
    notes = check_comparable(baseline, run)
    if descriptions is None:
        descriptions = recorded_descriptions(run)
        if descriptions is None:
            raise ReportError(f"{run.path}: its metrics.json and checkpoint record no description run; "
                              "pass --descriptions DESC")
        if not Path(descriptions).exists():  # moved, or recorded relative to another folder
            raise ReportError(f"{run.path}: trained on the descriptions {descriptions}, which are not there; "
                              "pass --descriptions DESC")
    desc_dir, by_label, glosses = read_descriptions(Path(descriptions))
    empty = {k: [] for k in REPORT_KINDS}
    missing = [c for c in range(run.num_classes) if c not in by_label]
    if missing:
        notes.append(f"{len(missing)} of {run.num_classes} classes have no Tg/Tp rows in {desc_dir} "
                     f"({_short(missing)})")

    def neighbour(other: int, count: int, label: int) -> dict:
        return {"label": other, "gloss": glosses.get(other), "count": count,
                "share": count / int(run.support[label]), "baseline_count": int(baseline.confusion[label, other]),
                "descriptions": by_label.get(other, empty)}

    classes = []
    for c in range(run.num_classes):
        b_acc, r_acc = baseline.accuracy[c], run.accuracy[c]
        classes.append({
            "label": c, "gloss": glosses.get(c), "support": int(run.support[c]),
            "baseline_accuracy": b_acc, "run_accuracy": r_acc, "delta": delta(b_acc, r_acc),
            "descriptions": by_label.get(c, empty),
            "confused_with": [neighbour(o, n, c) for o, n in most_confused(run.confusion, c, confused)],
        })
    classes.sort(key=sort_key)
    return {"baseline": _run_info(baseline), "run": _run_info(run), "descriptions": str(desc_dir),
            "summary": _summary(classes), "notes": notes, "classes": classes}
