"""pose-format (.pose) input: files written with pose-format's own writer in both accepted layouts
(COCO-WholeBody-133 and MediaPipe Holistic), the Holistic → COCO-WholeBody mapping point by point,
the face-mesh → iBUG table checked on MediaPipe's canonical face, a folder of .pose files trained
on and predicted from through the CLI, and the bad-file errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pose_format import Pose
from pose_format.numpy import NumPyPoseBody
from pose_format.pose_header import PoseHeader, PoseHeaderComponent, PoseHeaderDimensions
from pose_format.utils.cocowholebody133_header import cocowholebody_components
from typer.testing import CliRunner

from cli.main import app
from mc.data import SampleError, load_samples
from mc.keypoints import FACE0, MIRROR_133
from mc.pose_format import IBUG_FROM_MESH, PoseFileError, read_pose_file

torch.set_num_threads(1)

# MediaPipe's landmark names in their index order (mediapipe/python/solutions/pose.py, hands.py),
# written out here so the test states the correspondence independently of the module under test.
MP_BODY = ["NOSE", "LEFT_EYE_INNER", "LEFT_EYE", "LEFT_EYE_OUTER", "RIGHT_EYE_INNER", "RIGHT_EYE",
           "RIGHT_EYE_OUTER", "LEFT_EAR", "RIGHT_EAR", "MOUTH_LEFT", "MOUTH_RIGHT", "LEFT_SHOULDER",
           "RIGHT_SHOULDER", "LEFT_ELBOW", "RIGHT_ELBOW", "LEFT_WRIST", "RIGHT_WRIST", "LEFT_PINKY",
           "RIGHT_PINKY", "LEFT_INDEX", "RIGHT_INDEX", "LEFT_THUMB", "RIGHT_THUMB", "LEFT_HIP", "RIGHT_HIP",
           "LEFT_KNEE", "RIGHT_KNEE", "LEFT_ANKLE", "RIGHT_ANKLE", "LEFT_HEEL", "RIGHT_HEEL",
           "LEFT_FOOT_INDEX", "RIGHT_FOOT_INDEX"]
MP_HAND = ["WRIST", "THUMB_CMC", "THUMB_MCP", "THUMB_IP", "THUMB_TIP", "INDEX_FINGER_MCP", "INDEX_FINGER_PIP",
           "INDEX_FINGER_DIP", "INDEX_FINGER_TIP", "MIDDLE_FINGER_MCP", "MIDDLE_FINGER_PIP", "MIDDLE_FINGER_DIP",
           "MIDDLE_FINGER_TIP", "RING_FINGER_MCP", "RING_FINGER_PIP", "RING_FINGER_DIP", "RING_FINGER_TIP",
           "PINKY_MCP", "PINKY_PIP", "PINKY_DIP", "PINKY_TIP"]

# (x, y) of the face-mesh points the iBUG table uses, on MediaPipe's canonical face model
# (mediapipe/modules/face_geometry/data/canonical_face_model.obj, Apache-2.0; y points up, the
# subject's right at negative x), rounded to 0.01.
CANONICAL = {
    0: (0.00, -3.41), 2: (0.00, -2.09), 4: (0.00, -0.46), 5: (0.00, 0.37), 6: (0.00, 2.47),
    13: (0.00, -3.99), 14: (0.00, -4.54), 17: (0.00, -5.37), 33: (-4.45, 2.66), 37: (-0.71, -3.33),
    39: (-1.43, -3.50), 58: (-6.72, -4.79), 61: (-2.46, -4.34), 63: (-4.99, 4.80), 66: (-2.76, 5.10),
    70: (-5.72, 4.25), 75: (-1.04, -1.46), 78: (-2.15, -4.28), 82: (-0.53, -3.99), 84: (-0.70, -5.29),
    87: (-0.58, -4.52), 91: (-1.84, -4.83), 93: (-7.54, -1.05), 97: (-0.60, -2.01), 105: (-3.99, 5.11),
    107: (-1.40, 5.01), 127: (-7.74, 2.36), 132: (-7.27, -2.89), 133: (-1.86, 2.59), 136: (-5.09, -7.18),
    144: (-3.67, 2.36), 150: (-4.07, -7.99), 152: (0.00, -9.40), 153: (-2.72, 2.32), 158: (-2.72, 2.96),
    160: (-3.67, 2.93), 168: (0.00, 3.27), 172: (-5.94, -6.22), 176: (-2.31, -8.97), 195: (0.00, 1.06),
    197: (0.00, 1.73), 234: (-7.66, 0.67), 263: (4.45, 2.66), 267: (0.71, -3.33), 269: (1.43, -3.50),
    288: (6.72, -4.79), 291: (2.46, -4.34), 293: (4.99, 4.80), 296: (2.76, 5.10), 300: (5.72, 4.25),
    305: (1.04, -1.46), 308: (2.15, -4.28), 312: (0.53, -3.99), 314: (0.70, -5.29), 317: (0.58, -4.52),
    321: (1.84, -4.83), 323: (7.54, -1.05), 326: (0.60, -2.01), 334: (3.99, 5.11), 336: (1.40, 5.01),
    356: (7.74, 2.36), 361: (7.27, -2.89), 362: (1.86, 2.59), 365: (5.09, -7.18), 373: (3.67, 2.36),
    379: (4.07, -7.99), 380: (2.72, 2.32), 385: (2.72, 2.96), 387: (3.67, 2.93), 397: (5.94, -6.22),
    400: (2.31, -8.97), 454: (7.66, 0.67),
}


def component(name: str, points: list[str], fmt: str) -> PoseHeaderComponent:
    return PoseHeaderComponent(name=name, points=points, limbs=[], colors=[(255, 0, 0)], point_format=fmt)


def holistic_components(face: list[str] | None = None, fmt: str = "XYZC") -> list[PoseHeaderComponent]:
    """What pose-format's holistic_components() writes (it needs mediapipe to import)."""
    face = [str(i) for i in range(468)] if face is None else face
    return [component("POSE_LANDMARKS", MP_BODY, fmt), component("FACE_LANDMARKS", face, fmt),
            component("LEFT_HAND_LANDMARKS", MP_HAND, fmt), component("RIGHT_HAND_LANDMARKS", MP_HAND, fmt),
            component("POSE_WORLD_LANDMARKS", MP_BODY, fmt)]


def write_pose(path, components, data: np.ndarray, conf: np.ndarray):
    """A .pose file through pose-format's own writer: data (T, people, N, dims), conf (T, people, N)."""
    header = PoseHeader(0.2, PoseHeaderDimensions(640, 480, 0), components)
    with open(path, "wb") as fh:
        Pose(header, NumPyPoseBody(25, data.astype(np.float32), conf.astype(np.float32))).write(fh)
    return path


def indexed_points(t: int, n: int, dims: int) -> np.ndarray:
    """x = the point's index in the file + 0.25, y = 1000 + frame: where a slot came from is readable."""
    data = np.zeros((t, 1, n, dims), np.float32)
    data[..., 0] = np.arange(n)[None, None] + 0.25
    data[..., 1] = 1000 + np.arange(t)[:, None, None]
    return data


def test_coco_wholebody_files_are_taken_as_they_are(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.uniform(0, 640, (6, 2, 133, 2)).astype(np.float32)
    conf = rng.uniform(0.2, 1.0, (6, 2, 133)).astype(np.float32)
    conf[:, 1] *= 0.1  # the second person is tracked less confidently: the first is kept
    conf[2, 0, 100] = 0.0  # an undetected point (pose-format masks it)
    clip = read_pose_file(write_pose(tmp_path / "four.pose", cocowholebody_components(), data, conf))
    assert clip.shape == (6, 133, 3) and clip.dtype == np.float32
    keep = conf[:, 0] > 0
    np.testing.assert_allclose(clip[..., :2][keep], data[:, 0][keep], rtol=1e-6)
    np.testing.assert_allclose(clip[..., 2], conf[:, 0], rtol=1e-6)
    assert clip[2, 100].tolist() == [0.0, 0.0, 0.0]
    # one 133-point component, in another writer's point names
    single = [component("WHOLEBODY", [f"kp{i}" for i in range(133)], "XYC")]
    clip1 = read_pose_file(write_pose(tmp_path / "one.pose", single, data[:, :1], conf[:, :1]))
    np.testing.assert_allclose(clip1, clip, rtol=1e-6)


def test_holistic_points_land_in_their_coco_wholebody_slots(tmp_path):
    t, n = 3, 33 + 468 + 21 + 21 + 33
    data = indexed_points(t, n, 3)
    conf = np.ones((t, 1, n), np.float32)
    conf[..., :33] = np.linspace(0.3, 0.9, 33)  # MediaPipe's body visibility
    conf[1, 0, 522:543] = 0.0  # right hand not detected in frame 1
    clip = read_pose_file(write_pose(tmp_path / "h.pose", holistic_components(), data, conf))
    x, score = clip[..., 0] - 0.25, clip[..., 2]

    def source(slot):
        return x[0, slot]

    # body: COCO index ← MediaPipe pose index
    for coco, mp in {0: 0, 1: 2, 2: 5, 3: 7, 4: 8, 5: 11, 6: 12, 9: 15, 10: 16, 11: 23, 12: 24, 15: 27,
                     16: 28, 17: 31, 19: 29, 20: 32, 22: 30}.items():
        assert source(coco) == mp, coco
        assert score[0, coco] == pytest.approx(conf[0, 0, mp])
    assert (score[:, [18, 21]] == 0).all() and (clip[:, [18, 21], :2] == 0).all()  # small toes: no source
    # hands one to one, the signer's left to COCO's left
    np.testing.assert_array_equal(x[0, 91:112], np.arange(501, 522))
    np.testing.assert_array_equal(x[0, 112:133], np.arange(522, 543))
    assert (score[1, 112:133] == 0).all() and (score[0, 112:133] == 1).all() and (score[1, 91:112] == 1).all()
    # face: iBUG 30 (nose tip) ← mesh 4, iBUG 48 (mouth corner) ← mesh 61, iBUG 27 ← mean(mesh 168, 6)
    assert source(FACE0 + 30) == 33 + 4 and source(FACE0 + 48) == 33 + 61
    assert source(FACE0 + 27) == pytest.approx(33 + (168 + 6) / 2)
    assert clip[..., 1].tolist() == [[1000.0 + f if s > 0 else 0.0 for s in score[f]] for f in range(t)]
    assert x[score > 0].max() < 543  # POSE_WORLD_LANDMARKS is never used

    # the 478-point mesh (irises) maps the same, and a face reduced to a few mesh points keeps those
    data478 = indexed_points(t, n + 10, 3)
    clip478 = read_pose_file(write_pose(tmp_path / "h478.pose", holistic_components([str(i) for i in range(478)]),
                                        data478, np.ones((t, 1, n + 10))))
    assert clip478[0, FACE0 + 30, 0] - 0.25 == 33 + 4 and clip478[0, 91, 0] - 0.25 == 33 + 478
    reduced = holistic_components(face=["168", "4", "61"])
    small = read_pose_file(write_pose(tmp_path / "hsmall.pose", reduced, indexed_points(t, 33 + 3 + 42 + 33, 3),
                                      np.ones((t, 1, 33 + 3 + 42 + 33))))
    assert [small[0, FACE0 + i, 0] - 0.25 for i in (27, 30, 48)] == [33, 34, 35]
    assert small[0, FACE0 + 0, 2] == 0 and (small[0, FACE0:FACE0 + 68, 2] > 0).sum() == 3


def test_face_table_is_geometrically_right_on_the_canonical_face():
    pts = np.array([np.mean([CANONICAL[m] for m in mesh], axis=0) for mesh in IBUG_FROM_MESH])
    x, y = pts[:, 0], pts[:, 1]  # y up; the subject's right (iBUG's image-left side) at negative x
    assert (np.diff(x[:17]) > 0).all() and y[8] == y[:17].min()  # jaw left → right, chin lowest
    assert y[17:27].min() > y[36:48].max()  # brows above the eyes
    assert x[36] < x[39] < x[42] < x[45] and np.allclose(x[27:31], 0)  # eye corners; bridge on the midline
    assert y[27] > y[28] > y[29] > y[30] > y[33]  # bridge runs down to the tip, then the base
    assert x[48] < x[51] < x[54] and x[60] < x[62] < x[64]  # mouth corners at the sides
    assert y[51] > y[62] > y[66] > y[57] and y[33] > y[51]  # upper lip above lower, under the nose
    for i in range(68):  # every left/right pair is mirror-symmetric
        j = MIRROR_133[FACE0 + i] - FACE0
        assert (x[i], y[i]) == pytest.approx((-x[j], y[j]), abs=0.02), (i, j)


def test_bad_pose_files_are_one_line_naming_the_file(tmp_path):
    good = write_pose(tmp_path / "good.pose", cocowholebody_components(), np.ones((4, 1, 133, 2)),
                      np.ones((4, 1, 133)))
    truncated = tmp_path / "truncated.pose"
    truncated.write_bytes(good.read_bytes()[:-100])
    garbage = tmp_path / "garbage.pose"
    garbage.write_bytes(b"not a pose file at all")
    empty = write_pose(tmp_path / "empty.pose", cocowholebody_components(), np.zeros((0, 1, 133, 2)),
                       np.zeros((0, 1, 133)))
    openpose = write_pose(tmp_path / "openpose.pose", [component("pose_keypoints_2d", [str(i) for i in range(25)],
                                                                 "XYC")], np.ones((2, 1, 25, 2)), np.ones((2, 1, 25)))
    cases = {truncated: "corrupt or truncated", garbage: "corrupt or truncated", empty: "no pose body (0 frames",
             openpose: "unknown pose components pose_keypoints_2d (25 points); accepted layouts: COCO-WholeBody"}
    for path, words in cases.items():
        with pytest.raises(PoseFileError) as err:
            read_pose_file(path)
        message = str(err.value)
        assert message.startswith(f"{path}: ") and words in message and "\n" not in message, message
    with pytest.raises(PoseFileError, match="MediaPipe Holistic"):
        read_pose_file(openpose)


def toy_clip(label: int, k: int, frames: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """(T, 1, 133, 2) points and scores: a still body whose right hand moves in a class's direction."""
    rng = np.random.default_rng(100 * label + k)
    base = np.random.default_rng(7).normal(0, 30, (133, 2)) + 300
    base[5], base[6] = (340, 300), (260, 300)
    ang = 2 * np.pi * label / 3
    t = np.linspace(0, 1, frames)[:, None, None]
    xy = np.repeat(base[None], frames, 0) + rng.normal(0, 2, (frames, 133, 2))
    xy[:, 112:133] += t * 80 * np.array([np.cos(ang), np.sin(ang)])
    return xy[:, None], np.ones((frames, 1, 133))


def test_pose_folder_trains_and_predicts_through_the_cli(tmp_path):
    data = tmp_path / "poses"
    data.mkdir()
    rows = ["sample_id,label,split"]
    for label in range(3):
        for k in range(5):
            sid = f"c{label}_{k}"
            write_pose(data / f"{sid}.pose", cocowholebody_components(), *toy_clip(label, k))
            rows.append(f"{sid},{label},{'train' if k < 3 else 'test'}")
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    samples = load_samples(data, split="train")
    assert len(samples) == 9 and samples[0].path.suffix == ".pose"
    np.testing.assert_allclose(samples[0].keypoints()[..., :2], toy_clip(0, 0)[0][:, 0], rtol=1e-5)

    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--data", str(data), "--out", str(run), "--epochs", "1", "--frames", "8",
                                 "--batch-size", "4", "--base-channels", "4", "--threads", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (run / "export.pt").is_file() and (run / "metrics.json").is_file()

    clip = data / "c1_4.pose"
    result = runner.invoke(app, ["predict", str(run / "export.pt"), str(clip), "--json"])
    assert result.exit_code == 0, result.output
    assert '"label"' in result.output and '"probability"' in result.output
    n = 33 + 468 + 42 + 33  # a MediaPipe Holistic clip goes through the same command
    holistic = write_pose(tmp_path / "holistic.pose", holistic_components(), indexed_points(10, n, 3),
                          np.ones((10, 1, n)))
    result = runner.invoke(app, ["predict", str(run / "export.pt"), str(holistic), "--json"])
    assert result.exit_code == 0 and '"probability"' in result.output, result.output

    # a bad file in the folder is named with its sample, and --skip-bad leaves it out
    (data / "c2_0.pose").write_bytes(b"\x00" * 10)
    with pytest.raises(SampleError, match=r"sample 'c2_0'.*c2_0\.pose: not a readable \.pose file"):
        load_samples(data, split="train")
    kept = load_samples(data, split="train", skip_bad=True)
    assert len(kept) == 8 and [s.sample_id for s in kept.skipped] == ["c2_0"]
    result = runner.invoke(app, ["predict", str(run / "export.pt"), str(data / "c2_0.pose")])
    assert result.exit_code == 2 and "c2_0.pose: not a readable .pose file" in result.output
    assert "Traceback" not in result.output
