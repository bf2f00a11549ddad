"""The joints picture (paper Fig. 5): channel-averaged importance as pure math, on real tiny
trained runs (a CE-only and a GSP-MC run of one epoch), the class filter, the PNG written by
`gsp report joints`, and the errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from toy_data import toy_descriptions, toy_pyskl
from typer.testing import CliRunner

from cli.main import app
from mc.joints import JointsError, aggregate, channel_average, normalise_importance, run_importance
from mc.train import TrainConfig, train

torch.set_num_threads(1)
runner = CliRunner()
CLASSES, TEST_PER_CLASS = 4, 3


def tiny_run(out: Path, data: Path, **kw) -> Path:
    train(TrainConfig(data=data, out=out, preset="tiny", epochs=1, frames=16, batch_size=8, base_channels=4,
                      threads=1, progress=False, text_cache=out.parent / "cache", **kw))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("joints")
    data = toy_pyskl(root / "toy.pkl", num_classes=CLASSES, per_class=4, test_per_class=TEST_PER_CLASS, frames=16)
    desc = toy_descriptions(root / "desc", num_classes=CLASSES)
    return {"data": data, "ce": tiny_run(root / "ce", data),
            "gsp": tiny_run(root / "gsp", data, descriptions=desc)}


def test_importance_math_by_hand():
    # (N·M = 4, C = 2, T' = 3, V = 2): clip 0 = persons 0, 1; clip 1 = persons 2, 3
    feat = torch.zeros(4, 2, 3, 2)
    feat[0, :, :, 0] = 1.0  # person 0, joint 0: 1 everywhere
    feat[1, 0, :, 1] = 4.0  # person 1, joint 1: 4 in one channel of two → 2
    feat[2:, :, 0, 0] = 3.0  # clip 1, joint 0: 3 in one frame of three → 1
    per_clip = channel_average(feat, n=2)
    np.testing.assert_allclose(per_clip, [[0.5, 1.0], [1.0, 0.0]])
    labels = np.array([7, 9])
    np.testing.assert_allclose(aggregate(per_clip, labels), [0.75, 0.5])
    np.testing.assert_allclose(aggregate(per_clip, labels, label=9), [1.0, 0.0])
    with pytest.raises(ValueError, match="no clip of class 3"):
        aggregate(per_clip, labels, label=3)
    np.testing.assert_allclose(normalise_importance(np.array([0.75, 0.5, -1.0])), [1.0, 2 / 3, 0.0])
    assert normalise_importance(np.zeros(3)).tolist() == [0.0, 0.0, 0.0]


def test_run_importance_shape_normalisation_and_class_filter(runs):
    every, pose = run_importance(runs["ce"])
    assert every.kind == "CE only" and every.layout.name == "gsp87" and every.clips == CLASSES * TEST_PER_CLASS
    assert every.importance.shape == (87,) and pose.shape == (87, 2)
    assert every.importance.max() == pytest.approx(1.0) and every.importance.min() >= 0.0
    # the signer's shoulders in the mean pose are where normalisation puts them: 1 apart, centred
    left, right = every.layout.shoulders
    assert np.linalg.norm(pose[left] - pose[right]) == pytest.approx(1.0, abs=0.1)
    one, _ = run_importance(runs["ce"], label="1")
    two, _ = run_importance(runs["ce"], label=2)
    assert one.clips == two.clips == TEST_PER_CLASS and one.label == 1
    assert not np.allclose(one.importance, two.importance)
    assert not np.allclose(one.importance, every.importance)
    gsp, _ = run_importance(runs["gsp"], label="sign2")  # a class name the run recorded
    assert gsp.kind == "GSP-MC" and gsp.label == 2 and gsp.label_name == "sign2"


def test_report_joints_writes_a_png_side_by_side(runs, tmp_path):
    import matplotlib.image

    out = tmp_path / "joints.png"
    res = runner.invoke(app, ["report", "joints", str(runs["gsp"]), "--baseline", str(runs["ce"]),
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == str(out)
    # (log lines may come first: another test's `gsp train` in this process set up INFO logging)
    lines = [line for line in res.stderr.strip().splitlines() if not line.startswith(("INFO ", "WARNING "))]
    assert lines[0].startswith("CE only: ce (all test clips") and lines[1].startswith("GSP-MC: gsp (all test clips")
    assert "left_hand" in lines[0] and "mouth" in lines[1]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w = matplotlib.image.imread(out).shape[:2]
    assert 600 < h < 1400 and 1000 < w < 2200 and w > h  # two columns side by side

    single = tmp_path / "one.png"
    res = runner.invoke(app, ["report", "joints", str(runs["ce"]), "--label", "0", "--out", str(single)])
    assert res.exit_code == 0, res.output
    assert "(class 0 'sign0'" not in res.stderr and "(class 0, 3 clips)" in res.stderr  # CE run: no names
    hs, ws = matplotlib.image.imread(single).shape[:2]
    assert ws < w and 600 < hs < 1400


def test_report_joints_errors_are_one_line(runs, tmp_path):
    out = str(tmp_path / "x.png")
    cases = [
        (["report", "joints", str(tmp_path), "--out", out], "not a training run folder"),
        (["report", "joints", str(runs["ce"]), "--label", "9", "--out", out],
         f"no 'test' clip of class 9 in {runs['data']} (classes with 'test' clips: 0-3)"),
        (["report", "joints", str(runs["gsp"]), "--label", "nosuchsign", "--out", out],
         "--label 'nosuchsign': not a class id or a class name of the run (names: sign0, sign1"),
        (["report", "joints", str(runs["ce"]), "--out", str(tmp_path / "x.jpg")], "give a .png file name"),
    ]
    for args, words in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        lines = [line for line in res.stderr.strip().splitlines() if not line.startswith(("INFO ", "WARNING "))]
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(JointsError, match="not a training run folder"):
        run_importance(tmp_path)


def test_other_keypoint_sets_draw_but_do_not_mix(runs, tmp_path):
    base27 = tiny_run(tmp_path / "base27", runs["data"], layout="base27")
    out = tmp_path / "b27.png"
    res = runner.invoke(app, ["report", "joints", str(base27), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:4] == b"\x89PNG" and "mouth" not in res.stderr and "right_hand" in res.stderr
    res = runner.invoke(app, ["report", "joints", str(base27), "--baseline", str(runs["ce"]), "--out", str(out)])
    assert res.exit_code == 2 and "keypoint set 'gsp87' differs from RUN's 'base27'" in res.stderr, res.output
