"""Synthetic COCO-WholeBody sign clips animated from the structured sign source.

No sign-language skeleton data set is reachable offline, so tests and the demo train on clips
generated from the same ``knowledge_base/demo_signs.yaml`` that the demo dictionary is printed
from: every segment's handshape (chart finger states), location, palm, movement and the mouth,
face, head and body features become motion of the 133 whole-body points.

How a clip is made (all lengths in *body units*: half the shoulder width is 1; x to the signer's
left, y down, z toward the camera; the image is an orthographic view of that):

* **Timeline.** Rest → segment 1 → … → segment K → rest, with transitions between them. Each
  frame gets (segment a, phase u_a, segment b, phase u_b, weight w); any per-segment quantity is
  ``(1 − w)·F_a(u_a) + w·F_b(u_b)``, so transitions are smooth interpolations.
* **Hands.** A 21-point hand model (wrist, thumb CMC-MCP-IP-tip, four fingers MCP-PIP-DIP-tip)
  whose joints flex toward the palm normal by angles per chart finger state (extended, bent,
  curled, closed) and fan out when the chart says ``spread``. The palm facing sets the hand's 3D
  orientation; movements (tap, straight, arc, circle, wiggle, twist, open_close, shake) are
  offsets, finger modulations or rotations over the segment's phase. The palm centre sits on a
  body-relative anchor for the location (face locations are placed on the signer's face
  template). Elbows come from two-link inverse kinematics. The left hand is computed as a right
  hand in the mirrored world and mirrored back, so both hands obey the same model.
* **Non-manual features.** A 68-point face template; mouth shapes displace lip points (and the
  chin for an open mouth), face states displace brows, lids and mouth corners; head nods, shakes
  and tilts move the head points; body leans, shrugs and turns transform the upper body.
* **Signers.** Each signer has its own proportions (arms, neck, face, hands, hips), image scale
  and position, speed, noise level, handshape jitter and detection quality. Each clip adds its
  own length, timing, small anchor and handshape jitter, Gaussian coordinate noise, random
  missing points (score 0 and coordinates 0) and short whole-hand detection dropouts.

Minimal pairs in the source (signs that differ only in handshape or only in mouth/face) differ
only in those points here, by a few hundredths of a shoulder width for the mouth — so a
classifier has to learn fine detail and does not reach 100% in one epoch.

The output is a pyskl annotation pickle (``split`` by signer, ``annotations`` with
``keypoint`` [1, T, 133, 2], ``keypoint_score`` [1, T, 133], ``label``, ``frame_dir``,
``total_frames``, ``img_shape``) plus a top-level ``classes`` list (label, class_id, gloss), led
by a ``generator`` tag so that only a data set written here is ever overwritten by a new one.
"""

from __future__ import annotations

import logging
import pickletools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from gsp.atomic import check_replaceable
from gsp.sign_source import DEFAULT_SOURCE, HandAction, Handshape, Segment, SignSource, load_sign_source
from mc.data import write_pyskl
from mc.keypoints import FACE0, LEFT_HAND0, NUM_WHOLEBODY, RIGHT_HAND0

log = logging.getLogger(__name__)

IMG_SIZE = 512
GENERATOR_KEY, GENERATOR = "generator", "gsp-mc synthetic skeletons"
DATASET_WHAT = "a synthetic data set written by gsp synth"
FACE_UNIT = 0.38  # face template unit (half the face width) in body units

# ---------------------------------------------------------------------------------------------
# Templates


def _face_template() -> np.ndarray:
    """The 68 iBUG landmarks in face units: x to the signer's left, y down, origin between the eyes."""
    p = np.zeros((68, 2))
    t = np.pi * np.arange(17) / 16
    p[:17, 0] = -np.cos(t)  # iBUG 0 is the signer's right side (image left)
    p[:17, 1] = -0.1 + 1.25 * np.sin(t)
    k = np.arange(5)
    p[17:22, 0] = np.linspace(-0.78, -0.15, 5)
    p[17:22, 1] = -0.42 - 0.1 * np.sin(np.pi * k / 4)
    p[22:27, 0] = np.linspace(0.15, 0.78, 5)
    p[22:27, 1] = -0.42 - 0.1 * np.sin(np.pi * (4 - k) / 4)
    p[27:31] = np.c_[np.zeros(4), np.linspace(-0.2, 0.4, 4)]
    p[31:36] = np.c_[np.linspace(-0.25, 0.25, 5), [0.48, 0.51, 0.53, 0.51, 0.48]]
    p[36:42] = [(-0.6, -0.15), (-0.5, -0.22), (-0.36, -0.22), (-0.26, -0.15), (-0.36, -0.09), (-0.5, -0.09)]
    p[42:48] = [(0.26, -0.15), (0.36, -0.22), (0.5, -0.22), (0.6, -0.15), (0.5, -0.09), (0.36, -0.09)]
    p[48:60] = [(-0.36, 0.76), (-0.23, 0.69), (-0.1, 0.66), (0, 0.68), (0.1, 0.66), (0.23, 0.69),
                (0.36, 0.76), (0.23, 0.86), (0.1, 0.89), (0, 0.9), (-0.1, 0.89), (-0.23, 0.86)]
    p[60:68] = [(-0.29, 0.77), (-0.1, 0.74), (0, 0.74), (0.1, 0.74), (0.29, 0.77), (0.1, 0.8), (0, 0.8), (-0.1, 0.8)]
    return p


FACE_TEMPLATE = _face_template()
_UPPER_LIP = [49, 50, 51, 52, 53, 61, 62, 63]
_LOWER_LIP = [55, 56, 57, 58, 59, 65, 66, 67]
_CORNERS_L, _CORNERS_R = [54, 64], [48, 60]  # signer's left / right mouth corners
_CHIN = list(range(5, 12))
_BROWS = list(range(17, 27))
_INNER_BROWS = [20, 21, 22, 23]
_UPPER_LIDS = [37, 38, 43, 44]
_LOWER_LIDS = [40, 41, 46, 47]
_CHEEKS = [2, 3, 4, 12, 13, 14]

MOUTHS = ("neutral", "open", "round", "spread", "puffed", "tongue", "pressed", "blow")
FACES = ("neutral", "brows_raised", "brows_furrowed", "eyes_closed", "squint", "smile", "frown")


def _mouth_displacements() -> np.ndarray:
    d = np.zeros((len(MOUTHS), 68, 2))
    m = {name: d[i] for i, name in enumerate(MOUTHS)}
    m["open"][_LOWER_LIP, 1] += 0.2
    m["open"][_CHIN, 1] += 0.12
    m["open"][_CORNERS_L + _CORNERS_R, 1] += 0.06
    for name, inward, vert in (("round", 0.13, 0.04), ("blow", 0.16, 0.02)):
        m[name][_CORNERS_L, 0] -= inward
        m[name][_CORNERS_R, 0] += inward
        m[name][_UPPER_LIP, 1] -= vert
        m[name][_LOWER_LIP, 1] += vert
    m["blow"][_CHEEKS, 0] += np.sign(FACE_TEMPLATE[_CHEEKS, 0]) * 0.05
    m["spread"][_CORNERS_L, 0] += 0.1
    m["spread"][_CORNERS_R, 0] -= 0.1
    m["spread"][_CORNERS_L + _CORNERS_R, 1] -= 0.02
    m["puffed"][_CHEEKS, 0] += np.sign(FACE_TEMPLATE[_CHEEKS, 0]) * 0.1
    m["puffed"][[61, 62, 63], 1] += 0.03
    m["puffed"][[65, 66, 67], 1] -= 0.03
    m["tongue"][_LOWER_LIP, 1] += 0.12
    m["tongue"][[65, 66, 67], 1] += 0.06
    m["pressed"][[61, 62, 63], 1] += 0.03
    m["pressed"][[65, 66, 67], 1] -= 0.03
    m["pressed"][[50, 51, 52], 1] += 0.03
    m["pressed"][[56, 57, 58], 1] -= 0.03
    return d


def _face_displacements() -> np.ndarray:
    d = np.zeros((len(FACES), 68, 2))
    f = {name: d[i] for i, name in enumerate(FACES)}
    f["brows_raised"][_BROWS, 1] -= 0.13
    f["brows_raised"][_UPPER_LIDS, 1] -= 0.02
    f["brows_furrowed"][_BROWS, 1] += 0.05
    f["brows_furrowed"][_INNER_BROWS, 1] += 0.05
    f["brows_furrowed"][_INNER_BROWS, 0] -= np.sign(FACE_TEMPLATE[_INNER_BROWS, 0]) * 0.05
    f["eyes_closed"][_UPPER_LIDS, 1] += 0.12
    f["eyes_closed"][_LOWER_LIDS, 1] -= 0.01
    f["squint"][_UPPER_LIDS, 1] += 0.06
    f["squint"][_LOWER_LIDS, 1] -= 0.03
    f["smile"][_CORNERS_L, 0] += 0.07
    f["smile"][_CORNERS_R, 0] -= 0.07
    f["smile"][_CORNERS_L + _CORNERS_R, 1] -= 0.08
    f["smile"][_LOWER_LIDS, 1] -= 0.02
    f["frown"][_CORNERS_L + _CORNERS_R, 1] += 0.07
    f["frown"][_BROWS, 1] += 0.04
    return d


MOUTH_DISP = _mouth_displacements()
FACE_DISP = _face_displacements()

# Hand model, right hand, hand units (wrist to middle fingertip ~ 1), palm facing +z, fingers -y,
# thumb on +x (the medial side of a right hand held up with its palm to the camera).
FINGER_BASE = np.array([[0.1, -0.12, 0.0], [0.15, -0.5, 0], [0.05, -0.52, 0], [-0.05, -0.5, 0], [-0.15, -0.46, 0]])
FINGER_LEN = np.array([[0.17, 0.14, 0.11], [0.2, 0.12, 0.09], [0.22, 0.13, 0.1], [0.2, 0.12, 0.09], [0.16, 0.09, 0.08]])
# Flexion (deg) of the three joints of a finger per chart state; row 0 is the thumb.
_FLEX_FINGER = {"extended": (0, 0, 0), "bent": (65, 10, 5), "curled": (40, 75, 60), "closed": (90, 100, 70)}
_FLEX_THUMB = {"extended": (10, 0, 0), "bent": (25, 15, 10), "curled": (30, 45, 45), "closed": (45, 30, 20)}
_THUMB_ANGLE = {"extended": 55.0, "bent": 20.0, "curled": 30.0, "closed": -40.0}  # in-plane, toward +x
_SPREAD = {True: (10.0, 3.0, -4.0, -12.0), False: (2.0, 0.5, -0.5, -3.0)}
HAND_LENGTH = 0.95  # body units
CLOSED_FLEX = np.array([_FLEX_THUMB["closed"]] + [_FLEX_FINGER["closed"]] * 4, dtype=float)

# Palm facings as (finger direction, palm normal) for a right hand; `s` = +1 points across the body.
_PALM = {
    "out": ((0, -1, 0), (0, 0, 1)), "forward": ((0, -1, 0), (0, 0, 1)),
    "in": ((0, -1, 0), (0, 0, -1)), "back": ((0, -1, 0), (0, 0, -1)),
    "down": ((1, 0, 0.4), (0, 1, 0)), "up": ((1, 0, 0.4), (0, -1, 0)),
    "left": ((0, -1, 0.3), (1, 0, 0)), "right": ((0, -1, 0.3), (-1, 0, 0)),
}
_REST_F, _REST_N = (0.5, 0.0, 0.85), (0.0, -1.0, 0.0)
_REST_FLEX = np.array([(15, 10, 5)] + [(25, 20, 10)] * 4, dtype=float)
_REST_ANGLES = np.array([35.0, 2.0, 0.5, -0.5, -3.0])

# Movement direction vectors for a right hand (x = signer's left; in = toward midline and body).
_DIR = {
    "none": (0, 0, 0), "up": (0, -1, 0), "down": (0, 1, 0), "left": (1, 0, 0), "right": (-1, 0, 0),
    "forward": (0, 0.15, 1), "back": (0, -0.1, -1), "in": (0.7, 0, -0.7), "out": (-0.7, 0, 0.7),
}
_MIRROR_WORD = {"left": "right", "right": "left"}

# Palm-centre anchors for a right hand. Body locations in body units (x, y, z); face locations in
# face units relative to the eye line (x, y) plus a depth.
_BODY_ANCHOR = {
    "neutral": (-0.35, 1.0, 1.1), "neck": (0.0, -0.35, 0.3), "shoulder": (0.85, 0.05, 0.3),
    "chest": (-0.2, 0.6, 0.45), "stomach": (-0.15, 1.6, 0.5),
}
_FACE_ANCHOR = {
    "head_top": (0, -1.6, 0.2), "forehead": (0, -0.75, 0.55), "temple": (-0.95, -0.35, 0.25),
    "eye": (-0.42, -0.15, 0.55), "nose": (0, 0.4, 0.65), "cheek": (-0.75, 0.45, 0.45),
    "ear": (-1.1, 0.0, 0.1), "mouth": (0, 0.76, 0.6), "chin": (0, 1.25, 0.55),
}


# ---------------------------------------------------------------------------------------------
# Signers


@dataclass(frozen=True)
class SignerStyle:
    """One signer's body and recording conditions."""

    signer_id: int
    arm: float  # arm length factor
    neck: float  # shoulder line to eye line, body units
    face: float  # face size factor
    hand: float  # hand size factor
    hips: float  # hip half-width, body units
    px_per_unit: float
    centre: tuple[float, float]  # neck position in the image, pixels
    speed: float  # >1 is slower (more frames)
    noise: float  # coordinate noise factor
    hand_jitter_deg: float
    anchor_jitter: float
    drop_rate: float
    hand_score: float


def sample_signer(signer_id: int, rng: np.random.Generator) -> SignerStyle:
    return SignerStyle(
        signer_id=signer_id,
        arm=rng.uniform(0.92, 1.08),
        neck=rng.uniform(1.15, 1.35),
        face=rng.uniform(0.9, 1.1),
        hand=rng.uniform(0.9, 1.1),
        hips=rng.uniform(0.55, 0.75),
        px_per_unit=rng.uniform(55, 85),
        centre=(IMG_SIZE / 2 + rng.uniform(-40, 40), IMG_SIZE * 0.42 + rng.uniform(-25, 25)),
        speed=rng.uniform(0.8, 1.25),
        noise=rng.uniform(0.7, 1.5),
        hand_jitter_deg=rng.uniform(3.0, 8.0),
        anchor_jitter=rng.uniform(0.03, 0.08),
        drop_rate=rng.uniform(0.0, 0.03),
        hand_score=rng.uniform(0.55, 0.9),
    )


# ---------------------------------------------------------------------------------------------
# Timeline


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
    # the last piece is rest (segment K+1).
    is_trans = piece % 2 == 1
    seg_idx = piece // 2
    a = np.where(is_trans, seg_idx, seg_idx)
    b = np.where(is_trans, seg_idx + 1, seg_idx)
    ua = np.where(is_trans, 1.0, v)
    ub = np.where(is_trans, 0.0, v)
    w = np.where(is_trans, v * v * (3 - 2 * v), 0.0)
    return Timeline(a=a, ua=ua, b=b, ub=ub, w=w, n_segments=k + 2)


def _repeat(seg: Segment) -> list[int]:
    return [h.repeat for h in (seg.right, seg.left) if h is not None] or [1]


def blend(tl: Timeline, fn, shape: tuple[int, ...]) -> np.ndarray:
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


def _envelope(u: np.ndarray, ramp: float = 0.25) -> np.ndarray:
    return np.clip(np.minimum(u, 1 - u) / ramp, 0, 1)


# ---------------------------------------------------------------------------------------------
# Hands


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def handshape_params(shape: Handshape) -> tuple[np.ndarray, np.ndarray]:
    """(flex (5, 3) degrees, in-plane angles (5,) degrees) of a chart handshape."""
    flex = np.array([_FLEX_THUMB[shape.thumb]] + [_FLEX_FINGER[getattr(shape, f)] for f in
                     ("index", "middle", "ring", "little")], dtype=float)
    angles = np.array([_THUMB_ANGLE[shape.thumb], *_SPREAD[shape.spread]], dtype=float)
    return flex, angles


def hand_points(flex: np.ndarray, angles: np.ndarray, fdir: np.ndarray, normal: np.ndarray,
                size: np.ndarray) -> np.ndarray:
    """21 hand points relative to the wrist, (n, 21, 3) world units.

    ``flex`` (n, 5, 3) joint flexions in degrees toward the palm normal, ``angles`` (n, 5) in-plane
    finger directions (degrees toward the thumb side), ``fdir``/``normal`` (n, 3) the finger
    direction and palm normal of the hand, ``size`` (n,) world length of the hand.
    """
    n = flex.shape[0]
    a = np.deg2rad(angles)
    u = np.stack([np.sin(a), -np.cos(a), np.zeros_like(a)], axis=-1)  # (n, 5, 3) in the palm plane
    z = np.array([0.0, 0.0, 1.0])
    phi = np.deg2rad(np.cumsum(flex, axis=-1))  # (n, 5, 3) cumulative flexion
    dirs = np.cos(phi)[..., None] * u[:, :, None, :] + np.sin(phi)[..., None] * z  # (n, 5, 3, 3)
    segs = dirs * FINGER_LEN[None, :, :, None]
    joints = FINGER_BASE[None, :, None, :] + np.concatenate(
        [np.zeros((n, 5, 1, 3)), np.cumsum(segs, axis=2)], axis=2)  # (n, 5, 4, 3)
    local = np.concatenate([np.zeros((n, 1, 3)), joints.reshape(n, 20, 3)], axis=1)  # (n, 21, 3)
    y_axis = -fdir
    z_axis = normal
    x_axis = np.cross(y_axis, z_axis)
    rot = np.stack([x_axis, y_axis, z_axis], axis=-1)  # columns
    return np.einsum("nij,nkj->nki", rot, local) * size[:, None, None]


def _orthonormal(f: np.ndarray, nrm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = _unit(f)
    nrm = nrm - np.sum(nrm * f, axis=-1, keepdims=True) * f
    bad = np.linalg.norm(nrm, axis=-1) < 1e-6
    if bad.any():  # normal parallel to the fingers: pick any perpendicular
        alt = np.cross(f[bad], np.array([0.0, 0.0, 1.0]))
        alt[np.linalg.norm(alt, axis=-1) < 1e-6] = (1.0, 0.0, 0.0)
        nrm[bad] = alt
    return f, _unit(nrm)


def _rotate_about(v: np.ndarray, axis: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Rodrigues rotation of vectors v (n, 3) about unit axes (n, 3) by angles (n,)."""
    c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
    return v * c + np.cross(axis, v) * s + axis * np.sum(axis * v, axis=-1, keepdims=True) * (1 - c)


@dataclass
class _HandTrack:
    palm: np.ndarray  # (T, 3) palm centre
    f: np.ndarray
    n: np.ndarray
    flex: np.ndarray  # (T, 5, 3)
    angles: np.ndarray  # (T, 5)
    size: np.ndarray  # (T,)


def _mirror_action(act: HandAction) -> HandAction:
    return act.model_copy(update={
        "palm": _MIRROR_WORD.get(act.palm, act.palm),
        "direction": _MIRROR_WORD.get(act.direction, act.direction),
    })


def _hand_track(tl: Timeline, actions: list[HandAction | None], source: SignSource, style: SignerStyle,
                eye_line: np.ndarray, other_palm: np.ndarray | None, rng: np.random.Generator,
                hand_size: float) -> _HandTrack:
    """One hand's parameters per frame, in the right-hand world (mirror the input for a left hand).

    ``actions`` has one entry per timeline segment (rest segments and idle hands are None).
    ``eye_line`` (T, 2) is where the face anchors are measured from; ``other_palm`` (T, 3) the
    other hand's palm centre (for the ``other_hand`` location), in this hand's world.
    """
    shapes = {}
    jit = style.hand_jitter_deg
    for i, act in enumerate(actions):
        if act is not None:
            flex, ang = handshape_params(source.handshape(act.handshape))
            flex = np.clip(flex + rng.normal(0, jit, flex.shape), 0, 110)
            ang = ang + rng.normal(0, jit / 2, ang.shape)
            anchor_jit = rng.normal(0, style.anchor_jitter, 3)
            shapes[i] = (flex, ang, anchor_jit)
    def anchor(s: int, frames: np.ndarray) -> np.ndarray:
        act = actions[s]
        n = len(frames)
        if act is None:
            return np.tile(np.array([-0.75, 2.6, 0.5]) * [1, 1, 1], (n, 1))
        jit3 = shapes[s][2]
        if act.location in _BODY_ANCHOR:
            base = np.tile(np.array(_BODY_ANCHOR[act.location]), (n, 1))
        elif act.location in _FACE_ANCHOR:
            fx, fy, fz = _FACE_ANCHOR[act.location]
            fu = FACE_UNIT * style.face
            base = np.c_[eye_line[frames, 0] + fx * fu, eye_line[frames, 1] + fy * fu, np.full(n, fz)]
        else:  # other_hand: on top of the other palm
            other = other_palm[frames] if other_palm is not None else np.tile(_BODY_ANCHOR["neutral"], (n, 1))
            base = other + np.array([0.0, -0.2, 0.1])
        return base + jit3

    def movement_offset(act: HandAction, u: np.ndarray) -> np.ndarray:
        amp = 0.55 * act.size
        d = np.array(_DIR[act.direction], dtype=float)
        if np.linalg.norm(d) > 0:
            d = d / np.linalg.norm(d)
        r = act.repeat
        m = act.movement
        if m == "tap":
            dt = d if np.linalg.norm(d) > 0 else np.array([0.0, 0.0, -1.0])
            return (amp * 0.25 * (1 - np.cos(2 * np.pi * r * u)) / 2)[:, None] * dt
        if m == "straight":
            prog = u * u * (3 - 2 * u) if r == 1 else (1 - np.cos(2 * np.pi * r * u)) / 2
            return (amp * prog)[:, None] * d
        if m == "arc":
            uu = np.where(u >= 1, 1.0, (r * u) % 1.0)
            perp = np.array([0.0, -1.0, 0.0]) if abs(d[1]) < 0.7 else np.array([1.0, 0.0, 0.0])
            return (amp / r * uu)[:, None] * d + (amp * 0.3 * np.sin(np.pi * uu))[:, None] * perp
        if m == "circle":
            ang = 2 * np.pi * r * u
            c, s_ = 0.4 * amp * (np.cos(ang) - 1), 0.4 * amp * np.sin(ang)
            if act.direction in ("forward", "back"):
                return np.c_[np.zeros_like(u), s_, c]
            return np.c_[c, s_, np.zeros_like(u)]
        if m == "shake":
            return np.c_[amp * 0.12 * np.sin(2 * np.pi * 3 * r * u), np.zeros_like(u), np.zeros_like(u)]
        return np.zeros((len(u), 3))  # none, wiggle, twist, open_close: the hand stays put

    def pos_fn(s, u, frames):
        act = actions[s]
        base = anchor(s, frames)
        if act is None:
            return base
        return base + movement_offset(act, u)

    def orient_fn(s, u, frames):
        act = actions[s]
        if act is None:
            f, n_ = _REST_F, _REST_N
        else:
            f, n_ = _PALM[act.palm]
        out = np.empty((len(u), 2, 3))
        out[:, 0] = f
        out[:, 1] = n_
        if act is not None and act.movement in ("twist", "shake"):
            amp = np.deg2rad(70.0 if act.movement == "twist" else 15.0)
            sign = -1.0 if act.direction in ("in", "left", "back") else 1.0
            if act.movement == "twist":
                theta = sign * amp * (1 - np.cos(2 * np.pi * act.repeat * u)) / 2
            else:
                theta = amp * np.sin(2 * np.pi * 3 * act.repeat * u)
            fu = _unit(out[:, 0])
            out[:, 1] = _rotate_about(out[:, 1], fu, theta)
        return out

    def flex_fn(s, u, frames):
        act = actions[s]
        if act is None:
            return np.tile(_REST_FLEX, (len(u), 1, 1))
        flex = np.tile(shapes[s][0], (len(u), 1, 1))
        if act.movement == "wiggle":
            phase = np.arange(5) * 0.9
            flex = flex + 25.0 * np.sin(2 * np.pi * 3 * act.repeat * u[:, None] + phase)[..., None] * [1, 0.6, 0.3]
        elif act.movement == "open_close":
            k = ((1 - np.cos(2 * np.pi * act.repeat * u)) / 2)[:, None, None]
            flex = (1 - k) * flex + k * CLOSED_FLEX
        return np.clip(flex, -10, 115)

    def angle_fn(s, u, frames):
        if actions[s] is None:
            return np.tile(_REST_ANGLES, (len(u), 1))
        return np.tile(shapes[s][1], (len(u), 1))

    palm = blend(tl, pos_fn, (3,))
    orient = blend(tl, orient_fn, (2, 3))
    f, nrm = _orthonormal(orient[:, 0], orient[:, 1])
    flex = blend(tl, flex_fn, (5, 3))
    angles = blend(tl, angle_fn, (5,))
    # Weak perspective: a hand closer to the camera looks bigger.
    size = HAND_LENGTH * hand_size * (1 + 0.12 * np.clip(palm[:, 2] - 0.5, -1, 1.5))
    return _HandTrack(palm=palm, f=f, n=nrm, flex=flex, angles=angles, size=size)


def _two_link_elbow(shoulder: np.ndarray, wrist: np.ndarray, l1: float, l2: float) -> np.ndarray:
    """Elbow positions (T, 3) for a right arm by two-link inverse kinematics (elbow down and out)."""
    d = wrist - shoulder
    dist = np.linalg.norm(d, axis=-1, keepdims=True)
    dist_c = np.clip(dist, abs(l1 - l2) + 1e-3, l1 + l2 - 1e-3)
    along = (l1 ** 2 - l2 ** 2 + dist_c ** 2) / (2 * dist_c)
    height = np.sqrt(np.maximum(l1 ** 2 - along ** 2, 0))
    dirn = d / np.maximum(dist, 1e-6)
    pole = np.array([-0.4, 1.0, 0.7])  # elbows hang down, out and a little forward
    perp = pole - np.sum(pole * dirn, axis=-1, keepdims=True) * dirn
    perp = perp / np.maximum(np.linalg.norm(perp, axis=-1, keepdims=True), 1e-6)
    return shoulder + along * dirn + height * perp


# ---------------------------------------------------------------------------------------------
# One clip


def render_clip(source: SignSource, gloss: str, style: SignerStyle, num_frames: int,
                rng: np.random.Generator) -> np.ndarray:
    """One clip of ``gloss`` by ``style``'s signer: (T, 133, 3) image coordinates and scores."""
    segments = source.expanded_segments(gloss)
    tl = make_timeline(num_frames, segments, rng)
    T = num_frames
    seg_all: list[Segment | None] = [None] + list(segments) + [None]

    # --- non-manual per frame -------------------------------------------------------------
    def onehot(values: tuple[str, ...], attr: str):
        def fn(s, u, frames):
            out = np.zeros((len(u), len(values)))
            seg = seg_all[s]
            if seg is not None:
                out[:, values.index(getattr(seg, attr))] = _envelope(u)
            return out
        return fn

    mouth_w = blend(tl, onehot(MOUTHS, "mouth"), (len(MOUTHS),))
    face_w = blend(tl, onehot(FACES, "face"), (len(FACES),))

    def head_fn(s, u, frames):
        out = np.zeros((len(u), 3))  # dx, dy (body units), roll (rad)
        seg = seg_all[s]
        if seg is None or seg.head == "none":
            return out
        if seg.head == "nod":
            out[:, 1] = 0.12 * np.sin(2 * np.pi * 2 * u)
        elif seg.head == "shake":
            out[:, 0] = 0.12 * np.sin(2 * np.pi * 2 * u)
        elif seg.head == "tilt":
            out[:, 2] = np.deg2rad(12.0) * _envelope(u)
        return out

    def body_fn(s, u, frames):
        out = np.zeros((len(u), 4))  # lean_forward, lean_back, shrug, turn weights
        seg = seg_all[s]
        if seg is not None and seg.body != "none":
            out[:, ("lean_forward", "lean_back", "shrug", "turn").index(seg.body)] = _envelope(u)
        return out

    head = blend(tl, head_fn, (3,))
    body = blend(tl, body_fn, (4,))

    # --- face ---------------------------------------------------------------------------------
    fu = FACE_UNIT * style.face
    face_local = FACE_TEMPLATE[None] + np.einsum("tk,kpc->tpc", mouth_w, MOUTH_DISP) + np.einsum(
        "tk,kpc->tpc", face_w, FACE_DISP)
    eye_line = np.c_[head[:, 0], -style.neck + head[:, 1]]  # (T, 2)
    roll = head[:, 2]
    cr, sr = np.cos(roll)[:, None], np.sin(roll)[:, None]
    fx, fy = face_local[..., 0] * fu, face_local[..., 1] * fu
    face_xy = np.stack([cr * fx - sr * fy, sr * fx + cr * fy], axis=-1) + eye_line[:, None, :]

    pts = np.zeros((T, NUM_WHOLEBODY, 3))  # x, y, z in body units
    pts[:, FACE0:FACE0 + 68, :2] = face_xy
    pts[:, FACE0:FACE0 + 68, 2] = 0.45
    pts[:, 0, :2] = face_xy[:, 30]
    pts[:, 1, :2] = face_xy[:, 42:48].mean(axis=1)  # signer's left eye
    pts[:, 2, :2] = face_xy[:, 36:42].mean(axis=1)
    ear_off = 1.15 * fu
    ear = np.stack([cr[:, 0] * ear_off, sr[:, 0] * ear_off], axis=-1)
    pts[:, 3, :2] = eye_line + ear + [0, 0.05]
    pts[:, 4, :2] = eye_line - ear + [0, 0.05]
    pts[:, 0:5, 2] = 0.45
    pts[:, 5] = (1, 0, 0)
    pts[:, 6] = (-1, 0, 0)
    pts[:, 11] = (style.hips, 2.9, 0)
    pts[:, 12] = (-style.hips, 2.9, 0)
    pts[:, 13] = (style.hips + 0.05, 4.3, 0.3)
    pts[:, 14] = (-style.hips - 0.05, 4.3, 0.3)
    pts[:, 15:23] = (0, 5.6, 0)  # ankles, feet: out of frame (marked missing below)

    # --- hands ----------------------------------------------------------------------------------
    right_actions = [None] + [s.right for s in segments] + [None]
    left_actions = [None] + [(_mirror_action(s.left) if s.left else None) for s in segments] + [None]
    mirror = np.array([-1.0, 1.0, 1.0])
    eye_mirror = eye_line * mirror[:2]
    hand_rng_state = rng.bit_generator.state
    r_track = _hand_track(tl, right_actions, source, style, eye_line, None, rng, style.hand)
    l_track = _hand_track(tl, left_actions, source, style, eye_mirror, r_track.palm * mirror, rng, style.hand)
    uses_other_right = any(a is not None and a.location == "other_hand" for a in right_actions)
    if uses_other_right:
        # Re-run the right hand with the same random draws, now placed on the left palm.
        rng.bit_generator.state = hand_rng_state
        r_track = _hand_track(tl, right_actions, source, style, eye_line, l_track.palm * mirror, rng, style.hand)
        _hand_track(tl, left_actions, source, style, eye_mirror, r_track.palm * mirror, rng, style.hand)

    arm1, arm2 = 1.45 * style.arm, 1.3 * style.arm
    for track, hand0, sh, el, wr, flip in ((r_track, RIGHT_HAND0, 6, 8, 10, False),
                                           (l_track, LEFT_HAND0, 5, 7, 9, True)):
        wrist = track.palm - 0.25 * track.size[:, None] * track.f  # palm centre -> wrist
        hand = hand_points(track.flex, track.angles, track.f, track.n, track.size) + wrist[:, None, :]
        elbow = _two_link_elbow(np.array([-1.0, 0.0, 0.0]), wrist, arm1, arm2)
        if flip:
            hand, elbow, wrist = hand * mirror, elbow * mirror, wrist * mirror
        pts[:, hand0:hand0 + 21] = hand
        pts[:, el] = elbow
        pts[:, wr] = wrist

    # --- body moves: whole upper body (everything but hips and legs) ----------------------------
    upper = np.r_[0:11, 23:133]
    lf, lb, shrug, turn = body.T
    scale = 1 + 0.07 * lf - 0.05 * lb
    pivot = np.array([0.0, 2.9])
    xy = pts[:, upper, :2]
    xy = (xy - pivot) * scale[:, None, None] + pivot
    xy[..., 1] += (0.15 * lf - 0.1 * lb)[:, None]
    shrug_pts = [5, 6]
    xy[:, [upper.tolist().index(p) for p in shrug_pts], 1] -= 0.2 * shrug[:, None]
    xy[..., 1] += np.where(np.isin(upper, shrug_pts), 0, 0.05 * shrug[:, None])
    xy[..., 0] = xy[..., 0] * (1 - 0.12 * turn[:, None]) + 0.2 * turn[:, None]
    pts[:, upper, :2] = xy

    # --- image, noise, scores, missing points -------------------------------------------------
    scores = np.empty((T, NUM_WHOLEBODY))
    scores[:] = rng.uniform(0.85, 0.97)
    scores[:, FACE0:FACE0 + 68] = rng.uniform(0.75, 0.92)
    scores[:, LEFT_HAND0:] = style.hand_score
    scores += rng.normal(0, 0.04, scores.shape)
    scores[:, 11:13] *= 0.7
    scores[:, 13:15] = rng.uniform(0.05, 0.3, (T, 2))
    noise_sd = np.full(NUM_WHOLEBODY, 0.015)
    noise_sd[FACE0:FACE0 + 68] = 0.008
    noise_sd[LEFT_HAND0:] = 0.02
    xy = pts[..., :2] + rng.normal(0, 1, (T, NUM_WHOLEBODY, 2)) * noise_sd[None, :, None] * style.noise
    ang = np.deg2rad(rng.uniform(-3, 3))
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    ppu = style.px_per_unit * rng.uniform(0.95, 1.05)
    # Image x grows to the viewer's right, which is the signer's left: no x flip is needed.
    img = (xy @ rot.T) * ppu + np.array(style.centre) + rng.uniform(-10, 10, 2)
    out = np.concatenate([img, np.clip(scores, 0.0, 1.0)[..., None]], axis=-1)
    missing = np.zeros((T, NUM_WHOLEBODY), dtype=bool)
    missing[:, 15:23] = True
    missing |= rng.random((T, NUM_WHOLEBODY)) < style.drop_rate
    if rng.random() < 0.5:  # a short whole-hand detection dropout
        h0 = LEFT_HAND0 if rng.random() < 0.5 else RIGHT_HAND0
        length = int(rng.integers(2, 7))
        start = int(rng.integers(0, max(1, T - length)))
        missing[start:start + length, h0:h0 + 21] = True
    outside = (img < 0).any(axis=-1) | (img >= IMG_SIZE).any(axis=-1)
    missing |= outside
    out[missing] = 0.0
    return out.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Data set


def is_synthetic_dataset(path: Path | str) -> bool:
    """True for a pickle this module wrote: its first key is the generator tag. Only the first
    opcodes are read, so a large real data set is recognised as foreign without loading it."""
    previous = None
    try:
        with open(path, "rb") as fh:
            for n, (_, arg, _) in enumerate(pickletools.genops(fh)):
                if previous == GENERATOR_KEY and arg == GENERATOR:
                    return True
                if n > 16:
                    return False
                previous = arg if isinstance(arg, str) else previous
    except (OSError, ValueError, EOFError):
        return False
    return False


def check_dataset_target(out_path: Path | str) -> None:
    """Refuse an ``out_path`` holding a folder or any file but an earlier synthetic data set."""
    check_replaceable(out_path, is_synthetic_dataset, DATASET_WHAT, folder=False)


def write_synthetic_dataset(
    out_path: Path | str,
    source: Path | str | SignSource = DEFAULT_SOURCE,
    samples_per_class: int = 30,
    frames: int = 48,
    signers: int = 8,
    test_signers: int = 2,
    seed: int = 0,
    glosses: list[str] | None = None,
    label_mode: Literal["class_id", "index"] = "class_id",
) -> Path:
    """Render a signer-split synthetic data set and write it as a pyskl pickle at ``out_path``.

    Every sign of the source (or only ``glosses``) gets ``samples_per_class`` clips spread over
    ``signers`` signers; the last ``test_signers`` signers form the ``test`` split, the others
    ``train``. ``frames`` is the typical clip length; each clip's length varies with signer and
    clip speed. Labels are the signs' ``class_id`` (as in the description artifacts and the
    vocabulary) or, with ``label_mode="index"``, 0..N-1 in source order. Same arguments, same file.
    """
    if not 0 < test_signers < signers:
        raise ValueError(f"need 0 < test_signers < signers, got {test_signers} of {signers}")
    if samples_per_class < signers:
        # Clips are dealt to signers in turn; with fewer clips than signers the test signers
        # (the last ones) would perform nothing and the test split would be empty.
        raise ValueError(f"samples_per_class ({samples_per_class}) must be at least signers ({signers})")
    if frames < 4:
        raise ValueError(f"frames must be >= 4, got {frames}")
    check_dataset_target(out_path)  # before minutes of rendering
    src = source if isinstance(source, SignSource) else load_sign_source(source)
    signs = src.signs if glosses is None else [src.sign(g) for g in glosses]
    styles = [sample_signer(i, np.random.default_rng([seed, 1, i])) for i in range(signers)]
    test_ids = set(range(signers - test_signers, signers))
    annotations: list[dict] = []
    split: dict[str, list[str]] = {"train": [], "test": []}
    classes = []
    for k, sign in enumerate(signs):
        label = sign.class_id if label_mode == "class_id" else k
        classes.append({"label": int(label), "class_id": int(sign.class_id), "gloss": sign.gloss})
        for rep in range(samples_per_class):
            style = styles[rep % signers]
            rng = np.random.default_rng([seed, 2, sign.class_id, rep])
            length = max(8, int(round(frames * style.speed * rng.uniform(0.85, 1.15))))
            clip = render_clip(src, sign.gloss, style, length, rng)
            frame_dir = f"{sign.class_id:03d}_{sign.gloss}_s{style.signer_id:02d}_r{rep:03d}"
            annotations.append({
                "frame_dir": frame_dir,
                "label": int(label),
                "keypoint": np.ascontiguousarray(clip[None, ..., :2]),
                "keypoint_score": np.ascontiguousarray(clip[None, ..., 2]),
                "total_frames": int(length),
                "img_shape": (IMG_SIZE, IMG_SIZE),
                "original_shape": (IMG_SIZE, IMG_SIZE),
                "signer": int(style.signer_id),
            })
            split["test" if style.signer_id in test_ids else "train"].append(frame_dir)
    check_dataset_target(out_path)  # again: the path may have been taken while rendering
    path = write_pyskl(out_path, annotations, split, extra={GENERATOR_KEY: GENERATOR, "classes": classes})
    log.info("wrote %d synthetic clips of %d signs to %s", len(annotations), len(signs), path)
    return path
