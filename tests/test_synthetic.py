"""The synthetic skeleton generator: format, signer split, determinism and minimal pairs."""

from __future__ import annotations

import numpy as np
import pytest

from demo.sign_source import DEFAULT_SOURCE, HandAction, Handshape, Segment, Sign, SignSource, load_sign_source
from demo.synthetic import render_clip, sample_signer, write_synthetic_dataset
from mc.data import SkeletonDataset, load_samples, read_pickle_safely
from mc.keypoints import FACE0, RIGHT_HAND0


def _shape(sid: str, **fingers) -> Handshape:
    base = {"thumb": "closed", "index": "closed", "middle": "closed", "ring": "closed", "little": "closed"}
    base.update(fingers)
    return Handshape(id=sid, name=sid, description=f"shape {sid}", **base)


@pytest.fixture(scope="module")
def source() -> SignSource:
    a = _shape("A", thumb="extended")
    l_ = _shape("L", thumb="extended", index="extended", spread=True)
    five = _shape("5", thumb="extended", index="extended", middle="extended", ring="extended",
                  little="extended", spread=True)

    def sign(cid, gloss, *segments):
        return Sign(class_id=cid, gloss=gloss, native=gloss, prose=f"{gloss}.", segments=list(segments))

    cheek = {"location": "cheek", "palm": "left", "movement": "straight", "direction": "down"}
    return SignSource(
        title="t", disclaimer="d", handshapes=[a, l_, five],
        signs=[
            sign(10, "sister", Segment(right=HandAction(handshape="L", **cheek))),
            sign(11, "brother", Segment(right=HandAction(handshape="A", **cheek))),
            sign(20, "hungry", Segment(right=HandAction(handshape="5", location="stomach", palm="in",
                                                        movement="circle"), mouth="open")),
            sign(21, "full", Segment(right=HandAction(handshape="5", location="stomach", palm="in",
                                                      movement="circle"), mouth="puffed")),
            sign(30, "ring", Segment(left=HandAction(handshape="5", location="neutral", palm="down"),
                                     right=HandAction(handshape="A", location="other_hand", palm="left",
                                                      movement="tap", repeat=2))),
            sign(31, "yes_please", Segment(ref="hungry"), Segment(head="nod", body="shrug", face="smile")),
        ],
    )


def _pair(source, g1, g2, seed=7):
    style = sample_signer(0, np.random.default_rng(1))
    a = render_clip(source, g1, style, 40, np.random.default_rng(seed))
    b = render_clip(source, g2, style, 40, np.random.default_rng(seed))
    return a, b


def test_handshape_pair_differs_only_in_the_right_hand(source):
    a, b = _pair(source, "sister", "brother")
    diff = np.abs(a - b).max(axis=(0, 2))  # per point
    hand = np.zeros(133, bool)
    hand[RIGHT_HAND0:RIGHT_HAND0 + 21] = True
    assert diff[~hand].max() == 0
    # fingers differ by a clear but small amount (pixels, a shoulder width is ~110-170 px)
    assert 3 < diff[hand].max() < 120
    assert diff[RIGHT_HAND0] == 0  # the wrist does not depend on the handshape


def test_mouth_pair_differs_only_in_the_face(source):
    a, b = _pair(source, "hungry", "full")
    diff = np.abs(a - b).max(axis=(0, 2))
    face = np.zeros(133, bool)
    face[FACE0:FACE0 + 68] = True
    assert diff[~face].max() == 0
    lips = diff[FACE0 + 48:FACE0 + 68]
    assert 0.5 < lips.max() < 20  # a few pixels of lip motion


def test_clip_format_and_missing_points(source):
    style = sample_signer(3, np.random.default_rng(3))
    clip = render_clip(source, "ring", style, 33, np.random.default_rng(0))
    assert clip.shape == (33, 133, 3) and clip.dtype == np.float32 and np.isfinite(clip).all()
    score = clip[..., 2]
    assert ((score >= 0) & (score <= 1)).all()
    missing = score == 0
    assert (clip[missing][:, :2] == 0).all(), "missing points have zero coordinates"
    assert missing[:, 15:23].all(), "ankles and feet are out of frame"
    seen = ~missing
    assert (clip[seen][:, :2] >= 0).all() and (clip[seen][:, :2] < 512).all()
    # the two hands move: the right hand taps on the left palm
    rw = clip[:, RIGHT_HAND0, :2]
    assert np.ptp(rw[clip[:, RIGHT_HAND0, 2] > 0], axis=0).max() > 20


def test_dataset_file_split_by_signer_and_deterministic(source, tmp_path):
    kw = {"source": source, "samples_per_class": 5, "frames": 24, "signers": 5, "test_signers": 2, "seed": 4}
    path = write_synthetic_dataset(tmp_path / "syn.pkl", **kw)
    data = read_pickle_safely(path)
    anns = {a["frame_dir"]: a for a in data["annotations"]}
    assert len(anns) == 6 * 5
    train, test = data["split"]["train"], data["split"]["test"]
    assert sorted(train + test) == sorted(anns)
    train_signers = {anns[f]["signer"] for f in train}
    test_signers = {anns[f]["signer"] for f in test}
    assert train_signers == {0, 1, 2} and test_signers == {3, 4}
    assert {c["gloss"]: c["label"] for c in data["classes"]}["brother"] == 11  # labels are class ids
    a = anns[train[0]]
    t = a["total_frames"]
    assert a["keypoint"].shape == (1, t, 133, 2) and a["keypoint_score"].shape == (1, t, 133)
    lengths = {x["total_frames"] for x in anns.values()}
    assert len(lengths) > 3, "clip lengths vary with signer speed"
    # the reader accepts it and the dataset builds items from it
    samples = load_samples(path, "test")
    ds = SkeletonDataset(samples, "gsp87", frames=16, train=True)
    assert ds[0][0].shape == (3, 16, 87, 1)
    # same arguments → same data; another seed → other data
    again = read_pickle_safely(write_synthetic_dataset(tmp_path / "again.pkl", **kw))
    np.testing.assert_array_equal(again["annotations"][7]["keypoint"], data["annotations"][7]["keypoint"])
    other = read_pickle_safely(write_synthetic_dataset(tmp_path / "other.pkl", **{**kw, "seed": 5}))
    assert not np.array_equal(other["annotations"][7]["keypoint"], data["annotations"][7]["keypoint"])


def test_index_labels_and_gloss_subset(source, tmp_path):
    path = write_synthetic_dataset(tmp_path / "i.pkl", source=source, samples_per_class=2, frames=16,
                                   signers=2, test_signers=1, glosses=["full", "sister"], label_mode="index")
    samples = load_samples(path, None)
    assert sorted({s.label for s in samples}) == [0, 1]
    with pytest.raises(ValueError, match="test_signers"):
        write_synthetic_dataset(tmp_path / "x.pkl", source=source, signers=2, test_signers=2)


def test_every_sign_of_the_demo_source_renders():
    if not DEFAULT_SOURCE.is_file():
        pytest.fail(f"the demo sign source {DEFAULT_SOURCE} is missing")
    src = load_sign_source()
    style = sample_signer(0, np.random.default_rng(0))
    clips = {s.gloss: render_clip(src, s.gloss, style, 30, np.random.default_rng(1)) for s in src.signs}
    for gloss, clip in clips.items():
        assert clip.shape == (30, 133, 3) and np.isfinite(clip).all(), gloss
    # no two signs render identically for the same signer and random draws
    flat = {g: c[..., :2].ravel() for g, c in clips.items()}
    glosses = sorted(flat)
    for i, g1 in enumerate(glosses):
        for g2 in glosses[i + 1:]:
            assert not np.array_equal(flat[g1], flat[g2]), (g1, g2)
