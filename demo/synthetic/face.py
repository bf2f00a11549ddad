"""The face model of the synthetic signer: a 68-point iBUG template in face units and the
displacements each mouth shape and face state of the sign source applies to it."""

from __future__ import annotations

from typing import get_args

import numpy as np

from demo.sign_source import FaceState, MouthShape

FACE_UNIT = 0.38  # face template unit (half the face width) in body units


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

# Row order of MOUTH_DISP / FACE_DISP: the sign source's vocabularies, defined there once.
MOUTHS: tuple[str, ...] = get_args(MouthShape)
FACES: tuple[str, ...] = get_args(FaceState)


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


def face_points(mouth_w: np.ndarray, face_w: np.ndarray, head: np.ndarray, neck: float,
                face_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The 68 face points per frame in body units, and the eye line they hang from.

    ``mouth_w`` (T, len(MOUTHS)) and ``face_w`` (T, len(FACES)) weight the displacements; ``head``
    (T, 3) is the head's dx, dy (body units) and roll (rad); ``neck`` the shoulder line to eye line
    distance and ``face_scale`` the signer's face size factor. Returns (face_xy (T, 68, 2),
    eye_line (T, 2)).
    """
    fu = FACE_UNIT * face_scale
    face_local = FACE_TEMPLATE[None] + np.einsum("tk,kpc->tpc", mouth_w, MOUTH_DISP) + np.einsum(
        "tk,kpc->tpc", face_w, FACE_DISP)
    eye_line = np.c_[head[:, 0], -neck + head[:, 1]]  # (T, 2)
    roll = head[:, 2]
    cr, sr = np.cos(roll)[:, None], np.sin(roll)[:, None]
    fx, fy = face_local[..., 0] * fu, face_local[..., 1] * fu
    face_xy = np.stack([cr * fx - sr * fy, sr * fx + cr * fy], axis=-1) + eye_line[:, None, :]
    return face_xy, eye_line
