"""Evaluation: hand-checked metrics, the score ensemble, the inference-only export, predict and
the CLI commands that wrap them, on a real (tiny) trained run."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from mc.evaluate import (
    EvaluationError,
    classification_metrics,
    ensemble,
    evaluate_checkpoint,
    export_inference,
    load_checkpoint,
    load_inference,
    model_from_checkpoint,
    predict_file,
    save_scores,
    topk_accuracy,
)
from mc.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).parent))
from toy_data import toy_pyskl  # noqa: E402  (the shared small skeleton data set)

torch.set_num_threads(1)
runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    data = toy_pyskl(root / "toy.pkl", num_classes=6, per_class=5, test_per_class=2, frames=16)
    train(TrainConfig(data=data, out=root / "run", epochs=1, batch_size=10, threads=1, progress=False))
    return data, root / "run"


def test_metrics_hand_checked():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.3, 0.6]])
    labels = np.array([0, 1, 1, 1])
    m = classification_metrics(scores, labels, num_classes=3)
    assert m["top1"] == pytest.approx(0.5)
    assert topk_accuracy(scores, labels, 2) == pytest.approx(1.0)
    assert m["per_class_accuracy"] == [1.0, pytest.approx(1 / 3), None]  # class 2 absent from the test set
    assert m["confusion"] == [[1, 0, 0], [1, 1, 1], [0, 0, 0]]
    assert m["top5"] == 1.0  # k capped at the number of classes


def test_ensemble_aligns_by_sample_id_and_weights(tmp_path):
    ids = ["a", "b", "c"]
    labels = np.array([0, 1, 2])
    s1 = np.array([[5.0, 0, 0], [5.0, 0, 0], [0, 0, 5.0]], dtype=np.float32)  # right on a, c
    s2 = np.array([[0, 9.0, 0], [0, 0, 9.0], [0, 9.0, 0]], dtype=np.float32)  # right on nothing
    save_scores(tmp_path / "one", s1, labels, ids)
    order = [2, 0, 1]  # same samples, different order
    save_scores(tmp_path / "two", s2[order], labels[order], [ids[i] for i in order])
    only_first = ensemble([tmp_path / "one", tmp_path / "two"], [1.0, 0.0])
    assert only_first["top1"] == pytest.approx(2 / 3)
    only_second = ensemble([tmp_path / "one", tmp_path / "two"], [0.0, 1.0])
    # s2 rows in "two" are a permutation; aligned back to ids they predict 1,2,1 vs labels 0,1,2
    assert only_second["top1"] == pytest.approx(0.0)
    out = tmp_path / "fused"
    ensemble([tmp_path / "one", tmp_path / "two"], [1.0, 1.0], out_dir=out)
    assert json.loads((out / "metrics.json").read_text())["weights"] == [1.0, 1.0]
    assert (out / "confusion.csv").is_file()
    save_scores(tmp_path / "other", s1, labels, ["a", "b", "zz"])
    with pytest.raises(EvaluationError, match="different samples"):
        ensemble([tmp_path / "one", tmp_path / "other"])
    with pytest.raises(EvaluationError, match="weights"):
        ensemble([tmp_path / "one"], [1.0, 2.0])


def test_export_has_only_encoder_and_classifier(trained, tmp_path):
    data, run = trained
    ckpt = load_checkpoint(run)
    assert any(k.startswith("projections") for k in ckpt["model"]) is False  # CE-only run: none built
    path = export_inference(run / "checkpoints" / "last.pt", tmp_path / "export.pt")
    model, payload = load_inference(path)
    assert set(payload) >= {"format", "model_config", "state_dict", "stream", "frames", "layout"}
    assert all(k.startswith(("backbone.", "classifier.")) for k in payload["state_dict"])
    full = model_from_checkpoint(ckpt)
    x = torch.randn(2, 3, 16, 87, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), full(x))
    bad = tmp_path / "bad.pt"
    torch.save({"format": "other"}, bad)
    with pytest.raises(EvaluationError, match="not a gsp-mc export"):
        load_inference(bad)


def test_eval_reproduces_training_scores(trained, tmp_path):
    data, run = trained
    m = evaluate_checkpoint(run, out=tmp_path / "ev", device="cpu")
    trained_metrics = json.loads((run / "metrics.json").read_text())
    assert m["top1"] == trained_metrics["top1"]
    np.testing.assert_allclose(np.load(tmp_path / "ev" / "test_scores.npz")["scores"],
                               np.load(run / "test_scores.npz")["scores"], rtol=1e-5, atol=1e-5)


def test_predict_file_and_errors(trained, tmp_path):
    data, run = trained
    clip = np.random.default_rng(0).normal(300, 50, size=(20, 133, 3)).astype(np.float32)
    clip[..., 2] = 1.0
    np.save(tmp_path / "clip.npy", clip)
    preds = predict_file(run, tmp_path / "clip.npy", topk=3)
    assert len(preds) == 3
    probs = [p["probability"] for p in preds]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    from mc.data import SampleError

    np.save(tmp_path / "wrong.npy", np.zeros((20, 17, 3), np.float32))
    with pytest.raises(SampleError, match="shape"):
        predict_file(run, tmp_path / "wrong.npy")
    with pytest.raises(SampleError, match="not found"):
        predict_file(run, tmp_path / "missing.npy")


def test_cli_commands(trained, tmp_path):
    data, run = trained
    r = runner.invoke(app, ["model", "summary", "--json", "--num-classes", "10", "--frames", "16", "--preset", "tiny"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    for key in ("backbone", "classifier", "projections", "flops_per_sample"):
        assert isinstance(summary[key], int) and summary[key] > 0
    assert summary["classifier"] == 32 * 10 + 10
    r = runner.invoke(app, ["eval", str(run), "--out", str(tmp_path / "ev"), "--json"])
    assert r.exit_code == 0, r.output
    assert "top1" in json.loads(r.stdout)
    r = runner.invoke(app, ["ensemble", str(run), str(tmp_path / "ev"), "--weights", "1,0.5", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["weights"] == [1.0, 0.5]
    r = runner.invoke(app, ["ensemble", str(run), "--weights", "x"])
    assert r.exit_code == 2 and "weights" in r.output
    np.save(tmp_path / "clip.npy", np.ones((10, 133, 3), np.float32))
    r = runner.invoke(app, ["predict", str(run / "export.pt"), str(tmp_path / "clip.npy"), "--json", "--topk", "2"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)) == 2
    r = runner.invoke(app, ["train", "--data", str(tmp_path / "nope.pkl"), "--out", str(tmp_path / "x"),
                            "--no-progress"])
    assert r.exit_code == 2 and "nope.pkl" in r.output


def test_synth_cli_writes_a_loadable_dataset(tmp_path):
    from mc.data import load_samples

    out = tmp_path / "synth.pkl"
    r = runner.invoke(app, ["synth", "--out", str(out), "--samples-per-class", "2", "--frames", "8",
                            "--signers", "2", "--test-signers", "1"])
    assert r.exit_code == 0, r.output
    train_s, test_s = load_samples(out, split="train"), load_samples(out, split="test")
    assert len(train_s) == len(test_s) > 0
    r = runner.invoke(app, ["synth", "--out", str(out), "--signers", "2", "--test-signers", "2"])
    assert r.exit_code == 2 and "test_signers" in r.output
