"""Pure numpy transforms of one skeleton sequence, shape (T, V, 3) with channels (x, y, score).

Conventions shared by every function here:

* A *missing* point has score 0 and coordinates (0, 0); every transform keeps it that way, so a
  missing point never turns into a plausible-looking position (rotations, shifts and flips touch
  valid points only, and bones/motions that involve a missing point are zero).
* The score channel is never mixed into coordinates: augmentation is 2D on (x, y) only.
* Inputs are not modified; every function returns a new float32 array.

The pipeline a dataset item goes through is :func:`prepare`: select the layout's points →
:func:`normalise` → :func:`sample_frames` → (training) :func:`augment` and :func:`flip` →
:func:`to_stream`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from mc.keypoints import Layout

#: The four input streams (joint, bone = child − parent, and their frame differences).
Stream = Literal["joint", "bone", "joint_motion", "bone_motion"]
STREAMS: tuple[str, ...] = get_args(Stream)


@dataclass(frozen=True)
class TransformConfig:
    """Knobs of the item pipeline; defaults follow the CTR-GCN recipe adapted to 2D."""

    score_threshold: float = 0.0  # points with score below this are treated as missing
    crop_min: float = 0.5  # training: keep a random crop of crop_min..crop_max of the clip …
    crop_max: float = 1.0
    test_crop: float = 1.0  # … testing: the centred crop of this fraction
    rotate_deg: float = 15.0  # training: uniform rotation in ±rotate_deg
    scale: float = 0.15  # training: per-axis scale in 1 ± scale
    shift: float = 0.15  # training: translation in ± shift (shoulder widths)
    flip_prob: float = 0.0  # training: horizontal flip + hand swap (mirrored / left-handed signing)


def _check(x: np.ndarray) -> None:
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"expected a (T, V, 3) array, got shape {x.shape}")


def select_points(keypoints: np.ndarray, layout: Layout) -> np.ndarray:
    """(T, 133, 3) whole-body sequence → (T, V, 3) in the layout's node order."""
    _check(keypoints)
    return np.asarray(keypoints[:, layout.indices, :], dtype=np.float32)


def drop_low_score(x: np.ndarray, threshold: float) -> np.ndarray:
    """Points whose score is below ``threshold`` (or exactly 0) become missing: (0, 0, 0)."""
    _check(x)
    out = np.array(x, dtype=np.float32, copy=True)
    missing = (out[..., 2] < threshold) | (out[..., 2] <= 0)
    out[missing] = 0.0
    return out


def normalise(x: np.ndarray, layout: Layout, score_threshold: float = 0.0) -> np.ndarray:
    """Centre on the shoulders' midpoint and scale by the shoulder width, per sequence.

    One centre and one scale for the whole clip (the medians over frames where both shoulders
    are seen), not per frame, so whole-body motion such as leaning stays visible. Without any
    frame with both shoulders, the centre is the mean of all valid points and the scale their
    spread. Points under ``score_threshold`` are dropped first.
    """
    out = drop_low_score(x, score_threshold)
    valid = out[..., 2] > 0
    if not valid.any():
        return out
    ls, rs = layout.shoulders
    both = valid[:, ls] & valid[:, rs]
    if both.any():
        left, right = out[both, ls, :2], out[both, rs, :2]
        centre = np.median((left + right) / 2.0, axis=0)
        scale = float(np.median(np.linalg.norm(left - right, axis=-1)))
    else:
        pts = out[valid][:, :2]
        centre = pts.mean(axis=0)
        scale = float(pts.std(axis=0).max()) * 2.0
    if not np.isfinite(scale) or scale <= 1e-6:
        scale = 1.0
    out[..., :2] = (out[..., :2] - centre) / scale
    out[~valid] = 0.0
    return out.astype(np.float32, copy=False)


def resample(x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Values at fractional frame ``positions``: linear between neighbours when both are valid,
    otherwise the nearer frame (so a missing point is never blended with a seen one)."""
    _check(x)
    t = x.shape[0]
    positions = np.clip(np.asarray(positions, dtype=np.float64), 0, t - 1)
    lo = np.floor(positions).astype(int)
    hi = np.minimum(lo + 1, t - 1)
    w = (positions - lo).astype(np.float32)[:, None, None]
    a, b = x[lo], x[hi]
    both = (a[..., 2] > 0) & (b[..., 2] > 0)
    nearest = np.where(w < 0.5, a, b)
    lerp = a * (1.0 - w) + b * w
    return np.where(both[..., None], lerp, nearest).astype(np.float32)


def sample_frames(
    x: np.ndarray,
    frames: int,
    train: bool,
    rng: np.random.Generator | None = None,
    crop: tuple[float, float] = (0.5, 1.0),
    test_crop: float = 1.0,
) -> np.ndarray:
    """Fixed-length clip: a random crop resized to ``frames`` in training, the centred crop in test.

    Training draws the crop length uniformly from ``crop`` (fractions of the clip) and its start
    uniformly; testing keeps the centred ``test_crop`` fraction. Either way the crop is resampled
    to ``frames`` frames (shorter clips are stretched, longer ones thinned).
    """
    _check(x)
    t = x.shape[0]
    if t == 0:
        raise ValueError("cannot sample frames from an empty sequence")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if train:
        if rng is None:
            raise ValueError("training sampling needs an rng")
        frac = rng.uniform(crop[0], crop[1])
        length = max(1.0, frac * t)
        start = rng.uniform(0.0, t - length)
    else:
        length = max(1.0, test_crop * t)
        start = (t - length) / 2.0
    # Centres of `frames` equal bins over [start, start + length), in frame coordinates.
    positions = start + (np.arange(frames) + 0.5) * (length / frames) - 0.5
    return resample(x, positions)


def rotation_scale_matrix(angle_rad: float, scale_x: float, scale_y: float) -> np.ndarray:
    c, s = np.cos(angle_rad), np.sin(angle_rad)
    return np.array([[c, -s], [s, c]], dtype=np.float64) @ np.diag([scale_x, scale_y])


def affine_2d(x: np.ndarray, matrix: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Apply ``p -> matrix @ p + shift`` to the (x, y) of valid points; scores untouched."""
    _check(x)
    out = np.array(x, dtype=np.float32, copy=True)
    valid = out[..., 2] > 0
    xy = out[..., :2].astype(np.float64) @ np.asarray(matrix, dtype=np.float64).T + np.asarray(shift, dtype=np.float64)
    out[..., :2] = np.where(valid[..., None], xy, 0.0)
    return out


def augment(x: np.ndarray, rng: np.random.Generator, rotate_deg: float = 15.0, scale: float = 0.15,
            shift: float = 0.15) -> np.ndarray:
    """Random 2D rotation, per-axis scale and shift of the whole clip (one draw per clip)."""
    angle = np.deg2rad(rng.uniform(-rotate_deg, rotate_deg))
    sx, sy = rng.uniform(1.0 - scale, 1.0 + scale, size=2)
    offset = rng.uniform(-shift, shift, size=2)
    return affine_2d(x, rotation_scale_matrix(angle, sx, sy), offset)


def flip(x: np.ndarray, layout: Layout) -> np.ndarray:
    """Horizontal mirror of a normalised clip: x → −x and left/right nodes swapped.

    The permutation swaps the two hands, left/right body points and left/right face points, so
    the mirrored clip is again a valid skeleton (a left-handed rendering of the same sign).
    """
    _check(x)
    out = np.array(x[:, layout.flip_permutation, :], dtype=np.float32, copy=True)
    out[..., 0] = np.where(out[..., 2] > 0, -out[..., 0], 0.0)
    return out


def bones(x: np.ndarray, layout: Layout) -> np.ndarray:
    """Bone stream: (x, y) of child − parent along the layout's tree; roots give zero.

    The score channel of a bone is min(score child, score parent); a bone with a missing end is
    all zeros.
    """
    _check(x)
    parents = np.asarray(layout.parents)
    par = x[:, parents, :]
    out = np.empty_like(x, dtype=np.float32)
    out[..., :2] = x[..., :2] - par[..., :2]
    out[..., 2] = np.minimum(x[..., 2], par[..., 2])
    out[out[..., 2] <= 0] = 0.0
    return out


def motion(x: np.ndarray) -> np.ndarray:
    """Motion stream: (x, y) at t+1 minus at t; score min of the two; the last frame is zero."""
    _check(x)
    out = np.zeros_like(x, dtype=np.float32)
    out[:-1, :, :2] = x[1:, :, :2] - x[:-1, :, :2]
    out[:-1, :, 2] = np.minimum(x[1:, :, 2], x[:-1, :, 2])
    out[out[..., 2] <= 0] = 0.0
    return out


def to_stream(x: np.ndarray, layout: Layout, stream: str) -> np.ndarray:
    """One of the four input streams of a (T, V, 3) clip: joint, bone, joint_motion, bone_motion."""
    if stream == "joint":
        return np.array(x, dtype=np.float32, copy=True)
    if stream == "bone":
        return bones(x, layout)
    if stream == "joint_motion":
        return motion(x)
    if stream == "bone_motion":
        return motion(bones(x, layout))
    raise ValueError(f"unknown stream {stream!r}; choose one of {STREAMS}")


def prepare(
    keypoints: np.ndarray,
    layout: Layout,
    stream: str,
    frames: int,
    train: bool,
    rng: np.random.Generator | None = None,
    config: TransformConfig = TransformConfig(),
) -> np.ndarray:
    """The whole item pipeline: (T, 133, 3) whole-body clip → (frames, V, 3) stream input."""
    x = select_points(keypoints, layout)
    x = normalise(x, layout, config.score_threshold)
    x = sample_frames(x, frames, train, rng, (config.crop_min, config.crop_max), config.test_crop)
    if train:
        assert rng is not None
        x = augment(x, rng, config.rotate_deg, config.scale, config.shift)
        if config.flip_prob > 0 and rng.random() < config.flip_prob:
            x = flip(x, layout)
    return to_stream(x, layout, stream)
