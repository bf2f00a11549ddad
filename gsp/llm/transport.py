"""HTTP for the LLM client: one POST of a JSON body to an OpenAI-compatible endpoint, answered as
status, headers and bytes, with one small set of errors whatever carried it.

Two carriers, because per request cost matters only where requests are cheap and many:

- :class:`H11Transport`: plain HTTP to a server reached directly (the embedded llama.cpp server, a
  server on the LAN, the test server): the ``h11`` protocol state machine over asyncio streams and
  a pool of kept-alive connections. About 0.15 ms of CPU per request, against about 1 ms for
  ``httpx2`` and 3-4 ms through the OpenAI SDK, which at 64 requests in flight and 50 ms a request
  decides whether the client keeps up (see bench/generate.py).
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

import h11
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
    """:class:`H11Transport` for a plain-HTTP endpoint reached without a proxy, else
    :class:`HttpxTransport`."""
    if urlsplit(base_url).scheme == "http" and proxy_for(base_url) is None:
        return H11Transport(base_url, timeout_s)
    return HttpxTransport(base_url, timeout_s)


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    protocol: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))
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


class H11Transport:
    """HTTP/1.1 to one plain-HTTP origin with kept-alive connections (one per request in flight)."""

    def __init__(self, base_url: str, timeout_s: float):
        parts = urlsplit(chat_url(base_url))
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{base_url}: H11Transport speaks plain http:// only")
        self.host, self.port = parts.hostname, parts.port or 80
        self.target = parts.path + (f"?{parts.query}" if parts.query else "")
        self.timeout_s = timeout_s
        self._host_header = parts.netloc.rpartition("@")[2]
        self._idle: deque[_Connection] = deque()

    async def post(self, body: bytes, headers: dict[str, str]) -> HTTPAnswer:
        conn = await self._checkout()
        try:
            async with asyncio.timeout(self.timeout_s):
                answer = await self._exchange(conn, body, headers)
        except TimeoutError as exc:
            conn.close()
            raise RequestTimeout(f"no answer within {self.timeout_s:g} s") from exc
        except (OSError, h11.ProtocolError) as exc:
            conn.close()
            raise TransportError(f"{type(exc).__name__}: {exc}", truncated=_is_truncated(exc)) from exc
        except BaseException:  # cancelled mid-exchange: the connection is in an unknown state
            conn.close()
            raise
        self._checkin(conn)
        return check_status(answer)

    async def _checkout(self) -> _Connection:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.reusable(now):
                return conn
            conn.close()
        try:
            async with asyncio.timeout(self.timeout_s):
                reader, writer = await asyncio.open_connection(self.host, self.port, limit=READ_CHUNK)
        except TimeoutError as exc:
            raise RequestTimeout(f"no connection within {self.timeout_s:g} s") from exc
        except OSError as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc
        return _Connection(reader, writer)

    def _checkin(self, conn: _Connection) -> None:
        p = conn.protocol
        if p.our_state is h11.DONE and p.their_state is h11.DONE and len(self._idle) < MAX_IDLE:
            p.start_next_cycle()
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:  # the server said Connection: close, or the pool is full
            conn.close()

    async def _exchange(self, conn: _Connection, body: bytes, headers: dict[str, str]) -> HTTPAnswer:
        p = conn.protocol
        request = h11.Request(method="POST", target=self.target, headers=[
            ("Host", self._host_header), ("User-Agent", USER_AGENT), ("Accept", "application/json"),
            ("Content-Type", "application/json"), ("Content-Length", str(len(body))), *headers.items()])
        conn.writer.write(p.send(request) + p.send(h11.Data(data=body)) + p.send(h11.EndOfMessage()))
        await conn.writer.drain()
        status, answer_headers, chunks = 0, {}, []
        while True:
            event = p.next_event()
            if event is h11.NEED_DATA:
                p.receive_data(await conn.reader.read(READ_CHUNK))
            elif isinstance(event, h11.Response):
                status = event.status_code
                answer_headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
            elif isinstance(event, h11.Data):
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return HTTPAnswer(status, answer_headers, b"".join(chunks))
            # informational responses (100 Continue) need nothing

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop().close()


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

    async def aclose(self) -> None:
        await self._client.aclose()


def _is_truncated(exc: BaseException) -> bool:
    """The answer's headers came but its body ended early (h11's words, which httpx passes on)."""
    return "complete message body" in str(exc)


def json_body(payload: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON (orjson: a tenth of the stdlib's CPU, on every request sent)."""
    return orjson.dumps(payload)
