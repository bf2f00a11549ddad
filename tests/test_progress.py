"""The progress lines of the flows' long tasks (flows.progress), fed by the libraries' own
callbacks: a real training run's steps and epochs (mc.train), and a batch's finished kinds in the
order gsp.generate reports them."""

from __future__ import annotations

import logging
import math

import pytest
from toy_data import toy_pyskl

from flows.progress import DescribeProgress, TrainingProgress
from mc.train import TrainConfig, train


@pytest.fixture
def lines(caplog):
    caplog.set_level(logging.INFO, logger="test.progress")
    logger = logging.getLogger("test.progress")
    return logger, lambda: [r.getMessage() for r in caplog.records if r.name == "test.progress"]


def test_a_training_run_reports_every_step_and_epoch_and_the_lines_follow(tmp_path, lines):
    logger, messages = lines
    config = TrainConfig(data=toy_pyskl(tmp_path / "toy.pkl"), out=tmp_path / "run", preset="tiny", epochs=2,
                         frames=16, batch_size=12, threads=1, progress=False, text_cache=tmp_path / "cache")
    steps: list[dict] = []
    epochs: list[tuple[int, int]] = []
    progress = TrainingProgress("joint", logger, every_s=0)  # every step may say so

    def on_step(at: dict) -> None:
        steps.append(at)
        progress.step(at)

    def on_epoch(record: dict, total: int) -> None:
        epochs.append((record["epoch"], total))
        progress.epoch(record, total)

    metrics = train(config, on_epoch=on_epoch, on_step=on_step)
    per_epoch = len(steps) // 2
    assert per_epoch > 1 and [(s["epoch"], s["step"]) for s in steps] == [
        (e, i) for e in (1, 2) for i in range(1, per_epoch + 1)]
    assert all(s["steps"] == per_epoch and s["epochs"] == 2 and math.isfinite(s["loss"]) for s in steps)
    assert epochs == [(1, 2), (2, 2)]
    # the last step's running mean is the epoch's loss the record keeps
    assert steps[-1]["loss"] == pytest.approx(metrics["history"][-1]["loss"])
    said = messages()
    assert said[0] == f"joint: epoch 1/2, step 1/{per_epoch}, loss {steps[0]['loss']:.3f} so far"
    assert sum(m.startswith("joint: epoch 1/2, loss ") for m in said) == 1
    assert len(said) == 2 * (per_epoch - 1) + 2  # no step line for an epoch's last step: its epoch line follows


def test_a_batch_says_each_quarter_of_its_signs_and_not_the_end(lines):
    logger, messages = lines
    progress = DescribeProgress("batch 7", 8, logger, every_s=3600)
    for _ in range(8):  # as gsp.generate reports a sign's kinds: Tb, then Ts/Tg, then Tp
        for kind in ("Tb", "Ts", "Tg", "Tp"):
            progress(kind)
    said = messages()
    assert [m.split(", done ")[1] for m in said] == [
        f"Tb {n}/8, Ts {n}/8, Tg {n}/8, Tp {n}/8" for n in (2, 4, 6)]
    assert all(m.startswith("batch 7: ") for m in said)
    # with the clock's line always due: a line for every kind finished, but for the batch's last
    every = DescribeProgress("shard 2", 8, logger, every_s=0)
    for _ in range(8):
        for kind in ("Tb", "Ts", "Tg", "Tp"):
            every(kind)
    shard = [m for m in messages() if m.startswith("shard 2: ")]
    assert len(shard) == 8 * 4 - 1 and shard[-1].endswith("Tb 8/8, Ts 8/8, Tg 8/8, Tp 7/8")
