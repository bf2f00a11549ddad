"""Item transforms on small hand-checked arrays: normalisation, sampling, augmentation, flip, streams."""

from __future__ import annotations

import numpy as np
import pytest

from mc.keypoints import get_layout
from mc.transforms import (
    TransformConfig,
    augment,
    bones,
    flip,
    motion,
    normalise,
    prepare,
    resample,
    sample_frames,
    select_points,
    to_stream,
)

LAY = get_layout("base27")  # small: body nodes 0 nose, 1/2 shoulders, 3/4 elbows, 5/6 wrists, then hands


def _clip(t: int = 4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.zeros((t, LAY.num_nodes, 3), dtype=np.float32)
    x[..., :2] = rng.normal(0, 1, (t, LAY.num_nodes, 2))
    x[..., 2] = rng.uniform(0.5, 1.0, (t, LAY.num_nodes))
    return x


def test_normalise_centres_on_the_shoulders_and_scales_by_their_width():
    x = np.zeros((2, LAY.num_nodes, 3), dtype=np.float32)
    ls, rs = LAY.shoulders
    x[:, ls] = (100, 50, 0.9)
    x[:, rs] = (60, 50, 0.9)
    x[:, 0] = (120, 90, 0.8)  # nose
    x[:, 3] = (10, 10, 0.1)  # low-score elbow
    out = normalise(x, LAY, score_threshold=0.3)
    np.testing.assert_allclose(out[:, 0], [[1.0, 1.0, 0.8]] * 2)
    np.testing.assert_allclose(out[:, ls, :2], [[0.5, 0.0]] * 2)
    assert (out[:, 3] == 0).all(), "a point under the threshold becomes missing"
    assert (out[:, 10] == 0).all(), "a missing point stays (0, 0, 0)"
    np.testing.assert_array_equal(x[:, 3], np.float32([[10, 10, 0.1]] * 2))  # input untouched


def test_normalise_without_shoulders_falls_back_to_the_point_cloud():
    x = np.zeros((1, LAY.num_nodes, 3), dtype=np.float32)
    x[0, 7] = (10, 0, 1)
    x[0, 8] = (30, 0, 1)
    out = normalise(x, LAY)
    assert out[0, 7, 0] == pytest.approx(-out[0, 8, 0])
    assert np.isfinite(out).all()


def test_resample_interpolates_only_between_seen_points():
    x = np.zeros((2, 2, 3), dtype=np.float32)
    x[0] = [(0, 0, 1), (0, 0, 1)]
    x[1] = [(4, 8, 1), (0, 0, 0)]  # point 1 missing in frame 1
    out = resample(x, np.array([0.25, 0.75]))
    np.testing.assert_allclose(out[:, 0], [(1, 2, 1), (3, 6, 1)])
    np.testing.assert_allclose(out[:, 1], [(0, 0, 1), (0, 0, 0)])  # nearest frame, no blending


def test_sample_frames_test_mode_is_centred_and_uniform():
    t = 10
    x = np.zeros((t, 1, 3), dtype=np.float32)
    x[:, 0, 0] = np.arange(t)
    x[:, 0, 2] = 1
    out = sample_frames(x, 5, train=False)
    np.testing.assert_allclose(out[:, 0, 0], [0.5, 2.5, 4.5, 6.5, 8.5])
    out = sample_frames(x, 2, train=False, test_crop=0.5)  # frames 2.5..7.5 → centres 3.25, 5.75
    np.testing.assert_allclose(out[:, 0, 0], [3.25, 5.75])
    long = sample_frames(x, 40, train=False)
    assert long.shape == (40, 1, 3) and long[0, 0, 0] == 0 and long[-1, 0, 0] == 9


def test_sample_frames_train_mode_is_a_random_crop_within_bounds():
    t = 100
    x = np.zeros((t, 1, 3), dtype=np.float32)
    x[:, 0, 0] = np.arange(t)
    x[:, 0, 2] = 1
    spans = []
    for seed in range(20):
        out = sample_frames(x, 8, train=True, rng=np.random.default_rng(seed), crop=(0.5, 1.0))
        vals = out[:, 0, 0]
        assert (np.diff(vals) > 0).all() and vals.min() >= 0 and vals.max() <= 99
        spans.append(vals[-1] - vals[0])
    # a crop covers 50..100% of the clip: the sampled span is 7/8 of the crop length
    assert min(spans) >= 0.5 * 100 * 7 / 8 - 1 and max(spans) <= 100
    assert np.std(spans) > 1, "crops vary"
    a = sample_frames(x, 8, train=True, rng=np.random.default_rng(3))
    b = sample_frames(x, 8, train=True, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="empty"):
        sample_frames(x[:0], 8, train=False)


def test_augment_is_2d_only_and_keeps_missing_points_missing():
    x = _clip()
    x[1, 5] = 0  # a missing point
    out = augment(x, np.random.default_rng(0), rotate_deg=30, scale=0.2, shift=0.3)
    np.testing.assert_array_equal(out[..., 2], x[..., 2])  # scores never touched
    assert (out[1, 5] == 0).all()
    assert not np.allclose(out[..., :2], x[..., :2])
    # rotation + shift alone preserve distances between valid points
    rigid = augment(x, np.random.default_rng(1), rotate_deg=45, scale=0.0, shift=0.5)
    d_in = np.linalg.norm(x[0, 0, :2] - x[0, 7, :2])
    d_out = np.linalg.norm(rigid[0, 0, :2] - rigid[0, 7, :2])
    assert d_out == pytest.approx(d_in, rel=1e-5)


def test_flip_mirrors_x_and_swaps_the_hands():
    x = _clip()
    lh, rh = LAY.parts["left_hand"], LAY.parts["right_hand"]
    out = flip(x, LAY)
    np.testing.assert_allclose(out[:, rh, 0], -x[:, lh, 0])
    np.testing.assert_allclose(out[:, rh, 1], x[:, lh, 1])
    np.testing.assert_allclose(out[:, lh, 2], x[:, rh, 2])
    ls, rs = LAY.shoulders
    np.testing.assert_allclose(out[:, ls, 0], -x[:, rs, 0])
    np.testing.assert_allclose(flip(out, LAY), x)  # an involution


def test_bone_stream_by_hand():
    # base27 nodes: 0 nose (root), 1 left shoulder -> 0, 3 left elbow -> 1, 5 left wrist -> 3
    x = np.zeros((1, LAY.num_nodes, 3), dtype=np.float32)
    x[0, 0] = (1, 1, 0.9)
    x[0, 1] = (3, 2, 0.5)
    x[0, 3] = (4, 5, 0.8)
    x[0, 5] = (6, 5, 0.0)  # missing wrist
    assert LAY.parents[1] == 0 and LAY.parents[3] == 1 and LAY.parents[5] == 3
    b = bones(x, LAY)
    np.testing.assert_allclose(b[0, 0], (0, 0, 0.9))  # the root's bone is zero, its score kept
    np.testing.assert_allclose(b[0, 1], (2, 1, 0.5))
    np.testing.assert_allclose(b[0, 3], (1, 3, 0.5))  # score = min(child, parent)
    np.testing.assert_allclose(b[0, 5], (0, 0, 0))  # missing end → zero bone
    np.testing.assert_array_equal(to_stream(x, LAY, "bone"), b)


def test_motion_streams_by_hand():
    x = np.zeros((3, LAY.num_nodes, 3), dtype=np.float32)
    x[:, 1] = [(0, 0, 1), (1, 2, 0.6), (4, 4, 1)]
    x[:, 3] = [(1, 1, 1), (0, 0, 0), (2, 2, 1)]  # missing in the middle frame
    m = motion(x)
    np.testing.assert_allclose(m[:, 1], [(1, 2, 0.6), (3, 2, 0.6), (0, 0, 0)])
    np.testing.assert_allclose(m[:, 3], 0)  # every pair touches the missing frame
    np.testing.assert_array_equal(to_stream(x, LAY, "joint_motion"), m)
    np.testing.assert_array_equal(to_stream(x, LAY, "bone_motion"), motion(bones(x, LAY)))
    np.testing.assert_array_equal(to_stream(x, LAY, "joint"), x)
    with pytest.raises(ValueError, match="unknown stream"):
        to_stream(x, LAY, "velocity")


def test_prepare_runs_the_whole_pipeline():
    lay = get_layout("gsp87")
    rng = np.random.default_rng(0)
    kp = np.zeros((30, 133, 3), dtype=np.float32)
    kp[..., :2] = rng.uniform(100, 300, (30, 133, 2))
    kp[..., 2] = 0.9
    for stream in ("joint", "bone", "joint_motion", "bone_motion"):
        out = prepare(kp, lay, stream, 16, train=True, rng=np.random.default_rng(1),
                      config=TransformConfig(flip_prob=1.0))
        assert out.shape == (16, 87, 3) and out.dtype == np.float32 and np.isfinite(out).all()
    test = prepare(kp, lay, "joint", 16, train=False)
    np.testing.assert_array_equal(test, prepare(kp, lay, "joint", 16, train=False))
    np.testing.assert_array_equal(select_points(kp, lay)[:, 0], kp[:, 0])
