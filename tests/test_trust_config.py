"""Configuration and model files a user gets wrong: every mistake is one line naming the setting or
file, what was wrong and what is allowed, exit status 2, no traceback — through the CLI as a user
runs it. Also: `gsp eval` from another folder, `gsp predict` ranking only trained classes,
`gsp --version` and option help."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from mc.data import write_pyskl
from mc.evaluate import load_inference
from mc.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).parent))
from toy_data import toy_pyskl  # noqa: E402  (the shared small skeleton data set)

torch.set_num_threads(1)
GSP = str(Path(sys.executable).with_name("gsp"))
runner = CliRunner()


def one_error_line(result_output: str, *needles: str) -> str:
    """The output is exactly one non-empty line, without a traceback, containing every needle.
    `gsp train` reports its progress as INFO log lines before it gets to the error; those are not
    part of the error."""
    lines = [ln for ln in result_output.splitlines() if ln.strip() and not ln.startswith("INFO mc.")]
    assert len(lines) == 1, result_output
    assert "Traceback" not in result_output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def gsp(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The installed `gsp` in a subprocess, with the test's environment plus ``env``."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([GSP, *args], env=full_env, cwd=cwd, capture_output=True, text=True, timeout=300)


def cli(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture(scope="module")
def run_with_gaps(tmp_path_factory):
    """A real tiny run on data whose labels are 0, 2, 4, 6, 8, 10: the classifier has 11 outputs,
    five of which never saw a training sample. Trained from its own folder with a relative --data."""
    root = tmp_path_factory.mktemp("gaps")
    dense = toy_pyskl(root / "dense.pkl", num_classes=6, per_class=5, test_per_class=2, frames=16)
    with open(dense, "rb") as fh:
        raw = pickle.load(fh)
    for ann in raw["annotations"]:
        ann["label"] = 2 * int(ann["label"])
    write_pyskl(root / "toy.pkl", raw["annotations"], raw["split"])
    cwd = os.getcwd()
    os.chdir(root)
    try:
        train(TrainConfig(data=Path("toy.pkl"), out=Path("runs/a"), epochs=1, batch_size=10, threads=1,
                          progress=False))
    finally:
        os.chdir(cwd)
    return root, root / "runs" / "a"


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("yaml_text, needles", [
    ("kb:\n  chunk_size: [600\n", ["gsp.yaml", "not valid YAML", "line"]),
    ("kb: {chunk_sise: 600}\n", ["gsp.yaml", "kb.chunk_sise", "did you mean 'chunk_size'"]),
    ("kbb:\n  chunk_size: 600\n", ["gsp.yaml", "unknown section 'kbb'", "did you mean 'kb'", "paths, kb, llm, mc"]),
    ("kb:\n  chunk_size: abc\n", ["kb.chunk_size", "gsp.yaml", "'abc'", "integer"]),
    ("kb: 5\n", ["gsp.yaml", "section 'kb' must be a mapping"]),
])
def test_bad_config_file_is_one_line_for_every_command(tmp_path, monkeypatch, yaml_text, needles):
    (tmp_path / "gsp.yaml").write_text(yaml_text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # ./gsp.yaml is picked up from the working folder
    monkeypatch.delenv("GSP_CONFIG", raising=False)
    for args in (["search", "love"], ["model", "summary", "--json"], ["predict", "x.pt", "y.npy"]):
        r = cli(*args)
        assert r.exit_code == 2, (args, r.output)
        one_error_line(r.output, *needles)
    r = cli("train", "--help")  # help needs no settings, so it works while the config is broken
    assert r.exit_code == 0 and "--data" in r.output


def test_config_env_naming_a_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    r = gsp("model", "summary", "--json", env={"GSP_CONFIG": str(missing)})
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    one_error_line(r.stderr, f"GSP_CONFIG={missing}", "does not exist")


@pytest.mark.parametrize("var, value, needles", [
    ("GSP_KB_CHUNK_SIZE", "abc", ["GSP_KB_CHUNK_SIZE='abc'", "integer"]),
    ("GSP_KB_CHUNK_SIZE", "10", ["GSP_KB_CHUNK_SIZE='10'", "greater than or equal to 50"]),
    ("GSP_LLM_STRUCTURED_OUTPUT", "bogus", ["GSP_LLM_STRUCTURED_OUTPUT='bogus'", "'json_schema'", "'json_object'"]),
    ("GSP_MC_DEVICE", "gpu", ["GSP_MC_DEVICE='gpu'", "auto, cpu, cuda"]),
    ("GSP_KB_CHUNK_OVERLAP", "900", ["GSP_KB_CHUNK_OVERLAP='900'", "smaller than chunk_size (800)"]),
])
def test_bad_environment_setting_is_one_line(var, value, needles):
    r = gsp("search", "love", env={var: value})
    assert r.returncode == 2, r.stderr
    one_error_line(r.stderr, *needles)


def test_environment_wins_and_names_itself_over_the_file(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text("kb:\n  chunk_size: 600\n", encoding="utf-8")
    monkeypatch.setenv("GSP_CONFIG", str(config))
    monkeypatch.setenv("GSP_KB_CHUNK_SIZE", "lots")
    r = cli("model", "summary", "--json")
    assert r.exit_code == 2
    line = one_error_line(r.output, "GSP_KB_CHUNK_SIZE='lots'")
    assert "c.yaml" not in line  # the bad value came from the environment, not the file


def test_misnamed_keypoint_preset_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("GSP_MC_KEYPOINT_PRESET", "gsp78")
    r = cli("model", "summary", "--json")
    assert r.exit_code == 2
    one_error_line(r.output, "GSP_MC_KEYPOINT_PRESET", "'gsp78'", "did you mean 'gsp87'", "cosign76")


# --------------------------------------------------------------------------- option names


@pytest.mark.parametrize("args, needles", [
    (["train", "--data", "d.pkl", "--out", "o", "--preset", "tinyy"],
     ["--preset 'tinyy'", "did you mean 'tiny'", "slr500"]),
    (["train", "--data", "d.pkl", "--out", "o", "--stream", "joints"], ["--stream 'joints'", "bone_motion"]),
    (["train", "--data", "d.pkl", "--out", "o", "--device", "gpu"], ["--device 'gpu'", "auto, cpu, cuda"]),
    (["train", "--data", "d.pkl", "--out", "o", "--amp", "yes"], ["--amp 'yes'", "auto, on, off"]),
    (["train", "--data", "d.pkl", "--out", "o", "--ablation", "al"], ["--ablation 'al'", "synonyms+prompt"]),
    (["train", "--data", "d.pkl", "--out", "o", "--layout", "gsp88"], ["--layout 'gsp88'", "gsp87"]),
    (["train", "--data", "d.pkl", "--out", "o", "--alpha", "-1"], ["--alpha -1.0", "greater than or equal to 0"]),
    (["eval", "run", "--device", "gpu"], ["--device 'gpu'", "cuda:N"]),
    (["model", "summary", "--preset", "tinyy"], ["--preset 'tinyy'", "autsl"]),
    (["model", "summary", "--layout", "nope"], ["--layout 'nope'", "masa49"]),
])
def test_misspelt_option_value_is_one_line(tmp_path, monkeypatch, args, needles):
    monkeypatch.chdir(tmp_path)
    r = cli(*args)
    assert r.exit_code == 2, r.output
    one_error_line(r.output, *needles)
    assert not (tmp_path / "o").exists()  # refused before anything was created


def test_preset_setting_is_checked_and_named(tmp_path, monkeypatch):
    monkeypatch.setenv("GSP_MC_PRESET", "tinyy")
    r = cli("train", "--data", str(tmp_path / "d.pkl"), "--out", str(tmp_path / "o"))
    assert r.exit_code == 2
    one_error_line(r.output, "GSP_MC_PRESET", "'tinyy'", "tiny")


# --------------------------------------------------------------------------- model files


def test_predict_refuses_files_that_are_not_exports(run_with_gaps, tmp_path):
    _, run = run_with_gaps
    clip = tmp_path / "clip.npy"
    np.save(clip, np.ones((12, 133, 3), np.float32))
    garbage = tmp_path / "random.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((run / "export.pt").read_bytes()[:2000])
    a_dict = tmp_path / "dict.pt"
    torch.save({"weights": torch.zeros(3)}, a_dict)
    a_tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), a_tensor)
    cases = [(garbage, "not a readable gsp-mc export"), (truncated, "not a readable gsp-mc export"),
             (a_dict, "not a gsp-mc export"), (a_tensor, "not a gsp-mc export")]
    for path, needle in cases:
        r = cli("predict", str(path), str(clip))
        assert r.exit_code == 2, r.output
        one_error_line(r.output, str(path), needle)
    # and as a user runs it: the installed command, the bytes of a random file
    r = gsp("predict", str(garbage), str(clip))
    assert r.returncode == 2
    one_error_line(r.stderr, str(garbage), "not a readable gsp-mc export")


def test_corrupt_checkpoint_is_one_line_for_eval_and_resume(run_with_gaps, tmp_path):
    root, run = run_with_gaps
    broken = tmp_path / "broken"
    (broken / "checkpoints").mkdir(parents=True)
    good = (run / "checkpoints" / "last.pt").read_bytes()
    ckpt = broken / "checkpoints" / "last.pt"
    ckpt.write_bytes(good[: len(good) // 2])
    r = cli("eval", str(broken), "--data", str(root / "toy.pkl"))
    assert r.exit_code == 2, r.output
    one_error_line(r.output, str(ckpt), "not a readable gsp-mc training checkpoint")
    # resuming a run whose checkpoint is damaged says which file and how to go on
    r = cli("train", "--data", str(root / "toy.pkl"), "--out", str(broken), "--epochs", "1", "--frames", "16",
            "--no-progress")
    assert r.exit_code == 2, r.output
    one_error_line(r.output, str(ckpt), "--no-resume")
    # a torch file that holds something else than a checkpoint
    torch.save({"model": {}}, ckpt)
    r = cli("eval", str(broken), "--data", str(root / "toy.pkl"))
    assert r.exit_code == 2
    one_error_line(r.output, str(ckpt), "not a gsp-mc training checkpoint", "model_config")


# --------------------------------------------------------------------------- eval, predict


def test_eval_from_another_folder_finds_the_training_data(run_with_gaps, tmp_path):
    root, run = run_with_gaps
    recorded = json.loads(torch.load(run / "checkpoints" / "last.pt", weights_only=True)["train_config"])["data"]
    assert Path(recorded).is_absolute() and Path(recorded) == (root / "toy.pkl").resolve()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = gsp("eval", str(run), "--out", str(tmp_path / "ev"), "--json", "--device", "cpu", cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["num_samples"] == 12


def test_eval_of_an_old_run_with_a_relative_data_path(run_with_gaps, tmp_path, monkeypatch):
    root, run = run_with_gaps
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    cfg = json.loads(ckpt["train_config"])
    cfg["data"] = "toy.pkl"  # what runs recorded before: the path as typed, relative to where it ran
    ckpt["train_config"] = json.dumps(cfg)
    old = root / "runs" / "old"
    (old / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, old / "checkpoints" / "last.pt")
    monkeypatch.chdir(tmp_path)
    r = cli("eval", str(old), "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert Path(json.loads(r.stdout)["data"]) == root / "toy.pkl"  # found beside the run
    moved = tmp_path / "moved"
    (moved / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, moved / "checkpoints" / "last.pt")
    r = cli("eval", str(moved), "--json")
    assert r.exit_code == 2
    one_error_line(r.output, str(moved), "'toy.pkl'", "--data")


def test_predict_ranks_only_classes_that_had_training_data(run_with_gaps, tmp_path):
    _, run = run_with_gaps
    model, payload = load_inference(run / "export.pt")
    assert model.cfg.num_classes == 11
    assert payload["trained_labels"] == [0, 2, 4, 6, 8, 10]
    clip = tmp_path / "clip.npy"
    np.save(clip, np.random.default_rng(1).normal(300, 50, size=(16, 133, 3)).astype(np.float32))
    r = cli("predict", str(run / "export.pt"), str(clip), "--json", "--topk", "11")
    assert r.exit_code == 0, r.output
    preds = json.loads(r.stdout)
    assert sorted(p["label"] for p in preds) == [0, 2, 4, 6, 8, 10]
    assert sum(p["probability"] for p in preds) == pytest.approx(1.0, abs=1e-5)
    # an export from before the record ranks every output, as it always did
    legacy = {k: v for k, v in torch.load(run / "export.pt", weights_only=True).items() if k != "trained_labels"}
    torch.save(legacy, tmp_path / "legacy.pt")
    r = cli("predict", str(tmp_path / "legacy.pt"), str(clip), "--json", "--topk", "11")
    assert r.exit_code == 0, r.output
    assert sorted(p["label"] for p in json.loads(r.stdout)) == list(range(11))


# --------------------------------------------------------------------------- version, help


def test_version():
    r = gsp("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"gsp-mc {version('gsp-mc')}"


@pytest.mark.parametrize("command", [["train"], ["eval"], ["ensemble"], ["predict"], ["synth"], ["model", "summary"]])
def test_every_mc_option_has_help(command):
    import typer.main

    click_cmd = typer.main.get_command(app)
    for name in command:
        click_cmd = click_cmd.commands[name]
    for param in click_cmd.params:
        assert param.help, f"gsp {' '.join(command)} {param.opts[0]} has no help text"
    r = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    if command == ["train"]:
        for shown in ("[default: joint]", "[default: (the preset's)]", "[default: all]", "[default: auto]"):
            assert shown in r.output, shown


def test_train_logs_mc_info_on_stderr(run_with_gaps, tmp_path):
    root, finished = run_with_gaps
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    r = gsp("train", "--data", str(root / "toy.pkl"), "--out", str(run), "--epochs", "1", "--frames", "16",
            "--batch-size", "10", "--threads", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert f"INFO mc.train: resuming {run} at epoch 1" in r.stderr


@pytest.mark.parametrize("args, needles", [
    (["run", "--limit", "0"], ["--limit", "gsp run --help"]),
    (["train"], ["--data", "gsp train --help"]),
    (["model", "summary", "--num-classes", "0"], ["--num-classes"]),
    (["llm", "serve", "--port", "99999"], ["--port", "65535"]),
    (["generate", "--vocab", "v.csv", "--labels", "a,b"], ["--labels", "a,b"]),
])
def test_option_errors_are_one_line_not_a_usage_box(args, needles):
    result = cli(*args)
    assert result.exit_code == 2, result.output
    one_error_line(result.output, *needles)
    assert "╭" not in result.output
