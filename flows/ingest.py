"""Prefect wiring for the knowledge base: a task and a flow named ``ingest`` around gsp.index."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact


@task(name="ingest-knowledge-base")
def ingest_task(kb_dir: str | None = None, index_dir: str | None = None) -> dict:
    from gsp.index import ingest

    logger = get_run_logger()
    report = ingest(Path(kb_dir) if kb_dir else None, Path(index_dir) if index_dir else None)
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
    """Incrementally (re)build the knowledge-base index."""
    return ingest_task(kb_dir, index_dir)
