"""Multi-process training (DistributedDataParallel under torchrun, gloo on CPU): the global batch
split over ranks, one step of two processes equal to one process on the same global batch (loss,
gradients, BatchNorm statistics, contrastive loss over the gathered batch), a killed two-process
run that resumes, and a global batch the processes cannot share refused in one line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from toy_data import pyskl_annotation, toy_descriptions, toy_pyskl

from mc.data import write_pyskl
from mc.ddp import DistributedConfigError, global_batches, per_rank_batch, rank_slices
from mc.distributed import launch_training
from mc.train import train

torch.set_num_threads(1)
GSP = str(Path(sys.executable).with_name("gsp"))


@pytest.fixture(scope="module")
def twelve(tmp_path_factory):
    """Six classes, two training clips each: twelve training samples, one test clip per class."""
    return toy_pyskl(tmp_path_factory.mktemp("data") / "twelve.pkl", per_class=2, test_per_class=1)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Twelve training clips of six classes with scores that vary (the toy set's are all 1.0: a
    constant input channel, whose BatchNorm gradient is float32 rounding noise in any process
    count, so no fair yardstick)."""
    anns = [pyskl_annotation(f"c{c}_s{k}", c, t=20, seed=10 * c + k) for c in range(6) for k in range(3)]
    split = {"train": [a["frame_dir"] for a in anns if not a["frame_dir"].endswith("_s2")],
             "test": [a["frame_dir"] for a in anns if a["frame_dir"].endswith("_s2")]}
    return write_pyskl(tmp_path_factory.mktemp("data") / "scored.pkl", anns, split)


@pytest.mark.parametrize("world", [2, 3])
def test_rank_slices_gathered_in_rank_order_are_the_single_process_batches(world):
    n, batch = 14, 6
    single = global_batches(n, batch, torch.Generator().manual_seed(5), drop_last=True)
    assert [len(b) for b in single] == [6, 6] and len({i for b in single for i in b}) == 12
    per_rank = [rank_slices(global_batches(n, batch, torch.Generator().manual_seed(5), drop_last=True), r, world)
                for r in range(world)]
    for step, expected in enumerate(single):
        assert [i for r in range(world) for i in per_rank[r][step]] == expected
    # Another epoch's seed shuffles differently.
    assert global_batches(n, batch, torch.Generator().manual_seed(6), drop_last=True) != single


def test_a_global_batch_the_processes_cannot_share_is_refused():
    assert per_rank_batch(12, 3) == 4
    with pytest.raises(DistributedConfigError, match=r"batch_size 7 \(the global batch\) is not divisible by 2"):
        per_rank_batch(7, 2)


def test_cli_refuses_an_indivisible_global_batch_in_one_line(tmp_path, twelve):
    out = tmp_path / "run"
    r = subprocess.run([GSP, "train", "--data", str(twelve), "--out", str(out), "--batch-size", "7",
                        "--nproc-per-node", "2", "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "batch_size 7" in lines[0] and "--nproc-per-node" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def _checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)


def test_two_gloo_processes_take_the_single_process_step_on_the_global_batch(tmp_path, scored):
    """One step on a fixed global batch (all twelve samples) with the contrastive loss on: the
    loss terms, every gradient (SGD's first momentum buffer is grad + wd·w0, from the same w0),
    the updated weights and the BatchNorm running statistics match one process's."""
    desc = toy_descriptions(tmp_path / "desc")
    base = dict(data=scored, preset="tiny", epochs=1, frames=16, batch_size=12, threads=1, progress=False,
                descriptions=desc, text_cache=tmp_path / "cache")
    one = train({**base, "out": tmp_path / "one"})
    two = launch_training({**base, "out": tmp_path / "two"}, nproc_per_node=2)

    assert (one["world_size"], two["world_size"]) == (1, 2) and two["contrastive"] is True
    h1, h2 = one["history"][0], two["history"][0]
    assert h2["con_loss"] > 0
    for key in ("loss", "cls_loss", "con_loss", "train_top1"):
        assert h2[key] == pytest.approx(h1[key], rel=1e-5), key
    assert two["train_samples"] == 12 and two["test_samples"] == one["test_samples"] == 6

    c1, c2 = _checkpoint(tmp_path / "one"), _checkpoint(tmp_path / "two")
    assert c1["model"].keys() == c2["model"].keys()  # SyncBN stand-in keeps plain BatchNorm's keys
    for name in c1["model"]:
        torch.testing.assert_close(c2["model"][name], c1["model"][name], rtol=1e-4, atol=1e-5, msg=name)
    s1, s2 = c1["optimizer"]["state"], c2["optimizer"]["state"]
    # Parts without texts leave their projections without a gradient in both (no momentum state).
    assert s1.keys() == s2.keys() and len(s1) < len(c1["optimizer"]["param_groups"][0]["params"])
    for idx in s1:
        torch.testing.assert_close(s2[idx]["momentum_buffer"], s1[idx]["momentum_buffer"], rtol=1e-4, atol=1e-5,
                                   msg=f"gradient of parameter {idx}")
    sc1, sc2 = np.load(tmp_path / "one" / "test_scores.npz"), np.load(tmp_path / "two" / "test_scores.npz")
    np.testing.assert_allclose(sc2["scores"], sc1["scores"], rtol=1e-3, atol=1e-3)
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["world_size"] == 2
    assert (tmp_path / "two" / "export.pt").is_file() and list((tmp_path / "two" / "tb").glob("events.*"))


def _gsp_ddp(data, out):
    return [GSP, "train", "--data", str(data), "--out", str(out), "--epochs", "4", "--frames", "16",
            "--batch-size", "6", "--threads", "1", "--no-progress", "--nproc-per-node", "2"]


def test_killed_two_process_run_resumes_and_ends_as_an_uninterrupted_one(tmp_path, twelve):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    full = subprocess.run(_gsp_ddp(twelve, tmp_path / "full"), env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-2000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(_gsp_ddp(twelve, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpt = out / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    family = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)  # gsp and the torchrun agent; the workers have sessions of their own
    proc.wait()
    _, alive = psutil.wait_procs(family, timeout=20)
    for p in alive:  # never leave a stray worker behind, even when the assertion below fails
        p.kill()
    assert not alive, "workers outlived their killed agent"
    assert ckpt.exists() and not (out / "metrics.json").exists()
    first = _checkpoint(out)["epoch"]
    assert 1 <= first < 4

    again = subprocess.run(_gsp_ddp(twelve, out), env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming {out} at epoch {first}" in again.stderr
    a = json.loads((tmp_path / "full" / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert b["resumed_from_epoch"] == first and b["world_size"] == 2
    for key in ("top1", "top5", "per_class_accuracy"):
        assert a[key] == b[key], key
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    sa, sb = np.load(tmp_path / "full" / "test_scores.npz"), np.load(out / "test_scores.npz")
    np.testing.assert_array_equal(sa["scores"], sb["scores"])
