"""Prefect wiring for the knowledge base: a task and a flow named ``ingest`` around gsp.index."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from flows import warn_unknown_settings
from gsp.index import ingest
from gsp.settings import KnowledgeBaseSettings, get_settings


@task(name="ingest-knowledge-base")
def ingest_task(kb_dir: str, index_dir: str, kb_settings: dict[str, Any]) -> dict:
    """Ingest ``kb_dir`` into ``index_dir`` with the index settings ``kb_settings`` (the ``kb``
    section as plain data); returns a summary of plain values."""
    logger = get_run_logger()
    report = ingest(kb_dir, index_dir, KnowledgeBaseSettings(**kb_settings))
    for doc in report.failed:
        logger.warning("document failed: %s", doc.error)
    rows = [
        {"file": d.file, "status": d.status, "pages": d.pages, "chunks": d.chunks,
         "embedded": d.embedded, "error": d.error or ""}
        for d in report.documents
    ]
    create_table_artifact(key="knowledge-base-documents", table=rows, description="Ingested documents")
    logger.info(
        "index %s: %d chunks (%d embedded, %d reused), %d failed document(s)",
        report.index_dir, report.chunks, report.embedded_chunks, report.reused_chunks, len(report.failed),
    )
    return {
        "index_dir": str(report.index_dir),
        "manifest_id": report.manifest_id,
        "chunks": report.chunks,
        "embedded_chunks": report.embedded_chunks,
        "failed": [d.file for d in report.failed],
    }


@flow(name="ingest")
def ingest_flow(kb_dir: str | None = None, index_dir: str | None = None) -> dict:
    """Incrementally (re)build the knowledge-base index (default folders: the settings' paths)."""
    warn_unknown_settings()
    settings = get_settings()
    return ingest_task(str(kb_dir or settings.paths.kb_dir), str(index_dir or settings.paths.index),
                       settings.kb.model_dump(mode="json"))
