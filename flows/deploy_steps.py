"""Prefect deployment steps of this project (named in ``prefect.yaml``)."""

from __future__ import annotations

import os
from pathlib import Path

import flows


def project_root() -> Path:
    """The folder this project is installed in: the parent of the ``flows`` package (a clone with
    an editable install, or site-packages), where the file entrypoints and default data live."""
    return Path(flows.__file__).resolve().parent.parent


def enter_project() -> dict[str, str]:
    """Pull step: run the flow in the project's folder, on whichever machine the worker is.

    Replaces ``set_working_directory`` with a machine-specific path (or an environment variable
    that, unset, expands to "" and fails later with a traceback in the worker): the worker's own
    installation says where the project is, so relative parameters (``vocab=data/vocab/…``) and
    the default folders resolve the same way everywhere."""
    root = project_root()
    os.chdir(root)
    return {"directory": str(root)}
