"""The persistent LLM response cache.

One SQLite file under ``settings.paths.cache``. Each response is committed the moment it arrives
(autocommit, WAL journal), so a run killed with ``kill -9`` loses no completed call and the next
run replays it for free. The key is the SHA-256 of everything that determines the answer (see
:func:`request_hash`); the API key is never part of it and never stored. SQLite from the stdlib
rather than diskcache: one table, one primary key, and readable with any SQLite tool.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

CACHE_FILE = "llm_responses.sqlite"


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
            row = self._db.execute("SELECT response FROM responses WHERE request_hash = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, response: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO responses (request_hash, response, created_at) VALUES (?, ?, ?)",
                (key, canonical_json(response), time.time()),
            )

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def keys(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT request_hash FROM responses")}

    def response_ids(self) -> set[str]:
        """Ids of every cached response (the tests match them against what a server sent)."""
        with self._lock:
            rows = self._db.execute("SELECT response FROM responses").fetchall()
        return {json.loads(r[0]).get("id") for r in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()
