"""The LLM client: OpenAI's chat-completions protocol (over :mod:`gsp.llm.transport`) plus what
a long generation run needs.

- a persistent response cache (:mod:`gsp.llm.cache`): every completed call is committed in the
  event loop turn that received it, so re-runs make zero calls and a killed run resumes without
  repeating a committed one;
- a concurrency limit (``asyncio.Semaphore``), requests- and tokens-per-minute limits
  (``aiolimiter``);
- retries with exponential backoff and jitter on 429, 5xx, timeouts, dropped connections and
  truncated or unparseable bodies, honouring ``Retry-After`` (``tenacity``; the SDK's own retries
  are off so that one policy, with one set of counters, governs every attempt), bounded per request
  in time (``retry_budget_s``) and in attempts (``max_retries``; a 429 counts only against the
  time); every attempt's outcome is counted per stage and cause;
- an optional ``throttle`` awaited before every attempt, for a limit shared with other processes
  (the caller provides it: a Prefect global concurrency limit, say);
- structured output validated with pydantic and, optionally, a quality check of its content, with a
  bounded number of re-asks that show the model what was wrong (:mod:`gsp.llm.structured`);
- a circuit breaker: when most recent attempts failed for the same cause, no further request is
  sent and every pending one fails at once with that cause, instead of each retrying for minutes;
- a preflight check of a configured endpoint (:func:`check_endpoint`): a refused connection, an
  unknown host or a rejected key ends the run in seconds;
- token and cost accounting per stage.

The API key goes into the requests' ``Authorization`` header and nowhere else: not to the cache
key, logs or results.

Not the OpenAI SDK: for each request it spent 3-4 ms of CPU on the event loop (building and
validating typed request and response objects), which capped a run's throughput at a local server
(bench/generate.py); the protocol is one JSON POST and its JSON answer.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import socket
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
from aiolimiter import AsyncLimiter
from pydantic import BaseModel
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential_jitter

from gsp.errors import GspError
from gsp.llm.cache import ResponseCache, request_hash
from gsp.llm.structured import OutputInvalid, StructuredMode, response_format, validate_output
from gsp.llm.transport import (
    HTTPStatusError,
    RequestTimeout,
    Transport,
    TransportError,
    json_body,
    open_transport,
)
from gsp.settings import LLMSettings

log = logging.getLogger("gsp.llm")


class LLMCallError(RuntimeError):
    """A request failed for good (retries exhausted or a non-retryable HTTP error)."""


class FatalLLMError(GspError, RuntimeError):
    """The endpoint refuses every request (bad key, no access, unknown model): stop the run."""


class EndpointUnavailable(FatalLLMError):
    """The preflight check found the endpoint unreachable or refusing the key."""


class UnparseableResponse(RuntimeError):
    """The HTTP exchange succeeded but the body is not a usable chat completion."""


class CircuitOpen(RuntimeError):
    """The circuit breaker is open: the request was not sent."""


def endpoint_host(base_url: str | None) -> str | None:
    """``scheme://host[:port]/path`` without user info or query: safe for manifests and logs."""
    if not base_url:
        return None
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


def retry_after_seconds(exc: BaseException) -> float | None:
    """The server's requested wait (``Retry-After`` seconds or HTTP date, or ``retry-after-ms``)."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(float(ms) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(parsed.timestamp() - time.time(), 0.0) if parsed else None


#: Statuses that every further request would get too: a bad key, no access, an unknown model or URL.
REFUSING_STATUSES = (401, 403, 404)


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, (TransportError, UnparseableResponse)):
        return True
    if isinstance(exc, HTTPStatusError):
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    return False


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, HTTPStatusError):
        return f"HTTP {exc.status_code}: {str(exc)[:300]}"
    if isinstance(exc, RequestTimeout):
        return "request timed out"
    if isinstance(exc, TransportError):
        return f"connection error: {str(exc)[:200]}"
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def is_rate_limited(exc: BaseException | None) -> bool:
    return isinstance(exc, HTTPStatusError) and exc.status_code == 429


def attempt_cause(exc: BaseException | None) -> str:
    """The accounting category of a failed attempt, finer than the breaker's (a 429 and a truncated
    body are causes here): ``HTTP <status>``, ``timeout``, ``truncated body``, ``connection``,
    ``unparseable body`` or the exception's type."""
    if isinstance(exc, HTTPStatusError):
        return f"HTTP {exc.status_code}"
    if isinstance(exc, RequestTimeout):
        return "timeout"
    if isinstance(exc, TransportError):
        # the answer's headers came but its body ended early; a dropped connection ends before
        return "truncated body" if exc.truncated else "connection"
    if isinstance(exc, UnparseableResponse):
        return "unparseable body"
    return type(exc).__name__


def estimate_tokens(body: dict[str, Any]) -> int:
    """A request's token estimate for the rate limits: its messages at ~4 characters a token,
    plus the answer it may get."""
    return len(json.dumps(body["messages"], ensure_ascii=False)) // 4 + body["max_tokens"]


def chat_payload(body: dict[str, Any]) -> bytes:
    """The chat-completions request of a :meth:`LLMClient.request_body` (which also holds what
    only the cache key needs), as JSON bytes."""
    payload = {"model": body["model"], "messages": body["messages"], "temperature": body["temperature"],
               "max_tokens": body["max_tokens"]}
    if body["response_format"] is not None:
        payload["response_format"] = body["response_format"]
    if body["seed"] is not None:
        payload["seed"] = body["seed"]
    payload.update(body.get("sampling", {}))
    return json_body(payload)


def completion_fields(content: bytes) -> dict[str, Any]:
    """The fields the pipeline keeps of a chat completion's JSON body (id, model, the first
    choice's content and finish reason, token usage); :class:`UnparseableResponse` when the body
    is not a chat completion with content."""
    try:
        completion = orjson.loads(content)
    except orjson.JSONDecodeError as exc:  # an HTML error page from a proxy, half a body
        raise UnparseableResponse(f"unparseable response body: {exc}") from exc
    choices = completion.get("choices") if isinstance(completion, dict) else None
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise UnparseableResponse("response has no choices")
    choice = choices[0]
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else None
    if not isinstance(text, str):
        raise UnparseableResponse("response has no message content")
    usage = completion.get("usage") if isinstance(completion.get("usage"), dict) else {}
    return {
        "id": completion.get("id"),
        "model": completion.get("model"),
        "content": text,
        "finish_reason": choice.get("finish_reason"),
        "prompt_tokens": usage.get("prompt_tokens") or 0,
        "completion_tokens": usage.get("completion_tokens") or 0,
    }


class RetryBudget:
    """When one request stops retrying (tenacity's ``stop``, asked after each retryable failure):
    once ``max_retries`` failures other than 429 are retried, or when the next backoff would end more
    than ``budget_s`` after the first failure. A 429 is the server pacing us (its Retry-After is
    honoured) and counts only against the time. Timed from the first failure, not the first attempt:
    waiting for a slot or the rate limiters is not retrying."""

    def __init__(self, max_retries: int, budget_s: float):
        self.max_retries, self.budget_s = max_retries, budget_s
        self.first_failure: float | None = None
        self.counted = 0
        self.causes: Counter[str] = Counter()
        self.spent: str | None = None  # which bound ended the retries, in words

    def __call__(self, state: RetryCallState) -> bool:
        now = time.monotonic()
        if self.first_failure is None:
            self.first_failure = now
        exc = state.outcome.exception() if state.outcome else None
        self.causes[attempt_cause(exc)] += 1
        if not is_rate_limited(exc):
            self.counted += 1
        if self.counted > self.max_retries:
            self.spent = f"GSP_LLM_MAX_RETRIES={self.max_retries} retries spent"
        elif self.elapsed() + (state.upcoming_sleep or 0.0) > self.budget_s:
            self.spent = f"retry budget GSP_LLM_RETRY_BUDGET_S={self.budget_s:g} s spent"
        return self.spent is not None

    def elapsed(self) -> float:
        return 0.0 if self.first_failure is None else time.monotonic() - self.first_failure

    def outcome(self, attempts: int) -> str:
        """The tail of a failed request's error: the attempts made, over how long, why no more
        were made, and their causes (no parentheses inside: gsp.generate strips this tail to group
        rows by cause)."""
        if self.spent is None:  # a failure that is not retried (an HTTP 400, say)
            return f"(after {attempts} attempt(s))"
        causes = ", ".join(f"{c} ×{n}" for c, n in self.causes.most_common())
        return f"(after {attempts} attempt(s) over {self.elapsed():.1f} s, {self.spent}; {causes})"


def failure_cause(exc: BaseException) -> str | None:
    """The breaker's category of a failed attempt: failures with the same category are "the same
    cause". ``None`` for a 429: the server is pacing us, which the rate limits handle, not down."""
    if isinstance(exc, HTTPStatusError):
        return None if exc.status_code == 429 else f"HTTP {exc.status_code}"
    if isinstance(exc, RequestTimeout):
        return "timeout"
    if isinstance(exc, TransportError):
        return "connection error"
    if isinstance(exc, UnparseableResponse):
        return "unparseable response"
    return type(exc).__name__


def breaker_verdict(recent: Sequence[str | None], window: int, share: float) -> tuple[str, int] | None:
    """(cause, count) when the last ``window`` outcomes (``None`` = success) are all in and at
    least ``share`` of them failed with one cause; otherwise ``None``. Waiting for a full window
    keeps a few unlucky first attempts from stopping a run."""
    if window <= 0 or len(recent) < window:
        return None
    last = list(recent)[-window:]
    counts: dict[str, int] = {}
    for cause in last:
        if cause is not None:
            counts[cause] = counts.get(cause, 0) + 1
    if not counts:
        return None
    cause, n = max(counts.items(), key=lambda kv: kv[1])
    return (cause, n) if n >= share * window else None


class CircuitBreaker:
    """Opens, for the rest of the run, when :func:`breaker_verdict` says most recent attempts
    failed for one cause. It never closes again: a run is minutes long, and an endpoint that failed
    twenty attempts in a row is better re-run later (every answer so far is cached) than probed."""

    def __init__(self, window: int, share: float):
        self.window, self.share = window, share
        self._recent: deque[str | None] = deque(maxlen=max(window, 1))
        self.reason: str | None = None
        self._details: dict[str, str] = {}   # cause → the latest error of that cause, in words
        self._opened = asyncio.Event()

    @property
    def is_open(self) -> bool:
        return self.reason is not None

    def record(self, exc: BaseException | None) -> None:
        if self.is_open or self.window <= 0:
            return
        cause = None if exc is None else failure_cause(exc)
        if exc is not None and cause is None:
            return  # rate limiting is neither a success nor an outage
        self._recent.append(cause)
        if exc is not None and cause is not None:
            self._details[cause] = describe_error(exc)
        verdict = breaker_verdict(self._recent, self.window, self.share)
        if verdict is not None:
            cause, count = verdict
            self.reason = f"{self._details.get(cause, cause)} in {count} of the last {self.window} requests"
            self._opened.set()
            log.warning("LLM endpoint failing (%s): circuit breaker open, no further requests", self.reason)

    async def sleep(self, seconds: float) -> None:
        """A retry's backoff that ends early when the breaker opens (then the retry is refused)."""
        try:
            await asyncio.wait_for(self._opened.wait(), timeout=seconds)
        except TimeoutError:
            pass


def connect_failure(exc: BaseException, timeout_s: float) -> str:
    """Why a connection could not be made, in words: refused, unknown host, no answer."""
    chain, seen = [], set()
    node: BaseException | None = exc
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        chain.append(node)
        node = node.__cause__ or node.__context__
    text = " ".join(str(e) for e in chain).lower()
    if any(isinstance(e, ConnectionRefusedError) for e in chain) or "connection refused" in text:
        return "connection refused"
    if any(isinstance(e, socket.gaierror) for e in chain) or any(
            s in text for s in ("name or service not known", "nodename nor servname", "name resolution",
                                "no address associated")):
        return "unknown host (DNS lookup failed)"
    if any(isinstance(e, (httpx.ConnectTimeout, TimeoutError, socket.timeout)) for e in chain):
        return f"no answer within {timeout_s:g} s"
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def check_endpoint(base_url: str, api_key: str | None, model: str | None = None, *, timeout_s: float = 5.0,
                   attempts: int = 2) -> None:
    """Before a run: ``GET <base_url>/models`` with the key. A refused connection, an unknown host
    or a connect timeout (after ``attempts`` tries) and HTTP 401/403 raise
    :class:`EndpointUnavailable` naming the endpoint (never the key) and the cause. Anything else
    lets the run start: some OpenAI-compatible servers have no ``/models`` (404), and a 5xx or a
    slow answer here is for the run's own retries and circuit breaker to judge."""
    host = endpoint_host(base_url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # plain http has no TLS, and loading the CA bundle for nothing takes httpx about 50 ms
    verify = urlsplit(base_url).scheme != "http"
    failure = "no attempt"
    for attempt in range(attempts):
        if attempt:
            time.sleep(min(0.5, timeout_s))
        try:
            response = httpx.get(base_url.rstrip("/") + "/models", headers=headers, timeout=timeout_s, verify=verify)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            failure = connect_failure(exc, timeout_s)
            continue
        except httpx.HTTPError as exc:
            log.warning("endpoint check of %s inconclusive (%s); starting the run", host, type(exc).__name__)
            return
        if response.status_code in (401, 403):
            raise EndpointUnavailable(
                f"LLM endpoint {host} rejected the key (HTTP {response.status_code} on GET /models); "
                "check GSP_LLM_API_KEY")
        if response.status_code == 200 and model:
            _warn_unknown_model(response, model, host)
        return
    raise EndpointUnavailable(f"cannot reach the LLM endpoint {host}: {failure} "
                              f"({attempts} tries); check GSP_LLM_BASE_URL and that the server is running")


def _warn_unknown_model(response: httpx.Response, model: str, host: str | None) -> None:
    # Only a warning: proxies and gateways often list fewer models than they serve.
    try:
        ids = [m.get("id") for m in response.json().get("data", []) if isinstance(m, dict)]
    except (ValueError, AttributeError):
        return
    if ids and model not in ids:
        log.warning("model %r is not among the %d model(s) %s lists (%s)", model, len(ids), host,
                    ", ".join(map(str, ids[:8])))


@dataclass
class StageUsage:
    """Counters for one stage (Tb, Ts, Tg, Tp)."""

    requests: int = 0          # HTTP calls made in this run (every attempt)
    cached: int = 0            # answers served from the cache
    retries: int = 0           # attempts after a retryable failure
    failures: dict[str, int] = field(default_factory=dict)  # failed attempts by attempt_cause
    repairs: int = 0           # re-asks after schema-invalid output or a rejected text
    rejected: int = 0          # answers whose texts failed the quality check
    prompt_tokens: int = 0     # tokens of the calls made in this run (what is billed now)
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0

    def count_failure(self, cause: str) -> None:
        self.failures[cause] = self.failures.get(cause, 0) + 1

    def cost(self, price_in: float | None, price_out: float | None) -> float | None:
        if price_in is None and price_out is None:
            return None
        return ((price_in or 0.0) * self.prompt_tokens + (price_out or 0.0) * self.completion_tokens) / 1e6


@dataclass
class ChatResult:
    """The outcome of one structured exchange (including its re-asks)."""

    parsed: BaseModel | None
    request_hash: str
    response_id: str | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.parsed is not None


@dataclass
class Endpoint:
    base_url: str
    model: str
    api_key: str | None = None
    structured_output: StructuredMode = "json_object"
    #: What identifies the server in cache keys. The embedded server listens on a new free port
    #: each run, so its URL must not be part of the key, or no local run would ever hit the cache.
    identity: str | None = None
    #: A cap on answer length for this endpoint (the embedded model rambles; see settings).
    max_tokens: int | None = None
    #: Extra OpenAI sampling parameters sent with every request (e.g. ``frequency_penalty``);
    #: part of the cache key, since they change the answer.
    sampling: dict[str, float] = field(default_factory=dict)
    #: Base URLs of further servers that answer exactly like ``base_url`` (same weights, same
    #: identity): requests go to whichever has the fewest in flight.
    replicas: tuple[str, ...] = ()
    #: Re-asks after an invalid or rejected answer on this endpoint (None: the settings').
    repair_attempts: int | None = None
    #: Dictionary passages retrieved for a sign's gloss for this endpoint (None: the settings'
    #: retrieval_k).
    passages: int | None = None


class LLMClient:
    """Async chat client with cache, limits, retries and structured output. Use one per event loop."""

    def __init__(self, endpoint: Endpoint, settings: LLMSettings, cache: ResponseCache | None = None,
                 concurrency: int | None = None, throttle: Callable[[int], Awaitable[None]] | None = None):
        """``throttle``, when given, is awaited before every attempt with its token estimate, after
        this client's own limits: a limit shared with other processes (this package never knows
        whose)."""
        self.endpoint = endpoint
        self.settings = settings
        self.cache = cache
        self._transports: list[Transport] = [open_transport(url, settings.timeout_s)
                                             for url in (endpoint.base_url, *endpoint.replicas)]
        self._headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
        self._in_flight = [0] * len(self._transports)
        self._concurrency = concurrency or settings.concurrency
        self._slots = asyncio.Semaphore(self._concurrency)
        self._rpm = self._request_limiter(settings.requests_per_minute)
        self._tpm = AsyncLimiter(settings.tokens_per_minute, 60) if settings.tokens_per_minute else None
        self.breaker = CircuitBreaker(settings.breaker_window, settings.breaker_failure_share)
        self.throttle = throttle
        self.usage: dict[str, StageUsage] = {}

    @staticmethod
    def _request_limiter(rpm: float | None) -> AsyncLimiter | None:
        # Spread requests over the minute instead of allowing a whole minute's burst at once:
        # providers often enforce RPM over shorter windows.
        if not rpm:
            return None
        if rpm >= 60:
            return AsyncLimiter(rpm / 60.0, 1.0)
        return AsyncLimiter(1, 60.0 / rpm)

    def stage(self, name: str) -> StageUsage:
        return self.usage.setdefault(name, StageUsage())

    def usage_counts(self) -> dict[str, dict[str, Any]]:
        """The counters per stage as plain data (see :meth:`add_usage`)."""
        return {name: asdict(u) for name, u in sorted(self.usage.items())}

    def add_usage(self, counts: dict[str, dict[str, Any]]) -> None:
        """Add another client's :meth:`usage_counts` (a batch described in another process)."""
        for name, fields in counts.items():
            usage = self.stage(name)
            for key, value in fields.items():
                if isinstance(value, dict):
                    for cause, n in value.items():
                        getattr(usage, key)[cause] = getattr(usage, key).get(cause, 0) + n
                else:
                    setattr(usage, key, getattr(usage, key) + value)

    def usage_dict(self) -> dict[str, dict[str, Any]]:
        s = self.settings
        return {name: {**asdict(u), "cost": u.cost(s.price_input_per_mtok, s.price_output_per_mtok)}
                for name, u in sorted(self.usage.items())}

    @property
    def repair_attempts(self) -> int:
        """Re-asks this client makes after an invalid or rejected answer: the endpoint's, else the settings'."""
        own = self.endpoint.repair_attempts
        return self.settings.repair_attempts if own is None else own

    @property
    def retrieval_k(self) -> int:
        """Passages to retrieve for a sign's gloss for this endpoint: its own, else the settings'."""
        own = self.endpoint.passages
        return self.settings.retrieval_k if own is None else own

    async def open_connections(self, requests: int) -> None:
        """Connections for the first ``requests`` requests (at most the concurrency), opened
        together and spread over the replicas as the requests will be. Each may take as long as
        the endpoint check (``preflight_timeout_s``): an endpoint that stopped answering since is
        then left to the requests, rather than holding the batch for a request's time limit."""
        count = min(requests, self._concurrency)
        share = -(-count // len(self._transports))
        await asyncio.gather(*(t.open_connections(share, self.settings.preflight_timeout_s)
                               for t in self._transports))

    async def aclose(self) -> None:
        for transport in self._transports:
            await transport.aclose()

    # -- one request -------------------------------------------------------------------------

    def request_body(self, messages: list[dict[str, str]], fmt: dict[str, Any] | None) -> dict[str, Any]:
        """Everything that determines the answer, and nothing secret: the cache key's input."""
        s = self.settings
        return {
            "base_url": self.endpoint.identity or self.endpoint.base_url.rstrip("/"),
            "model": self.endpoint.model,
            "messages": messages,
            "response_format": fmt,
            "temperature": s.temperature,
            "seed": s.seed,
            "max_tokens": min(s.max_tokens, self.endpoint.max_tokens or s.max_tokens),
            # only when set, so adding the option left every existing cache key as it was
            **({"sampling": dict(sorted(self.endpoint.sampling.items()))} if self.endpoint.sampling else {}),
        }

    async def complete(self, body: dict[str, Any], stage: str) -> tuple[str, dict[str, Any]]:
        """One chat completion, from the cache or the server; returns (request hash, response)."""
        key = request_hash(body)
        usage = self.stage(stage)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                usage.cached += 1
                usage.cached_prompt_tokens += hit.get("prompt_tokens") or 0
                usage.cached_completion_tokens += hit.get("completion_tokens") or 0
                return key, hit

        payload = chat_payload(body)
        budget = RetryBudget(self.settings.max_retries, self.settings.retry_budget_s)
        retrying: AsyncRetrying | None = None
        try:
            first: Exception | None = None
            try:
                response = await self._attempt(body, payload, usage)
            except Exception as exc:
                if not is_retryable(exc):
                    raise
                first = exc
            if first is not None:  # retried outside the handler, so later failures do not chain to it
                retrying = self._retrying(budget)
                response = await self._retry(retrying, first, body, payload, usage)
        except CircuitOpen as exc:
            raise LLMCallError(f"not sent, endpoint failing: {exc} (circuit breaker)") from exc
        except Exception as exc:  # every failure mode becomes one clear, recorded reason
            if isinstance(exc, HTTPStatusError) and exc.status_code in REFUSING_STATUSES:
                raise FatalLLMError(f"{endpoint_host(self.endpoint.base_url)} refused the request "
                                    f"({describe_error(exc)}); check GSP_LLM_API_KEY / GSP_LLM_MODEL") from exc
            attempts = retrying.statistics.get("attempt_number", 1) if retrying is not None else 1
            raise LLMCallError(f"{describe_error(exc)} {budget.outcome(attempts)}") from exc
        if self.cache is not None:
            self.cache.put(key, response)
        return key, response

    def _retrying(self, budget: RetryBudget) -> AsyncRetrying:
        return AsyncRetrying(stop=budget, wait=self._wait, sleep=self.breaker.sleep,
                             retry=retry_if_exception(is_retryable), before_sleep=self._log_retry, reraise=True)

    async def _retry(self, retrying: AsyncRetrying, first: Exception, body: dict[str, Any], payload: bytes,
                     usage: StageUsage) -> dict[str, Any]:
        """The attempts after a retryable first failure, under tenacity's policy. The first
        attempt ran outside it (most requests need one, and tenacity's per-attempt bookkeeping cost
        about 30 µs of CPU and left about 40 objects in reference cycles a request, for the garbage
        collector to find — bench/generate.py); here it is
        replayed as tenacity's attempt 1, so waits, stops and counts are those of one policy."""
        replay: Exception | None = first
        async for attempt in retrying:
            with attempt:
                if replay is not None:
                    failure, replay = replay, None
                    raise failure
                if self.breaker.is_open:  # opened during the backoff: refused, not a retry
                    raise CircuitOpen(self.breaker.reason)
                usage.retries += 1
                return await self._attempt(body, payload, usage)
        raise AssertionError("unreachable: tenacity re-raises the last failure")  # pragma: no cover

    async def _attempt(self, body: dict[str, Any], payload: bytes, usage: StageUsage) -> dict[str, Any]:
        if self.breaker.is_open:
            raise CircuitOpen(self.breaker.reason)
        try:
            response = await self._send(body, payload, usage)
        except Exception as exc:
            self.breaker.record(exc)
            raise
        self.breaker.record(None)
        return response

    async def _send(self, body: dict[str, Any], payload: bytes, usage: StageUsage) -> dict[str, Any]:
        async with self._slots:
            if self._rpm is not None:
                await self._rpm.acquire()
            if self._tpm is not None or self.throttle is not None:  # only they need it (JSON-encodes the messages)
                estimate = estimate_tokens(body)
                if self._tpm is not None:
                    await self._tpm.acquire(min(estimate, self.settings.tokens_per_minute))
                if self.throttle is not None:
                    await self.throttle(estimate)
            if self.breaker.is_open:  # it may have opened while this request waited for a slot
                raise CircuitOpen(self.breaker.reason)
            usage.requests += 1
            try:
                return await self._exchange(payload, usage)
            except Exception as exc:  # every attempt sent is counted as ok or with its cause
                usage.count_failure(attempt_cause(exc))
                raise

    async def _exchange(self, payload: bytes, usage: StageUsage) -> dict[str, Any]:
        """One HTTP exchange with the least busy replica; its answer as plain data."""
        replica = min(range(len(self._transports)), key=self._in_flight.__getitem__)
        self._in_flight[replica] += 1
        try:
            answer = await self._transports[replica].post(payload, self._headers)
        finally:
            self._in_flight[replica] -= 1
        response = completion_fields(answer.content)
        usage.prompt_tokens += response["prompt_tokens"]
        usage.completion_tokens += response["completion_tokens"]
        return response

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        requested = retry_after_seconds(exc) if exc is not None else None
        if requested is not None:
            return min(requested, self.settings.retry_max_s)
        return wait_exponential_jitter(multiplier=self.settings.retry_initial_s, max=self.settings.retry_max_s)(state)

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning("LLM request attempt %d failed (%s); retrying in %.1fs",
                    state.attempt_number, describe_error(exc) if exc else "?", wait)

    # -- a structured exchange ---------------------------------------------------------------

    async def structured(self, messages: list[dict[str, str]], output: type[BaseModel], schema: dict[str, Any],
                         name: str, stage: str,
                         check: Callable[[BaseModel], str | None] | None = None) -> ChatResult:
        """Ask for JSON of shape ``output``; re-ask up to ``repair_attempts`` times when the answer
        is invalid or ``check(parsed)`` names a problem with its content, showing the model what
        was wrong. Each re-ask carries the rejected answer and the complaint, so it has its own
        cache key: a bad answer in the cache is re-asked, never replayed as final.
        Transport failures raise :class:`LLMCallError`."""
        fmt = response_format(self.endpoint.structured_output, name, schema)
        convo = list(messages)
        prompt_tokens = completion_tokens = 0
        key, response, error, rejected = "", None, "no attempt", False
        answers = self.repair_attempts + 1
        for attempt in range(answers):
            if attempt:
                self.stage(stage).repairs += 1
            body = self.request_body(convo, fmt)
            key, response = await self.complete(body, stage)
            prompt_tokens += response.get("prompt_tokens") or 0
            completion_tokens += response.get("completion_tokens") or 0
            try:
                parsed = validate_output(output, response.get("content"))
            except OutputInvalid as exc:
                error, rejected = str(exc), False
                if response.get("finish_reason") == "length":
                    error += f" (the answer was cut off at max_tokens={body['max_tokens']}; be shorter)"
                convo = convo + repair_messages(response.get("content"), f"That answer is invalid: {error}. Reply "
                                                "again with only one JSON object that matches the schema.")
                continue
            problem = check(parsed) if check is not None else None
            if problem is None:
                return ChatResult(parsed, key, response.get("id"), prompt_tokens, completion_tokens)
            self.stage(stage).rejected += 1
            error, rejected = problem, True
            convo = convo + repair_messages(response.get("content"), f"That answer is unusable: {problem}. Reply "
                                            "again with only one JSON object that matches the schema, each text a "
                                            "real description in words of how the sign is performed.")
        error = (f"{error} (still after {answers} answer(s))" if rejected
                 else f"invalid output after {answers} answer(s): {error}")
        return ChatResult(None, key, response.get("id") if response else None, prompt_tokens, completion_tokens,
                          error=error)


def repair_messages(answer: str | None, complaint: str) -> list[dict[str, str]]:
    """The turns appended for a re-ask: the model's answer, then what was wrong with it."""
    return [{"role": "assistant", "content": answer or ""}, {"role": "user", "content": complaint}]
