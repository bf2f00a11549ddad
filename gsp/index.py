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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from gsp.atomic import (
    check_disjoint,
    check_replaceable,
    make_staging_dir,
    recover_dir,
    remove_debris,
    replace_dir_atomic,
    sha256_file,
    write_json_atomic,
)
from gsp.chunking import DEFAULT_HEADWORD_PATTERN, Chunk, DictionaryChunker
from gsp.embedding import load_sentence_model, model_id
from gsp.errors import GspError
from gsp.pdf import PdfExtractionError, extract_pages
from gsp.settings import KnowledgeBaseSettings

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


class NothingToIndexError(GspError, FileNotFoundError):
    """The knowledge base is missing or yields no text at all; the existing index is kept as it was."""


def is_index_dir(path: Path) -> bool:
    """True for a folder this module wrote: its manifest has the index format fields."""
    try:
        manifest = json.loads((Path(path) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(manifest, dict) and isinstance(manifest.get("format_version"), int)
            and isinstance(manifest.get("embedding"), dict) and isinstance(manifest.get("documents"), list))


def prepare_ingest(kb_dir: Path | str, index_dir: Path | str) -> tuple[Path, Path, list[Path]]:
    """Resolve the folders, check them, list the PDFs — everything that can refuse a run before
    any work: an index folder overlapping the knowledge base or holding anything but an index
    (``UnsafePathError``), a missing knowledge base or one without PDFs (``NothingToIndexError``)."""
    kb_dir = Path(kb_dir).resolve()
    index_dir = Path(index_dir).resolve()
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
        raise NothingToIndexError(f"knowledge base folder not found: {kb_dir}")
    return sorted(p for p in kb_dir.rglob("*") if p.is_file() and p.suffix.lower() == ".pdf")


@dataclass
class PreviousIndex:
    """The index being replaced, when it was built with the same model and chunking: its
    documents' chunks and vectors are reused as they are."""

    manifest: dict
    chunks: pd.DataFrame
    vectors: np.ndarray

    def __post_init__(self) -> None:
        self.chunks = self.chunks.reset_index(drop=True)
        self.by_document = {key: group for key, group in self.chunks.groupby(["file", "sha256"], sort=False)}

    def pages(self, rel: str, sha: str, fallback: int) -> int:
        """A reused document's page count, from the previous manifest when it has one."""
        for d in self.manifest.get("documents", []):
            if d.get("file") == rel and d.get("sha256") == sha:
                return int(d.get("pages") or fallback)
        return fallback


def read_previous(index_dir: Path, embedding: str, chunking: dict) -> PreviousIndex | None:
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
        return PreviousIndex(manifest, chunks, vectors)
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


def chunking_config(kb: KnowledgeBaseSettings) -> dict:
    """The chunking settings an index records (a change means every document is re-chunked)."""
    return {"chunk_size": kb.chunk_size, "chunk_overlap": kb.chunk_overlap,
            "headword_pattern": kb.headword_pattern or DEFAULT_HEADWORD_PATTERN}


def chunk_rows(chunks: list[Chunk], rel: str, sha: str) -> list[dict]:
    """The chunks.parquet rows of one document's chunks."""
    return [{"chunk_id": f"{sha[:12]}-p{c.page}-c{c.ordinal}", "file": rel, "sha256": sha, "page": c.page,
             "ordinal": c.ordinal, "char_start": c.start, "char_end": c.end, "headword": c.headword,
             "aliases": list(c.aliases), "text": c.text} for c in chunks]


@dataclass
class Collected:
    """What the documents gave: chunks and vectors reused from the previous index, and new chunk
    rows whose texts went to the background embedder."""

    documents: list[DocumentStatus] = field(default_factory=list)
    kept_chunks: list[pd.DataFrame] = field(default_factory=list)
    kept_vectors: list[np.ndarray] = field(default_factory=list)
    new_rows: list[dict] = field(default_factory=list)


def collect_document(path: Path, rel: str, previous: PreviousIndex | None, chunker: DictionaryChunker,
                     embedder: _BackgroundEmbedder, out: Collected) -> DocumentStatus:
    """One document: reused when its sha256 is in the previous index, else extracted, chunked and
    queued for embedding; a bad file becomes a failed status naming it."""
    try:
        sha = sha256_file(path)
    except OSError as exc:
        return DocumentStatus(rel, None, "failed", reason="unreadable", error=f"{path}: {exc}")
    reused = previous.by_document.get((rel, sha)) if previous is not None else None
    if reused is not None:
        out.kept_chunks.append(reused)
        out.kept_vectors.append(previous.vectors[reused.index.to_numpy()])
        pages = int(reused["page"].max()) if len(reused) else 0
        return DocumentStatus(rel, sha, "ok", pages=previous.pages(rel, sha, pages), chunks=len(reused))
    try:
        pages = extract_pages(path)
    except PdfExtractionError as exc:
        return DocumentStatus(rel, sha, "failed", reason=exc.reason, error=str(exc))
    chunks = chunker.split_pages([(p.number, p.text) for p in pages])
    embedder.add([chunk_embedding_text(c.headword, c.text) for c in chunks])
    out.new_rows.extend(chunk_rows(chunks, rel, sha))
    if not chunks:
        return DocumentStatus(rel, sha, "failed", pages=len(pages), reason="no_text", embedded=True,
                              error=f"{path}: no chunks after splitting")
    return DocumentStatus(rel, sha, "ok", pages=len(pages), chunks=len(chunks), embedded=True)


def assemble(collected: Collected, new_vectors: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """Reused and new chunks with their vectors, in a deterministic order whatever was reused:
    by file, then position in the file."""
    frames = [f for f in collected.kept_chunks if len(f)]
    if collected.new_rows:
        frames.append(pd.DataFrame(collected.new_rows))
    chunks = pd.concat(frames, ignore_index=True)
    vectors = np.vstack(collected.kept_vectors + [new_vectors]).astype("float32")
    order = np.lexsort((chunks["ordinal"].to_numpy(), chunks["file"].to_numpy()))
    return chunks.iloc[order].reset_index(drop=True), vectors[order]


def index_manifest(report: IngestReport, kb_dir: Path, chunks: pd.DataFrame, dim: int, embed_name: str,
                   chunking: dict) -> dict:
    """manifest.json: format, provenance, every document's status and the counts."""
    docs = [{k: v for k, v in d.__dict__.items() if k != "embedded"} for d in report.documents]
    embedding = {"model": embed_name, "dimension": int(dim), "normalized": True, "metric": "inner_product"}
    report.manifest_id = _manifest_id(docs, embedding, chunking)
    return {
        "format_version": FORMAT_VERSION,
        "manifest_id": report.manifest_id,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "kb_dir": str(kb_dir),
        "embedding": embedding,
        "chunking": chunking,
        "documents": docs,
        "removed": report.removed,
        "counts": {
            "documents": len(docs),
            "failed": len(report.failed),
            "pages": report.pages,
            "chunks": len(chunks),
            "embedded_chunks": report.embedded_chunks,
            "reused_chunks": report.reused_chunks,
        },
    }


def write_index(index_dir: Path, chunks: pd.DataFrame, vectors: np.ndarray, dim: int, manifest: dict) -> None:
    """Build the index in a staging folder beside ``index_dir`` and swap it in (a crash at any
    moment leaves the previous index usable)."""
    index = faiss.IndexFlatIP(dim)
    if len(vectors):
        index.add(np.ascontiguousarray(vectors))
    staging = make_staging_dir(index_dir)
    try:
        faiss.write_index(index, str(staging / INDEX_FILE))
        table = pa.Table.from_pandas(chunks[CHUNK_SCHEMA.names], schema=CHUNK_SCHEMA, preserve_index=False)
        pq.write_table(table, staging / CHUNKS_FILE)
        write_json_atomic(staging / MANIFEST_FILE, manifest)
        replace_dir_atomic(staging, index_dir, is_index_dir, INDEX_WHAT)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def ingest(
    kb_dir: Path | str,
    index_dir: Path | str,
    settings: KnowledgeBaseSettings,
    progress: Callable[[int, int], None] | None = None,
    on_document: Callable[[DocumentStatus], None] | None = None,
) -> IngestReport:
    """Build or update the index in ``index_dir`` from the PDFs under ``kb_dir``: read the
    previous index, extract and embed what is new, assemble, write.

    ``progress(done, total)`` is called as chunks are embedded; ``on_document`` once per file.
    Failures (corrupt, encrypted, not a PDF, no text) are recorded per document and the rest
    is still indexed. Refusals (see ``prepare_ingest``) and a knowledge base that gives no text
    at all (``NothingToIndexError``) leave the index folder untouched.
    """
    t0 = time.perf_counter()
    kb_dir, index_dir, documents = prepare_ingest(kb_dir, index_dir)
    remove_debris(index_dir)
    chunking = chunking_config(settings)
    embed_name = model_id(settings.embedding_model)
    previous = read_previous(index_dir, embed_name, chunking)

    chunker = DictionaryChunker(settings.chunk_size, settings.chunk_overlap, chunking["headword_pattern"])
    embedder = _BackgroundEmbedder(settings.embedding_model, settings.embed_batch_size, progress)
    collected = Collected()
    for path in documents:
        status = collect_document(path, path.relative_to(kb_dir).as_posix(), previous, chunker, embedder, collected)
        collected.documents.append(status)
        if on_document:
            on_document(status)
    # Only new or changed documents were embedded: the expensive step the incremental design avoids.
    batches = embedder.finish()

    report = IngestReport(index_dir=index_dir, documents=collected.documents,
                          embedded_chunks=len(collected.new_rows),
                          reused_chunks=sum(len(f) for f in collected.kept_chunks))
    if previous is not None:
        seen = {d.file for d in report.documents}
        report.removed = sorted({d["file"] for d in previous.manifest["documents"]} - seen)
    if not collected.new_rows and not any(len(f) for f in collected.kept_chunks):
        raise NothingToIndexError(f"{kb_dir}: none of the {len(documents)} PDF file(s) gave any text "
                                  f"(see the failures above); nothing indexed, {index_dir} left as it was")
    if collected.new_rows:
        new_vectors = np.vstack(batches)
        report.embed_seconds = embedder.seconds
    else:  # everything was reused, so there is a previous index to take the dimension from
        new_vectors = np.zeros((0, previous.vectors.shape[1]), dtype="float32")
    chunks, vectors = assemble(collected, new_vectors)
    dim = new_vectors.shape[1]
    write_index(index_dir, chunks, vectors, dim, index_manifest(report, kb_dir, chunks, dim, embed_name, chunking))
    report.seconds = time.perf_counter() - t0
    return report
