"""`gsp export RUN --onnx` and `gsp predict MODEL.onnx`: a real tiny run trained and exported once
through the CLI, its ONNX model run with ONNX Runtime against the PyTorch export."""

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from pose_format import Pose
from pose_format.numpy import NumPyPoseBody
from pose_format.pose_header import PoseHeader, PoseHeaderComponent, PoseHeaderDimensions
from typer.testing import CliRunner

from cli.main import app
from mc.evaluate import load_inference, predict_file
from mc.onnx_export import ONNX_FORMAT, OnnxPredictor, is_onnx_export, predict_onnx_file

sys.path.insert(0, str(Path(__file__).parent))
from toy_data import keypoint_clip, toy_descriptions, toy_pyskl  # noqa: E402  (shared small data sets)

runner = CliRunner()
NUM_CLASSES = 4
FRAMES = 16


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 1-epoch, 4-channel run with label names (from descriptions), exported to ONNX by the CLI."""
    root = tmp_path_factory.mktemp("onnxrun")
    data = toy_pyskl(root / "toy.pkl", num_classes=NUM_CLASSES, per_class=3, test_per_class=1, frames=12)
    descriptions = toy_descriptions(root / "desc", num_classes=NUM_CLASSES)
    run = root / "run"
    r = runner.invoke(app, ["train", "--data", str(data), "--out", str(run), "--descriptions", str(descriptions),
                            "--no-contrastive", "--epochs", "1", "--base-channels", "4", "--frames", str(FRAMES),
                            "--batch-size", "4", "--threads", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["export", str(run), "--onnx"])
    assert r.exit_code == 0, r.output
    return run, r.stdout.split()


@pytest.fixture
def clip(tmp_path) -> Path:
    path = tmp_path / "clip.npy"
    np.save(path, keypoint_clip(23, seed=3))
    return path


def _metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load_model(str(path)).metadata_props}


def test_export_writes_model_onnx_beside_export_pt_with_metadata(exported):
    run, printed = exported
    assert printed == [str(run / "export.pt"), str(run / "model.onnx")]
    meta = _metadata(run / "model.onnx")
    _, payload = load_inference(run / "export.pt")
    assert meta["gsp.format"] == ONNX_FORMAT and is_onnx_export(run / "model.onnx")
    assert json.loads(meta["gsp.labels"]) == payload["labels"] == [f"sign{c}" for c in range(NUM_CLASSES)]
    assert json.loads(meta["gsp.trained_labels"]) == payload["trained_labels"]
    assert (meta["gsp.stream"], int(meta["gsp.frames"]), meta["gsp.layout"]) == ("joint", FRAMES, "gsp87")
    assert json.loads(meta["gsp.transform"]) == {"score_threshold": 0.0, "test_crop": 1.0}
    assert json.loads(meta["gsp.model_config"]) == payload["model_config"]
    # only the encoder and classifier: one input, one (N, K) output; batch and frames symbolic
    graph = onnx.load_model(str(run / "model.onnx")).graph
    assert len(graph.input) == 1 and len(graph.output) == 1
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, False, True, False, False]
    assert [d.dim_value for d in dims][1::2] == [3, 87] and dims[4].dim_value == 1
    assert graph.output[0].type.tensor_type.shape.dim[1].dim_value == NUM_CLASSES


def test_dynamic_batch_and_frame_count_match_pytorch(exported):
    run, _ = exported
    model, _ = load_inference(run / "export.pt")
    predictor = OnnxPredictor(run / "model.onnx")
    rng = np.random.default_rng(0)
    for n, t in ((1, FRAMES), (3, 9), (2, 40)):
        x = rng.normal(size=(n, 3, t, 87, 1)).astype(np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        got = predictor.logits(x)
        assert got.shape == (n, NUM_CLASSES)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        probs = [torch.softmax(torch.from_numpy(v), 1).numpy() for v in (got, want)]
        np.testing.assert_allclose(*probs, atol=1e-3)


def test_onnx_predictions_equal_the_pytorch_export(exported, clip, tmp_path):
    run, _ = exported
    want = predict_file(run / "export.pt", clip, topk=NUM_CLASSES)
    got = predict_onnx_file(run / "model.onnx", clip, topk=NUM_CLASSES)
    assert [(p["label"], p["name"]) for p in got] == [(p["label"], p["name"]) for p in want]
    np.testing.assert_allclose([p["probability"] for p in got], [p["probability"] for p in want], atol=1e-3)
    # a .pose file of the same clip goes through the same reader and preprocessing
    arr = np.load(clip)
    header = PoseHeader(0.2, PoseHeaderDimensions(640, 480, 0), [PoseHeaderComponent(
        name="WHOLEBODY", points=[f"kp{i}" for i in range(133)], limbs=[], colors=[(255, 0, 0)], point_format="XYC")])
    with open(tmp_path / "clip.pose", "wb") as fh:
        Pose(header, NumPyPoseBody(25, arr[:, None, :, :2], arr[:, None, :, 2])).write(fh)
    from_pose = predict_onnx_file(run / "model.onnx", tmp_path / "clip.pose", topk=NUM_CLASSES)
    assert [p["label"] for p in from_pose] == [p["label"] for p in got]
    np.testing.assert_allclose([p["probability"] for p in from_pose], [p["probability"] for p in got], atol=1e-5)


def test_cli_predict_onnx_prints_what_export_pt_prints(exported, clip):
    run, _ = exported
    outputs = {}
    for model in ("export.pt", "model.onnx"):
        for fmt in ([], ["--json"]):
            r = runner.invoke(app, ["predict", str(run / model), str(clip), "--topk", "3", *fmt])
            assert r.exit_code == 0, r.output
            outputs[model, bool(fmt)] = r.stdout
    want, got = json.loads(outputs["export.pt", True]), json.loads(outputs["model.onnx", True])
    assert len(got) == 3 and [(p["label"], p["name"]) for p in got] == [(p["label"], p["name"]) for p in want]
    np.testing.assert_allclose([p["probability"] for p in got], [p["probability"] for p in want], atol=1e-3)
    text = [line.split("\t") for line in outputs["model.onnx", False].splitlines()]
    assert [row[0] for row in text] == [f"{p['label']:>5} {p['name']}" for p in want]
    assert [row[0] for row in text] == [line.split("\t")[0] for line in outputs["export.pt", False].splitlines()]


def _one_error_line(r, *needles: str) -> None:
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    for needle in needles:
        assert needle in r.output, r.output


def test_bad_models_and_clips_are_one_line_errors(exported, clip, tmp_path):
    run, _ = exported
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf")
    _one_error_line(runner.invoke(app, ["predict", str(junk), str(clip)]), "junk.onnx", "not a readable ONNX model")
    foreign = tmp_path / "foreign.onnx"  # a valid ONNX model, not ours: no gsp metadata
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    onnx.save_model(onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])), str(foreign))
    _one_error_line(runner.invoke(app, ["predict", str(foreign), str(clip)]), "foreign.onnx", "not a gsp-mc ONNX")
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((10, 17, 3), np.float32))
    _one_error_line(runner.invoke(app, ["predict", str(run / "model.onnx"), str(wrong)]), "wrong.npy", "(T, 133, 3)")


def test_export_refuses_bad_runs_and_outputs(exported, tmp_path):
    run, _ = exported
    _one_error_line(runner.invoke(app, ["export", str(tmp_path / "nope"), "--onnx"]), "nope", "not a training run")
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / ".gsp-run").write_text("{}")
    _one_error_line(runner.invoke(app, ["export", str(tmp_path / "started")]), "started", "no checkpoint")
    _one_error_line(runner.invoke(app, ["export", str(tmp_path), "--onnx"]), "no checkpoint", "not a gsp training run")
    r = runner.invoke(app, ["export", str(run), "--onnx", "--out", str(tmp_path / "m.pt")])
    _one_error_line(r, "m.pt", "must end in .onnx")
    mine = tmp_path / "notes.onnx"
    mine.write_text("a user's file")
    _one_error_line(runner.invoke(app, ["export", str(run), "--onnx", "--out", str(mine)]), "notes.onnx", "refusing")
    assert mine.read_text() == "a user's file"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_error_line(runner.invoke(app, ["export", str(run), "--out", str(blocker / "e.pt")]), "cannot write")
    # without --onnx: export.pt rewritten from the checkpoint, elsewhere when asked
    r = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "copy.pt")])
    assert r.exit_code == 0 and r.stdout.split() == [str(tmp_path / "copy.pt")], r.output
    a, b = load_inference(run / "export.pt")[1], load_inference(tmp_path / "copy.pt")[1]
    assert a["labels"] == b["labels"] and all(torch.equal(a["state_dict"][k], v) for k, v in b["state_dict"].items())


def test_the_mc_flow_writes_model_onnx_when_asked(tmp_path, clip, monkeypatch):
    """``mc_flow(onnx=True)`` (and so the deployment's parameter and `gsp run --onnx`) writes each
    stream's model.onnx beside its export.pt, and it predicts what the export predicts."""
    from flows import use_local_prefect
    from gsp.settings import get_settings

    monkeypatch.setenv("GSP_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    monkeypatch.setenv("GSP_MC_THREADS", "1")
    get_settings.cache_clear()
    use_local_prefect()
    from flows.mc_flow import mc_flow

    data = toy_pyskl(tmp_path / "toy.pkl", num_classes=NUM_CLASSES, per_class=3, test_per_class=1, frames=12)
    try:
        result = mc_flow(data=str(data), out=str(tmp_path / "runs"), streams=["joint"], epochs=1, contrastive=False,
                         onnx=True)
    finally:
        get_settings.cache_clear()
    model_onnx = Path(result["onnx"]["joint"])
    assert model_onnx == Path(result["exports"]["joint"]).with_name("model.onnx") and is_onnx_export(model_onnx)
    from_onnx = predict_onnx_file(model_onnx, clip, topk=NUM_CLASSES)
    from_pt = predict_file(Path(result["exports"]["joint"]), clip, topk=NUM_CLASSES)
    assert [p["label"] for p in from_onnx] == [p["label"] for p in from_pt]
    np.testing.assert_allclose([p["probability"] for p in from_onnx], [p["probability"] for p in from_pt], atol=1e-3)
