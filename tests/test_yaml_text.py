"""The YAML files the project reads (prompts, settings) go through one loader, libyaml's C parser
where PyYAML has it: it must read every shipped file exactly as the pure-Python safe loader does
(the prompts' texts are part of every request's cache key), and a broken prompt file is one line
naming the file and the line."""

import shutil
import subprocess

import pytest
import yaml

from gsp.prompts import PROMPT_FILES, REFINE_PROMPT_FILES, PromptError, load_prompts
from gsp.settings import PROJECT_ROOT
from gsp.yamltext import load_yaml


def shipped_yaml_files():
    names = subprocess.run(["git", "ls-files", "*.yaml", "*.yml"], cwd=PROJECT_ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    return [PROJECT_ROOT / n for n in names]


def test_every_shipped_yaml_file_reads_as_the_pure_python_loader_reads_it():
    files = shipped_yaml_files()
    assert {f.name for f in files} >= {*PROMPT_FILES.values(), *REFINE_PROMPT_FILES.values()}
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert load_yaml(text) == yaml.load(text, Loader=yaml.SafeLoader), path


def test_the_loader_builds_no_python_objects():
    with pytest.raises(yaml.YAMLError):
        load_yaml("!!python/object/apply:os.system ['true']")


def test_a_broken_prompt_file_is_one_line_naming_file_and_line(tmp_path):
    shutil.copytree(PROJECT_ROOT / "prompts", tmp_path, dirs_exist_ok=True)
    broken = tmp_path / PROMPT_FILES["P3"]
    lines = broken.read_text(encoding="utf-8").splitlines()
    broken.write_text("\n".join([lines[0], "system: [unclosed", *lines[1:]]) + "\n", encoding="utf-8")
    with pytest.raises(PromptError) as err:
        load_prompts(tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{broken}: not valid YAML (line ")
    assert load_prompts(tmp_path, {"P1": PROMPT_FILES["P1"]})["P1"].key == "P1"  # the others still load
