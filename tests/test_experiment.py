"""The experiment runner (`gsp experiment ablation`, mc.experiment): the grid on a tiny synthetic
set with the reference and shuffled controls, resume after a real SIGKILL, bad input refused
before training, minimal pairs derived from the sign source, the K-clips draw, and the Prefect
flow publishing its summary on a real (temporary, loopback) Prefect server."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from toy_data import toy_descriptions, toy_pyskl
from typer.testing import CliRunner

from cli.main import app
from demo.experiment_inputs import data_minimal_pairs, minimal_pairs
from demo.sign_source import load_sign_source
from demo.synthetic import write_synthetic_dataset
from gsp.schema import read_run, row_key
from mc.data import load_samples
from mc.experiment import derangement, write_shuffled_run
from mc.train import per_class_subset

runner = CliRunner()
GSP = str(Path(sys.executable).with_name("gsp"))
#: Six demo signs: two minimal pairs (one per kind) and two other signs.
GLOSSES = ["sister", "brother", "hungry", "full", "love", "friend"]
#: What a results row says about a cell's outcome (not when or where it ran).
OUTCOME = ("cell", "ablation", "descriptions", "k", "seed", "top1", "top5", "pairs_handshape", "pairs_nonmanual",
           "epochs", "train_samples")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """4 training and 2 test clips per sign (3 signers, the last one tests)."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("syn") / "six.pkl", samples_per_class=6, frames=16,
                                   signers=3, test_signers=1, glosses=GLOSSES)


def grid_args(data: Path, out: Path) -> list[str]:
    return ["experiment", "ablation", "--data", str(data), "--out", str(out), "--descriptions", "reference",
            "--ablations", "ce,all", "--seeds", "0,1", "--epochs", "2", "--train-per-class", "2", "--threads", "1"]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_minimal_pairs_are_derived_from_the_sign_source(synthetic, tmp_path):
    found = {(kind, a, b) for kind, a, b in minimal_pairs(load_sign_source())}
    assert found == {("handshape", "sister", "brother"), ("handshape", "monday", "tuesday"),
                     ("handshape", "be_pleased", "apologize"), ("nonmanual", "hungry", "full"),
                     ("nonmanual", "sweet", "honey"), ("nonmanual", "sad", "tired"),
                     ("location", "mother", "father"), ("location", "grandmother", "grandfather"),
                     ("direction", "tomorrow", "yesterday")}
    # mapped onto a synthetic set's labels (the signs' class ids), only pairs whose signs it has
    pairs = data_minimal_pairs(synthetic)
    assert [(p.kind, p.a, p.b) for p in pairs] == [("handshape", 0, 4), ("nonmanual", 2, 53)]
    assert data_minimal_pairs(toy_pyskl(tmp_path / "toy.pkl")) == []  # not synthetic: no glosses to map


def test_shuffled_run_gives_every_class_another_class_texts(tmp_path):
    assert all(i != p for n in range(2, 12) for s in range(3) for i, p in enumerate(derangement(n, s)))
    original = read_run(toy_descriptions(tmp_path / "desc"))
    shuffled = read_run(write_shuffled_run(tmp_path / "desc", tmp_path / "shuffled", seed=0))
    tg = {int(r["label"]): r["text"] for r in original["Tg"].to_dict("records")}
    moved = {int(r["label"]): r["text"] for r in shuffled["Tg"].to_dict("records")}
    assert sorted(moved.values()) == sorted(tg.values())  # a permutation of the texts
    assert all(moved[c] != tg[c] for c in tg)  # no class keeps its own
    donor = {c: next(d for d in tg if tg[d] == moved[c]) for c in tg}
    for kind in ("Ts", "Tp"):  # every kind follows the same permutation, keys stay the class's own
        for r in shuffled[kind].to_dict("records"):
            c = int(r["label"])
            assert r["key"] == row_key(c, kind, int(r["variant"])) and r["gloss"] == f"sign{c}"
            src = original[kind]
            assert r["text"] in set(src[src["label"] == donor[c]]["text"])


def test_k_clips_per_class_are_drawn_by_seed_and_nested(tmp_path):
    train = load_samples(toy_pyskl(tmp_path / "toy.pkl"), "train")  # 6 classes x 6 clips
    ids = {k: {s.sample_id for s in per_class_subset(train, k, seed=0)} for k in (2, 4)}
    assert len(ids[2]) == 12 and len(ids[4]) == 24 and ids[2] < ids[4]
    assert {s.sample_id for s in per_class_subset(train, 2, seed=0)} == ids[2]  # same seed, same clips
    assert {s.sample_id for s in per_class_subset(train, 2, seed=1)} != ids[2]
    with pytest.raises(ValueError, match="class 0 has only 6 training clips"):
        per_class_subset(train, 7, seed=0)


@pytest.mark.parametrize("change, option", [
    (["--ablations", "ce,everything"], "--ablations"),
    (["--keypoints", "gsp88"], "--keypoints"),
    (["--preset", "huge"], "--preset"),
    (["--descriptions", "no/such/run"], "--descriptions"),
    (["--train-per-class", "2,5"], "--train-per-class 5"),
    (["--seeds", "0,one"], "--seeds"),
])
def test_bad_input_is_one_line_before_any_training(synthetic, tmp_path, change, option):
    res = runner.invoke(app, grid_args(synthetic, tmp_path / "exp") + change)  # the last value of an option wins
    assert res.exit_code == 2, res.output
    assert option in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "exp" / "runs").exists()


def test_grid_resumes_after_a_kill_and_equals_an_uninterrupted_run(synthetic, tmp_path):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    # killed: a real `gsp experiment ablation` stopped with SIGKILL in its second cell
    killed = tmp_path / "killed"
    proc = subprocess.Popen([GSP, *grid_args(synthetic, killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    second = killed / "runs" / "all-gsp87-reference-k2-seed0"
    deadline = time.time() + 240
    while not (second / "checkpoints" / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = killed / "runs" / "ce-gsp87-none-k2-seed0" / "metrics.json"
    assert first.is_file() and not (second / "metrics.json").exists()
    first_mtime = first.stat().st_mtime_ns

    again = runner.invoke(app, grid_args(synthetic, killed))
    assert again.exit_code == 0, again.output
    assert "ce-gsp87-none-k2-seed0: finished before, skipped" in again.stderr
    assert first.stat().st_mtime_ns == first_mtime  # not retrained
    assert "all-gsp87-reference-k2-seed0: training 2 epochs" in again.stderr  # resumed from its checkpoint

    whole = runner.invoke(app, grid_args(synthetic, tmp_path / "whole"))
    assert whole.exit_code == 0, whole.output
    rows, expected = read_csv(killed / "results.csv"), read_csv(tmp_path / "whole" / "results.csv")
    assert [{k: r[k] for k in OUTCOME} for r in rows] == [{k: r[k] for k in OUTCOME} for r in expected]
    # seed outermost; every cell trained on 2 clips of each of the 6 signs
    assert [r["cell"] for r in rows] == ["ce-gsp87-none-k2-seed0", "all-gsp87-reference-k2-seed0",
                                         "ce-gsp87-none-k2-seed1", "all-gsp87-reference-k2-seed1"]
    assert {r["train_samples"] for r in rows} == {"12"}
    for r in rows:
        for m in ("top1", "top5", "pairs_handshape", "pairs_nonmanual"):
            assert 0.0 <= float(r[m]) <= 1.0
    summary = {(r["ablation"], r["descriptions"]): r for r in read_csv(killed / "summary.csv")}
    assert set(summary) == {("ce", "none"), ("all", "reference")}
    ref = summary[("all", "reference")]
    assert ref["n"] == "2" and float(ref["top1_low"]) <= float(ref["top1"]) <= float(ref["top1_high"])
    by_seed = {(r["descriptions"], r["seed"]): float(r["top1"]) for r in rows}
    diffs = [by_seed[("reference", s)] - by_seed[("none", s)] for s in ("0", "1")]
    assert float(ref["d_top1"]) == pytest.approx(sum(diffs) / 2)
    assert "d_top1" not in summary[("ce", "none")] or summary[("ce", "none")]["d_top1"] == ""
    md = (killed / "summary.md").read_text()
    assert "| all | gsp87 | reference | 2 | 2 |" in md and "Cosine similarity" in md
    # the Tg diagnostic: one row per pair, plus the all-classes yardstick
    sims = read_csv(killed / "pair_similarity.csv")
    assert [(s["descriptions"], s["kind"]) for s in sims] == [
        ("reference", "handshape"), ("reference", "nonmanual"), ("reference", "all classes")]
    assert all(-1.0 <= float(s["cosine"]) <= 1.0 for s in sims)
    # the reference control was written as a description run of the data's six classes only
    assert {int(v) for v in read_run(killed / "descriptions" / "reference")["Tg"]["label"]} == {0, 4, 2, 53, 179, 15}


def test_experiment_flow_trains_the_shuffled_control_and_publishes_the_summary(synthetic, tmp_path):
    from flows import use_local_prefect

    use_local_prefect()
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    from flows.experiment_flow import SUMMARY_ARTIFACT, experiment_flow

    # a busy machine can take longer than the default 20 s to start the temporary server
    with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 120}):
        result = experiment_flow(data=str(synthetic), out=str(tmp_path / "exp"), descriptions=["shuffled:reference"],
                                 seeds=[3], ablations=["all"], epochs=1, train_per_class=[2], threads=1)
    [row] = result["summary"]
    assert (row["ablation"], row["descriptions"], row["k"], row["n"]) == ("all", "shuffled-reference", "2", 1)
    # the shuffled run was read by training like any description run: its texts in the bank
    metrics = json.loads((tmp_path / "exp" / "runs" / "all-gsp87-shuffled-reference-k2-seed3" / "metrics.json")
                         .read_text())
    assert metrics["contrastive"] is True and metrics["text_bank"]["labels_with_Tg"] == 6
    assert metrics["history"][0]["con_loss"] > 0

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[SUMMARY_ARTIFACT])))

    with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 120}):
        published = [a for a in asyncio.run(artifacts()) if str(tmp_path / "exp") in (a.description or "")]
    assert len(published) == 1 and published[0].type == "table"
    assert "shuffled-reference" in str(published[0].data)


def test_gsp_train_takes_k_clips_per_class_and_records_it(tmp_path):
    data = toy_pyskl(tmp_path / "toy.pkl")  # 6 classes x 6 training clips
    args = ["train", "--data", str(data), "--epochs", "1", "--frames", "16", "--batch-size", "6", "--threads", "1",
            "--no-progress", "--train-per-class"]
    res = runner.invoke(app, [*args, "2", "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train_per_class"] == 2 and metrics["train_samples"] == 12 and metrics["test_samples"] == 18
    res = runner.invoke(app, [*args, "7", "--out", str(tmp_path / "too-many")])
    assert res.exit_code == 2 and "class 0 has only 6 training clips" in res.stderr
    # one error line (after gsp train's INFO log of the data check), no traceback, no run folder
    assert [ln for ln in res.stderr.splitlines() if not ln.startswith("INFO ")] == [
        "error: train_per_class 7: class 0 has only 6 training clips; use at most 6"]
    assert not (tmp_path / "too-many").exists()
