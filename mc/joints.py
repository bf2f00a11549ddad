"""Per-joint importance of a trained skeleton encoder: the paper's Figure 5 (section 4.4.1).

The paper derives "attention weights" from *channel-averaged feature maps*: the final backbone
feature map (N·M, C, T', V) of CTR-GCN — the last unit's ReLU output, before pooling into S_g
(eq. 2) — averaged over channels gives one activation per joint and frame; averaged over frames,
persons and clips (every test clip, or those of one class) it is one value per joint, normalised
per model so two models can be drawn side by side (:mod:`mc.joints_figure`).

The math is in small pure functions (:func:`channel_average`, :func:`aggregate`,
:func:`normalise_importance`); :func:`run_importance` runs a training run's last checkpoint over
its data and returns them with what the picture needs (the layout, a mean pose, a title).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gsp.errors import GspError
from mc.keypoints import DEFAULT_KEYPOINT_SET, Layout, LayoutError, get_layout
from mc.run_folder import RunFolder


class JointsError(GspError, ValueError):
    """A run, data set or label the joints picture cannot use; the message names it."""


# --------------------------------------------------------------------------- the math


def channel_average(feat: torch.Tensor | np.ndarray, n: int) -> np.ndarray:
    """(n, V) per-clip joint activation from a backbone feature map ``feat`` (N·M, C, T', V):
    the mean over channels (the paper's "channel-averaged feature maps", section 4.4.1), then
    over the T' frames and the M persons of each clip."""
    f = torch.as_tensor(feat).float()
    nm, _, _, v = f.shape
    return f.mean(dim=(1, 2)).view(n, nm // n, v).mean(1).cpu().numpy()


def aggregate(per_clip: np.ndarray, labels: np.ndarray, label: int | None = None) -> np.ndarray:
    """(V,) mean activation over the clips of class ``label`` (every clip when None)."""
    per_clip, labels = np.asarray(per_clip, dtype=np.float64), np.asarray(labels)
    chosen = per_clip if label is None else per_clip[labels == label]
    if len(chosen) == 0:
        raise ValueError(f"no clip of class {label}")
    return chosen.mean(0)


def normalise_importance(values: np.ndarray) -> np.ndarray:
    """Joint importance in [0, 1] per model: activation divided by the largest one.

    Dividing by the maximum (rather than stretching min..max) keeps the ratios between joints,
    so a model whose activation is spread evenly over the skeleton ("diffuse attention", the
    paper's Figure 5, top) stays visibly even instead of being stretched into false contrast.
    The final ReLU makes activations non-negative; an all-zero map stays zero.
    """
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, None)
    top = v.max() if v.size else 0.0
    return v / top if top > 0 else v


def part_means(importance: np.ndarray, layout: Layout) -> dict[str, float]:
    """Mean importance of each part of the layout (body, hands, mouth, face)."""
    return {name: float(np.mean(importance[nodes])) for name, nodes in layout.parts.items()}


def mean_pose(clips: Sequence[np.ndarray]) -> np.ndarray:
    """(V, 2) mean position of each node over every frame it is seen in (score > 0), from
    normalised (T, V, 3) clips; a node never seen is placed at the mean of the others."""
    total, count = None, None
    for clip in clips:
        seen = clip[..., 2] > 0
        s = (clip[..., :2] * seen[..., None]).sum(0)
        total = s if total is None else total + s
        count = seen.sum(0) if count is None else count + seen.sum(0)
    if total is None:
        raise ValueError("no clips to average")
    pose = total / np.maximum(count, 1)[:, None]
    seen_any = count > 0
    pose[~seen_any] = pose[seen_any].mean(0) if seen_any.any() else 0.0
    return pose.astype(np.float32)


# --------------------------------------------------------------------------- a run


@dataclass
class JointImportance:
    """One model's joint importance, with what the picture and the CLI say about it."""

    run: Path
    kind: str  # "CE only" or "GSP-MC"
    layout: Layout
    importance: np.ndarray  # (V,) in [0, 1]
    clips: int
    label: int | None
    label_name: str | None
    data: Path

    @property
    def title(self) -> str:
        which = "all test clips" if self.label is None else f"class {self.label}" + (
            f" '{self.label_name}'" if self.label_name else "")
        return f"{self.kind}: {self.run.name} ({which}, {self.clips} clips)"

    def part_means(self) -> dict[str, float]:
        return part_means(self.importance, self.layout)


def _checkpoint(run: Path) -> dict:
    from mc.evaluate import load_checkpoint

    if not RunFolder(run).checkpoint.is_file():
        raise JointsError(f"{run}: not a training run folder (no {RunFolder(run).checkpoint.relative_to(run)}; "
                          "`gsp train --out RUN` writes one)")
    return load_checkpoint(run)


def _data_of(run: Path, ckpt: dict, data: Path | None) -> Path:
    from mc.evaluate import checkpoint_data_path

    return checkpoint_data_path(run, ckpt, data)


def resolve_label(label: str | int | None, names: Sequence[str]) -> int | None:
    """A class id from ``--label``: an integer, or a class name the run recorded (its gloss)."""
    if label is None:
        return None
    text = str(label).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    folded = [str(n).casefold() for n in names]
    if text.casefold() in folded:
        return folded.index(text.casefold())
    raise JointsError(f"--label {text!r}: not a class id or a class name of the run"
                      + (f" (names: {', '.join(map(str, names[:10]))}{', …' if len(names) > 10 else ''})"
                         if names else " (it records no class names; give the class id)"))


def _layout_of(run: Path, meta: dict) -> Layout:
    try:
        return get_layout(meta.get("layout", DEFAULT_KEYPOINT_SET), source="keypoint set recorded in the run")
    except LayoutError as exc:
        raise JointsError(f"{run}: {exc}") from None


@torch.no_grad()
def run_importance(run: Path | str, data: Path | str | None = None, label: str | int | None = None,
                   split: str = "test", batch_size: int = 32) -> tuple[JointImportance, np.ndarray]:
    """The normalised joint importance of a run's last checkpoint over ``split`` of its data
    (the recorded data unless ``data``), for every clip or those of ``label``; and the (V, 2)
    mean pose of the same clips, to draw it on."""
    from mc.data import SkeletonDataset, load_samples
    from mc.evaluate import model_from_checkpoint
    from mc.transforms import prepare

    run = Path(run)
    ckpt = _checkpoint(run)
    meta = ckpt.get("meta", {})
    layout = _layout_of(run, meta)
    data_path = _data_of(run, ckpt, Path(data) if data is not None else None)
    model = model_from_checkpoint(ckpt, RunFolder(run).checkpoint)
    names = [str(n) for n in meta.get("labels") or []]
    wanted = resolve_label(label, names)
    samples = load_samples(data_path, split=split, num_classes=model.cfg.num_classes)
    if wanted is not None:
        present = sorted({s.label for s in samples})
        samples = [s for s in samples if s.label == wanted]
        if not samples:
            raise JointsError(f"--label {label}: no {split!r} clip of class {wanted} in {data_path} "
                              f"(classes with {split!r} clips: {_ranges(present)})")
    frames = int(meta.get("frames", 64))
    ds = SkeletonDataset(samples, layout, stream=meta.get("stream", "joint"), frames=frames, train=False,
                         num_classes=model.cfg.num_classes)
    per_clip, labels = [], []
    for x, y, _ in torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False):
        per_clip.append(channel_average(model.backbone(x), x.shape[0]))
        labels.append(y.numpy())
    importance = normalise_importance(aggregate(np.concatenate(per_clip), np.concatenate(labels)))
    pose = mean_pose([prepare(s.keypoints(), layout, "joint", frames, train=False) for s in samples])
    kind = "GSP-MC" if model.cfg.text_dim is not None else "CE only"
    name = names[wanted] if wanted is not None and wanted < len(names) else None
    return JointImportance(run, kind, layout, importance, len(samples), wanted, name, data_path), pose


def _ranges(values: Sequence[int]) -> str:
    """'0-5, 8, 10-11' for sorted class ids (a readable list)."""
    groups: list[list[int]] = []
    for v in values:
        if groups and v == groups[-1][1] + 1:
            groups[-1][1] = v
        else:
            groups.append([v, v])
    return ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in groups) or "none"
