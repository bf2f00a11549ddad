"""A clip's timeline: rest → segment 1 → … → segment K → rest with transitions between them,
as per-frame (segment, phase) pairs, and the blend that turns per-segment quantities into
smooth per-frame ones."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from demo.sign_source import Segment

# fn(segment index, phases (n,), frame indices (n,)) -> (n, *shape) values of that segment
SegmentFn = Callable[[int, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class Timeline:
    """Per frame: blend of segment ``a`` at phase ``ua`` and segment ``b`` at ``ub`` by weight ``w``.

    Segment 0 and K+1 are the rest poses before and after the sign's K segments.
    """

    a: np.ndarray
    ua: np.ndarray
    b: np.ndarray
    ub: np.ndarray
    w: np.ndarray
    n_segments: int  # K + 2


def make_timeline(num_frames: int, segments: list[Segment], rng: np.random.Generator) -> Timeline:
    k = len(segments)
    # Durations: rest, (segment, transition)*, rest; repeats lengthen a segment.
    seg = np.array([1.0 + 0.35 * (max(_repeat(s)) - 1) for s in segments]) * rng.uniform(0.85, 1.15, k)
    trans = rng.uniform(0.3, 0.5, k + 1)
    rest = rng.uniform(0.15, 0.45, 2)
    pieces = [rest[0]]
    for i in range(k):
        pieces += [trans[i], seg[i]]
    pieces += [trans[k], rest[1]]
    edges = np.concatenate([[0.0], np.cumsum(pieces)])
    edges /= edges[-1]
    tau = (np.arange(num_frames) + 0.5) / num_frames
    piece = np.clip(np.searchsorted(edges, tau, side="right") - 1, 0, len(pieces) - 1)
    v = (tau - edges[piece]) / (edges[piece + 1] - edges[piece])
    # piece 0: rest (segment 0); odd pieces: transitions; even pieces >= 2: segment piece//2 (1..K),
    # the last piece is rest (segment K+1). A transition runs from the end of segment piece//2
    # to the start of the next one; elsewhere a and b are the same segment at the same phase.
    is_trans = piece % 2 == 1
    seg_idx = piece // 2
    a = seg_idx
    b = np.where(is_trans, seg_idx + 1, seg_idx)
    ua = np.where(is_trans, 1.0, v)
    ub = np.where(is_trans, 0.0, v)
    w = np.where(is_trans, v * v * (3 - 2 * v), 0.0)
    return Timeline(a=a, ua=ua, b=b, ub=ub, w=w, n_segments=k + 2)


def _repeat(seg: Segment) -> list[int]:
    return [h.repeat for h in (seg.right, seg.left) if h is not None] or [1]


def blend(tl: Timeline, fn: SegmentFn, shape: tuple[int, ...]) -> np.ndarray:
    """Evaluate ``fn(segment, phases, frame_indices) -> (n, *shape)`` on the timeline; blend transitions."""
    out_a = np.zeros((len(tl.a),) + shape)
    out_b = np.zeros((len(tl.a),) + shape)
    frames = np.arange(len(tl.a))
    for s in range(tl.n_segments):
        for seg_arr, u_arr, out in ((tl.a, tl.ua, out_a), (tl.b, tl.ub, out_b)):
            mask = seg_arr == s
            if mask.any():
                out[mask] = fn(s, u_arr[mask], frames[mask])
    w = tl.w.reshape((-1,) + (1,) * len(shape))
    return (1 - w) * out_a + w * out_b


def envelope(u: np.ndarray, ramp: float = 0.25) -> np.ndarray:
    """0 at a segment's start and end, 1 in between, with linear ramps of ``ramp`` of the phase."""
    return np.clip(np.minimum(u, 1 - u) / ramp, 0, 1)
