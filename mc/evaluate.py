"""Evaluation: scores, top-k and per-class accuracy, confusion matrix, the 4-stream ensemble, the
inference-only export and prediction on a keypoint file.

Files (all written atomically; their names and places are :mod:`mc.run_folder`'s):

- ``test_scores.npz`` — ``scores`` (N, K) float32 logits, ``labels`` (N,), ``sample_ids`` (N,):
  what :func:`ensemble` fuses, aligned by sample id.
- ``confusion.csv`` — K×K counts, rows = true class, columns = predicted.
- ``export.pt`` — only the skeleton encoder and classifier (no text branch, no projections):
  ``{"format": "gsp-mc-export/1", "model_config", "state_dict", "stream", "frames", "layout",
  "labels"}``, loadable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from gsp.atomic import atomic_path, write_json_atomic, write_text_atomic
from gsp.errors import GspError
from mc.device import amp_dtype, resolve_device
from mc.keypoints import DEFAULT_KEYPOINT_SET, LayoutError, get_layout
from mc.model import GSPMCModel, ModelConfig, SkeletonClassifier
from mc.run_folder import CHECKPOINT_DIR, EXPORT_FILE, LAST_CHECKPOINT, RunFolder, ScoresFolder, claim_eval_folder

EXPORT_FORMAT = "gsp-mc-export/1"


class EvaluationError(GspError, ValueError):
    pass


# --------------------------------------------------------------------------- metrics


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose true label is among the ``k`` highest scores (ties: lower index)."""
    if len(labels) == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels.astype(np.int64), pred.astype(np.int64)), 1)
    return cm


def classification_metrics(scores: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> dict:
    """top1, top5, per-class accuracy (None for classes absent from the test set) and the
    confusion matrix (as a nested list)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = int(num_classes or scores.shape[1])
    pred = scores.argmax(1)
    cm = confusion_matrix(pred, labels, num_classes)
    support = cm.sum(1)
    per_class = [float(cm[c, c] / support[c]) if support[c] else None for c in range(num_classes)]
    present = [v for v in per_class if v is not None]
    return {
        "top1": topk_accuracy(scores, labels, 1),
        "top5": topk_accuracy(scores, labels, 5),
        "mean_class_accuracy": float(np.mean(present)) if present else float("nan"),
        "per_class_accuracy": per_class,
        "num_samples": int(len(labels)),
        "confusion": cm.tolist(),
    }


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def predict_scores(model: torch.nn.Module, dataset, batch_size: int = 64, device: str | torch.device = "cpu",
                   amp: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, K) and labels (N,) of every item of ``dataset`` in order."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    device = torch.device(device)
    scores, labels = [], []
    for x, y, _ in loader:
        with torch.autocast(device_type=device.type, dtype=amp_dtype(device), enabled=amp):
            logits = model(x.to(device, non_blocking=True))
        scores.append(logits.float().cpu().numpy())
        labels.append(np.asarray(y))
    return np.concatenate(scores).astype(np.float32), np.concatenate(labels).astype(np.int64)


def save_scores(out_dir: Path, scores: np.ndarray, labels: np.ndarray, sample_ids: Sequence[str]) -> Path:
    target = ScoresFolder(out_dir).scores
    with atomic_path(target, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, scores=scores.astype(np.float32), labels=labels.astype(np.int64),
                     sample_ids=np.asarray(list(sample_ids), dtype=str))
    return target


def load_scores(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    path = Path(path)
    if path.is_dir():
        path = ScoresFolder(path).scores
    if not path.is_file():
        raise EvaluationError(f"{path}: no saved test scores (run `gsp train`/`gsp eval` first)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return data["scores"], data["labels"], data["sample_ids"]
    except (OSError, KeyError, ValueError) as exc:
        raise EvaluationError(f"{path}: not a scores file: {exc}") from exc


def save_confusion(out_dir: Path, confusion: Sequence[Sequence[int]]) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf)
    k = len(confusion)
    writer.writerow(["true\\pred", *range(k)])
    for c, row in enumerate(confusion):
        writer.writerow([c, *row])
    target = ScoresFolder(out_dir).confusion
    write_text_atomic(target, buf.getvalue())
    return target


def write_eval_outputs(out_dir: Path, scores: np.ndarray, labels: np.ndarray, sample_ids: Sequence[str],
                       num_classes: int) -> dict:
    """Scores, confusion matrix and metrics (without the bulky confusion list) for one model."""
    metrics = classification_metrics(scores, labels, num_classes)
    save_scores(out_dir, scores, labels, sample_ids)
    save_confusion(out_dir, metrics.pop("confusion"))
    return metrics


# --------------------------------------------------------------------------- ensemble


def ensemble(score_sources: Sequence[Path], weights: Sequence[float] | None = None,
             out_dir: Path | None = None) -> dict:
    """Weighted sum of several streams' softmax scores, aligned by sample id.

    Softmax first, so a stream with larger logits does not dominate by scale alone (the usual
    CTR-GCN ensemble sums raw scores; on our short CPU runs logit scales differ a lot).
    """
    if not score_sources:
        raise EvaluationError("ensemble needs at least one scores file")
    weights = list(weights) if weights is not None else [1.0] * len(score_sources)
    if len(weights) != len(score_sources):
        raise EvaluationError(f"{len(weights)} weights for {len(score_sources)} score files")
    base_scores, base_labels, base_ids = load_scores(score_sources[0])
    order = {sid: i for i, sid in enumerate(base_ids)}
    total = np.zeros_like(base_scores, dtype=np.float64)
    for src, w in zip(score_sources, weights):
        scores, labels, ids = load_scores(src)
        if set(ids) != set(order) or scores.shape != base_scores.shape:
            raise EvaluationError(f"{src}: scores cover different samples or classes than {score_sources[0]}")
        idx = np.array([order[s] for s in ids])
        if not np.array_equal(base_labels[idx], labels):
            raise EvaluationError(f"{src}: labels disagree with {score_sources[0]} for the same sample ids")
        z = scores.astype(np.float64) - scores.max(1, keepdims=True)
        prob = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        aligned = np.empty_like(prob)
        aligned[idx] = prob
        total += w * aligned
    metrics = classification_metrics(total, base_labels)
    metrics["sources"] = [str(s) for s in score_sources]
    metrics["weights"] = weights
    if out_dir is not None:
        folder = claim_eval_folder(out_dir)
        save_scores(folder.root, total.astype(np.float32), base_labels, base_ids)
        save_confusion(folder.root, metrics.pop("confusion"))
        write_json_atomic(folder.metrics, metrics)
    else:
        metrics.pop("confusion")
    return metrics


# --------------------------------------------------------------------------- export / predict


#: Keys every training checkpoint has (``mc.train._save_checkpoint``).
CHECKPOINT_KEYS = ("model", "optimizer", "scaler", "epoch", "history", "seconds", "model_config")
EXPORT_KEYS = ("format", "model_config", "state_dict")


def _first_sentence(exc: BaseException) -> str:
    """The head of an exception's message: torch's run to several sentences and lines."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text.split(". ")[0].rstrip(".")[:200]


def _torch_load(path: Path, what: str) -> dict:
    """``torch.load`` (weights only) of a file that must hold a dict; any failure is one line
    naming the file. torch reports a truncated or foreign file as anything from an OSError
    ("Invalid argument") to a zip, pickle or index error, none of them naming the file."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EvaluationError(f"{path}: not a readable {what} (damaged, truncated or not a torch file: "
                              f"{_first_sentence(exc)})") from None
    if not isinstance(payload, dict):
        raise EvaluationError(f"{path}: not a {what} (it holds a {type(payload).__name__}, not the expected dict)")
    return payload


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = RunFolder(path).checkpoint
    if not path.is_file():
        raise EvaluationError(f"{path}: checkpoint not found (a training run folder holds "
                              f"{CHECKPOINT_DIR}/{LAST_CHECKPOINT})")
    ckpt = _torch_load(path, "gsp-mc training checkpoint")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise EvaluationError(f"{path}: not a gsp-mc training checkpoint (no {', '.join(missing)})")
    return ckpt


def _build(model_cls, config: Mapping, state: Mapping, path: Path | str, what: str):
    """A model from a stored config and weights; a mismatch is one line naming the file."""
    try:
        model = model_cls(ModelConfig.from_dict(config))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise EvaluationError(f"{path}: not a usable {what} (its model_config is incomplete or invalid: "
                              f"{type(exc).__name__} {_first_sentence(exc)})") from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError):
        # torch lists every mismatched tensor over many lines; which ones helps nobody here
        raise EvaluationError(f"{path}: not a usable {what} (its weights do not fit its model_config)") from None
    return model.eval()


def model_from_checkpoint(ckpt: Mapping, path: Path | str = "checkpoint") -> GSPMCModel:
    return _build(GSPMCModel, ckpt["model_config"], ckpt["model"], path, "gsp-mc training checkpoint")


def export_inference(checkpoint: Path | Mapping, out_path: Path) -> Path:
    """Write the inference-only model (skeleton encoder + classifier) of a training checkpoint."""
    ckpt = load_checkpoint(checkpoint) if not isinstance(checkpoint, Mapping) else checkpoint
    model = model_from_checkpoint(ckpt).inference_model()
    meta = ckpt.get("meta", {})
    payload = {
        "format": EXPORT_FORMAT,
        "model_config": model.cfg.to_dict(),
        "state_dict": model.state_dict(),
        "stream": meta.get("stream", "joint"),
        "frames": int(meta.get("frames", 64)),
        "layout": meta.get("layout", DEFAULT_KEYPOINT_SET),
        "labels": list(meta.get("labels", [])),
    }
    if meta.get("trained_labels") is not None:
        payload["trained_labels"] = [int(c) for c in meta["trained_labels"]]
    with atomic_path(out_path, suffix=".pt") as tmp:
        torch.save(payload, tmp)
    return Path(out_path)


def load_inference(path: Path) -> tuple[SkeletonClassifier, dict]:
    path = Path(path)
    if path.is_dir():
        path = RunFolder(path).export
    if not path.is_file():
        raise EvaluationError(f"{path}: exported model not found")
    payload = _torch_load(path, "gsp-mc export")
    if payload.get("format") != EXPORT_FORMAT:
        raise EvaluationError(f"{path}: not a gsp-mc export (format {payload.get('format')!r}, "
                              f"expected {EXPORT_FORMAT!r}; `gsp train` writes one as RUN/{EXPORT_FILE})")
    missing = [k for k in EXPORT_KEYS if k not in payload]
    if missing:
        raise EvaluationError(f"{path}: not a complete gsp-mc export (no {', '.join(missing)})")
    return _build(SkeletonClassifier, payload["model_config"], payload["state_dict"], path, "gsp-mc export"), payload


def rankable_classes(payload: Mapping, num_outputs: int) -> list[int] | None:
    """The class ids a prediction may name: those that had training samples (recorded at
    training since exports carry ``trained_labels``); None for older exports (rank them all).
    A classifier sized by the highest label id has outputs no sample ever trained."""
    trained = payload.get("trained_labels")
    if not trained:
        return None
    kept = sorted({int(c) for c in trained if 0 <= int(c) < num_outputs})
    return kept or None


#: Keypoint files `gsp predict` reads: suffix → what it holds.
KEYPOINT_SUFFIXES = {".npy": "a (T, 133, 3) numpy array", ".pose": "a pose-format file"}


def read_keypoint_file(path: Path) -> np.ndarray:
    """A (T, 133, 3) float32 clip from a ``.npy`` file (the per-video format) or a ``.pose`` file
    (pose-format, mapped to COCO-WholeBody by :mod:`mc.pose_format`), checked."""
    from mc.data import SampleError, check_keypoints

    path = Path(path)
    if not path.is_file():
        raise SampleError(f"{path}: keypoint file not found")
    suffix = path.suffix.lower()
    if suffix not in KEYPOINT_SUFFIXES:
        allowed = ", ".join(f"{s} ({what})" for s, what in KEYPOINT_SUFFIXES.items())
        raise SampleError(f"{path}: not a keypoint file; give {allowed}")
    if suffix == ".pose":
        from mc.pose_format import read_pose_file  # pose-format is only needed for .pose files

        arr = read_pose_file(path)
    else:
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise SampleError(f"{path}: unreadable .npy: {exc}") from exc
    return np.asarray(check_keypoints(arr, path.stem, str(path), check_values=True), dtype=np.float32)


def prediction_input(clip: np.ndarray, settings: Mapping, source: Path | str) -> np.ndarray:
    """The model input (1, C, T, V, 1) of one clip, with the test-time preprocessing an export
    records (``layout``, ``stream``, ``frames``; ``transform``: TransformConfig overrides, none in
    ``export.pt``). The one home of predict's preprocessing, for PyTorch and ONNX Runtime alike."""
    from mc.transforms import TransformConfig, prepare

    try:
        layout = get_layout(settings.get("layout", DEFAULT_KEYPOINT_SET))
        config = TransformConfig(**dict(settings.get("transform") or {}))
    except (LayoutError, TypeError) as exc:
        raise EvaluationError(f"{source}: not a usable gsp-mc export ({exc})") from None
    x = prepare(clip, layout, settings["stream"], int(settings["frames"]), train=False, config=config)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None, ..., None], dtype=np.float32)


def top_predictions(logits: np.ndarray, settings: Mapping, topk: int) -> list[dict]:
    """The ``topk`` most probable classes of one sample's logits: a softmax over the classes the
    export may name (:func:`rankable_classes`), each as {label, name, probability}, most probable
    first (ties: lower label). The one home of predict's output, for PyTorch and ONNX Runtime."""
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    classes = rankable_classes(settings, logits.size) or list(range(logits.size))
    z = logits[classes] - logits[classes].max()
    prob = np.exp(z) / np.exp(z).sum()  # a distribution over the rankable classes only
    order = np.argsort(-prob, kind="stable")[: min(topk, len(classes))]
    names = settings.get("labels") or []
    return [{"label": classes[i], "name": names[classes[i]] if classes[i] < len(names) else None,
             "probability": float(prob[i])} for i in order]


@torch.no_grad()
def predict_file(export: Path, keypoint_file: Path, topk: int = 5) -> list[dict]:
    """Top-k classes for one keypoint file with an exported model (centred test-time sampling)."""
    model, payload = load_inference(export)
    x = prediction_input(read_keypoint_file(keypoint_file), payload, export)
    logits = model(torch.from_numpy(x)).float()[0].numpy()
    return top_predictions(logits, payload, topk)


def checkpoint_data_path(run_dir: Path, ckpt: Mapping, data: Path | None = None) -> Path:
    """``data`` when given, else the data the checkpoint's training config records
    (:func:`recorded_data_path`); the one home of that lookup for eval, zero-shot and reports."""
    if data is not None:
        return Path(data)
    try:
        recorded = json.loads(ckpt.get("train_config", "{}")).get("data")
    except (ValueError, AttributeError):
        recorded = None
    if not recorded:
        raise EvaluationError(f"{run_dir}: no --data given and the checkpoint does not record one")
    return recorded_data_path(run_dir, recorded)


def recorded_data_path(run_dir: Path, recorded: str) -> Path:
    """The data a run was trained on. Runs record it absolute; an older run recorded it as given,
    relative to the folder `gsp train` ran in, which was usually an ancestor of the run folder
    (``--out runs/x``): so try the current folder, then the run folder and its ancestors."""
    path = Path(recorded)
    if path.exists():
        return path
    if path.is_absolute():
        raise EvaluationError(f"{run_dir}: the run was trained on {path}, which no longer exists; "
                              "give the data with --data PATH")
    for base in (Path(run_dir).resolve(), *Path(run_dir).resolve().parents):
        if (base / path).exists():
            return base / path
    raise EvaluationError(f"{run_dir}: the run was trained on {recorded!r}, a relative path found neither here "
                          "nor beside the run; give the data with --data PATH")


def evaluate_checkpoint(run_dir: Path, data: Path | None = None, split: str = "test", out: Path | None = None,
                        batch_size: int = 64, device: str = "auto", skip_bad: bool = False) -> dict:
    """Re-evaluate a training run's last checkpoint on a split; writes scores, confusion and
    ``metrics.json`` into ``out`` (default ``<run_dir>/eval-<split>``)."""

    from mc.data import SkeletonDataset, load_samples

    run_dir = Path(run_dir)
    run = RunFolder(run_dir)
    ckpt = load_checkpoint(run.checkpoint)
    meta = ckpt.get("meta", {})
    data = checkpoint_data_path(run_dir, ckpt, data)
    model = model_from_checkpoint(ckpt, run.checkpoint)
    num_classes = model.cfg.num_classes
    samples = load_samples(data, split=split, skip_bad=skip_bad, num_classes=num_classes)
    holdout = [int(c) for c in meta.get("holdout_classes") or []]
    if holdout:  # never trained: recognised only zero-shot (mc.zeroshot), as training's test metrics say
        samples = samples.of_classes(lambda label: label not in set(holdout))
        if not samples:
            raise EvaluationError(f"{data}: every {split!r} clip belongs to a held-out class of {run_dir}; "
                                  "evaluate them with --zero-shot")
    ds = SkeletonDataset(samples, get_layout(meta.get("layout", DEFAULT_KEYPOINT_SET)),
                         stream=meta.get("stream", "joint"),
                         frames=int(meta.get("frames", 64)), train=False, num_classes=num_classes)
    dev = resolve_device(device)
    scores, labels = predict_scores(model.to(dev), ds, batch_size=batch_size, device=dev)
    folder = claim_eval_folder(Path(out) if out is not None else run.eval_dir(split))
    metrics = write_eval_outputs(folder.root, scores, labels, ds.sample_ids, num_classes)
    metrics.update({"checkpoint_epoch": int(ckpt["epoch"]), "data": str(data), "split": split,
                    "stream": meta.get("stream"), "skipped": [s.to_json() for s in samples.skipped]})
    if holdout:
        metrics.update({"holdout_classes": holdout, "test_classes": "seen classes only"})
    write_json_atomic(folder.metrics, metrics)
    return metrics
