"""GSP generation (paper section 3.2): for every sign of a vocabulary, prompts P1–P4 produce the
primary description Tb (eq. 3), k synonym variants Ts (eq. 4), the refined description Tg (eq. 5)
and the part-level texts Tp (eq. 6), written as one description run (layout: :mod:`gsp.schema`).

Per sign: retrieve → P1 → (P2 ‖ retrieve references → P3) → P4. A failure at any step becomes an
explicit ``failed`` row with its reason (Tg and Tp fail with the upstream reason when Tb did);
Ts still comes from the label when Tb failed. Every text passes the quality check of
:mod:`gsp.quality` or is re-asked like schema-invalid output. A run in which more than
``max_failed_share`` of the rows failed is written, but marked failed and not made ``LATEST``.
All signs run concurrently; the client's semaphore and rate limiters decide how many requests
are in flight.

A run honours the review of a base run (the output folder's ``LATEST`` or ``base``; see
:class:`ReviewBase`): approved and edited rows are kept without a request, rejected rows and what
depends on them are asked again, the reviewer's note in the prompt.

A refinement run (:func:`refine_descriptions`, beyond the paper) rewrites the Tg of the signs of a
training run's most confused class pairs with P5 so that each states what tells it apart from the
other sign, splits them again with P4, and carries every other row of the base run over unchanged.

One lifecycle for every caller: :func:`generation_session` (response cache → endpoint, configured
or the embedded server → client → close). :func:`generate_descriptions` runs a whole plan in one
session without Prefect; the Prefect flow opens the session itself and hands its tasks plain data
(the plan as :meth:`RunPlan.to_dict`, label lists, the session's id) through
:func:`describe_planned` and :func:`finalize_planned`.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import logging
import re
import secrets
import shutil
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from gsp.atomic import (
    check_replaceable,
    claim_folder,
    json_text,
    publish_staged_folder,
    remove_leftover,
    sha256_file,
    write_text_atomic,
)
from gsp.errors import GspError
from gsp.llm.cache import ResponseCache
from gsp.llm.client import ChatResult, Endpoint, LLMCallError, LLMClient, check_endpoint, endpoint_host
from gsp.llm.server import local_llm_server
from gsp.prompts import REFINE_PROMPT_FILES, Prompt, load_prompts, output_model, schema_text
from gsp.quality import is_quality_failure, texts_problem
from gsp.retrieval import shared_retriever
from gsp.schema import (
    BODY_PARTS,
    KINDS,
    LATEST_POINTER,
    MANIFEST,
    REVIEW_FILE,
    REVIEW_KEPT,
    REVIEW_REGENERATED,
    STATUS_FAILED,
    STATUS_OK,
    apply_review,
    read_manifest,
    read_review,
    read_run,
    resolve_run_dir,
    row_key,
    write_kind,
)
from gsp.settings import Settings
from gsp.vocab import VocabEntry, VocabError, Vocabulary, load_vocabulary

log = logging.getLogger("gsp.generate")

KIND_OF_PROMPT = {"P1": "Tb", "P2": "Ts", "P3": "Tg", "P4": "Tp", "P5": "Tg"}
RUN_COMPLETE, RUN_FAILED = "complete", "failed"
NO_PASSAGES = "(no dictionary passage was found for this sign; describe it from general knowledge)"


class GenerationError(GspError, RuntimeError):
    """A description run cannot start or be written (no signs selected, the run folder exists)."""


class RunFailed(GspError, RuntimeError):
    """A description run was written but too many of its rows failed (see ``max_failed_share``):
    it is marked failed and is not ``LATEST``. The message is one line with the causes and the
    manifest's path."""

    exit_code = 1  # not the user's mistake: the run exists, its manifest says what failed


class PassageSearch(Protocol):
    """What generation needs from a knowledge base (:class:`gsp.retrieval.HybridRetriever`)."""

    manifest_id: str

    def search(self, query: str, k: int = ...) -> list[Any]: ...


def utc_now() -> str:
    return _utc_second(int(time.time()))


@lru_cache(maxsize=1)
def _utc_second(epoch_s: int) -> str:
    # once a second, not once a row: formatting was 2 % of a fast run's CPU (bench/generate.py)
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="seconds")


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


# --- references (P3) ------------------------------------------------------------------------

_Q = "[\"'“”‘’«»]"
_NQ = "[^\"'“”‘’«»]"
SIGN_REF_PATTERNS = (
    re.compile(rf"(?:sign\s+for|same\s+as|identical\s+to|like)\s+(?:the\s+sign\s+)?"
               rf"{_Q}(?P<name>{_NQ}{{1,40}}?){_Q}", re.I),
    re.compile(r"(?:sign\s+for|same\s+as|identical\s+to|like)\s+(?:the\s+sign\s+)?(?P<name>[A-Z][A-Z\-]+(?:\s+[A-Z][A-Z\-]+)*)\b"),
    # Chinese dictionaries: 手势同“好” ("the handshape is that of GOOD"), 同“饿”
    re.compile(rf"同\s*{_Q}(?P<name>{_NQ}{{1,12}}?){_Q}"),
)
HANDSHAPE_REF_PATTERNS = (
    re.compile(rf"{_Q}(?P<name>{_NQ}{{1,12}}?){_Q}[\s-]*hand(?:\s*shape)?\b", re.I),
    re.compile(rf"hand\s*shape\s+{_Q}?(?P<name>[A-Za-z0-9][A-Za-z0-9\-]{{0,11}}){_Q}?", re.I),
    re.compile(rf"manual\s+(?:sign|alphabet(?:\s+letter)?|letter)\s+"
               rf"{_Q}?(?P<name>[A-Za-z0-9][A-Za-z0-9\-]{{0,11}}){_Q}?", re.I),
    re.compile(r"\b(?P<name>[A-Z0-9](?:-[A-Za-z]+)?)[\s-]hand\s*shape\b"),
)
_NOT_NAMES = {"the", "a", "an", "one", "this", "that", "same", "other", "both", "each", "hand", "chart"}


@dataclass(frozen=True)
class Reference:
    kind: str   # 'sign' or 'handshape'
    name: str

    @property
    def query(self) -> str:
        return self.name if self.kind == "sign" else f"{self.name} handshape"


def find_references(text: str) -> list[Reference]:
    """Substituted references in a description: other signs ("the sign for LOVE", "same as
    'good'") and handshape-chart entries ("the '5' handshape", "manual sign Q"), in order."""
    found: list[Reference] = []
    for kind, patterns in (("sign", SIGN_REF_PATTERNS), ("handshape", HANDSHAPE_REF_PATTERNS)):
        for pattern in patterns:
            for match in pattern.finditer(text or ""):
                name = match.group("name").strip(" .,;:")
                if not name or name.lower() in _NOT_NAMES:
                    continue
                ref = Reference(kind, name)
                if all(r.kind != kind or r.name.lower() != name.lower() for r in found):
                    found.append(ref)
    return found


# --- honouring a reviewed run ---------------------------------------------------------------

#: The note a rejected text is asked again with when the reviewer wrote none: without a note the
#: request would be the rejected one, and the response cache would answer it with the same text.
DEFAULT_NOTE = "no reason was given; write a different answer"


@dataclass
class ReviewBase:
    """What a base run's review means for the next run, by row key (:func:`load_review_base`).

    ``kept``: approved and edited rows (also those a reviewed run kept before), and the rows a
    refinement run rewrote with P5 (``contrast_with``) unless rejected, copied into the new run
    without a request: a plain re-run must not undo a refinement by asking P3 again. ``notes``:
    rows to ask again with the reviewer's note: rejected now, or regenerated after an earlier
    rejection (asked with the same note, so the cache answers with the regenerated text instead of
    the rejected one). Everything else is asked as usual.
    What depends on a text is asked with the text as reviewed: an edited Tb's Tg and an edited
    Tg's Tp are asked with the edited text (unless reviewed themselves), so a correction reaches
    the texts split or refined from it; Ts, which paraphrases Tb only for grounding, keeps the
    text the LLM wrote (:func:`generated_text`)."""

    run_dir: Path | None = None
    kept: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    request_hashes: dict[str, str | None] = field(default_factory=dict)

    _by_stem: dict[str, tuple[list[str], list[str], list[str]]] | None = field(default=None, init=False,
                                                                              repr=False, compare=False)

    def notes_of(self, keys: Iterable[str]) -> str | None:
        """The notes of ``keys`` joined into one (``None`` when none of them is to be asked again)."""
        found = list(dict.fromkeys(self.notes[k] for k in keys if k in self.notes))
        return "; ".join(found) if found else None

    def keys_with_stem(self, stem: str) -> tuple[list[str], list[str], list[str]]:
        """The kept keys, the noted keys and all the base run's keys that are ``stem`` and an
        ordinal (one sign's Tp parts), in their order. Indexed on the first call: a scan of every
        key for each sign made a reviewed re-run quadratic in the vocabulary's size."""
        if self._by_stem is None:
            self._by_stem = {}
            for i, keys in enumerate((self.kept, self.notes, self.request_hashes)):
                for key in keys:
                    self._by_stem.setdefault(key[:-2], ([], [], []))[i].append(key)
        return self._by_stem.get(stem, ([], [], []))


def base_run_dir(out_root: Path, base: Path | str | None) -> Path | None:
    """The run to honour: ``base`` (a run, or a descriptions folder's LATEST run), else the
    output folder's LATEST run, else none."""
    if base is not None:
        return resolve_run_dir(Path(base))
    pointer = Path(out_root) / LATEST_POINTER
    if pointer.is_file():
        run = Path(out_root) / pointer.read_text(encoding="utf-8").strip()
        return run if (run / MANIFEST).is_file() else None
    return None


def plain_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row read from parquet as plain Python values (what Prefect tasks pass around)."""
    out = {k: (None if _is_null(v) else v.item() if hasattr(v, "item") else v) for k, v in row.items()
           if k not in ("body_parts", "sources")}
    out["body_parts"] = None if row.get("body_parts") is None else [str(p) for p in row["body_parts"]]
    out["sources"] = [{"chunk_id": str(s["chunk_id"]), "file": str(s["file"]), "page": int(s["page"])}
                      for s in (row.get("sources") if row.get("sources") is not None else [])]
    return out


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def load_review_base(run_dir: Path | None) -> ReviewBase:
    """Read ``run_dir``'s rows and review decisions (``gsp.schema.apply_review``) into a ReviewBase."""
    if run_dir is None:
        return ReviewBase()
    decisions = read_review(run_dir)
    raw = read_run(run_dir, ok_only=False)
    base = ReviewBase(run_dir=Path(run_dir))
    for df in raw.values():
        base.request_hashes.update(zip(df["key"], df["request_hash"]))
    for df in apply_review(raw, decisions).values():
        for row in df.to_dict("records"):
            key = row["key"]
            if row["status"] == STATUS_OK and (row["review"] in REVIEW_KEPT or row.get("contrast_with")):
                base.kept[key] = {**plain_row(row), "prompt_tokens": 0, "completion_tokens": 0}
            elif key not in decisions and row["review"] == REVIEW_REGENERATED:
                base.notes[key] = row["review_note"] or DEFAULT_NOTE
    for key, d in decisions.items():
        if d["decision"] == "reject":
            base.notes[key] = (d.get("note") or "").strip() or DEFAULT_NOTE
    return base


def generated_text(row: dict[str, Any]) -> str:
    """The text the LLM wrote for a kept row (before a reviewer's edit): what Ts paraphrases."""
    return row.get("original_text") or row["text"]


# --- the run plan ---------------------------------------------------------------------------

@dataclass
class RunPlan:
    """Everything fixed before the first request."""

    settings: Settings
    vocabulary: Vocabulary
    entries: list[VocabEntry]
    prompts: dict[str, Prompt]
    retriever: PassageSearch | None
    index_dir: Path | None
    out_root: Path
    run_id: str
    started_at: str = field(default_factory=utc_now)
    started_monotonic: float = field(default_factory=time.monotonic)
    base_dir: Path | None = None  # the run whose review this run honours (see ReviewBase)
    review: ReviewBase = field(default_factory=lambda: ReviewBase())

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain data (what a Prefect task receives): files, labels, ids and the
        settings without secrets; :meth:`from_dict` loads the rest again."""
        return {"vocab": str(self.vocabulary.path), "vocab_sha256": self.vocabulary.sha256,
                "labels": [e.label for e in self.entries], "run_id": self.run_id, "out_root": str(self.out_root),
                "index_dir": str(self.index_dir) if self.index_dir else None,
                "settings": self.settings.public_dict(), "started_at": self.started_at,
                "base_dir": str(self.base_dir) if self.base_dir else None,
                "started_unix": time.time() - (time.monotonic() - self.started_monotonic)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], labels: Sequence[int] | None = None) -> RunPlan:
        """The plan of :meth:`to_dict` (only ``labels`` of it, when given). The API key is not in
        the data: it comes from this process's environment, like every secret."""
        settings = Settings(**data["settings"])
        vocabulary = load_vocabulary(data["vocab"])
        if vocabulary.sha256 != data["vocab_sha256"]:
            raise GenerationError(f"{data['vocab']}: the vocabulary changed after run {data['run_id']} was planned")
        index_dir = Path(data["index_dir"]) if data["index_dir"] else None
        return cls(settings=settings, vocabulary=vocabulary,
                   entries=vocabulary.select(list(labels if labels is not None else data["labels"])),
                   prompts=load_prompts(settings.paths.prompts_dir),
                   retriever=shared_retriever(index_dir, settings.kb) if index_dir else None,
                   index_dir=index_dir, out_root=Path(data["out_root"]), run_id=data["run_id"],
                   started_at=data["started_at"],
                   started_monotonic=time.monotonic() - (time.time() - data["started_unix"]),
                   base_dir=Path(data["base_dir"]) if data.get("base_dir") else None,
                   review=load_review_base(Path(data["base_dir"]) if data.get("base_dir") else None))


def prepare_run(vocab_path: Path | str, *, settings: Settings, index_dir: Path | None = None,
                use_index: bool = True, out_dir: Path | None = None, labels: Sequence[int] | None = None,
                limit: int | None = None, run_id: str | None = None,
                retriever: PassageSearch | None = None, base: Path | str | None = None) -> RunPlan:
    """Load and check the vocabulary, prompts and index; choose the run id. Raises before any request.

    ``base``: the description run whose review this run honours; default: the output folder's
    ``LATEST`` run, when there is one (see :class:`ReviewBase`)."""
    vocabulary = load_vocabulary(vocab_path)
    entries = vocabulary.select(list(labels) if labels else None, limit)
    if not entries:
        raise GenerationError(f"{vocab_path}: no signs selected (limit={limit}, labels={labels})")
    prompts = load_prompts(settings.paths.prompts_dir)
    if retriever is None and use_index:
        index_dir = Path(index_dir) if index_dir else settings.paths.index
        retriever = shared_retriever(index_dir, settings.kb)
    elif retriever is None:
        index_dir = None
    out_root = Path(out_dir) if out_dir else settings.paths.descriptions
    # checked now, before any request; created only when the run is written (finalize_run)
    check_replaceable(out_root, _is_descriptions_root, DESCRIPTIONS_WHAT)
    base_dir = base_run_dir(out_root, base)
    return RunPlan(settings=settings, vocabulary=vocabulary, entries=entries, prompts=prompts,
                   retriever=retriever, index_dir=index_dir, out_root=out_root, run_id=run_id or new_run_id(),
                   base_dir=base_dir, review=load_review_base(base_dir))


DESCRIPTIONS_MARKER = ".gsp-descriptions"


DESCRIPTIONS_WHAT = "a gsp descriptions folder"


def _is_descriptions_root(folder: Path) -> bool:
    """Ours: marked, or holding description runs (each with its manifest)."""
    return (folder / DESCRIPTIONS_MARKER).is_file() or any(
        (run / MANIFEST).is_file() for run in folder.iterdir() if run.is_dir())


def claim_descriptions_root(out_root: Path) -> Path:
    """The folder that holds description runs and ``LATEST``: new, empty, or one we wrote before,
    never a user's folder (its own ``LATEST`` file would be overwritten) or a file."""
    return claim_folder(out_root, DESCRIPTIONS_MARKER, DESCRIPTIONS_WHAT, _is_descriptions_root)


# --- the generation session -----------------------------------------------------------------

@contextmanager
def llm_endpoint(settings: Settings) -> Iterator[tuple[Endpoint, int, bool]]:
    """The configured endpoint, or the embedded local server started for the duration.
    Yields (endpoint, concurrency, is_local)."""
    s = settings.llm
    if s.base_url:
        key = s.api_key.get_secret_value() if s.api_key else None
        # The embedded server's readiness is checked when it starts; a configured one is checked
        # here, so that a dead endpoint costs seconds rather than every request's retries.
        check_endpoint(s.base_url, key, s.model, timeout_s=s.preflight_timeout_s, attempts=s.preflight_attempts)
        yield Endpoint(s.base_url, s.model, key, s.structured_output), s.concurrency, False
        return
    with local_llm_server(model_path=s.local_model_path, ctx=s.local_ctx, replicas=s.local_servers,
                          slots=s.local_slots, log_dir=settings.paths.cache / "logs",
                          weights=s.local_weights, weights_dir=settings.paths.cache / "llm") as server:
        # json_object + schema: llama-server's grammar mode, sent without string upper bounds (grammar_safe).
        yield (Endpoint(server.base_url, server.model, None, s.local_structured_output, identity=server.identity,
                        max_tokens=s.local_max_tokens,
                        sampling={"frequency_penalty": s.local_frequency_penalty} if s.local_frequency_penalty else {},
                        replicas=server.replicas, repair_attempts=s.local_repair_attempts,
                        passages=s.local_retrieval_k),
               server.slots, True)


@dataclass
class GenerationSession:
    """An open endpoint with its client: every request of a run goes through ``client``, so one
    set of concurrency and rate limits (and one circuit breaker) governs the whole run."""

    id: str
    client: LLMClient
    is_local: bool


#: Open sessions of this process by id. A Prefect task receives the id (a string), not the live
#: client, so that tasks take plain data; see :func:`describe_planned`.
_SESSIONS: dict[str, GenerationSession] = {}


#: A limit shared with other processes, awaited before every request with its token estimate
#: (see :class:`gsp.llm.client.LLMClient`); provided by the caller, e.g. the flows.
Throttle = Callable[[int], Awaitable[None]]


@contextmanager
def long_lived_objects_frozen() -> Iterator[None]:
    """Keep what exists now (the imported libraries: 140,000 objects without Prefect, several
    times that with it) out of the garbage collector's full passes until the block ends.

    A generation session allocates steadily, so CPython's collector runs full passes during it;
    each one walked every imported object again (70-85 ms a pass here, a stall of all 64 requests
    in flight; bench/generate.py). ``gc.freeze`` is the stdlib's way to exempt long-lived objects;
    on leaving, ``gc.unfreeze`` hands them back, so garbage among them is still collected later.
    Nested and concurrent blocks (sessions in threads of one process) unfreeze when the last ends."""
    global _frozen_depth
    with _frozen_lock:
        if _frozen_depth == 0:
            gc.freeze()
        _frozen_depth += 1
    try:
        yield
    finally:
        with _frozen_lock:
            _frozen_depth -= 1
            if _frozen_depth == 0:
                gc.unfreeze()


_frozen_lock = threading.Lock()
_frozen_depth = 0


@asynccontextmanager
async def generation_session(settings: Settings, throttle: Throttle | None = None) -> AsyncIterator[GenerationSession]:
    """Response cache → endpoint (configured, after its preflight check, or the embedded server)
    → client; everything closed again on the way out, whatever happened. The session runs with
    the objects that existed before it frozen (:func:`long_lived_objects_frozen`)."""
    cache = ResponseCache(settings.paths.cache)
    try:
        with llm_endpoint(settings) as (endpoint, concurrency, is_local):
            client = LLMClient(endpoint, settings.llm, cache, concurrency=concurrency, throttle=throttle)
            session = GenerationSession(id=f"gen-{secrets.token_hex(6)}", client=client, is_local=is_local)
            _SESSIONS[session.id] = session
            try:
                with long_lived_objects_frozen():
                    yield session
            finally:
                del _SESSIONS[session.id]
                await client.aclose()
    finally:
        cache.close()


def open_session(session_id: str) -> GenerationSession:
    """The session ``session_id`` opened in this process (``GenerationError`` when there is none)."""
    try:
        return _SESSIONS[session_id]
    except KeyError:
        raise GenerationError(f"no generation session {session_id!r} is open in this process") from None


# --- describing signs -----------------------------------------------------------------------

@dataclass
class BatchResult:
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {k: [] for k in KINDS})
    no_hit: list[dict[str, Any]] = field(default_factory=list)
    busy_s: dict[str, float] = field(default_factory=lambda: {k: 0.0 for k in KINDS})

    def merge(self, other: BatchResult) -> None:
        for kind in KINDS:
            self.rows[kind].extend(other.rows[kind])
            self.busy_s[kind] += other.busy_s[kind]
        self.no_hit.extend(other.no_hit)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BatchResult:
        return cls(rows=data["rows"], no_hit=data["no_hit"], busy_s=data["busy_s"])


def hit_source(hit: Any) -> dict[str, Any]:
    return {"chunk_id": str(hit.chunk_id), "file": str(hit.file), "page": int(hit.page)}


def format_passages(hits: Sequence[Any]) -> str:
    if not hits:
        return NO_PASSAGES
    lines = []
    for i, hit in enumerate(hits, 1):
        head = f" (entry: {hit.headword})" if getattr(hit, "headword", None) else ""
        text = " ".join(str(hit.text).split())
        lines.append(f"[{i}] {Path(str(hit.file)).name} p.{hit.page}{head}: {text}")
    return "\n".join(lines)


def answer_texts(parsed: Any) -> list[str]:
    """The texts of one parsed answer: a description, k variants or the parts' texts."""
    if hasattr(parsed, "description"):
        return [parsed.description]
    if hasattr(parsed, "variants"):
        return list(parsed.variants)
    return [part.text for part in parsed.parts]


class SignDescriber:
    """Runs P1–P4 for signs with one client and one retriever (all on one event loop)."""

    def __init__(self, plan: RunPlan, client: LLMClient, on_done: Callable[[str], None] | None = None):
        self.plan = plan
        self.client = client
        self.on_done = on_done or (lambda kind: None)
        self.k = plan.settings.llm.synonyms
        self.pool: ThreadPoolExecutor | None = None  # set by describe_batch for the batch's searches
        self._search_lock = threading.Lock()
        self._search_memo: dict[tuple[str, int], list[Any]] = {}
        self.models = {key: output_model(key, self.k) for key in KIND_OF_PROMPT}
        self.review = plan.review
        # once, not per request (see schema_text); the dicts are this describer's own
        self.schema_texts = {key: schema_text(model) for key, model in self.models.items()}
        self.schemas = {key: json.loads(text) for key, text in self.schema_texts.items()}

    # retrieval runs in a worker thread (embedding a query is CPU work) so requests keep flowing
    def _search_sync(self, query: str, k: int) -> list[Any]:
        with self._search_lock:
            memo = self._search_memo.get((query, k))
            if memo is None:
                memo = list(self.plan.retriever.search(query, k=k))
                self._search_memo[(query, k)] = memo
            return memo

    async def search(self, query: str, k: int) -> list[Any]:
        if self.plan.retriever is None or not query.strip():
            return []
        # Not asyncio.to_thread: the loop's default pool keeps its threads until asyncio.run()
        # ends, and a live thread that once ran torch work makes libgomp stop spinning for every
        # later torch op in this process (training inside `gsp run` measured 1.5-2.3x slower,
        # 255k context switches against 300). The batch's own pool is shut down when it ends.
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._search_sync, query, k)

    def relevant(self, hit: Any, forms: Sequence[str]) -> bool:
        """Hybrid search always returns its nearest chunks; only these count as hits (an unrelated
        entry in P1's context would make the model describe the wrong sign)."""
        s = self.plan.settings.llm
        headword = str(getattr(hit, "headword", "") or "").strip().lower()
        if getattr(hit, "exact", False) or (headword and headword in {f.lower() for f in forms}):
            return True
        return (getattr(hit, "dense", 1.0) >= s.retrieval_min_dense
                or getattr(hit, "lexical", 1.0) >= s.retrieval_min_lexical)

    async def retrieve_gloss(self, entry: VocabEntry) -> list[Any]:
        """Top-k relevant passages over the English and the native form of the gloss."""
        k = self.client.retrieval_k
        best: dict[str, Any] = {}
        for form in entry.query_forms():
            for hit in await self.search(form, k):
                if not self.relevant(hit, [form]):
                    continue
                if hit.chunk_id not in best or hit.score > best[hit.chunk_id].score:
                    best[hit.chunk_id] = hit
        return sorted(best.values(), key=lambda h: (-h.score, str(h.chunk_id)))[:k]

    async def retrieve_references(self, texts: Sequence[str], exclude: set[str]) -> list[Any]:
        hits: list[Any] = []
        seen = set(exclude)
        for ref in find_references("\n".join(texts)):
            found = [h for h in await self.search(ref.query, 2) if self.relevant(h, [ref.name])]
            # the entry itself first when the index knows its headword
            found = sorted(found, key=lambda h: (str(getattr(h, "headword", "") or "").lower() != ref.name.lower()))
            for hit in found[:2]:
                if hit.chunk_id not in seen:
                    seen.add(hit.chunk_id)
                    hits.append(hit)
        return hits

    async def ask(self, key: str, entry: VocabEntry, note: str | None = None,
                  **variables: Any) -> tuple[ChatResult | None, str | None]:
        """One prompt for one sign; ``note``: a reviewer's note on the rejected text it replaces."""
        prompt = self.plan.prompts[key]
        messages = prompt.render(gloss=entry.describe(), schema=self.schema_texts[key],
                                 review_note=prompt.note_block(note), **variables)
        kind = KIND_OF_PROMPT[key]
        forms = [*entry.query_forms(), entry.gloss]
        started = time.monotonic()
        try:
            result = await self.client.structured(
                messages, self.models[key], self.schemas[key], name=f"{prompt.produces}_{key}", stage=kind,
                check=lambda parsed: texts_problem(answer_texts(parsed), kind, forms))
        except LLMCallError as exc:
            return None, str(exc)
        finally:
            self._busy[KIND_OF_PROMPT[key]] += time.monotonic() - started
        return result, result.error

    def row(self, entry: VocabEntry, kind: str, variant: int, prompt: Prompt, result: ChatResult | None,
            text: str | None, error: str | None, sources: Sequence[dict], body_parts: list[str] | None = None,
            with_tokens: bool = True, note: str | None = None) -> dict[str, Any]:
        ok = error is None and text is not None
        return {
            "key": row_key(entry.label, kind, variant),
            "label": entry.label,
            "gloss": entry.gloss,
            "lang": entry.lang,
            "kind": kind,
            "variant": variant,
            "text": text if ok else None,
            "body_parts": list(body_parts) if (kind == "Tp" and ok) else ([] if kind == "Tp" else None),
            "prompt_id": prompt.prompt_id,
            "prompt_sha": prompt.sha,
            "model": self.client.endpoint.model,
            "temperature": self.plan.settings.llm.temperature,
            "sources": list(sources),
            "request_hash": result.request_hash if result else None,
            "response_id": result.response_id if result else None,
            # a request's tokens are counted once: on the first row it produced
            "prompt_tokens": (result.prompt_tokens if result else 0) if with_tokens else 0,
            "completion_tokens": (result.completion_tokens if result else 0) if with_tokens else 0,
            "status": STATUS_OK if ok else STATUS_FAILED,
            "error": None if ok else (error or "no output"),
            "created_at": utc_now(),
            # asked again with a reviewer's note: a later run asks with the same note (see ReviewBase)
            "review": REVIEW_REGENERATED if note is not None else None,
            "review_note": note,
        }

    async def describe(self, entry: VocabEntry, out: BatchResult) -> None:
        hits = await self.retrieve_gloss(entry)
        if not hits:
            out.no_hit.append({"label": entry.label, "gloss": entry.gloss})
        tb_text, tb_err, ts_basis = await self.primary(entry, hits, out)
        self.on_done("Tb")

        async def synonyms() -> None:
            await self.synonyms(entry, ts_basis, [hit_source(h) for h in hits] if ts_basis else [], out)
            self.on_done("Ts")

        async def refine_and_split() -> None:
            tg_text, tp_err, tg_sources = await self.refine(entry, hits, tb_text, tb_err, out)
            self.on_done("Tg")
            await self.split(entry, tg_text, tp_err, tg_sources, out)
            self.on_done("Tp")

        await asyncio.gather(synonyms(), refine_and_split())

    async def primary(self, entry: VocabEntry, hits: Sequence[Any],
                      out: BatchResult) -> tuple[str | None, str | None, str | None]:
        """Tb (P1), kept from a review or asked. Returns (the text Tg is refined from, the error,
        the text Ts paraphrases): Ts depends on Tb only for grounding, so a Tb regenerated after a
        rejection, or edited, leaves Ts as it was (its text comes from the note-less request, or
        the LLM's own Tb, cached); Tg is refined from the edited text."""
        key = row_key(entry.label, "Tb", 0)
        if key in self.review.kept:
            kept = self.review.kept[key]
            out.rows["Tb"].append(kept)
            return kept["text"], None, generated_text(kept)
        sources, passages = [hit_source(h) for h in hits], format_passages(hits)
        note = self.review.notes.get(key)
        res, err = await self.ask("P1", entry, note=note, passages=passages)
        text = res.parsed.description.strip() if res and res.ok else None
        out.rows["Tb"].append(self.row(entry, "Tb", 0, self.plan.prompts["P1"], res, text, err, sources, note=note))
        if note is None:
            return text, err, text
        plain, _ = await self.ask("P1", entry, passages=passages)
        return text, err, plain.parsed.description.strip() if plain and plain.ok else None

    async def synonyms(self, entry: VocabEntry, basis: str | None, sources: list[dict], out: BatchResult) -> None:
        """Ts (P2): kept variants stay; rejected ones come from a request with the reviewers' notes,
        the others from the usual request."""
        keys = [row_key(entry.label, "Ts", i) for i in range(self.k)]
        note = self.review.notes_of(keys)
        answers: dict[str | None, tuple[ChatResult | None, str | None]] = {}
        for wanted in {None if k not in self.review.notes else note for k in keys if k not in self.review.kept}:
            answers[wanted] = await self.ask("P2", entry, note=wanted, k=self.k, primary=basis or "(none)")
        counted: set[str | None] = set()
        for i, key in enumerate(keys):
            if key in self.review.kept:
                out.rows["Ts"].append(self.review.kept[key])
                continue
            row_note = note if key in self.review.notes else None
            res, err = answers[row_note]
            variants = [v.strip() for v in res.parsed.variants] if res and res.ok else None
            text = variants[i] if variants and i < len(variants) else None
            out.rows["Ts"].append(self.row(entry, "Ts", i, self.plan.prompts["P2"], res, text, err, sources,
                                           with_tokens=row_note not in counted, note=row_note))
            counted.add(row_note)

    async def refine(self, entry: VocabEntry, hits: Sequence[Any], tb_text: str | None, tb_err: str | None,
                     out: BatchResult) -> tuple[str | None, str | None, list[dict]]:
        """Tg (P3), kept from a review or asked. Returns (the text Tp is split from, the error Tp
        fails with when there is none, Tg's sources)."""
        p3 = self.plan.prompts["P3"]
        key = row_key(entry.label, "Tg", 0)
        if key in self.review.kept:
            kept = self.review.kept[key]
            out.rows["Tg"].append(kept)
            return kept["text"], None, list(kept["sources"])
        sources = [hit_source(h) for h in hits]
        if tb_text is None:
            err = f"upstream Tb failed: {tb_err}"
            out.rows["Tg"].append(self.row(entry, "Tg", 0, p3, None, None, err, sources))
            return None, err, sources
        own = [h.text for h in hits if str(getattr(h, "headword", "") or "").lower()
               in {f.lower() for f in entry.query_forms()}]
        ref_hits = await self.retrieve_references([tb_text, *own], exclude={h.chunk_id for h in hits})
        tg_hits = list(hits) + ref_hits
        tg_sources = [hit_source(h) for h in tg_hits]
        note = self.review.notes.get(key)
        res, err = await self.ask("P3", entry, note=note, primary=tb_text, passages=format_passages(tg_hits))
        text = res.parsed.description.strip() if res and res.ok else None
        out.rows["Tg"].append(self.row(entry, "Tg", 0, p3, res, text, err, tg_sources, note=note))
        return text, None if text else f"upstream Tg failed: {err}", tg_sources

    async def split(self, entry: VocabEntry, tg_text: str | None, upstream_err: str | None, sources: list[dict],
                    out: BatchResult) -> None:
        """Tp (P4). Kept parts stay at their ordinals, and when the review kept every part of the
        base run's split, nothing is asked (whatever Tg became). An answer to the base run's own
        request puts its parts at their old ordinals; a new answer (a rejected part's note, a
        regenerated or edited Tg) fills the ordinals the kept parts leave free."""
        p4 = self.plan.prompts["P4"]
        prefix = row_key(entry.label, "Tp", 0)[:-2]
        kept_keys, noted_keys, base_keys = self.review.keys_with_stem(prefix)
        kept = {int(k[len(prefix):]): self.review.kept[k] for k in kept_keys}
        out.rows["Tp"].extend(kept.values())
        if kept and len(kept_keys) == len(base_keys):
            return
        free = (i for i in itertools.count() if i not in kept)
        if tg_text is None:
            out.rows["Tp"].append(self.row(entry, "Tp", next(free), p4, None, None, upstream_err, sources))
            return
        note = self.review.notes_of(noted_keys)
        res, err = await self.ask("P4", entry, note=note, refined=tg_text, body_parts=", ".join(BODY_PARTS))
        if not (res and res.ok):
            out.rows["Tp"].append(self.row(entry, "Tp", next(free), p4, res, None, err, sources, note=note))
            return
        same = res.request_hash == self.review.request_hashes.get(prefix + "00")
        for i, part in enumerate(res.parsed.parts):
            if same and i in kept:
                continue
            parts = sorted(set(part.body_parts), key=BODY_PARTS.index)
            out.rows["Tp"].append(self.row(entry, "Tp", i if same else next(free), p4, res, part.text.strip(), None,
                                           sources, body_parts=parts, with_tokens=i == 0, note=note))

    async def describe_all(self, entries: Sequence[VocabEntry]) -> BatchResult:
        # Every sign at once: the slots take their requests first come, first served, so all P1s
        # go first and the run ends on a queue of P2-P4s that keeps the slots busy. Admitting signs
        # as slots freed up starved the slots at the end (AUTSL at C=16, 200 ms: efficiency 0.98 ->
        # 0.94; bench/generate.py); the first wave leaves early because describe_batch opened its
        # connections before this prepares every sign's first request.
        out = BatchResult()
        self._busy = out.busy_s
        await asyncio.gather(*(self.describe(e, out) for e in entries))
        return out


async def describe_batch(plan: RunPlan, client: LLMClient, entries: Sequence[VocabEntry],
                         on_done: Callable[[str], None] | None = None) -> BatchResult:
    """P1–P4 for ``entries``; never raises for a sign's failure (those are rows), only for a
    fatal endpoint error (:class:`gsp.llm.client.FatalLLMError`)."""
    describer = SignDescriber(plan, client, on_done)
    # Searches are serialised by the describer's lock, so one thread is enough (see search()).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrieval") as pool:
        describer.pool = pool
        # Every answer this batch got is committed when it returns (the cache batches commits),
        # also when it fails; then the batch's own error is the one reported, not the flush's.
        try:
            await client.open_connections(len(entries))  # each sign's first request comes at once
            result = await describer.describe_all(entries)
        except BaseException:
            if client.cache is not None:
                with suppress(sqlite3.Error, OSError):
                    client.cache.flush()
            raise
        if client.cache is not None:
            client.cache.flush()
        return result


async def describe_planned(plan: dict[str, Any], labels: Sequence[int], session_id: str,
                           throttle: Throttle | None = None,
                           on_done: Callable[[str], None] | None = None) -> dict[str, Any]:
    """P1–P4 for ``labels`` of a planned run (:meth:`RunPlan.to_dict`), as plain data: what a
    flow's batch task does.

    The tasks of one flow run share the session the flow opened (found by its id), so they share
    one client and one set of limits. A task run in another process (a remote worker) finds no such
    session and opens its own for the batch; its usage travels back with the rows, and
    :func:`finalize_planned` adds it to the run's. ``throttle`` is for that own session: what
    holds the endpoint's limits across such workers (the shared session has its own).
    ``on_done(kind)``: called as each sign's Tb, Ts, Tg and Tp finish (progress)."""
    run = RunPlan.from_dict(plan, labels)
    if session_id in _SESSIONS:
        return (await describe_batch(run, _SESSIONS[session_id].client, run.entries, on_done)).to_dict()
    async with generation_session(run.settings, throttle=throttle) as own:
        result = await describe_batch(run, own.client, run.entries, on_done)
        return {**result.to_dict(), "usage": own.client.usage_counts()}


def finalize_planned(plan: dict[str, Any], batches: Sequence[dict[str, Any]], session: GenerationSession) -> RunResult:
    """Write a planned run from its batches' plain results (see :func:`describe_planned`)."""
    merged = BatchResult()
    for batch in batches:
        merged.merge(BatchResult.from_dict(batch))
        session.client.add_usage(batch.get("usage") or {})
    return finalize_run(RunPlan.from_dict(plan), merged, session)


# --- writing the run ------------------------------------------------------------------------

_UPSTREAM = re.compile(r"^(?:upstream T[bg] failed: )+")
_DETAIL_TAIL = re.compile(r"(?:: ['\"].*| \((?:after|still after) \d+ (?:attempt|answer)\(s\)[^()]*\)"
                          r"| \(circuit breaker\)| in \d+ of the last \d+ requests)$")


def failure_cause(error: str | None) -> str:
    """A failed row's cause without what is particular to the row: the upstream chain ("upstream
    Tb failed: …" counts as the Tb failure's cause), the rejected text, attempt counts. Rows that
    failed the same way get the same cause."""
    cause = _UPSTREAM.sub("", (error or "no output").strip())
    while True:
        shorter = _DETAIL_TAIL.sub("", cause)
        if shorter == cause:
            break
        cause = shorter
    return cause[:160]


def failure_causes(errors: Iterable[str | None]) -> list[dict[str, Any]]:
    """Causes with their row counts, most common first."""
    counts = Counter(failure_cause(e) for e in errors)
    return [{"cause": c, "rows": n} for c, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def failed_run_reason(failed: int, total: int, max_failed_share: float) -> str | None:
    """Why a run with ``failed`` of ``total`` rows failed counts as failed, or ``None`` when it
    does not: more than ``max_failed_share`` of its rows failed (no rows at all is a failure too)."""
    if total == 0:
        return "the run produced no rows"
    if failed / total > max_failed_share:
        return (f"{failed} of {total} rows failed ({failed / total:.0%}; "
                f"GSP_LLM_MAX_FAILED_SHARE is {max_failed_share:.0%})")
    return None


def attempt_totals(usage: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every HTTP attempt of the run over all stages: how many were sent, how many got an answer,
    how many were retries, and the failed ones by cause (``HTTP 429``, ``HTTP 500``, ``connection``,
    ``truncated body``, ``timeout``, ``unparseable body`` …; :func:`gsp.llm.client.attempt_cause`)."""
    failed: Counter[str] = Counter()
    for u in usage.values():
        failed.update(u.get("failures") or {})
    requests = sum(u["requests"] for u in usage.values())
    return {"requests": requests, "ok": requests - sum(failed.values()),
            "retries": sum(u["retries"] for u in usage.values()), "failed": dict(sorted(failed.items()))}


def format_causes(causes: Sequence[dict[str, Any]], top: int = 3) -> str:
    shown = "; ".join(f"{c['cause']} ×{c['rows']}" for c in causes[:top])
    more = len(causes) - top
    return shown + (f"; {more} other cause(s)" if more > 0 else "")


@dataclass
class RunResult:
    run_dir: Path
    manifest: dict[str, Any]

    @property
    def failed(self) -> int:
        return sum(c["failed"] for c in self.manifest["counts"].values())

    @property
    def run_failed(self) -> bool:
        """The run as a whole failed (too many failed rows): it is not LATEST."""
        return self.manifest["status"] == RUN_FAILED

    @property
    def manifest_path(self) -> Path:
        return self.run_dir / MANIFEST

    def failure_line(self) -> str | None:
        """One line for the end of a run with failed rows: how many, the main causes, where the
        manifest is; ``None`` when every row is ok."""
        m = self.manifest
        if self.run_failed:
            return (f"description run {m['run_id']} failed: {m['failure_reason']}; causes: "
                    f"{format_causes(m['failure_causes'])}; not made LATEST; manifest: {self.manifest_path}")
        if self.failed:
            return (f"{self.failed} row(s) failed ({format_causes(m['failure_causes'])}); "
                    f"see failures in {self.manifest_path}")
        return None

    def summary(self) -> str:
        m = self.manifest
        lines = [f"description run {m['run_id']} → {self.run_dir}"]
        for kind in KINDS:
            c = m["counts"][kind]
            u = m["usage"].get(kind, {})
            lines.append(f"  {kind}: {c['ok']} ok, {c['failed']} failed; requests {u.get('requests', 0)}, "
                         f"cached {u.get('cached', 0)}; tokens {u.get('prompt_tokens', 0)}+"
                         f"{u.get('completion_tokens', 0)}")
        t = m["tokens"]
        cost = f", cost {m['cost']:.4f}" if m.get("cost") is not None else ""
        lines.append(f"  total: {t['prompt']}+{t['completion']} tokens this run{cost}; "
                     f"{self.failed} failed row(s); {len(m['no_retrieval_hit'])} gloss(es) without a dictionary hit")
        a = m.get("attempts") or {}
        if a.get("failed"):
            lines.append(f"  attempts: {a['requests']} sent, {a['ok']} answered, {a['retries']} retries; failed: "
                         + ", ".join(f"{c} ×{n}" for c, n in a["failed"].items()))
        r = m.get("review") or {}
        if r.get("kept") or r.get("regenerated"):
            lines.append(f"  review of {r['base_run']}: {r['kept']} reviewed row(s) kept without a request, "
                         f"{r['regenerated']} row(s) asked again with the reviewer's note")
        if m.get("refine"):
            f = m["refine"]
            lines.append(f"  refined {len(f['refined'])} sign(s) of the {len(f['pairs'])} most confused pair(s) of "
                         f"{f['training_run']} with {f['prompt']}; {f['carried_rows']} row(s) of {f['base_run']} "
                         "carried over without a request")
        if m["failure_causes"]:
            lines.append(f"  failure causes: {format_causes(m['failure_causes'], top=5)}")
        lines.append(f"  status: {m['status']}; manifest: {self.manifest_path}")
        return "\n".join(lines)


def finalize_run(plan: RunPlan, result: BatchResult, session: GenerationSession, *,
                 manifest_extra: dict[str, Any] | None = None, review: dict[str, Any] | None = None) -> RunResult:
    """Write the four parquet files and the manifest into a staging folder, publish it as
    ``<out>/<run_id>`` with one rename, then point ``LATEST`` at it unless the run failed (more than
    ``max_failed_share`` of its rows failed). A run folder is never rewritten.

    ``manifest_extra``: sections added to the manifest; ``review``: a review file written with the
    run (a refinement run carries its base run's decisions on the rows it carries)."""
    run_dir = claim_descriptions_root(plan.out_root) / plan.run_id
    if run_dir.exists():
        raise GenerationError(f"{run_dir}: run folder exists; a run is never overwritten")
    staging = plan.out_root / f".{plan.run_id}.partial"
    # Ours (a hidden name in the folder claim_descriptions_root made ours): what a run of the same
    # id left when it was killed while writing; it was never published.
    remove_leftover(staging)
    staging.mkdir()
    try:
        for kind in KINDS:
            write_kind(staging, kind, result.rows[kind], staged_for=run_dir)
        manifest = {**run_manifest(plan, result, session.client, session.is_local), **(manifest_extra or {})}
        (staging / MANIFEST).write_text(json_text(manifest), encoding="utf-8")
        if review:
            (staging / REVIEW_FILE).write_text(json_text(review), encoding="utf-8")
        publish_staged_folder(staging, run_dir)
    except BaseException:  # a half-written run is no use to anyone: nothing of it stays
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # A failed run stays on disk for inspection, but training and `gsp train` keep using the last
    # good run that LATEST names.
    if manifest["status"] != RUN_FAILED:
        write_text_atomic(plan.out_root / LATEST_POINTER, plan.run_id + "\n")
    else:  # said as the run's last line by the CLI and the flow; here only for library users' logs
        log.info("description run %s failed: %s", plan.run_id, manifest["failure_reason"])
    return RunResult(run_dir=run_dir, manifest=manifest)


def review_counts(base_dir: Path | None, rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """How the base run's review shaped this run: rows kept as reviewed, rows asked again with a note."""
    marks = Counter(r.get("review") for kind_rows in rows.values() for r in kind_rows)
    return {"base_run": str(base_dir) if base_dir else None,
            "kept": sum(marks[m] for m in REVIEW_KEPT), "regenerated": marks[REVIEW_REGENERATED]}


def run_manifest(plan: RunPlan, result: BatchResult, client: LLMClient, is_local: bool) -> dict[str, Any]:
    """The run's manifest: provenance, counts, failures and their causes, usage, timings."""
    s = plan.settings
    usage = client.usage_dict()
    counts = {kind: {"rows": len(rows), "ok": sum(r["status"] == STATUS_OK for r in rows),
                     "failed": sum(r["status"] == STATUS_FAILED for r in rows),
                     "signs": len({r["label"] for r in rows})}
              for kind, rows in result.rows.items()}
    failures = sorted(({"key": r["key"], "label": r["label"], "gloss": r["gloss"], "kind": r["kind"],
                        "error": r["error"]} for rows in result.rows.values() for r in rows
                       if r["status"] == STATUS_FAILED), key=lambda f: f["key"])
    costs = [u["cost"] for u in usage.values() if u["cost"] is not None]
    counted = [f for f in failures
               if not (is_local and not s.llm.local_quality_fails_run
                       and is_quality_failure(failure_cause(f["error"])))]
    reason = failed_run_reason(len(counted), sum(c["rows"] for c in counts.values()), s.llm.max_failed_share)
    manifest = {
        "run_id": plan.run_id,
        "status": RUN_FAILED if reason else RUN_COMPLETE,
        "failure_reason": reason,
        # rows counted toward max_failed_share (the embedded model's quality rejections may be exempt)
        "failed_rows_counted": len(counted),
        "failure_causes": failure_causes(f["error"] for f in failures),
        "started_at": plan.started_at,
        "finished_at": utc_now(),
        "vocabulary": {"path": str(plan.vocabulary.path), "sha256": plan.vocabulary.sha256,
                       "signs_in_file": len(plan.vocabulary.entries), "signs_run": len(plan.entries)},
        "index": {"dir": str(plan.index_dir) if plan.index_dir else None,
                  "manifest_id": getattr(plan.retriever, "manifest_id", None)},
        "model": client.endpoint.model,
        "endpoint": endpoint_host(client.endpoint.base_url),
        "local_server": is_local,
        "structured_output": client.endpoint.structured_output,
        "sampling": dict(client.endpoint.sampling),
        "servers": 1 + len(client.endpoint.replicas),
        # what this endpoint used (the embedded model has its own, smaller budgets in the settings);
        # retrieval_k: passages retrieved for a sign's gloss (P3 adds those of the signs Tb refers to)
        "retrieval_k": client.retrieval_k,
        "repair_attempts": client.repair_attempts,
        "prompts": {key: {"id": p.prompt_id, "sha": p.sha, "file": p.path.name, "produces": p.produces}
                    for key, p in plan.prompts.items()},
        "settings": s.public_dict(),
        "counts": counts,
        "failures": failures,
        "no_retrieval_hit": sorted(result.no_hit, key=lambda h: h["label"]),
        "usage": usage,
        "tokens": {"prompt": sum(u["prompt_tokens"] for u in usage.values()),
                   "completion": sum(u["completion_tokens"] for u in usage.values()),
                   "cached_prompt": sum(u["cached_prompt_tokens"] for u in usage.values()),
                   "cached_completion": sum(u["cached_completion_tokens"] for u in usage.values())},
        "requests": sum(u["requests"] for u in usage.values()),
        "attempts": attempt_totals(usage),
        "cached_responses": sum(u["cached"] for u in usage.values()),
        "cost": sum(costs) if costs else None,
        "review": review_counts(plan.base_dir, result.rows),
        "timings": {"wall_s": round(time.monotonic() - plan.started_monotonic, 3),
                    "busy_s": {k: round(v, 3) for k, v in result.busy_s.items()}},
    }
    return manifest


# --- the whole thing, without Prefect --------------------------------------------------------

@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[str], None]]:
    if not enabled:
        yield lambda kind: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=False) as bar:
        tasks = {kind: bar.add_task(f"{kind} (P{i + 1})", total=total) for i, kind in enumerate(KINDS)}
        yield lambda kind: bar.advance(tasks[kind])


async def agenerate(plan: RunPlan, *, progress: bool = False) -> RunResult:
    """Describe every sign of ``plan`` in one generation session and write the run."""
    async with generation_session(plan.settings) as session:
        with _progress(progress, len(plan.entries)) as on_done:
            result = await describe_batch(plan, session.client, plan.entries, on_done)
        return finalize_run(plan, result, session)


def generate_descriptions(vocab_path: Path | str, *, settings: Settings, index_dir: Path | None = None,
                          use_index: bool = True, out_dir: Path | None = None, labels: Sequence[int] | None = None,
                          limit: int | None = None, run_id: str | None = None,
                          retriever: PassageSearch | None = None, progress: bool = False,
                          base: Path | str | None = None) -> RunResult:
    """Describe the vocabulary's signs with P1–P4 and write one description run (no Prefect);
    ``base`` as in :func:`prepare_run`."""
    with long_lived_objects_frozen():  # from the plan on: loading it is when the first full pass came
        plan = prepare_run(vocab_path, settings=settings, index_dir=index_dir, use_index=use_index,
                           out_dir=out_dir, labels=labels, limit=limit, run_id=run_id, retriever=retriever, base=base)
        return asyncio.run(agenerate(plan, progress=progress))


# --- confusion-driven refinement (P5) --------------------------------------------------------

#: One confused class pair of a training run: (label a, label b, clips of either predicted as the
#: other); the caller reads them from the run's confusion matrix (gsp does not read training runs).
ConfusedPair = tuple[int, int, int]
#: How many of a training run's most confused class pairs are refined unless told otherwise.
DEFAULT_TOP = 10
NO_DESCRIPTION = "(none: this sign has no usable description in the run being refined)"
REFINED_KINDS = ("Tg", "Tp")


def contrast_partners(pairs: Sequence[ConfusedPair]) -> dict[int, tuple[int, int]]:
    """Each sign of ``pairs`` → (the sign it is rewritten against, that pair's count). Both signs
    of every pair are refined; a sign in several pairs only once, against the other sign of its
    most confused pair (ties: the pair with the lower labels), so no sign gets two rewrites that
    would each undo the other."""
    partners: dict[int, tuple[int, int]] = {}
    for a, b, n in sorted(pairs, key=lambda p: (-p[2], min(p[0], p[1]), max(p[0], p[1]))):
        for sign, other in ((a, b), (b, a)):
            partners.setdefault(int(sign), (int(other), int(n)))
    return partners


@dataclass
class RefinePlan:
    """A refinement run fixed before its first request: the run plan of the refined signs (P5
    among its prompts, the base run as ``base_dir``), each sign's partner, and the base run's rows
    (raw, as plain values) and review decisions."""

    plan: RunPlan
    pairs: list[ConfusedPair]
    partners: dict[int, tuple[int, int]]
    base_rows: dict[str, list[dict[str, Any]]]
    decisions: dict[str, dict]
    training_run: str | None = None
    #: The description run the training run was trained on, as it records it (None: not recorded).
    trained_on: str | None = None
    #: Pairs ranked among the refined ones but passed over, each with a sign the base run does not
    #: describe (:func:`choose_pairs`).
    passed_over: list[ConfusedPair] = field(default_factory=list)

    def base_differs(self) -> str | None:
        """One line when the run being refined is not the run the model was trained on (``LATEST``
        moved since, or another ``base`` was given): the confusions are those of the other texts."""
        if not self.trained_on or not (Path(self.trained_on) / "Tg.parquet").is_file():
            return None  # unknown, or a descriptions root whose LATEST then is not known now
        if Path(self.trained_on).resolve() == Path(self.plan.base_dir).resolve():
            return None
        return (f"refining {self.plan.base_dir}, but {self.training_run} was trained on {self.trained_on}: "
                "the confusions are those of its texts (give that run as the base, --base or the flow's base, "
                "to refine them)")

    def warnings(self) -> list[str]:
        """What a caller logs before the first request, one line each: :meth:`base_differs` and the
        pairs passed over."""
        lines = [line] if (line := self.base_differs()) else []
        if self.passed_over:
            shown = ", ".join(f"({a}, {b}) ({n} clip(s))" for a, b, n in self.passed_over[:5])
            more = f" and {len(self.passed_over) - 5} more" if len(self.passed_over) > 5 else ""
            lines.append(f"{self.plan.base_dir}: passed over {len(self.passed_over)} confused pair(s) of "
                         f"{self.training_run or 'the confused pairs'} with a sign it does not describe: "
                         f"{shown}{more}; refined the next ones instead (a run that describes them, --base, "
                         "refines them)")
        return lines

    def is_refined(self, row: dict[str, Any]) -> bool:
        return row["kind"] in REFINED_KINDS and int(row["label"]) in self.partners

    def current_texts(self) -> dict[int, str]:
        """Each sign's Tg as training read it (the base's review applied): what P5 rewrites."""
        tg = apply_review({"Tg": pd.DataFrame(self.base_rows["Tg"])}, self.decisions)["Tg"]
        return {int(r["label"]): r["text"] for r in tg.to_dict("records") if r["status"] == STATUS_OK}

    def note_of(self, label: int) -> str | None:
        """The reviewer's note when the base's review rejected this sign's Tg (P5 answers it)."""
        d = self.decisions.get(row_key(label, "Tg", 0))
        if not d or d["decision"] != "reject":
            return None
        return (d.get("note") or "").strip() or DEFAULT_NOTE

    def manifest_section(self, carried: int) -> dict[str, Any]:
        gloss = {e.label: e.gloss for e in self.plan.vocabulary.entries}
        return {"training_run": self.training_run, "base_run": str(self.plan.base_dir), "trained_on": self.trained_on,
                "prompt": self.plan.prompts["P5"].prompt_id, "carried_rows": carried,
                "pairs": [{"a": a, "b": b, "count": n, "glosses": [gloss[a], gloss[b]]} for a, b, n in self.pairs],
                "passed_over": [{"a": a, "b": b, "count": n, "glosses": [gloss[a], gloss[b]],
                                 "reason": "a sign the base run does not describe"} for a, b, n in self.passed_over],
                "refined": [{"label": lab, "gloss": gloss[lab], "contrast_with": other, "count": n}
                            for lab, (other, n) in sorted(self.partners.items())]}

    def carried_review(self, run_id: str) -> dict[str, Any] | None:
        """The base's review decisions on the rows carried over, as the new run's review file, so the
        new run reads as its base did (training, `gsp review export`, the next run)."""
        dropped = {r["key"] for kind in REFINED_KINDS for r in self.base_rows[kind] if self.is_refined(r)}
        kept = {k: d for k, d in self.decisions.items() if k not in dropped}
        if not kept:
            return None
        source = Path(self.plan.base_dir) / REVIEW_FILE
        return {"format_version": 1, "run_id": run_id, "applied_at": utc_now(), "source": str(source),
                "source_sha256": sha256_file(source), "carried_from": str(self.plan.base_dir),
                "decisions": dict(sorted(kept.items()))}


def check_top(top: int | None) -> None:
    """``top`` (how many confused pairs to refine; None: all) must be at least 1."""
    if top is not None and top < 1:
        raise GenerationError(f"top {top}: must be at least 1 (how many of the most confused class pairs to refine)")


def choose_pairs(pairs: Sequence[ConfusedPair], top: int | None, described: set[int], vocabulary: Vocabulary,
                 where: str) -> tuple[list[ConfusedPair], list[ConfusedPair]]:
    """The ``top`` (None: all) first of ``pairs`` (most confused first) whose two signs are in
    ``described``, and the pairs ranked among them that were passed over for a sign not in it:
    P5 rewrites a description, and a sign the base run leaves out has none (a vocabulary subset
    such as the demo's, or a run of ``--labels``). A class not in ``vocabulary`` among them is an
    error: the model was trained on another vocabulary."""
    known = {e.label for e in vocabulary.entries}
    chosen: list[ConfusedPair] = []
    passed_over: list[ConfusedPair] = []
    for a, b, n in pairs:
        if top is not None and len(chosen) == top:
            break
        if missing := [lab for lab in (a, b) if lab not in known]:
            raise GenerationError(f"{where}: the confused pair ({a}, {b}) ({n} clip(s)) has class {missing[0]}, "
                                  f"which is not in the vocabulary {vocabulary.path}; refine with the vocabulary "
                                  "the model was trained on")
        (chosen if a in described and b in described else passed_over).append((int(a), int(b), int(n)))
    return chosen, passed_over


def recorded_vocabulary(run_dir: Path) -> Path:
    """The vocabulary CSV a description run was generated from, as its manifest records it, checked
    to be the same file still (its sha256): the glosses a refinement of the run must ask with."""
    manifest = read_manifest(run_dir)
    recorded = manifest.get("vocabulary") if isinstance(manifest, dict) else None
    if not isinstance(recorded, dict) or not recorded.get("path"):
        raise GenerationError(f"{run_dir}: its manifest records no vocabulary; give the vocabulary the model "
                              "was trained on (--vocab)")
    try:
        vocabulary = load_vocabulary(recorded["path"])
    except VocabError as exc:  # gone, or a relative path read from another folder than the run's
        raise GenerationError(f"{exc} (the vocabulary {run_dir} records it was generated from); give the "
                              "vocabulary the model was trained on (--vocab)") from None
    if recorded.get("sha256") and vocabulary.sha256 != recorded["sha256"]:
        raise GenerationError(f"{recorded['path']}: changed since {run_dir} was generated from it; give the "
                              "vocabulary the model was trained on (--vocab)")
    return vocabulary.path


def prepare_refine(vocab_path: Path | str | None, pairs: Sequence[ConfusedPair], *, settings: Settings,
                   training_run: str | None = None, base: Path | str | None = None, out_dir: Path | None = None,
                   index_dir: Path | None = None, use_index: bool = True, retriever: PassageSearch | None = None,
                   run_id: str | None = None, trained_on: str | None = None, top: int | None = None) -> RefinePlan:
    """Check everything a refinement run needs before any request: a base run (``base``, else the
    output folder's LATEST), the pairs' classes in the vocabulary (``vocab_path``, else the one the
    base run was generated from), P5; and choose the ``top`` (None: all) first of ``pairs`` (most
    confused first) whose signs the base describes (:func:`choose_pairs`). ``trained_on``: the
    description run the training run records; both are kept in the manifest, and
    :meth:`RefinePlan.warnings` says when the base is another run or pairs were passed over."""
    check_top(top)  # 0 would choose no pair and blame the base run for it
    where = training_run or "the confused pairs"
    out_root = Path(out_dir) if out_dir else settings.paths.descriptions
    base_dir = base_run_dir(out_root, base)
    if base_dir is None:
        raise GenerationError(f"{out_root}: no description run to refine (no {LATEST_POINTER} run there); "
                              "run `gsp generate` first or pass --base RUN")
    vocab_path = recorded_vocabulary(base_dir) if vocab_path is None else vocab_path
    if not pairs:
        raise GenerationError(f"{where}: no two classes were confused (every test clip was predicted as its "
                              "own class); nothing to refine")
    raw = read_run(base_dir, ok_only=False)
    pairs, passed_over = choose_pairs(pairs, top, {int(lab) for lab in raw["Tg"]["label"]},
                                      load_vocabulary(vocab_path), where)
    if not pairs:
        raise GenerationError(f"{base_dir}: describes no confused pair of {where} whole (each has a sign it does "
                              "not describe); refine a run that describes them (--base)")
    partners = contrast_partners(pairs)
    plan = prepare_run(vocab_path, settings=settings, index_dir=index_dir, use_index=use_index, out_dir=out_root,
                       labels=sorted(partners), run_id=run_id, retriever=retriever, base=base_dir)
    plan.prompts.update(load_prompts(settings.paths.prompts_dir, REFINE_PROMPT_FILES))
    return RefinePlan(plan=plan, pairs=pairs, partners=partners,
                      base_rows={k: [plain_row(r) for r in df.to_dict("records")] for k, df in raw.items()},
                      decisions=read_review(base_dir), training_run=training_run, trained_on=trained_on,
                      passed_over=passed_over)


class ContrastDescriber(SignDescriber):
    """P5 for the signs of a refinement run, then P4 on each new Tg; no review base of its own (the
    refined rows are all new, the others are carried by :func:`refine_batch`)."""

    def __init__(self, plan: RunPlan, client: LLMClient):
        super().__init__(plan, client)
        self.review = ReviewBase()

    async def contrast(self, entry: VocabEntry, other: VocabEntry, hits: dict[int, list[Any]],
                       current: dict[int, str], note: str | None, out: BatchResult) -> None:
        """``entry``'s Tg rewritten against ``other`` (both signs' passages and current texts in the
        prompt), split again into Tp; every row marked with ``other`` in ``contrast_with``."""
        mine, theirs = hits[entry.label], hits[other.label]
        sources = list({s["chunk_id"]: s for s in map(hit_source, [*mine, *theirs])}.values())
        res, err = await self.ask("P5", entry, note=note, current=current.get(entry.label, NO_DESCRIPTION),
                                  passages=format_passages(mine), other=other.describe(),
                                  other_current=current.get(other.label, NO_DESCRIPTION),
                                  other_passages=format_passages(theirs))
        text = res.parsed.description.strip() if res and res.ok else None
        out.rows["Tg"].append(self.row(entry, "Tg", 0, self.plan.prompts["P5"], res, text, err, sources, note=note))
        await self.split(entry, text, None if text else f"upstream Tg failed: {err}", sources, out)
        for kind in REFINED_KINDS:
            for row in out.rows[kind]:
                if row["label"] == entry.label:
                    row["contrast_with"] = f"{other.label}:{other.gloss}"


async def refine_batch(rp: RefinePlan, client: LLMClient) -> BatchResult:
    """The refined signs' new Tg and Tp rows, then every other row of the base run, unchanged."""
    describer = ContrastDescriber(rp.plan, client)
    entries = {e.label: e for e in rp.plan.entries}
    out = BatchResult()
    describer._busy = out.busy_s
    current = rp.current_texts()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrieval") as pool:
        describer.pool = pool
        hits = {label: await describer.retrieve_gloss(e) for label, e in entries.items()}
        out.no_hit.extend({"label": lab, "gloss": entries[lab].gloss} for lab, h in hits.items() if not h)
        await asyncio.gather(*(describer.contrast(e, entries[rp.partners[lab][0]], hits, current, rp.note_of(lab), out)
                               for lab, e in entries.items()))
    for kind, rows in rp.base_rows.items():
        out.rows[kind].extend(r for r in rows if not rp.is_refined(r))
    return out


async def arefine(rp: RefinePlan) -> RunResult:
    """A refinement run in one generation session, written like any run (LATEST moves unless it failed)."""
    async with generation_session(rp.plan.settings) as session:
        result = await refine_batch(rp, session.client)
        carried = sum(not rp.is_refined(r) for rows in rp.base_rows.values() for r in rows)
        return finalize_run(rp.plan, result, session, manifest_extra={"refine": rp.manifest_section(carried)},
                            review=rp.carried_review(rp.plan.run_id))


def refine_descriptions(vocab_path: Path | str | None, pairs: Sequence[ConfusedPair], *, settings: Settings,
                        training_run: str | None = None, base: Path | str | None = None,
                        out_dir: Path | None = None, index_dir: Path | None = None, use_index: bool = True,
                        retriever: PassageSearch | None = None, run_id: str | None = None,
                        trained_on: str | None = None, top: int | None = None) -> RunResult:
    """Rewrite the descriptions of the signs of the ``top`` first of ``pairs`` (most confused
    first, e.g. from a training run's confusion matrix) with P5 into a new description run; see
    :func:`prepare_refine`."""
    rp = prepare_refine(vocab_path, pairs, settings=settings, training_run=training_run, base=base,
                        out_dir=out_dir, index_dir=index_dir, use_index=use_index, retriever=retriever, run_id=run_id,
                        trained_on=trained_on, top=top)
    for line in rp.warnings():
        log.warning("%s", line)
    return asyncio.run(arefine(rp))
