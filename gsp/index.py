"""Ingest: dictionary PDFs → chunks → sentence embeddings → a FAISS inner-product index.

The index is a folder of plain files — ``index.faiss`` (``faiss.write_index``), ``chunks.parquet``
(one row per vector, same order) and ``manifest.json`` — so loading it never executes code from
it (no pickle). Re-ingest is incremental: a document whose sha256 is unchanged keeps its chunks
and vectors (read back from the old index), only new or changed documents are embedded, and
removed ones drop out. The new index is built in a staging folder and swapped in, so a crash
leaves the previous index usable.

The index folder replaces only an index (a manifest.json with the format fields), an empty folder
or nothing, and never overlaps the knowledge base; a knowledge base with nothing to index leaves
the existing index as it was.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from gsp.atomic import (check_disjoint, check_replaceable, make_staging_dir, recover_dir, remove_debris,
                        replace_dir_atomic, write_json_atomic)
from gsp.chunking import DEFAULT_HEADWORD_PATTERN, DictionaryChunker
from gsp.embedding import load_sentence_model, model_id
from gsp.pdf import PdfExtractionError, extract_pages, sha256_file
from gsp.settings import KnowledgeBaseSettings, get_settings

INDEX_FILE = "index.faiss"
CHUNKS_FILE = "chunks.parquet"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 2
INDEX_WHAT = "an index made by gsp ingest"  # recognised by is_index_dir

CHUNK_SCHEMA = pa.schema(
    [
        ("chunk_id", pa.string()),
        ("file", pa.string()),
        ("sha256", pa.string()),
        ("page", pa.int32()),
        ("ordinal", pa.int32()),
        ("char_start", pa.int32()),
        ("char_end", pa.int32()),
        ("headword", pa.string()),
        ("aliases", pa.list_(pa.string())),
        ("text", pa.string()),
    ]
)


class NothingToIndexError(FileNotFoundError):
    """The knowledge base yields no text at all; the existing index is kept as it was."""


def is_index_dir(path: Path) -> bool:
    """True for a folder this module wrote: its manifest has the index format fields."""
    try:
        manifest = json.loads((Path(path) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(manifest, dict) and isinstance(manifest.get("format_version"), int)
            and isinstance(manifest.get("embedding"), dict) and isinstance(manifest.get("documents"), list))


def prepare_ingest(kb_dir: Path | str | None = None,
                   index_dir: Path | str | None = None) -> tuple[Path, Path, list[Path]]:
    """Resolve the folders, check them, list the PDFs — everything that can refuse a run before
    any work: an index folder overlapping the knowledge base or holding anything but an index
    (``UnsafePathError``), a missing knowledge base or one without PDFs (``FileNotFoundError``)."""
    app = get_settings()
    kb_dir = Path(kb_dir or app.paths.kb_dir).resolve()
    index_dir = Path(index_dir or app.paths.index).resolve()
    recover_dir(index_dir)
    check_disjoint(index_dir, kb_dir, "index folder", "knowledge-base folder")
    check_replaceable(index_dir, is_index_dir, INDEX_WHAT)
    documents = find_documents(kb_dir)
    if not documents:
        raise NothingToIndexError(f"{kb_dir}: no .pdf files in this folder or below; nothing indexed, "
                                  f"{index_dir} left as it was")
    return kb_dir, index_dir, documents


@dataclass
class DocumentStatus:
    file: str
    sha256: str | None
    status: str  # "ok" | "failed"
    pages: int = 0
    chunks: int = 0
    reason: str | None = None
    error: str | None = None
    embedded: bool = False  # embedded in this run (False: reused from the previous index)


@dataclass
class IngestReport:
    index_dir: Path
    documents: list[DocumentStatus] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    embedded_chunks: int = 0
    reused_chunks: int = 0
    seconds: float = 0.0
    embed_seconds: float = 0.0
    manifest_id: str = ""

    @property
    def failed(self) -> list[DocumentStatus]:
        return [d for d in self.documents if d.status != "ok"]

    @property
    def pages(self) -> int:
        return sum(d.pages for d in self.documents)

    @property
    def chunks(self) -> int:
        return sum(d.chunks for d in self.documents if d.status == "ok")

    @property
    def ok(self) -> bool:
        return not self.failed


def chunk_embedding_text(headword: str | None, text: str) -> str:
    """What is embedded and lexically indexed for a chunk: continuation pieces of a long entry
    get their headword in front, so they are still found by the sign they describe."""
    if isinstance(headword, str) and headword and not text.startswith(headword):
        return f"{headword}\n{text}"
    return text


def find_documents(kb_dir: Path) -> list[Path]:
    """Every file under kb_dir that claims to be a PDF (by extension), sorted."""
    kb_dir = Path(kb_dir)
    if not kb_dir.is_dir():
        raise FileNotFoundError(f"knowledge base folder not found: {kb_dir}")
    return sorted(p for p in kb_dir.rglob("*") if p.is_file() and p.suffix.lower() == ".pdf")


def _read_previous(index_dir: Path, embedding: str, chunking: dict) -> tuple[dict, pd.DataFrame, np.ndarray] | None:
    """The previous index if it is complete and built with the same model and chunking."""
    try:
        manifest = json.loads((index_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
        if manifest.get("format_version") != FORMAT_VERSION:
            return None
        if manifest["embedding"]["model"] != embedding or manifest["chunking"] != chunking:
            return None
        chunks = pq.read_table(index_dir / CHUNKS_FILE).to_pandas()
        index = faiss.read_index(str(index_dir / INDEX_FILE))
        if index.ntotal != len(chunks):
            return None
        vectors = index.reconstruct_n(0, index.ntotal) if index.ntotal else np.zeros((0, index.d), "float32")
        return manifest, chunks, vectors
    except (OSError, KeyError, ValueError, RuntimeError, pa.ArrowException):
        return None


def _manifest_id(documents: list[dict], embedding: dict, chunking: dict) -> str:
    payload = json.dumps({"d": documents, "e": embedding, "c": chunking}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class _BackgroundEmbedder:
    """Embeds full batches on one worker thread while the caller extracts the next PDFs.

    pypdf's extraction holds the GIL and torch's kernels release it, so the two overlap and ingest
    costs little more than embedding alone. Hand-written: it is a few lines around a thread pool.
    """

    def __init__(self, model_name: str, batch_size: int, progress: Callable[[int, int], None] | None):
        self.model_name = model_name
        self.batch_size = batch_size
        self.progress = progress
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self.texts: list[str] = []
        self.futures = []
        self.submitted = 0
        self.done = 0
        self.seconds = 0.0

    def add(self, texts: list[str]) -> None:
        self.texts.extend(texts)
        while len(self.texts) - self.submitted >= self.batch_size:
            self._submit(self.submitted + self.batch_size)

    def _submit(self, end: int) -> None:
        batch = self.texts[self.submitted : end]
        self.submitted = end
        self.futures.append(self.pool.submit(self._encode, batch))

    def _encode(self, batch: list[str]) -> np.ndarray:
        model = load_sentence_model(self.model_name)
        t0 = time.perf_counter()
        vectors = model.encode(batch, batch_size=self.batch_size, normalize_embeddings=True,
                               convert_to_numpy=True, show_progress_bar=False)
        self.seconds += time.perf_counter() - t0
        self.done += len(batch)
        if self.progress:
            self.progress(self.done, len(self.texts))
        return vectors.astype("float32")

    def finish(self) -> list[np.ndarray]:
        try:
            if self.submitted < len(self.texts):
                self._submit(len(self.texts))
            return [f.result() for f in self.futures]
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def ingest(
    kb_dir: Path | str | None = None,
    index_dir: Path | str | None = None,
    settings: KnowledgeBaseSettings | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_document: Callable[[DocumentStatus], None] | None = None,
) -> IngestReport:
    """Build or update the index in ``index_dir`` from the PDFs under ``kb_dir``.

    ``progress(done, total)`` is called as chunks are embedded; ``on_document`` once per file.
    Failures (corrupt, encrypted, not a PDF, no text) are recorded per document and the rest
    is still indexed. Refusals (see ``prepare_ingest``) and a knowledge base that gives no text
    at all (``NothingToIndexError``) leave the index folder untouched.
    """
    t0 = time.perf_counter()
    kb = settings or get_settings().kb
    kb_dir, index_dir, documents = prepare_ingest(kb_dir, index_dir)
    remove_debris(index_dir)

    chunking = {
        "chunk_size": kb.chunk_size,
        "chunk_overlap": kb.chunk_overlap,
        "headword_pattern": kb.headword_pattern or DEFAULT_HEADWORD_PATTERN,
    }
    embed_name = model_id(kb.embedding_model)
    previous = _read_previous(index_dir, embed_name, chunking)
    prev_docs: dict[tuple[str, str], pd.DataFrame] = {}
    prev_vectors = None
    if previous is not None:
        _, prev_chunks, prev_vectors = previous
        prev_chunks = prev_chunks.reset_index(drop=True)
        for (file, sha), group in prev_chunks.groupby(["file", "sha256"], sort=False):
            prev_docs[(file, sha)] = group

    chunker = DictionaryChunker(kb.chunk_size, kb.chunk_overlap, chunking["headword_pattern"])
    report = IngestReport(index_dir=index_dir)
    kept_frames: list[pd.DataFrame] = []
    kept_vectors: list[np.ndarray] = []
    new_rows: list[dict] = []
    embedder = _BackgroundEmbedder(kb.embedding_model, kb.embed_batch_size, progress)

    for path in documents:
        rel = path.relative_to(kb_dir).as_posix()
        try:
            sha = sha256_file(path)
        except OSError as exc:
            status = DocumentStatus(rel, None, "failed", reason="unreadable", error=f"{path}: {exc}")
            report.documents.append(status)
            if on_document:
                on_document(status)
            continue
        reused = prev_docs.get((rel, sha))
        if reused is not None:
            kept_frames.append(reused)
            kept_vectors.append(prev_vectors[reused.index.to_numpy()])
            status = DocumentStatus(rel, sha, "ok", pages=int(reused["page"].max()) if len(reused) else 0,
                                    chunks=len(reused))
            # pages of a reused document come from the previous manifest when available
            status.pages = _previous_pages(previous, rel, sha, status.pages)
        else:
            try:
                pages = extract_pages(path)
            except PdfExtractionError as exc:
                status = DocumentStatus(rel, sha, "failed", reason=exc.reason, error=str(exc))
            else:
                chunks = chunker.split_pages([(p.number, p.text) for p in pages])
                embedder.add([chunk_embedding_text(c.headword, c.text) for c in chunks])
                for c in chunks:
                    new_rows.append(
                        {
                            "chunk_id": f"{sha[:12]}-p{c.page}-c{c.ordinal}",
                            "file": rel,
                            "sha256": sha,
                            "page": c.page,
                            "ordinal": c.ordinal,
                            "char_start": c.start,
                            "char_end": c.end,
                            "headword": c.headword,
                            "aliases": list(c.aliases),
                            "text": c.text,
                        }
                    )
                status = DocumentStatus(rel, sha, "ok", pages=len(pages), chunks=len(chunks), embedded=True)
                if not chunks:
                    status.status, status.reason = "failed", "no_text"
                    status.error = f"{path}: no chunks after splitting"
        report.documents.append(status)
        if on_document:
            on_document(status)

    seen = {d.file for d in report.documents}
    if previous is not None:
        report.removed = sorted({d["file"] for d in previous[0]["documents"]} - seen)

    # Only new or changed documents were embedded: the expensive step the incremental design avoids.
    batches = embedder.finish()
    if new_rows:
        new_vectors = np.vstack(batches)
        dim = new_vectors.shape[1]
        report.embed_seconds = embedder.seconds
    else:
        dim = prev_vectors.shape[1] if prev_vectors is not None else \
            load_sentence_model(kb.embedding_model).get_embedding_dimension()
        new_vectors = np.zeros((0, dim), dtype="float32")
    report.embedded_chunks = len(new_rows)
    report.reused_chunks = sum(len(f) for f in kept_frames)

    frames = [f for f in kept_frames if len(f)] + ([pd.DataFrame(new_rows)] if new_rows else [])
    if not frames:
        raise NothingToIndexError(f"{kb_dir}: none of the {len(documents)} PDF file(s) gave any text "
                                  f"(see the failures above); nothing indexed, {index_dir} left as it was")
    all_chunks = pd.concat(frames, ignore_index=True)
    all_vectors = np.vstack(kept_vectors + [new_vectors]).astype("float32") if (kept_vectors or len(new_vectors)) \
        else np.zeros((0, dim), "float32")
    # Deterministic row order whatever was reused: by file, then position in the file.
    order = np.lexsort((all_chunks["ordinal"].to_numpy(), all_chunks["file"].to_numpy())) if len(all_chunks) else []
    all_chunks = all_chunks.iloc[order].reset_index(drop=True)
    all_vectors = all_vectors[order] if len(all_chunks) else all_vectors

    index = faiss.IndexFlatIP(dim)
    if len(all_vectors):
        index.add(np.ascontiguousarray(all_vectors))

    docs = [
        {k: v for k, v in d.__dict__.items() if k != "embedded"} for d in report.documents
    ]
    embedding = {"model": embed_name, "dimension": int(dim), "normalized": True, "metric": "inner_product"}
    report.manifest_id = _manifest_id(docs, embedding, chunking)
    manifest = {
        "format_version": FORMAT_VERSION,
        "manifest_id": report.manifest_id,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "kb_dir": str(kb_dir),
        "embedding": embedding,
        "chunking": chunking,
        "documents": docs,
        "removed": report.removed,
        "counts": {
            "documents": len(docs),
            "failed": len(report.failed),
            "pages": report.pages,
            "chunks": len(all_chunks),
            "embedded_chunks": report.embedded_chunks,
            "reused_chunks": report.reused_chunks,
        },
    }

    staging = make_staging_dir(index_dir)
    try:
        faiss.write_index(index, str(staging / INDEX_FILE))
        table = pa.Table.from_pandas(all_chunks[CHUNK_SCHEMA.names], schema=CHUNK_SCHEMA, preserve_index=False)
        pq.write_table(table, staging / CHUNKS_FILE)
        write_json_atomic(staging / MANIFEST_FILE, manifest)
        replace_dir_atomic(staging, index_dir, is_index_dir, INDEX_WHAT)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    report.seconds = time.perf_counter() - t0
    return report


def _previous_pages(previous, rel: str, sha: str, fallback: int) -> int:
    if previous is None:
        return fallback
    for d in previous[0].get("documents", []):
        if d.get("file") == rel and d.get("sha256") == sha:
            return int(d.get("pages") or fallback)
    return fallback
