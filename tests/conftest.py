"""Shared fixtures: real bundled PDFs copied to temp folders, a real index built once."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KB_DIR = ROOT / "knowledge_base"

# Tests never talk to a hub and keep their outputs out of the repo.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Prefect's temporary server logs its shutdown at exit, after pytest has closed the streams.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


@pytest.fixture(autouse=True)
def _isolated_artifacts(tmp_path_factory, monkeypatch):
    """Every test gets its own artifacts/cache root unless it sets one itself."""
    root = tmp_path_factory.mktemp("artifacts")
    monkeypatch.setenv("GSP_ARTIFACTS_DIR", str(root))
    from gsp.settings import get_settings

    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def bundled_pdfs() -> list[Path]:
    return sorted(KB_DIR.rglob("*.pdf"))


@pytest.fixture
def demo_kb(tmp_path) -> Path:
    """A copy of the bundled knowledge base (the real demo PDFs), safe to modify."""
    dest = tmp_path / "kb"
    for pdf in bundled_pdfs():
        target = dest / pdf.relative_to(KB_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(pdf, target)
    assert list(dest.rglob("*.pdf")), "the bundled demo PDFs are missing from knowledge_base/"
    return dest


@pytest.fixture(scope="session")
def demo_index(tmp_path_factory) -> Path:
    """The bundled knowledge base ingested once per test session (read-only for tests)."""
    from gsp.index import ingest
    from gsp.settings import KnowledgeBaseSettings

    index_dir = tmp_path_factory.mktemp("demo_index") / "index"
    report = ingest(KB_DIR, index_dir, KnowledgeBaseSettings())
    assert report.ok, [d.error for d in report.failed]
    return index_dir


@pytest.fixture
def stack_env(tmp_path, demo_index):
    """The environment a researcher would have: artifacts in a folder of their own, the endpoint
    set (a loopback chat server), a short training (1 epoch of the tiny preset)."""
    artifacts = tmp_path / "artifacts"
    index = tmp_path / "index"
    shutil.copytree(demo_index, index)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GSP_", "PREFECT_"))}
    env.update({"GSP_ARTIFACTS_DIR": str(artifacts), "GSP_INDEX_DIR": str(index), "GSP_MC_EPOCHS": "1",
                "GSP_MC_PRESET": "tiny", "GSP_LLM_MODEL": "fake-model", "GSP_LLM_CONCURRENCY": "4",
                "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_LOGGING_LEVEL": "INFO"})
    return env
