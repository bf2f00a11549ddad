"""The persistent LLM response cache.

One SQLite file under ``settings.paths.cache`` (WAL journal). :meth:`ResponseCache.put` queues a
response and asks the running event loop to commit the queue: at the end of the loop iteration
when the last commit is at least :data:`COMMIT_INTERVAL_S` old (an answer now and then, as from a
remote provider at seconds a request, is committed as soon as it is handled), otherwise once that
interval has passed, with every answer that came in meanwhile in the same transaction. Under load
(64 requests in flight at 50 ms each, 1,300 answers a second) a commit per loop iteration was 1,600
commits for 2,000 answers, 60-120 ms of the event loop's time in a 1.8 s run with checkpoint
stalls of up to 5 ms (bench/generate.py); batched, a tenth of that. Outside an event loop, ``put``
commits at once, and a batch of requests commits what it got before it returns
(:func:`gsp.generate.describe_batch`). What ``kill -9`` can lose is the answers of the last
:data:`COMMIT_INTERVAL_S`, not yet committed: the next run asks those again; every committed
answer it replays for free.

The key is the SHA-256 of everything that determines the answer (see :func:`request_hash`); the
API key is never part of it and never stored. SQLite from the stdlib rather than diskcache: one
table, one primary key, and readable with any SQLite tool.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import orjson

CACHE_FILE = "llm_responses.sqlite"
#: Under load, answers are committed together at most this often (see the module's docstring).
COMMIT_INTERVAL_S = 0.01


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def request_hash(request: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a request: base URL, model, messages, response format,
    sampling parameters. Callers must not put credentials in ``request``."""
    return hashlib.sha256(canonical_json(request).encode("utf-8")).hexdigest()


class ResponseCache:
    """request hash → the response fields the pipeline needs (id, content, usage, finish reason)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if self.path.suffix != ".sqlite":
            self.path = self.path / CACHE_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._pending: dict[str, str] = {}  # request hash → response JSON, queued, not yet committed
        self._flush_loop: asyncio.AbstractEventLoop | None = None  # where a flush is scheduled
        self._committed_at = 0.0  # time.monotonic() of the last commit
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL survives a killed process (not a power cut) at a fraction of FULL's fsyncs.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS responses ("
            " request_hash TEXT PRIMARY KEY, response TEXT NOT NULL, created_at REAL NOT NULL)"
        )

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            text = self._pending.get(key)
            if text is None:
                row = self._db.execute("SELECT response FROM responses WHERE request_hash = ?", (key,)).fetchone()
                text = row[0] if row else None
        return json.loads(text) if text is not None else None

    def put(self, key: str, response: dict[str, Any]) -> None:
        """Store ``response``: committed by the running event loop with what else comes in within
        :data:`COMMIT_INTERVAL_S` of the last commit, or at once when no loop runs in this thread."""
        text = orjson.dumps(response).decode()  # any JSON will do here; only the key must be canonical
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            self._pending[key] = text
            scheduled = loop is not None and loop is self._flush_loop
            if loop is not None:
                self._flush_loop = loop
        if loop is None:
            self.flush()
        elif not scheduled:
            # call_soon runs after the callbacks this iteration already has, before the next poll
            # (the docstring says why not always)
            wait = self._committed_at + COMMIT_INTERVAL_S - time.monotonic()
            if wait > 0:
                loop.call_later(wait, self.flush)
            else:
                loop.call_soon(self.flush)

    def flush(self) -> None:
        """Commit every queued response in one transaction."""
        with self._lock:
            self._flush_loop = None
            if not self._pending:
                return
            now = time.time()
            rows = [(key, text, now) for key, text in self._pending.items()]
            with self._db:  # one transaction: committed on leaving, rolled back on an error
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT OR REPLACE INTO responses (request_hash, response, created_at) VALUES (?, ?, ?)", rows)
            self._pending.clear()
            self._committed_at = time.monotonic()

    def __len__(self) -> int:
        self.flush()
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def keys(self) -> set[str]:
        self.flush()
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT request_hash FROM responses")}

    def response_ids(self) -> set[str]:
        """Ids of every cached response (the tests match them against what a server sent)."""
        self.flush()
        with self._lock:
            rows = self._db.execute("SELECT response FROM responses").fetchall()
        return {json.loads(r[0]).get("id") for r in rows}

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._db.close()
