"""One synthetic clip: a signer's style, the timeline of a sign's segments, the face, hands,
arms and body per frame, then the camera (image coordinates, noise, scores, missing points).

All lengths before the camera are in *body units*: half the shoulder width is 1; x to the
signer's left, y down, z toward the camera; the image is an orthographic view of that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import numpy as np

from demo.sign_source import BodyMove, HandAction, Segment, SignSource
from demo.synthetic.face import FACE_UNIT, FACES, MOUTHS, face_points
from demo.synthetic.hands import HandTrack, draw_hand_jitter, hand_points, hand_track, mirror_action, two_link_elbow
from demo.synthetic.timeline import Timeline, blend, envelope, make_timeline
from mc.keypoints import FACE0, LEFT_HAND0, NUM_WHOLEBODY, RIGHT_HAND0

IMG_SIZE = 512
_MIRROR = np.array([-1.0, 1.0, 1.0])  # the right-hand world <-> the left-hand world
_BODY_MOVES = get_args(BodyMove)[1:]  # all but "none", in the order _move_upper_body unpacks them

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
# One clip


def render_clip(source: SignSource, gloss: str, style: SignerStyle, num_frames: int,
                rng: np.random.Generator) -> np.ndarray:
    """One clip of ``gloss`` by ``style``'s signer: (T, 133, 3) image coordinates and scores.

    The random draws happen in a fixed order (timeline, hand jitter, camera), so the same ``rng``
    state gives the same clip.
    """
    segments = source.expanded_segments(gloss)
    tl = make_timeline(num_frames, segments, rng)
    seg_all: list[Segment | None] = [None] + list(segments) + [None]
    mouth_w, face_w, head, body = _nonmanual_tracks(tl, seg_all)
    face_xy, eye_line = face_points(mouth_w, face_w, head, style.neck, style.face)

    pts = np.zeros((num_frames, NUM_WHOLEBODY, 3))  # x, y, z in body units
    _place_head_and_trunk(pts, face_xy, eye_line, head[:, 2], style)
    r_track, l_track = _hand_tracks(tl, segments, source, style, eye_line, rng)
    _place_arms_and_hands(pts, r_track, l_track, style)
    _move_upper_body(pts, body)
    return _camera(pts, style, rng)


def _nonmanual_tracks(tl: Timeline, seg_all: list[Segment | None]):
    """Per frame: mouth-shape and face-state weights, head (dx, dy, roll) and body-move weights."""
    def onehot(values: tuple[str, ...], attr: str):
        def fn(s, u, frames):
            out = np.zeros((len(u), len(values)))
            seg = seg_all[s]
            if seg is not None:
                out[:, values.index(getattr(seg, attr))] = envelope(u)
            return out
        return fn

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
            out[:, 2] = np.deg2rad(12.0) * envelope(u)
        return out

    def body_fn(s, u, frames):
        out = np.zeros((len(u), len(_BODY_MOVES)))
        seg = seg_all[s]
        if seg is not None and seg.body != "none":
            out[:, _BODY_MOVES.index(seg.body)] = envelope(u)
        return out

    mouth_w = blend(tl, onehot(MOUTHS, "mouth"), (len(MOUTHS),))
    face_w = blend(tl, onehot(FACES, "face"), (len(FACES),))
    head = blend(tl, head_fn, (3,))
    body = blend(tl, body_fn, (len(_BODY_MOVES),))
    return mouth_w, face_w, head, body


def _place_head_and_trunk(pts: np.ndarray, face_xy: np.ndarray, eye_line: np.ndarray, roll: np.ndarray,
                          style: SignerStyle) -> None:
    """Face points, the five COCO head points, shoulders, hips and legs (in place)."""
    pts[:, FACE0:FACE0 + 68, :2] = face_xy
    pts[:, FACE0:FACE0 + 68, 2] = 0.45
    pts[:, 0, :2] = face_xy[:, 30]
    pts[:, 1, :2] = face_xy[:, 42:48].mean(axis=1)  # signer's left eye
    pts[:, 2, :2] = face_xy[:, 36:42].mean(axis=1)
    ear_off = 1.15 * (FACE_UNIT * style.face)
    ear = np.stack([np.cos(roll) * ear_off, np.sin(roll) * ear_off], axis=-1)
    pts[:, 3, :2] = eye_line + ear + [0, 0.05]
    pts[:, 4, :2] = eye_line - ear + [0, 0.05]
    pts[:, 0:5, 2] = 0.45
    pts[:, 5] = (1, 0, 0)
    pts[:, 6] = (-1, 0, 0)
    pts[:, 11] = (style.hips, 2.9, 0)
    pts[:, 12] = (-style.hips, 2.9, 0)
    pts[:, 13] = (style.hips + 0.05, 4.3, 0.3)
    pts[:, 14] = (-style.hips - 0.05, 4.3, 0.3)
    pts[:, 15:23] = (0, 5.6, 0)  # ankles, feet: out of frame (marked missing by the camera)


def _hand_tracks(tl: Timeline, segments: list[Segment], source: SignSource, style: SignerStyle,
                 eye_line: np.ndarray, rng: np.random.Generator) -> tuple[HandTrack, HandTrack]:
    """Both hands' tracks, the left one in the mirrored (right-hand) world.

    A hand at the ``other_hand`` location rests on the other palm, so the tracks depend on each
    other: the left hand is placed after the right one, and a right hand on the left palm is
    placed again once the left palm is known. All random draws (right hand, then left) happen
    before any placement, so placing a hand twice draws nothing twice.
    """
    right: list[HandAction | None] = [None] + [s.right for s in segments] + [None]
    left: list[HandAction | None] = [None] + [(mirror_action(s.left) if s.left else None) for s in segments] + [None]
    r_shapes = draw_hand_jitter(right, source, style.hand_jitter_deg, style.anchor_jitter, rng)
    l_shapes = draw_hand_jitter(left, source, style.hand_jitter_deg, style.anchor_jitter, rng)
    eye_mirror = eye_line * _MIRROR[:2]
    r_track = hand_track(tl, right, r_shapes, eye_line, None, style.face, style.hand)
    l_track = hand_track(tl, left, l_shapes, eye_mirror, r_track.palm * _MIRROR, style.face, style.hand)
    if any(a is not None and a.location == "other_hand" for a in right):
        r_track = hand_track(tl, right, r_shapes, eye_line, l_track.palm * _MIRROR, style.face, style.hand)
    return r_track, l_track


def _place_arms_and_hands(pts: np.ndarray, r_track: HandTrack, l_track: HandTrack, style: SignerStyle) -> None:
    """Hand points, wrists and elbows (two-link IK from the shoulders) of both arms (in place)."""
    arm1, arm2 = 1.45 * style.arm, 1.3 * style.arm
    for track, hand0, el, wr, flip in ((r_track, RIGHT_HAND0, 8, 10, False), (l_track, LEFT_HAND0, 7, 9, True)):
        wrist = track.palm - 0.25 * track.size[:, None] * track.f  # palm centre -> wrist
        hand = hand_points(track.flex, track.angles, track.f, track.n, track.size) + wrist[:, None, :]
        elbow = two_link_elbow(np.array([-1.0, 0.0, 0.0]), wrist, arm1, arm2)
        if flip:
            hand, elbow, wrist = hand * _MIRROR, elbow * _MIRROR, wrist * _MIRROR
        pts[:, hand0:hand0 + 21] = hand
        pts[:, el] = elbow
        pts[:, wr] = wrist


def _move_upper_body(pts: np.ndarray, body: np.ndarray) -> None:
    """Leans, shrugs and turns move the whole upper body (everything but hips and legs), in place."""
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


def _camera(pts: np.ndarray, style: SignerStyle, rng: np.random.Generator) -> np.ndarray:
    """Body units → image pixels with detector-like noise and scores; missing points get score 0
    and coordinates 0: ankles and feet, random drops, a short whole-hand dropout, off-image points."""
    T = len(pts)
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
