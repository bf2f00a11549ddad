"""Hybrid retrieval over the knowledge base: dense FAISS scores fused with BM25 and headwords.

The offline default embedding model is English-only, and dictionary lookups are mostly by
headword, so the dense cosine score alone would miss a Turkish or Chinese gloss. The fused score
is ``w·dense + (1−w)·bm25/max(bm25) + bonus·[query == headword]``; with a multilingual
embedding model (a setting) the dense part carries more of the load.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import bm25s
import faiss
import numpy as np
import pyarrow.parquet as pq

from gsp.atomic import recover_dir
from gsp.embedding import load_sentence_model
from gsp.errors import GspError
from gsp.index import CHUNKS_FILE, INDEX_FILE, MANIFEST_FILE, chunk_embedding_text
from gsp.lexical import normalise_headword, tokenize
from gsp.settings import KnowledgeBaseSettings

# bm25s logs every index build at DEBUG; Prefect's logging setup would show it.
logging.getLogger("bm25s").setLevel(logging.WARNING)


class IndexNotFoundError(GspError, FileNotFoundError):
    """No usable index at the given folder (run `gsp ingest` first)."""


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    file: str
    page: int
    score: float
    text: str
    headword: str | None
    dense: float = 0.0
    lexical: float = 0.0
    exact: bool = False  # the query is this entry's headword or one of its aliases

    def citation(self) -> str:
        return f"{self.file} p.{self.page}"

    def to_dict(self) -> dict:
        return asdict(self)


class HybridRetriever:
    """Search over one index folder: dense FAISS scores fused with BM25 and exact headwords."""

    def __init__(self, index_dir: Path, manifest: dict, index: faiss.Index, chunks, settings: KnowledgeBaseSettings):
        self.index_dir = index_dir
        self.manifest = manifest
        self.index = index
        self.chunks = chunks.reset_index(drop=True)
        self.settings = settings
        self._model = None
        # Every name a chunk's entry goes by (headword and aliases), in comparable form.
        self._names = [
            {normalise_headword(n) for n in ([h] if isinstance(h, str) else []) + list(a if a is not None else [])}
            for h, a in zip(self.chunks["headword"], self.chunks["aliases"])
        ]
        corpus = [tokenize(chunk_embedding_text(h, t)) for h, t in zip(self.chunks["headword"], self.chunks["text"])]
        self._bm25 = bm25s.BM25()
        if corpus:
            self._bm25.index([c or [""] for c in corpus], show_progress=False)

    @property
    def manifest_id(self) -> str:
        return str(self.manifest.get("manifest_id", ""))

    def __len__(self) -> int:
        return len(self.chunks)

    @classmethod
    def load(cls, index_dir: Path | str, settings: KnowledgeBaseSettings) -> HybridRetriever:
        """The index in ``index_dir`` (an interrupted swap is recovered first); ``IndexNotFoundError``
        names the folder when it is missing, unreadable or inconsistent."""
        index_dir = Path(index_dir)
        recover_dir(index_dir)
        missing = [f for f in (INDEX_FILE, CHUNKS_FILE, MANIFEST_FILE) if not (index_dir / f).is_file()]
        if missing:
            raise IndexNotFoundError(
                f"no index at {index_dir} (missing {', '.join(missing)}); run `gsp ingest` first"
            )
        try:
            manifest = json.loads((index_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
            index = faiss.read_index(str(index_dir / INDEX_FILE))
            chunks = pq.read_table(index_dir / CHUNKS_FILE).to_pandas()
        except (OSError, ValueError, RuntimeError) as exc:
            raise IndexNotFoundError(f"index at {index_dir} is unreadable: {exc}") from exc
        if index.ntotal != len(chunks):
            raise IndexNotFoundError(
                f"index at {index_dir} is inconsistent: {index.ntotal} vectors but {len(chunks)} chunks"
            )
        return cls(index_dir, manifest, index, chunks, settings)

    def _embed(self, query: str) -> np.ndarray:
        if self._model is None:
            model_name = self.manifest["embedding"]["model"]
            self._model = load_sentence_model(model_name)
        vec = self._model.encode([query], normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        if vec.shape[1] != self.index.d:
            raise IndexNotFoundError(
                f"index at {self.index_dir} has dimension {self.index.d}, query model gives {vec.shape[1]}"
            )
        return vec.astype("float32")

    def search(self, query: str, k: int = 5) -> list[Hit]:
        """The top-k chunks for ``query`` with fused scores and citations (file, page)."""
        n = len(self.chunks)
        if n == 0 or not query.strip():
            return []
        dense = np.zeros(n, dtype="float32")
        pool = min(n, max(50, k * 10))
        scores, ids = self.index.search(self._embed(query), pool)
        valid = ids[0] >= 0
        dense[ids[0][valid]] = np.clip(scores[0][valid], 0.0, 1.0)

        lexical = np.zeros(n, dtype="float32")
        q_tokens = tokenize(query)
        if q_tokens:
            raw = np.asarray(self._bm25.get_scores(q_tokens), dtype="float32")
            if raw.max() > 0:
                lexical = raw / raw.max()

        qhead = normalise_headword(query)
        exact = np.array([1.0 if qhead and qhead in names else 0.0 for names in self._names], dtype="float32")
        w = self.settings.dense_weight
        fused = w * dense + (1.0 - w) * lexical + self.settings.headword_bonus * exact
        top = np.argsort(-fused, kind="stable")[:k]
        hits = []
        for i in top:
            if fused[i] <= 0:
                break
            row = self.chunks.iloc[int(i)]
            hits.append(
                Hit(
                    chunk_id=row["chunk_id"],
                    file=row["file"],
                    page=int(row["page"]),
                    score=float(fused[i]),
                    text=row["text"],
                    headword=row["headword"] if isinstance(row["headword"], str) else None,
                    dense=float(dense[i]),
                    lexical=float(lexical[i]),
                    exact=bool(exact[i]),
                )
            )
        return hits


_loaded: dict[tuple[str, str, str], HybridRetriever] = {}
_loaded_lock = threading.Lock()


def shared_retriever(index_dir: Path | str, settings: KnowledgeBaseSettings) -> HybridRetriever:
    """One retriever per index (folder, contents, search settings) per process: loading one
    builds the BM25 index and the query model, and every generation task of a flow run needs it.
    Keyed on the manifest's id as well, so a re-ingested index is loaded afresh."""
    index_dir = Path(index_dir).resolve()
    recover_dir(index_dir)
    try:
        manifest_id = str(json.loads((index_dir / MANIFEST_FILE).read_text(encoding="utf-8")).get("manifest_id", ""))
    except (OSError, ValueError, AttributeError):
        manifest_id = ""  # HybridRetriever.load says what is wrong with the folder
    key = (str(index_dir), manifest_id, settings.model_dump_json())
    with _loaded_lock:
        if key not in _loaded:
            if len(_loaded) >= 2:  # an old index of this folder is not searched again
                _loaded.pop(next(iter(_loaded)))
            _loaded[key] = HybridRetriever.load(index_dir, settings)
        return _loaded[key]
