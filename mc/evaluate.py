"""Evaluation: scores, top-k and per-class accuracy, confusion matrix, the 4-stream ensemble, the
inference-only export and prediction on a keypoint file.

Files (all written atomically):

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
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from gsp.atomic import atomic_path, write_json_atomic, write_text_atomic
from mc.model import GSPMCModel, ModelConfig, SkeletonClassifier

EXPORT_FORMAT = "gsp-mc-export/1"
SCORES_FILE = "test_scores.npz"
CONFUSION_FILE = "confusion.csv"
EXPORT_FILE = "export.pt"


class EvaluationError(ValueError):
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
        with torch.autocast(device_type=device.type, dtype=_amp_dtype(device), enabled=amp):
            logits = model(x.to(device, non_blocking=True))
        scores.append(logits.float().cpu().numpy())
        labels.append(np.asarray(y))
    return np.concatenate(scores).astype(np.float32), np.concatenate(labels).astype(np.int64)


def _amp_dtype(device: torch.device) -> torch.dtype:
    # float16 + GradScaler on CUDA; bfloat16 on CPU (no scaler needed, and CPU autocast supports it).
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def save_scores(out_dir: Path, scores: np.ndarray, labels: np.ndarray, sample_ids: Sequence[str]) -> Path:
    target = Path(out_dir) / SCORES_FILE
    with atomic_path(target, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, scores=scores.astype(np.float32), labels=labels.astype(np.int64),
                     sample_ids=np.asarray(list(sample_ids), dtype=str))
    return target


def load_scores(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    path = Path(path)
    if path.is_dir():
        path = path / SCORES_FILE
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
    target = Path(out_dir) / CONFUSION_FILE
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
        out_dir = Path(out_dir)
        save_scores(out_dir, total.astype(np.float32), base_labels, base_ids)
        save_confusion(out_dir, metrics.pop("confusion"))
        write_json_atomic(out_dir / "metrics.json", metrics)
    else:
        metrics.pop("confusion")
    return metrics


# --------------------------------------------------------------------------- export / predict


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise EvaluationError(f"{path}: checkpoint not found")
    return torch.load(path, map_location="cpu", weights_only=True)


def model_from_checkpoint(ckpt: Mapping) -> GSPMCModel:
    model = GSPMCModel(ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()


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
        "layout": meta.get("layout", "gsp87"),
        "labels": list(meta.get("labels", [])),
    }
    with atomic_path(out_path, suffix=".pt") as tmp:
        torch.save(payload, tmp)
    return Path(out_path)


def load_inference(path: Path) -> tuple[SkeletonClassifier, dict]:
    path = Path(path)
    if path.is_dir():
        path = path / EXPORT_FILE
    if not path.is_file():
        raise EvaluationError(f"{path}: exported model not found")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != EXPORT_FORMAT:
        raise EvaluationError(f"{path}: not a gsp-mc export (format {payload.get('format')!r})")
    model = SkeletonClassifier(ModelConfig.from_dict(payload["model_config"]))
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload


def read_keypoint_file(path: Path) -> np.ndarray:
    """A (T, 133, 3) clip from a ``.npy`` file (the per-video format), checked."""
    from mc.data import SampleError, check_keypoints

    path = Path(path)
    if not path.is_file():
        raise SampleError(f"{path}: keypoint file not found")
    if path.suffix.lower() != ".npy":
        raise SampleError(f"{path}: expected a (T, 133, 3) .npy keypoint file")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SampleError(f"{path}: unreadable .npy: {exc}") from exc
    return np.asarray(check_keypoints(arr, path.stem, str(path), check_values=True), dtype=np.float32)


@torch.no_grad()
def predict_file(export: Path, keypoint_file: Path, topk: int = 5) -> list[dict]:
    """Top-k classes for one keypoint file with an exported model (centred test-time sampling)."""
    from mc.keypoints import get_layout
    from mc.transforms import prepare

    model, payload = load_inference(export)
    clip = read_keypoint_file(keypoint_file)
    layout = get_layout(payload["layout"])
    x = prepare(clip, layout, payload["stream"], payload["frames"], train=False)
    tensor = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[None, ..., None]))
    prob = torch.softmax(model(tensor).float(), dim=1)[0]
    k = min(topk, prob.numel())
    values, idx = prob.topk(k)
    names = payload.get("labels") or []
    return [
        {"label": int(i), "name": names[int(i)] if int(i) < len(names) else None, "probability": float(v)}
        for v, i in zip(values.tolist(), idx.tolist())
    ]


def evaluate_checkpoint(run_dir: Path, data: Path | None = None, split: str = "test", out: Path | None = None,
                        batch_size: int = 64, device: str = "auto", skip_bad: bool = False) -> dict:
    """Re-evaluate a training run's last checkpoint on a split; writes scores, confusion and
    ``metrics.json`` into ``out`` (default ``<run_dir>/eval-<split>``)."""
    import json

    from mc.data import SkeletonDataset, load_samples
    from mc.keypoints import get_layout
    from mc.train import resolve_device

    run_dir = Path(run_dir)
    ckpt = load_checkpoint(run_dir)
    meta = ckpt.get("meta", {})
    train_cfg = json.loads(ckpt.get("train_config", "{}"))
    data = Path(data) if data is not None else Path(train_cfg.get("data", ""))
    if not str(data):
        raise EvaluationError(f"{run_dir}: no --data given and the checkpoint does not record one")
    model = model_from_checkpoint(ckpt)
    num_classes = model.cfg.num_classes
    samples = load_samples(data, split=split, skip_bad=skip_bad, num_classes=num_classes)
    ds = SkeletonDataset(samples, get_layout(meta.get("layout")), stream=meta.get("stream", "joint"),
                         frames=int(meta.get("frames", 64)), train=False, num_classes=num_classes)
    dev = resolve_device(device)
    scores, labels = predict_scores(model.to(dev), ds, batch_size=batch_size, device=dev)
    out = Path(out) if out is not None else run_dir / f"eval-{split}"
    metrics = write_eval_outputs(out, scores, labels, ds.sample_ids, num_classes)
    metrics.update({"checkpoint_epoch": int(ckpt["epoch"]), "data": str(data), "split": split,
                    "stream": meta.get("stream"), "skipped": [list(s) for s in samples.skipped]})
    write_json_atomic(out / "metrics.json", metrics)
    return metrics
