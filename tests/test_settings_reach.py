"""Every entry point that trains — `gsp train`, the Prefect flow ``mc`` and `gsp run` — honours
GSP_MC_SEED, GSP_MC_DEVICE and GSP_MC_NUM_WORKERS (the settings `gsp run` used to drop), and
records them in the run's metrics.json. Real training, real flows, no stand-ins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI
from typer.testing import CliRunner

from cli.main import app
from gsp.errors import GspError
from gsp.settings import get_settings
from mc.run_folder import RunFolder
from mc.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"GSP_MC_SEED": "3", "GSP_MC_DEVICE": "cpu", "GSP_MC_NUM_WORKERS": "1"}


def assert_settings_recorded(metrics_file: Path, seed: int = 3) -> dict:
    m = json.loads(Path(metrics_file).read_text(encoding="utf-8"))
    assert (m["seed"], m["device_setting"], m["device"], m["num_workers"]) == (seed, "cpu", "cpu", 1), m
    return m


@pytest.fixture
def mc_env(monkeypatch):
    for k, v in SETTINGS.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    from toy_data import toy_pyskl

    return toy_pyskl(tmp_path_factory.mktemp("data") / "toy.pkl", num_classes=4, per_class=4, test_per_class=2,
                     frames=16)


def test_train_config_from_settings_takes_every_mc_setting(mc_env, monkeypatch, tmp_path):
    monkeypatch.setenv("GSP_MC_PRESET", "autsl")
    monkeypatch.setenv("GSP_MC_TEXT_LONG_POLICY", "truncate")
    get_settings.cache_clear()
    cfg = TrainConfig.from_settings(get_settings(), data=tmp_path / "d.pkl", out=tmp_path / "run")
    assert (cfg.seed, cfg.device, cfg.num_workers, cfg.preset) == (3, "cpu", 1, "autsl")
    assert cfg.text_encoder.long_text == "truncate" and cfg.text_cache == get_settings().paths.cache
    # an option given on the command line wins; None means "from settings"
    cfg = TrainConfig.from_settings(get_settings(), data=tmp_path / "d.pkl", out=tmp_path / "run", seed=5,
                                    device=None)
    assert (cfg.seed, cfg.device) == (5, "cpu")


def test_gsp_train_and_eval_honour_the_settings(mc_env, toy_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--data", str(toy_data), "--out", str(out), "--epochs", "1",
                                 "--frames", "16", "--batch-size", "8", "--threads", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert_settings_recorded(RunFolder(out).metrics)
    # `gsp eval` takes its device from the same setting: asking for CUDA on this CPU machine is
    # refused by name, which proves the setting was read (the explicit option still wins).
    monkeypatch.setenv("GSP_MC_DEVICE", "cuda")
    get_settings.cache_clear()
    refused = CliRunner().invoke(app, ["eval", str(out)])
    assert refused.exit_code == 2 and "cuda" in refused.output.lower(), refused.output
    assert CliRunner().invoke(app, ["eval", str(out), "--device", "cpu"]).exit_code == 0


def test_mc_flow_honours_the_settings(mc_env, toy_data, tmp_path, monkeypatch):
    """… and a misspelt GSP_ variable is named in the flow run's log (a worker has no CLI to say it)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from flows import use_local_prefect

    use_local_prefect()
    from flows.mc_flow import mc_flow

    monkeypatch.setenv("GSP_MC_SEEED", "4")  # a name no other test in this process has said
    # No description run exists: the flow refuses to guess, unless asked for the CE-only baseline.
    refused = mc_flow(data=str(toy_data), out=str(tmp_path / "runs"), streams=["joint"], epochs=1,
                      return_state=True)
    assert refused.is_failed()
    with pytest.raises(GspError, match="no complete description run"):
        refused.result()
    state = mc_flow(data=str(toy_data), out=str(tmp_path / "runs"), streams=["joint"], epochs=1, contrastive=False,
                    return_state=True)
    assert_settings_recorded(state.result()["metrics_files"]["joint"])
    APILogHandler().flush()
    runs = [refused.state_details.flow_run_id, state.state_details.flow_run_id]
    with get_client(sync_client=True) as client:
        said = [[log.message for log in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run])))
                 if "GSP_MC_SEEED" in log.message] for run in runs]
    # said once per process: in the first flow run's log, not again in the second's
    assert said == [["GSP_MC_SEEED is not a gsp setting and is ignored (did you mean 'GSP_MC_SEED'?)"], []], said


@pytest.mark.slow
def test_gsp_run_honours_the_settings(tmp_path):
    """The README's main job against a loopback endpoint (so no local LLM), two signs, one epoch."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GSP_", "PREFECT_"))}
    with FakeOpenAI() as srv:
        env.update({
            **SETTINGS,
            "GSP_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
            "GSP_LLM_BASE_URL": srv.base_url,
            "GSP_LLM_MODEL": "fake",
            "GSP_LLM_STRUCTURED_OUTPUT": "json_schema",
            "PREFECT_HOME": str(tmp_path / "prefect"),
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "COLUMNS": "200",
        })
        proc = subprocess.run([sys.executable, "-m", "cli.main", "run", "--limit", "2", "--epochs", "1",
                               "--samples-per-class", "8"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics_files = list((tmp_path / "artifacts" / "runs").glob("*/joint/metrics.json"))
    assert len(metrics_files) == 1
    m = assert_settings_recorded(metrics_files[0])
    assert m["epochs"] == 1 and m["contrastive"] is True


def test_a_misspelt_gsp_variable_is_named_with_the_setting_it_resembles(monkeypatch, tmp_path):
    """The settings ignore unknown GSP_ variables; the CLI says so, one line each, and runs on."""
    monkeypatch.setenv("GSP_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    monkeypatch.setenv("GSP_LLM_CONCURENCY", "3")
    monkeypatch.setenv("GSP_MC_EPOCS", "2")
    monkeypatch.setenv("GSP_LLM_CONCURRENCY", "5")  # spelt right: no word about it
    get_settings.cache_clear()
    result = CliRunner().invoke(app, ["diff", str(tmp_path / "missing-a"), str(tmp_path / "missing-b")])
    get_settings.cache_clear()
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        "warning: GSP_LLM_CONCURENCY is not a gsp setting and is ignored (did you mean 'GSP_LLM_CONCURRENCY'?)",
        "warning: GSP_MC_EPOCS is not a gsp setting and is ignored (did you mean 'GSP_MC_EPOCHS'?)",
    ]
    assert result.exit_code == 2 and "missing-a" in result.stderr  # the command itself still ran
