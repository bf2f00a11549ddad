"""The hand model of the synthetic signer: chart handshapes as finger kinematics, palm facings,
movements and locations as per-frame hand tracks, and the arm that reaches them.

A 21-point hand (wrist, thumb CMC-MCP-IP-tip, four fingers MCP-PIP-DIP-tip) whose joints flex
toward the palm normal by angles per chart finger state and fan out when the chart says
``spread``. Everything is computed for a right hand; a left hand is computed as a right hand in
the mirrored world (``mirror_action``) and mirrored back by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from demo.sign_source import HandAction, Handshape, SignSource
from demo.synthetic.face import FACE_UNIT
from demo.synthetic.timeline import Timeline, blend

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
_REST_ANCHOR = (-0.75, 2.6, 0.5)  # palm centre of a hand hanging at rest, body units

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
# Geometry


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


def two_link_elbow(shoulder: np.ndarray, wrist: np.ndarray, l1: float, l2: float) -> np.ndarray:
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


def mirror_action(act: HandAction) -> HandAction:
    """The left hand's action as a right hand would do it in the mirrored world."""
    return act.model_copy(update={
        "palm": _MIRROR_WORD.get(act.palm, act.palm),
        "direction": _MIRROR_WORD.get(act.direction, act.direction),
    })


# ---------------------------------------------------------------------------------------------
# Per-segment quantities of one hand


@dataclass(frozen=True)
class HandJitter:
    """One hand action's handshape as this clip performs it: the chart's flexions and in-plane
    angles with per-clip noise, and a small offset of its anchor."""

    flex: np.ndarray  # (5, 3) degrees
    angles: np.ndarray  # (5,) degrees
    anchor: np.ndarray  # (3,) body units


def draw_hand_jitter(actions: list[HandAction | None], source: SignSource, jitter_deg: float,
                     anchor_jitter: float, rng: np.random.Generator) -> dict[int, HandJitter]:
    """Per active segment, this clip's handshape and anchor jitter (the only random draws of a hand)."""
    shapes = {}
    for i, act in enumerate(actions):
        if act is not None:
            flex, ang = handshape_params(source.handshape(act.handshape))
            flex = np.clip(flex + rng.normal(0, jitter_deg, flex.shape), 0, 110)
            ang = ang + rng.normal(0, jitter_deg / 2, ang.shape)
            shapes[i] = HandJitter(flex=flex, angles=ang, anchor=rng.normal(0, anchor_jitter, 3))
    return shapes


def _anchor(act: HandAction | None, jitter: HandJitter | None, frames: np.ndarray, eye_line: np.ndarray,
            other_palm: np.ndarray | None, face_scale: float) -> np.ndarray:
    """Palm centre (n, 3) the action is placed at before its movement."""
    n = len(frames)
    if act is None:
        return np.tile(np.array(_REST_ANCHOR), (n, 1))
    if act.location in _BODY_ANCHOR:
        base = np.tile(np.array(_BODY_ANCHOR[act.location]), (n, 1))
    elif act.location in _FACE_ANCHOR:
        fx, fy, fz = _FACE_ANCHOR[act.location]
        fu = FACE_UNIT * face_scale
        base = np.c_[eye_line[frames, 0] + fx * fu, eye_line[frames, 1] + fy * fu, np.full(n, fz)]
    else:  # other_hand: on top of the other palm
        other = other_palm[frames] if other_palm is not None else np.tile(_BODY_ANCHOR["neutral"], (n, 1))
        base = other + np.array([0.0, -0.2, 0.1])
    return base + jitter.anchor


def movement_offset(act: HandAction, u: np.ndarray) -> np.ndarray:
    """Offset (n, 3) of the palm centre from its anchor at phases ``u`` of the movement."""
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


def _orientation(act: HandAction | None, u: np.ndarray) -> np.ndarray:
    """(n, 2, 3): finger direction and palm normal (not yet orthonormal), twisted or shaken."""
    f, n_ = (_REST_F, _REST_N) if act is None else _PALM[act.palm]
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


def _flexion(act: HandAction | None, jitter: HandJitter | None, u: np.ndarray) -> np.ndarray:
    """(n, 5, 3) joint flexions in degrees: the handshape, wiggling or opening and closing."""
    if act is None:
        return np.tile(_REST_FLEX, (len(u), 1, 1))
    flex = np.tile(jitter.flex, (len(u), 1, 1))
    if act.movement == "wiggle":
        phase = np.arange(5) * 0.9
        flex = flex + 25.0 * np.sin(2 * np.pi * 3 * act.repeat * u[:, None] + phase)[..., None] * [1, 0.6, 0.3]
    elif act.movement == "open_close":
        k = ((1 - np.cos(2 * np.pi * act.repeat * u)) / 2)[:, None, None]
        flex = (1 - k) * flex + k * CLOSED_FLEX
    return np.clip(flex, -10, 115)


# ---------------------------------------------------------------------------------------------
# Tracks


@dataclass
class HandTrack:
    palm: np.ndarray  # (T, 3) palm centre
    f: np.ndarray  # (T, 3) finger direction, unit
    n: np.ndarray  # (T, 3) palm normal, unit and perpendicular to f
    flex: np.ndarray  # (T, 5, 3)
    angles: np.ndarray  # (T, 5)
    size: np.ndarray  # (T,)


def hand_track(tl: Timeline, actions: list[HandAction | None], shapes: dict[int, HandJitter],
               eye_line: np.ndarray, other_palm: np.ndarray | None, face_scale: float,
               hand_size: float) -> HandTrack:
    """One hand's parameters per frame, in the right-hand world (mirror the input for a left hand).

    ``actions`` has one entry per timeline segment (rest segments and idle hands are None) and
    ``shapes`` their jitter (:func:`draw_hand_jitter`). ``eye_line`` (T, 2) is where the face
    anchors are measured from; ``other_palm`` (T, 3) the other hand's palm centre (for the
    ``other_hand`` location), in this hand's world. Draws no random numbers.
    """
    def pos_fn(s, u, frames):
        act = actions[s]
        base = _anchor(act, shapes.get(s), frames, eye_line, other_palm, face_scale)
        return base if act is None else base + movement_offset(act, u)

    def angle_fn(s, u, frames):
        if actions[s] is None:
            return np.tile(_REST_ANGLES, (len(u), 1))
        return np.tile(shapes[s].angles, (len(u), 1))

    palm = blend(tl, pos_fn, (3,))
    orient = blend(tl, lambda s, u, frames: _orientation(actions[s], u), (2, 3))
    f, nrm = _orthonormal(orient[:, 0], orient[:, 1])
    flex = blend(tl, lambda s, u, frames: _flexion(actions[s], shapes.get(s), u), (5, 3))
    angles = blend(tl, angle_fn, (5,))
    # Weak perspective: a hand closer to the camera looks bigger.
    size = HAND_LENGTH * hand_size * (1 + 0.12 * np.clip(palm[:, 2] - 0.5, -1, 1.5))
    return HandTrack(palm=palm, f=f, n=nrm, flex=flex, angles=angles, size=size)
