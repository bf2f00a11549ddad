"""pose-format (``.pose``) files read as the project's (T, 133, 3) COCO-WholeBody clips.

Many sign-language data sets and tools store poses in the binary ``.pose`` format of the
``pose-format`` package. :func:`read_pose_file` turns one into what the ``.npy`` reader gives for
one clip: float32 (T, 133, 3) with channels (x, y, score), points in the COCO-WholeBody order of
:mod:`mc.keypoints`. Two header layouts are accepted:

**COCO-WholeBody-133**, taken as it is:

* one component of exactly 133 points (any name), in COCO-WholeBody order; or
* the four components pose-format's ``cocowholebody_components()`` writes (what its MMPose
  whole-body estimator and COCO-133 converters produce): ``BODY`` 23 (COCO body 17, then the six
  foot points), ``FACE`` 68 (iBUG-300W), ``LEFT_HAND`` 21 and ``RIGHT_HAND`` 21, each with exactly
  that many points, in any component order; the same names with the suffix ``_133`` (AlphaPose-133)
  too. Other components beside them are ignored.

**MediaPipe Holistic** (pose-format's ``holistic_components()``): ``POSE_LANDMARKS`` (required),
``FACE_LANDMARKS``, ``LEFT_HAND_LANDMARKS``, ``RIGHT_HAND_LANDMARKS`` (each optional: absent →
those slots scored 0); ``POSE_WORLD_LANDMARKS`` (metric 3-D) is ignored. Points are found by
their *names* (MediaPipe's landmark names; the face mesh's points are named by their mesh index),
so files whose face was reduced to a subset of the mesh (pose-format's ``get_components``, e.g.
the face contours) still map every point they kept. The correspondence:

* body: nose, eyes, ears, shoulders, elbows, wrists, hips, knees, ankles → COCO body 0-16 (the
  MediaPipe eye *centres* ``LEFT_EYE``/``RIGHT_EYE``; the inner/outer eye corners, mouth corners
  and the body's coarse finger points have no COCO body slot);
* feet: ``*_HEEL`` → COCO heel, ``*_FOOT_INDEX`` (the tip of the foot) → COCO big toe; COCO's
  small toes have no source;
* hands: one to one (MediaPipe's 21 hand landmarks are in COCO-WholeBody's hand order: wrist,
  then thumb, index, middle, ring, little finger, base to tip). Holistic's
  ``LEFT_HAND_LANDMARKS`` is the *signer's* left hand — the holistic graph crops it around the
  pose's ``LEFT_WRIST``/``LEFT_PINKY``/``LEFT_INDEX`` (``hand_landmarks_left_and_right_cpu.pbtxt``)
  — which is COCO's convention too, so left goes to left (91-111) and right to right (112-132);
* face: :data:`IBUG_FROM_MESH`, 468-point mesh → the 68 iBUG landmarks (the 478-point mesh with
  irises shares the first 468 points).

Scores: the pose body's confidence (MediaPipe's visibility for the body, 1 for a detected face
or hand and 0 for a missing one); a masked or non-finite point and a slot with no source get
score 0 and coordinates (0, 0), the project's "missing" (see :mod:`mc.transforms`). Coordinates
are kept as the file stores them: pose-format writes pixels of the header's width × height (the
same as pyskl/COCO); the item pipeline normalises by the shoulders, so the unit does not matter.
With several people in a file the most confidently tracked one is kept (as for pyskl files).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from gsp.errors import GspError

NUM_WHOLEBODY = 133  # mc.keypoints.NUM_WHOLEBODY; kept literal so this module needs nothing of torch


class PoseFileError(GspError, ValueError):
    """A ``.pose`` file that cannot be read as a clip; the message names the file."""


#: COCO-WholeBody components by name → (first COCO index, point count).
COCO_COMPONENTS: dict[str, tuple[int, int]] = {
    "BODY": (0, 23), "FACE": (23, 68), "LEFT_HAND": (91, 21), "RIGHT_HAND": (112, 21)}

#: MediaPipe Pose landmark name → COCO-WholeBody index (body 0-16, feet 17-22).
HOLISTIC_BODY: dict[str, int] = {
    "NOSE": 0, "LEFT_EYE": 1, "RIGHT_EYE": 2, "LEFT_EAR": 3, "RIGHT_EAR": 4,
    "LEFT_SHOULDER": 5, "RIGHT_SHOULDER": 6, "LEFT_ELBOW": 7, "RIGHT_ELBOW": 8,
    "LEFT_WRIST": 9, "RIGHT_WRIST": 10, "LEFT_HIP": 11, "RIGHT_HIP": 12,
    "LEFT_KNEE": 13, "RIGHT_KNEE": 14, "LEFT_ANKLE": 15, "RIGHT_ANKLE": 16,
    "LEFT_FOOT_INDEX": 17, "LEFT_HEEL": 19, "RIGHT_FOOT_INDEX": 20, "RIGHT_HEEL": 22,
}

#: MediaPipe's 21 hand landmark names, in order (the same order as a COCO-WholeBody hand).
HOLISTIC_HAND_POINTS: tuple[str, ...] = (
    "WRIST", "THUMB_CMC", "THUMB_MCP", "THUMB_IP", "THUMB_TIP",
    *(f"{finger}_{joint}" for finger in ("INDEX_FINGER", "MIDDLE_FINGER", "RING_FINGER", "PINKY")
      for joint in ("MCP", "PIP", "DIP", "TIP")),
)
HOLISTIC_HANDS: dict[str, int] = {"LEFT_HAND_LANDMARKS": 91, "RIGHT_HAND_LANDMARKS": 112}
HOLISTIC_FACE_SIZES = (468, 478)

# iBUG-300W landmark i ← the mean of these MediaPipe face-mesh points. Source: the correspondence
# table of Peizhi Yan's "Mediapipe_2_Dlib_Landmarks" (github.com/PeizhiYan/Mediapipe_2_Dlib_Landmarks,
# mp2dlib.py, 2024), pointed to from google-ai-edge/mediapipe issue #4490. One change: iBUG 13
# is (361, 288), the mirror of iBUG 3 = (132, 58), where the source has 361 alone. Checked on
# MediaPipe's canonical face model (modules/face_geometry/data/canonical_face_model.obj): the jaw
# 0-16 runs from the image's left to its right through the chin (8, lowest), brows 17-26 lie above
# the eyes 36-47, the nose 27-35 runs down the midline to its base, mouth corners 48/54 and 60/64
# sit at the mouth's sides, upper lip above lower, and every left/right pair is mirror-symmetric
# (tests/test_pose_format.py repeats these checks on the canonical coordinates).
IBUG_FROM_MESH: tuple[tuple[int, ...], ...] = (
    # jaw 0-16, the subject's right ear → chin → left ear
    (127,), (234,), (93,), (132, 58), (58, 172), (136,), (150,), (176,), (152,),
    (400,), (379,), (365,), (397, 288), (361, 288), (323,), (454,), (356,),
    # brows 17-21 (subject's right), 22-26 (left), outer → inner → outer
    (70,), (63,), (105,), (66,), (107,), (336,), (296,), (334,), (293,), (300,),
    # nose bridge 27-30 (top → tip), base 31-35
    (168, 6), (197, 195), (5,), (4,), (75,), (97,), (2,), (326,), (305,),
    # eyes 36-41 (subject's right), 42-47 (left): corner, upper lid, corner, lower lid
    (33,), (160,), (158,), (133,), (153,), (144,), (362,), (385,), (387,), (263,), (373,), (380,),
    # outer lip 48-59: right corner, upper lip, left corner, lower lip back
    (61,), (39,), (37,), (0,), (267,), (269,), (291,), (321,), (314,), (17,), (84,), (91,),
    # inner lip 60-67
    (78,), (82,), (13,), (312,), (308,), (317,), (14,), (87,),
)

ACCEPTED_LAYOUTS = (
    "COCO-WholeBody-133 (one 133-point component, or BODY 23 + FACE 68 + LEFT_HAND 21 + RIGHT_HAND 21, "
    "names optionally suffixed _133) or MediaPipe Holistic (POSE_LANDMARKS 33 [+ FACE_LANDMARKS 468/478, "
    "LEFT_HAND_LANDMARKS 21, RIGHT_HAND_LANDMARKS 21; POSE_WORLD_LANDMARKS ignored])"
)

#: Sources per COCO slot: up to this many file points averaged (the face table's pairs).
MAX_SOURCES = 2


def slot_sources(components: Sequence[tuple[str, Sequence[str]]], where: str = "pose file") -> np.ndarray:
    """(133, MAX_SOURCES) indices into the file's concatenated points, -1 where none: COCO slot
    ``i`` is the mean of the file points ``out[i]`` (see the module docstring for the layouts).

    ``components`` is the header as (name, point names) pairs, in file order.
    """
    try:
        return _slot_sources(tuple((n, tuple(p)) for n, p in components)).copy()
    except PoseFileError as exc:
        raise PoseFileError(f"{where}: {exc}") from None


@lru_cache(maxsize=64)  # a data set's files share one header: map it once
def _slot_sources(components: tuple[tuple[str, tuple[str, ...]], ...]) -> np.ndarray:
    offsets, start = {}, 0
    for name, points in components:
        offsets.setdefault(name, (start, points))
        start += len(points)
    out = np.full((NUM_WHOLEBODY, MAX_SOURCES), -1, dtype=np.int64)
    if len(components) == 1 and len(components[0][1]) == NUM_WHOLEBODY:
        out[:, 0] = np.arange(NUM_WHOLEBODY)
        return out
    if "POSE_LANDMARKS" in offsets:
        return _holistic_sources(offsets, out)
    coco = {name.removesuffix("_133"): value for name, value in offsets.items()}
    if all(name in coco for name in COCO_COMPONENTS):
        for name, (first, count) in COCO_COMPONENTS.items():
            comp_start, points = coco[name]
            if len(points) != count:
                raise PoseFileError(f"component {name!r} has {len(points)} points, a COCO-WholeBody "
                                    f"{name} has {count}; accepted layouts: {ACCEPTED_LAYOUTS}")
            out[first:first + count, 0] = np.arange(comp_start, comp_start + count)
        return out
    found = ", ".join(f"{name} ({len(points)} points)" for name, points in components) or "none"
    raise PoseFileError(f"unknown pose components {found}; accepted layouts: {ACCEPTED_LAYOUTS}")


def _holistic_sources(offsets: dict[str, tuple[int, tuple[str, ...]]], out: np.ndarray) -> np.ndarray:
    """Fill ``out`` from MediaPipe Holistic components, finding points by name."""

    def index_of(component: str) -> dict[str, int]:
        start, points = offsets.get(component, (0, ()))
        return {p: start + k for k, p in enumerate(points)}

    body = index_of("POSE_LANDMARKS")
    if not body.keys() & HOLISTIC_BODY.keys():
        raise PoseFileError("POSE_LANDMARKS has none of MediaPipe's pose landmark names "
                            f"(NOSE, LEFT_SHOULDER, …); accepted layouts: {ACCEPTED_LAYOUTS}")
    for name, slot in HOLISTIC_BODY.items():
        if name in body:
            out[slot, 0] = body[name]
    for component, first in HOLISTIC_HANDS.items():
        hand = index_of(component)
        for k, name in enumerate(HOLISTIC_HAND_POINTS):
            if name in hand:
                out[first + k, 0] = hand[name]
    face = index_of("FACE_LANDMARKS")
    for ibug, mesh_points in enumerate(IBUG_FROM_MESH):
        present = [face[str(m)] for m in mesh_points if str(m) in face]
        out[23 + ibug, : len(present)] = present
    return out


def gather_coco(xy: np.ndarray, conf: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """(T, 133, 3) clip from one person's file points ``xy`` (T, N, 2) and ``conf`` (T, N):
    each slot the mean of its seen sources (confidence > 0), score their mean confidence; a slot
    with no seen source is (0, 0, 0)."""
    t = xy.shape[0]
    has = sources >= 0
    idx = np.where(has, sources, 0)
    pts = xy[:, idx]  # (T, 133, S, 2)
    c = np.where(has[None], conf[:, idx], 0.0)  # (T, 133, S)
    seen = c > 0
    n = seen.sum(-1)
    denom = np.maximum(n, 1)
    out = np.zeros((t, NUM_WHOLEBODY, 3), dtype=np.float32)
    out[..., :2] = (pts * seen[..., None]).sum(-2) / denom[..., None]
    out[..., 2] = (c * seen).sum(-1) / denom
    out[n == 0] = 0.0
    return out


def _read(path: Path):
    from pose_format import Pose

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PoseFileError(f"{path}: unreadable .pose file: {exc.strerror or exc}") from None
    try:
        return Pose.read(data)
    except Exception as exc:  # a damaged file fails in struct, numpy or pose-format with many types
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise PoseFileError(f"{path}: not a readable .pose file (corrupt or truncated: {detail})") from None


def read_pose_file(path: Path | str) -> np.ndarray:
    """One ``.pose`` file as a float32 (T, 133, 3) COCO-WholeBody clip (x, y, score); see the
    module docstring for the accepted layouts and the mapping."""
    path = Path(path)
    if not path.is_file():
        raise PoseFileError(f"{path}: pose file not found")
    pose = _read(path)
    header = pose.header
    components = [(c.name, c.points) for c in header.components]
    sources = slot_sources(components, str(path))
    if header.num_dims() < 2:
        raise PoseFileError(f"{path}: points have {header.num_dims()} coordinate(s), need at least x and y")
    data, conf = pose.body.data, np.asarray(pose.body.confidence, dtype=np.float32)
    if data.ndim != 4 or data.shape[0] == 0 or data.shape[1] == 0:
        shape = "0 frames" if data.ndim == 4 and data.shape[0] == 0 else f"data shape {tuple(data.shape)}"
        raise PoseFileError(f"{path}: no pose body ({shape}; a clip needs at least one frame of one person)")
    # Several people: keep the signer, i.e. the most confidently tracked person.
    person = int(np.argmax(np.nan_to_num(conf, nan=0.0).clip(0).sum(axis=(0, 2))))
    # Only the points some slot uses are checked and copied (a Holistic file has 576, ~150 used).
    used = np.unique(sources[sources >= 0])
    position = np.full(data.shape[2], -1, dtype=np.int64)
    position[used] = np.arange(len(used))
    local = np.where(sources >= 0, position[sources.clip(0)], -1)
    xy = np.asarray(np.ma.getdata(data)[:, person][:, used, :2], dtype=np.float32)
    c = conf[:, person][:, used]
    bad = np.ma.getmaskarray(data)[:, person][:, used, :2].any(-1) | ~np.isfinite(xy).all(-1) | ~np.isfinite(c)
    c = np.where(bad, 0.0, np.maximum(c, 0.0)).astype(np.float32)
    return gather_coco(np.where(bad[..., None], 0.0, xy), c, local)
