"""HTTP for the LLM client: one POST of a JSON body to an OpenAI-compatible endpoint, answered as
status, headers and bytes, with one small set of errors whatever carried it.

Two carriers, because per request cost matters only where requests are cheap and many:

- :class:`PlainHttpTransport`: plain HTTP to a server reached directly (the embedded llama.cpp
  server, a server on the LAN, the test server): a fixed request head and ``httptools``' response
  parser over asyncio streams, with a pool of kept-alive connections. A few µs of CPU per request
  besides the socket calls, against about 1 ms for ``httpx2`` and 3-4 ms through the OpenAI SDK,
  which at 64 requests in flight and 50 ms a request decides whether the client keeps up (see
  bench/generate.py).
- :class:`HttpxTransport`: everything else (TLS, a proxy named by ``HTTP(S)_PROXY``/``ALL_PROXY``):
  ``httpx2``, the HTTP library the OpenAI SDK itself uses, with the SDK's connection limits. At a
  remote provider's seconds per request its CPU per request does not matter.

:func:`open_transport` picks one for a base URL. Neither retries: the client's one retry policy
does (:mod:`gsp.llm.client`).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import httptools
import httpx2
import orjson

USER_AGENT = "gsp-mc"
#: How long an idle kept-alive connection is reused: servers close idle ones after a while
#: (uvicorn-based servers, such as many self-hosted OpenAI-compatible proxies, after 5 s),
#: and a request sent on a connection the server is closing fails; below the shortest common one.
KEEPALIVE_S = 4.0
MAX_IDLE = 128
READ_CHUNK = 65536


@dataclass(frozen=True)
class HTTPAnswer:
    status: int
    headers: dict[str, str]  # names in lower case
    content: bytes


class TransportError(Exception):
    """No HTTP answer: the connection could not be made, or was dropped before the whole answer
    came (``truncated``: its headers had come)."""

    def __init__(self, message: str, truncated: bool = False):
        super().__init__(message)
        self.truncated = truncated


class RequestTimeout(TransportError):
    """No whole answer within the request's time limit."""


class HTTPStatusError(Exception):
    """The endpoint answered with a status other than 2xx. The message is the endpoint's own
    (``error.message`` of an OpenAI error body) after ``Error code: <status>``, as the SDK words it."""

    def __init__(self, response: HTTPAnswer):
        self.response = response
        self.status_code = response.status
        super().__init__(status_message(response))


def status_message(response: HTTPAnswer) -> str:
    message = f"Error code: {response.status}"
    try:
        body = json.loads(response.content)
    except ValueError:
        return message
    error = body.get("error", body) if isinstance(body, dict) else None
    text = error.get("message") if isinstance(error, dict) else None
    return f"{message} - {text}" if isinstance(text, str) and text else message


def check_status(response: HTTPAnswer) -> HTTPAnswer:
    if not 200 <= response.status < 300:
        raise HTTPStatusError(response)
    return response


class Transport(Protocol):
    async def post(self, body: bytes, headers: dict[str, str]) -> HTTPAnswer:
        """POST ``body`` (JSON) to the chat completions URL; a non-2xx answer raises
        :class:`HTTPStatusError`, no answer :class:`TransportError`."""
        ...

    async def open_connections(self, count: int, timeout_s: float | None = None) -> None:
        """Open up to ``count`` connections ahead of a burst of requests, where the carrier can."""
        ...

    async def aclose(self) -> None: ...


def chat_url(base_url: str) -> str:
    return base_url.rstrip("/") + "/chat/completions"


def proxy_for(url: str) -> str | None:
    """The proxy the environment names for ``url`` (``urllib``'s reading of ``*_PROXY`` and
    ``NO_PROXY``), or ``None``."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        return proxy
    return None


def open_transport(base_url: str, timeout_s: float) -> Transport:
    """:class:`PlainHttpTransport` for a plain-HTTP endpoint reached without a proxy, else
    :class:`HttpxTransport`."""
    if urlsplit(base_url).scheme == "http" and proxy_for(base_url) is None:
        return PlainHttpTransport(base_url, timeout_s)
    return HttpxTransport(base_url, timeout_s)


class _Answer:
    """What httptools' parser reports of the answer to one request (its callbacks, by name). An
    informational answer (1xx) may come first: each message starts afresh, and the first final
    one (2xx-5xx) is kept as ``result``; bytes after it mean the connection is not reused."""

    __slots__ = ("parser", "status", "headers", "chunks", "headers_done", "chunked", "result", "keep_alive")

    def __init__(self) -> None:
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.result: HTTPAnswer | None = None
        self.keep_alive = False
        self.on_message_begin()

    def on_message_begin(self) -> None:
        if self.result is not None:  # a second answer to one request: a misbehaving server
            self.keep_alive = False
        self.status = 0
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.headers_done = self.chunked = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.headers_done = True
        self.status = self.parser.get_status_code()

    def on_chunk_header(self) -> None:
        self.chunked = True

    def on_body(self, data: bytes) -> None:
        self.chunks.append(data)

    def on_message_complete(self) -> None:
        if self.status >= 200 and self.result is None:
            self.result = HTTPAnswer(self.status, self.headers, b"".join(self.chunks))
            self.keep_alive = self.parser.should_keep_alive()  # only valid now: the parser resets after

    @property
    def final_headers_done(self) -> bool:
        """The headers of a final (not informational) answer have come."""
        return self.headers_done and self.status >= 200

    @property
    def delimited_by_close(self) -> bool:
        """Neither a length nor chunks: the body ends when the server closes the connection."""
        return ("content-length" not in self.headers and not self.chunked
                and "chunked" not in self.headers.get("transfer-encoding", "").lower())


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    keep_alive: bool = True
    idle_since: float = 0.0
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)

    def reusable(self, now: float) -> bool:
        # a server that closed the connection while it idled has left an EOF in the reader; a
        # client used by a second asyncio.run() cannot use the first one's sockets
        return (now - self.idle_since < KEEPALIVE_S and self.loop is asyncio.get_running_loop()
                and not self.reader.at_eof() and not self.writer.is_closing())

    def close(self) -> None:
        try:
            self.writer.close()
        except RuntimeError:  # its event loop is closed, and with it the socket
            pass


class PlainHttpTransport:
    """HTTP/1.1 to one plain-HTTP origin with kept-alive connections (one per request in flight).

    The request head is written here (one fixed shape: a POST of JSON); the answer is parsed by
    ``httptools`` (llhttp, the parser of Node.js and uvicorn), which handles lengths, chunks and
    keep-alive. It replaced ``h11``, whose pure-Python state machine cost about 50 µs of CPU a
    request against 2-3 µs (bench/generate.py)."""

    def __init__(self, base_url: str, timeout_s: float):
        parts = urlsplit(chat_url(base_url))
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{base_url}: PlainHttpTransport speaks plain http:// only")
        self.host, self.port = parts.hostname, parts.port or 80
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        self.timeout_s = timeout_s
        self._head = (f"POST {target} HTTP/1.1\r\nHost: {parts.netloc.rpartition('@')[2]}\r\n"
                      f"User-Agent: {USER_AGENT}\r\nAccept: application/json\r\n"
                      "Content-Type: application/json\r\n")
        self._idle: deque[_Connection] = deque()

    async def post(self, body: bytes, headers: dict[str, str]) -> HTTPAnswer:
        head = request_head(self._head, headers, len(body))
        conn = await self._checkout()
        try:
            async with asyncio.timeout(self.timeout_s):
                answer = await self._exchange(conn, head, body)
        except TimeoutError as exc:
            conn.close()
            raise RequestTimeout(f"no answer within {self.timeout_s:g} s") from exc
        except (OSError, httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            conn.close()
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:  # cancelled or cut off mid-exchange: the connection is in an unknown state
            conn.close()
            raise
        self._checkin(conn)
        return check_status(answer)

    async def _checkout(self, connect_timeout_s: float | None = None) -> _Connection:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.reusable(now):
                return conn
            conn.close()
        limit = connect_timeout_s or self.timeout_s
        try:
            async with asyncio.timeout(limit):
                reader, writer = await asyncio.open_connection(self.host, self.port, limit=READ_CHUNK)
        except TimeoutError as exc:
            raise RequestTimeout(f"no connection within {limit:g} s") from exc
        except OSError as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc
        return _Connection(reader, writer)

    async def open_connections(self, count: int, timeout_s: float | None = None) -> None:
        """Open up to ``count`` idle connections at once (fewer where some are idle already),
        giving up on each after ``timeout_s`` (default: a request's time limit).

        A run's first wave otherwise opens its connections while the event loop prepares every
        other sign's first request (~80 µs each), so no connection completes before all are
        prepared: at 500 signs and C=64 the first wave left 45-70 ms late. A connection that
        cannot be opened here is left to the request that needs it, which reports the error."""
        wanted = min(count, MAX_IDLE) - len(self._idle)
        if wanted <= 0:
            return
        opened = await asyncio.gather(*(self._checkout(timeout_s) for _ in range(wanted)), return_exceptions=True)
        for conn in opened:  # every opened one kept (or closed) before anything is raised
            if isinstance(conn, _Connection):
                self._checkin(conn)
        unexpected = [e for e in opened if isinstance(e, BaseException) and not isinstance(e, TransportError)]
        if unexpected:
            raise unexpected[0]

    def _checkin(self, conn: _Connection) -> None:
        if conn.keep_alive and len(self._idle) < MAX_IDLE:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:  # the server said Connection: close, or the pool is full
            conn.close()

    async def _exchange(self, conn: _Connection, head: bytes, body: bytes) -> HTTPAnswer:
        conn.writer.write(head + body)
        await conn.writer.drain()
        answer = _Answer()
        try:
            while answer.result is None:
                data = await conn.reader.read(READ_CHUNK)
                if not data:
                    if answer.final_headers_done and answer.delimited_by_close:
                        answer.result = HTTPAnswer(answer.status, answer.headers, b"".join(answer.chunks))
                        break
                    if answer.final_headers_done:
                        raise TransportError("the server closed the connection before the whole body came",
                                             truncated=True)
                    raise TransportError("the server closed the connection without an answer")
                answer.parser.feed_data(data)
        finally:
            answer.parser = None  # parser and answer refer to each other: a cycle for the collector otherwise
        conn.keep_alive = answer.keep_alive
        return answer.result

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop().close()


def request_head(fixed: str, headers: dict[str, str], length: int) -> bytes:
    """The head of one POST: the transport's fixed lines, the caller's headers, the length."""
    lines = [fixed]
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
            raise ValueError(f"header {name!r} has a line break or colon where it cannot (a malformed API key?)")
        lines.append(f"{name}: {value}\r\n")
    lines.append(f"Content-Length: {length}\r\n\r\n")
    return "".join(lines).encode("latin-1")


class HttpxTransport:
    """POSTs through ``httpx2`` (TLS, proxies from the environment), with the OpenAI SDK's limits."""

    def __init__(self, base_url: str, timeout_s: float):
        self.url = chat_url(base_url)
        self.timeout_s = timeout_s
        self._client = httpx2.AsyncClient(timeout=timeout_s, headers={"User-Agent": USER_AGENT},
                                          limits=httpx2.Limits(max_connections=1000, max_keepalive_connections=100))

    async def post(self, body: bytes, headers: dict[str, str]) -> HTTPAnswer:
        try:
            response = await self._client.post(self.url, content=body, headers={
                "Accept": "application/json", "Content-Type": "application/json", **headers})
        except httpx2.TimeoutException as exc:
            raise RequestTimeout(f"no answer within {self.timeout_s:g} s") from exc
        except httpx2.TransportError as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}", truncated=_is_truncated(exc)) from exc
        return check_status(HTTPAnswer(response.status_code, {k.lower(): v for k, v in response.headers.items()},
                                       response.content))

    async def open_connections(self, count: int, timeout_s: float | None = None) -> None:
        """Nothing: httpx opens its pooled connections only for requests."""

    async def aclose(self) -> None:
        await self._client.aclose()


def _is_truncated(exc: BaseException) -> bool:
    """The answer's headers came but its body ended early (h11's words, which httpx passes on)."""
    return "complete message body" in str(exc)


def json_body(payload: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON (orjson: a tenth of the stdlib's CPU, on every request sent)."""
    return orjson.dumps(payload)
