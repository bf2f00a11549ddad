"""Readers (pyskl pickle, .npy folder + CSV), bad-input handling and the torch dataset."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from toy_data import keypoint_clip, pyskl_annotation

from mc.data import SampleError, SkeletonDataset, load_samples, write_pyskl
from mc.keypoints import get_layout


@pytest.fixture
def pyskl_file(tmp_path):
    anns = [pyskl_annotation(f"v{i}", i % 3, seed=i) for i in range(6)]
    return write_pyskl(tmp_path / "ann.pkl", anns, {"train": ["v0", "v1", "v2", "v3"], "test": ["v4", "v5"]})


def _npy_folder(tmp_path, rows: list[tuple[str, str]], header: str | None = "sample_id,label", t: int = 10):
    for sid, _ in rows:
        np.save(tmp_path / f"{sid}.npy", keypoint_clip(t, seed=len(sid)))
    lines = ([header] if header else []) + [f"{s},{label}" for s, label in rows]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


# --- pyskl ----------------------------------------------------------------------------------


def test_pyskl_split_and_arrays(pyskl_file):
    train = load_samples(pyskl_file, "train")
    test = load_samples(pyskl_file, "test")
    assert [s.sample_id for s in train] == ["v0", "v1", "v2", "v3"]
    assert [s.label for s in test] == [1, 2]
    kp = train[1].keypoints()
    assert kp.shape == (12, 133, 3) and kp.dtype == np.float32
    np.testing.assert_allclose(kp, keypoint_clip(12, seed=1))
    assert len(load_samples(pyskl_file, None)) == 6
    with pytest.raises(SampleError, match=r"no split 'val'; available: \['test', 'train'\]"):
        load_samples(pyskl_file, "val")


def test_pyskl_keeps_the_most_confident_person(tmp_path):
    ann = pyskl_annotation("multi", 0, people=2)
    ann["keypoint_score"][1] = 1.0  # second person tracked with full confidence
    path = write_pyskl(tmp_path / "m.pkl", [ann], {"train": ["multi"]})
    kp = load_samples(path, "train")[0].keypoints()
    np.testing.assert_allclose(kp[..., :2], ann["keypoint"][1])


def test_pyskl_refuses_code_in_the_pickle(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"split": {"train": ["a"]}, "annotations": [Evil()]}))
    with pytest.raises(SampleError, match=r"refusing to unpickle .*system"):
        load_samples(path, "train")
    assert not marker.exists()


def test_pyskl_bad_samples_name_the_sample_and_can_be_skipped(tmp_path):
    good = pyskl_annotation("good", 1)
    nan = pyskl_annotation("has_nan", 0)
    nan["keypoint"][0, 3, 7, 0] = np.nan
    empty = pyskl_annotation("empty", 0, t=0)
    shape = pyskl_annotation("shape", 0)
    shape["keypoint"] = shape["keypoint"][:, :, :17]
    shape["keypoint_score"] = shape["keypoint_score"][:, :, :17]
    badlabel = pyskl_annotation("badlabel", -2)
    frames = pyskl_annotation("frames", 0)
    frames["total_frames"] = 99
    anns = [good, nan, empty, shape, badlabel, frames]
    split = {"train": ["good", "has_nan", "empty", "shape", "badlabel", "frames", "ghost"]}
    path = write_pyskl(tmp_path / "bad.pkl", anns, split)
    with pytest.raises(SampleError, match=r"sample 'has_nan'.*non-finite value at frame 3, point 7") as info:
        load_samples(path, "train")
    assert "6 bad sample(s) in split 'train'" in str(info.value)  # all of them, not the first
    assert all(f"sample {sid!r}" in str(info.value)
               for sid in ("has_nan", "empty", "shape", "badlabel", "frames", "ghost"))
    samples = load_samples(path, "train", skip_bad=True)
    assert [s.sample_id for s in samples] == ["good"]
    reasons = {s.sample_id: s.reason for s in samples.skipped}
    assert set(reasons) == {"has_nan", "empty", "shape", "badlabel", "frames", "ghost"}
    # the label where it was readable, so a selection of classes keeps only its own bad clips
    labels = {s.sample_id: s.label for s in samples.skipped}
    assert labels == {"has_nan": 0, "empty": 0, "shape": 0, "frames": 0, "badlabel": None, "ghost": None}
    assert "zero-length" in reasons["empty"]
    assert "keypoint" in reasons["shape"] and "17" in reasons["shape"]
    assert "out of range" in reasons["badlabel"]
    assert "total_frames is 99" in reasons["frames"]
    assert "no annotation" in reasons["ghost"]


def test_label_range_checked_against_num_classes(pyskl_file):
    with pytest.raises(SampleError, match=r"sample 'v2'.*label 2 out of range \(0..1\)"):
        load_samples(pyskl_file, "train", num_classes=2)


def test_not_a_pickle_or_missing_file(tmp_path):
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(SampleError, match="junk.pkl: not a readable pickle"):
        load_samples(tmp_path / "junk.pkl")
    with pytest.raises(SampleError, match="does not exist"):
        load_samples(tmp_path / "nothing.pkl")


# --- .npy folder ------------------------------------------------------------------------------


def test_npy_folder_is_memory_mapped_and_read_lazily(tmp_path):
    folder = _npy_folder(tmp_path, [("a", "0"), ("b", "2"), ("sub_c", "1")])
    samples = load_samples(folder, split=None)
    assert [(s.sample_id, s.label) for s in samples] == [("a", 0), ("b", 2), ("sub_c", 1)]
    assert all(s.array is None and s.path is not None for s in samples)
    np.testing.assert_allclose(samples[1].keypoints(), np.load(tmp_path / "b.npy"))
    # the CSV itself works too, and a split cannot be chosen without a split column
    assert len(load_samples(tmp_path / "labels.csv", split=None)) == 3
    with pytest.raises(SampleError, match="no 'split' column"):
        load_samples(folder, split="train")


def test_npy_csv_without_header_and_with_split_column(tmp_path):
    _npy_folder(tmp_path, [("x1", "4"), ("x2", "5")], header=None)
    assert [s.label for s in load_samples(tmp_path / "labels.csv", split=None)] == [4, 5]
    (tmp_path / "all.csv").write_text("sample_id,label,split\nx1,4,train\nx2,5,test\n")
    assert [s.sample_id for s in load_samples(tmp_path / "all.csv", split="test")] == ["x2"]
    (tmp_path / "train_labels.csv").write_text("x1,4\n")
    assert [s.sample_id for s in load_samples(tmp_path, split="train")] == ["x1"]
    (tmp_path / "ids.csv").write_text("id,label\nx1,4\n")  # `id` is a header too, not a sample
    assert [(s.sample_id, s.label) for s in load_samples(tmp_path / "ids.csv", split=None)] == [("x1", 4)]


def test_npy_bad_input(tmp_path):
    folder = _npy_folder(tmp_path, [("ok", "0"), ("nan", "1"), ("wrong", "1")])
    arr = np.load(folder / "nan.npy")
    arr[2, 4, 1] = np.inf
    np.save(folder / "nan.npy", arr)
    np.save(folder / "wrong.npy", np.zeros((5, 17, 3), dtype=np.float32))
    with (folder / "labels.csv").open("a") as fh:
        fh.write("gone,0\nnotint,abc\n")
    np.save(folder / "notint.npy", keypoint_clip(4))
    with pytest.raises(SampleError, match=r"sample 'wrong'.*shape \(5, 17, 3\)") as info:
        load_samples(folder, split=None)
    assert "4 bad sample(s)" in str(info.value)  # every one, values scanned up front
    assert all(f"sample {sid!r}" in str(info.value) for sid in ("nan", "wrong", "gone", "notint"))
    samples = load_samples(folder, split=None, skip_bad=True)
    assert [s.sample_id for s in samples] == ["ok"]
    reasons = {s.sample_id: s.reason for s in samples.skipped}
    assert "non-finite" in reasons["nan"] and "file missing" in reasons["gone"]
    assert {s.sample_id: s.label for s in samples.skipped} == {"nan": 1, "wrong": 1, "gone": 0, "notint": None}
    # selecting classes drops the bad clips of the others, never one whose class is unknown
    ones = samples.of_classes(lambda label: label == 1)
    assert ones == [] and [s.sample_id for s in ones.skipped] == ["nan", "wrong", "notint"]
    zeros = samples.of_classes(lambda label: label == 0)
    assert [s.sample_id for s in zeros] == ["ok"]
    assert [s.sample_id for s in zeros.skipped] == ["gone", "notint"]
    assert "not an integer" in reasons["notint"] and "labels.csv:6" in reasons["notint"]
    # strict mode without a value scan still names the sample when the item is read
    lazy = [s for s in load_samples(folder / "labels.csv", split=None, skip_bad=True, check_values=False)
            if s.sample_id == "nan"][0]
    ds = SkeletonDataset([lazy], "gsp87", frames=8, train=False)
    with pytest.raises(SampleError, match=r"sample 'nan'.*non-finite value at frame 2, point 4"):
        ds[0]


def test_all_bad_is_an_error(tmp_path):
    folder = _npy_folder(tmp_path, [("a", "0")])
    (folder / "a.npy").unlink()
    with pytest.raises(SampleError, match=r"no usable samples.*1 skipped"):
        load_samples(folder, split=None, skip_bad=True)


# --- dataset ----------------------------------------------------------------------------------


def test_dataset_items(pyskl_file):
    torch.set_num_threads(1)
    samples = load_samples(pyskl_file, "train")
    ds = SkeletonDataset(samples, get_layout("gsp87"), stream="bone", frames=20, train=True, seed=3)
    x, label, index = ds[2]
    assert x.shape == (3, 20, 87, 1) and x.dtype == torch.float32
    assert (label, index) == (2, 2)
    assert ds.num_classes == 3 and ds.sample_ids == ["v0", "v1", "v2", "v3"]
    np.testing.assert_array_equal(ds.labels, [0, 1, 2, 0])
    # deterministic per (seed, epoch, index); a new epoch draws new augmentations
    again = SkeletonDataset(samples, "gsp87", stream="bone", frames=20, train=True, seed=3)
    assert torch.equal(x, again[2][0])
    again.set_epoch(1)
    assert not torch.equal(x, again[2][0])
    test_ds = SkeletonDataset(samples, "gsp87", frames=20, train=False)
    assert torch.equal(test_ds[0][0], test_ds[0][0])
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    xb, yb, ib = next(iter(loader))
    assert xb.shape == (4, 3, 20, 87, 1) and yb.tolist() == [0, 1, 2, 0] and ib.tolist() == [0, 1, 2, 3]


def test_dataset_rejects_labels_beyond_num_classes(pyskl_file):
    samples = load_samples(pyskl_file, "train")
    with pytest.raises(SampleError, match=r"sample 'v2'.*label 2 out of range 0..1"):
        SkeletonDataset(samples, "gsp87", num_classes=2)
    assert SkeletonDataset(samples, "gsp87", num_classes=10).num_classes == 10
    with pytest.raises(ValueError, match="unknown stream"):
        SkeletonDataset(samples, "gsp87", stream="depth")
