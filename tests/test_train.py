"""Training: the LR schedule, CE-only and contrastive runs on real (small) skeleton data, AMP on
CPU, resume after a real kill of `gsp train`, and beating chance by a wide margin."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from toy_data import toy_descriptions, toy_pyskl

from mc.device import resolve_device
from mc.presets import RECIPES, learning_rate
from mc.train import TrainConfig, train

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
GSP = str(Path(sys.executable).with_name("gsp"))


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    return toy_pyskl(tmp_path_factory.mktemp("data") / "toy.pkl")


def small(out, data, **kw):
    base = dict(data=data, out=out, preset="tiny", epochs=2, frames=16, batch_size=12, threads=1, progress=False,
                text_cache=Path(out).parent / "cache")
    base.update(kw)
    return TrainConfig(**base)


def test_learning_rate_schedule_matches_paper_recipe():
    p = RECIPES["slr500"]
    lrs = [learning_rate(e, p.lr, p.warmup_epochs, p.milestones, p.gamma) for e in range(110)]
    assert lrs[0] == pytest.approx(0.06 / 5) and lrs[4] == pytest.approx(0.06)
    assert lrs[89] == pytest.approx(0.06) and lrs[90] == pytest.approx(0.006) and lrs[100] == pytest.approx(0.0006)
    assert (RECIPES["autsl"].batch_size, RECIPES["autsl"].lr, RECIPES["autsl"].weight_decay) == (80, 0.04, 4e-4)


def test_ce_only_run_writes_outputs(tmp_path, toy_data):
    m = train(small(tmp_path / "run", toy_data))
    out = tmp_path / "run"
    on_disk = json.loads((out / "metrics.json").read_text())
    for key in ("top1", "top5", "per_class_accuracy", "epochs", "seconds"):
        assert key in on_disk
    assert on_disk["epochs"] == 2 and len(on_disk["history"]) == 2 and on_disk["contrastive"] is False
    assert len(m["per_class_accuracy"]) == 6 and m["test_samples"] == 18
    assert m["parameters"]["projections"] == 0  # no text features -> no projections built
    for name in ("test_scores.npz", "confusion.csv", "export.pt", "checkpoints/last.pt"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.*"))


def test_contrastive_run_uses_all_text_sets(tmp_path, toy_data):
    desc = toy_descriptions(tmp_path / "desc")
    m = train(small(tmp_path / "run", toy_data, descriptions=desc, epochs=1))
    assert m["contrastive"] is True and m["ablation"] == "all"
    assert m["history"][0]["con_loss"] > 0
    first = m["history"][0]
    assert first["loss"] == pytest.approx(first["cls_loss"] + 0.5 * first["con_loss"], rel=1e-4)
    assert m["text_bank"]["labels_with_Tg"] == 6 and m["text_bank"]["dim"] == 384
    assert m["parameters"]["projections"] == 6 * (32 * 384 + 384)
    export = torch.load(tmp_path / "run" / "export.pt", weights_only=True)
    assert export["state_dict"] and not any("projections" in k for k in export["state_dict"])
    assert export["labels"][:2] == ["sign0", "sign1"]  # class names from the description run
    # --no-contrastive (and the "ce" ablation) give the baseline even with descriptions.
    base = train(small(tmp_path / "base", toy_data, descriptions=desc, epochs=1, contrastive=False))
    assert base["contrastive"] is False and base["history"][0]["con_loss"] == 0.0


def test_amp_path_and_device_selection_on_cpu(tmp_path, toy_data):
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            resolve_device("cuda")
    m = train(small(tmp_path / "amp", toy_data, epochs=1, amp="on", device="cpu"))
    assert m["amp"] is True and np.isfinite(m["history"][0]["loss"])


def _gsp_train(data, out, epochs):
    return [GSP, "train", "--data", str(data), "--out", str(out), "--epochs", str(epochs), "--frames", "16",
            "--batch-size", "12", "--threads", "1", "--no-progress"]


def test_resume_after_kill_reproduces_uninterrupted_run(tmp_path, toy_data):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    full = subprocess.run(_gsp_train(toy_data, tmp_path / "full", 4), env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-2000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(_gsp_train(toy_data, out, 4), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (out / "metrics.json").exists()
    again = subprocess.run(_gsp_train(toy_data, out, 4), env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    a = json.loads((tmp_path / "full" / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert b["resumed_from_epoch"] and b["resumed_from_epoch"] >= 1
    for key in ("top1", "top5", "per_class_accuracy"):
        assert a[key] == b[key], key
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    sa, sb = np.load(tmp_path / "full" / "test_scores.npz"), np.load(out / "test_scores.npz")
    np.testing.assert_array_equal(sa["scores"], sb["scores"])


def test_tiny_preset_beats_chance_by_a_wide_margin(tmp_path):
    data = toy_pyskl(tmp_path / "ten.pkl", num_classes=10, per_class=16, test_per_class=4, frames=24, seed=3)
    m = train(TrainConfig(data=data, out=tmp_path / "run", preset="tiny", threads=1, progress=False))
    chance = 1 / 10
    assert m["top1"] >= 4 * chance, m["history"]
    assert m["top5"] > m["top1"]


def test_mc_flow_trains_streams_ensembles_and_publishes(tmp_path, toy_data):
    from flows import use_local_prefect

    use_local_prefect()
    from flows.mc_flow import mc_flow

    desc = toy_descriptions(tmp_path / "desc")
    result = mc_flow(data=str(toy_data), out=str(tmp_path / "runs"), descriptions=str(desc),
                     streams=["joint", "bone_motion"], epochs=1)
    assert [r["stream"] for r in result["table"]] == ["joint", "bone_motion", "ensemble(joint,bone_motion)"]
    assert result["text_features"]["labels_with_Tg"] == 6
    for stream in ("joint", "bone_motion"):
        m = json.loads((tmp_path / "runs" / stream / "metrics.json").read_text())
        assert m["stream"] == stream and m["contrastive"] is True
    fused = json.loads((tmp_path / "runs" / "ensemble" / "metrics.json").read_text())
    assert fused["weights"] == [1.0, 0.5]


def test_resume_compares_descriptions_by_what_they_say_not_by_folder(tmp_path):
    """`gsp run` writes a fully cached re-run as a new description folder: the same texts resume;
    other texts, or another frame count, are named as changes."""
    import dataclasses

    from gsp.schema import read_kind, write_kind
    from mc.train import resume_conflicts

    first, again, other = (toy_descriptions(tmp_path / name, num_classes=3) for name in ("a", "b", "c"))
    tg = read_kind(other, "Tg").to_dict("records")
    tg[0]["text"] = "the left hand circles instead"
    write_kind(other, "Tg", tg)

    def cfg(descriptions, **extra):
        return TrainConfig(data=tmp_path / "data.pkl", out=tmp_path / "run", descriptions=descriptions,
                           text_cache=tmp_path / "cache", **extra)

    assert resume_conflicts(cfg(first), cfg(again, epochs=9, threads=1, device="cpu")) == []
    faster = dataclasses.replace(cfg(first).text_encoder, batch_size=8)
    assert resume_conflicts(cfg(first), cfg(again, text_encoder=faster)) == []  # the encoder's batch size is speed
    assert resume_conflicts(cfg(first, contrastive=False), cfg(other, contrastive=False)) == []  # reads no text
    [changed] = resume_conflicts(cfg(first), cfg(other))
    assert changed.startswith("descriptions: 'texts ") and changed != "descriptions: 'texts '"
    tiny_frames = RECIPES["tiny"].frames
    assert resume_conflicts(cfg(first), cfg(again, frames=tiny_frames)) == []  # the preset's own value
    assert resume_conflicts(cfg(first), cfg(again, frames=tiny_frames + 4)) == [
        f"frames: {tiny_frames} → {tiny_frames + 4}"]
