"""YAML text (the settings file, the prompt files): the one home of the loader and of its errors."""

from __future__ import annotations

from typing import Any

import yaml

YAMLError = yaml.YAMLError

# libyaml's C parser, which PyYAML's wheels include: the four prompt files took 3.3 ms to parse in
# pure Python and 0.2 ms in C, at the start of every generation run (bench/generate.py).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load``: plain data only, no Python objects."""
    return yaml.load(text, Loader=_LOADER)  # noqa: S506 - a safe loader, the C one where there is one


def yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML syntax error: where and what (PyYAML's own text spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"
