"""The LLM client: the official async OpenAI SDK plus what a long generation run needs.

- a persistent response cache (:mod:`gsp.llm.cache`): every completed call is stored the moment it
  arrives, so re-runs make zero calls and a killed run resumes without repeating one;
- a concurrency limit (``asyncio.Semaphore``), requests- and tokens-per-minute limits
  (``aiolimiter``);
- retries with exponential backoff and jitter on 429, 5xx, timeouts, dropped connections and
  unparseable bodies, honouring ``Retry-After`` (``tenacity``; the SDK's own retries are off so
  that one policy, with one set of counters, governs every attempt);
- structured output validated with pydantic, with a bounded number of re-asks that show the model
  its validation error (:mod:`gsp.llm.structured`);
- token and cost accounting per stage.

The API key is handed to the SDK and nowhere else: not to the cache key, logs or results.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
from aiolimiter import AsyncLimiter
from pydantic import BaseModel
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from gsp.llm.cache import ResponseCache, request_hash
from gsp.llm.structured import OutputInvalid, response_format, validate_output
from gsp.settings import LLMSettings

log = logging.getLogger("gsp.llm")

#: Used when no key is configured (local servers ignore it; the SDK insists on one).
NO_KEY = "no-key-configured"


class LLMCallError(RuntimeError):
    """A request failed for good (retries exhausted or a non-retryable HTTP error)."""


class FatalLLMError(RuntimeError):
    """The endpoint refuses every request (bad key, no access, unknown model): stop the run."""


class UnparseableResponse(RuntimeError):
    """The HTTP exchange succeeded but the body is not a usable chat completion."""


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


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError, UnparseableResponse)):
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    return isinstance(exc, (httpx.TransportError, asyncio.TimeoutError))


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {str(exc.message)[:300]}"
    if isinstance(exc, openai.APITimeoutError):
        return "request timed out"
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return f"connection error: {type(cause).__name__}: {str(cause)[:200]}"
    return f"{type(exc).__name__}: {str(exc)[:300]}"


@dataclass
class StageUsage:
    """Counters for one stage (Tb, Ts, Tg, Tp)."""

    requests: int = 0          # HTTP calls made in this run (every attempt)
    cached: int = 0            # answers served from the cache
    retries: int = 0           # attempts after a retryable failure
    repairs: int = 0           # re-asks after schema-invalid output
    prompt_tokens: int = 0     # tokens of the calls made in this run (what is billed now)
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0

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
    structured_output: str = "json_object"
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


class LLMClient:
    """Async chat client with cache, limits, retries and structured output. Use one per event loop."""

    def __init__(self, endpoint: Endpoint, settings: LLMSettings, cache: ResponseCache | None = None,
                 concurrency: int | None = None):
        self.endpoint = endpoint
        self.settings = settings
        self.cache = cache
        self._sdks = [
            openai.AsyncOpenAI(base_url=url, api_key=endpoint.api_key or NO_KEY, max_retries=0,
                               timeout=settings.timeout_s)
            for url in (endpoint.base_url, *endpoint.replicas)
        ]
        self._in_flight = [0] * len(self._sdks)
        self._slots = asyncio.Semaphore(concurrency or settings.concurrency)
        self._rpm = self._request_limiter(settings.requests_per_minute)
        self._tpm = AsyncLimiter(settings.tokens_per_minute, 60) if settings.tokens_per_minute else None
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

    def usage_dict(self) -> dict[str, dict[str, Any]]:
        s = self.settings
        return {name: {**asdict(u), "cost": u.cost(s.price_input_per_mtok, s.price_output_per_mtok)}
                for name, u in sorted(self.usage.items())}

    async def aclose(self) -> None:
        for sdk in self._sdks:
            await sdk.close()

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

        s = self.settings
        retrying = AsyncRetrying(
            stop=stop_after_attempt(s.max_retries + 1),
            wait=self._wait,
            retry=retry_if_exception(is_retryable),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        usage.retries += 1
                    response = await self._send(body, usage)
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as exc:
            raise FatalLLMError(f"{endpoint_host(self.endpoint.base_url)} refused the request "
                                f"({describe_error(exc)}); check GSP_LLM_API_KEY / GSP_LLM_MODEL") from exc
        except Exception as exc:  # every failure mode becomes one clear, recorded reason
            attempts = retrying.statistics.get("attempt_number", 1)
            raise LLMCallError(f"{describe_error(exc)} (after {attempts} attempt(s))") from exc
        if self.cache is not None:
            self.cache.put(key, response)
        return key, response

    async def _send(self, body: dict[str, Any], usage: StageUsage) -> dict[str, Any]:
        s = self.settings
        kwargs: dict[str, Any] = {
            "model": body["model"],
            "messages": body["messages"],
            "temperature": body["temperature"],
            "max_tokens": body["max_tokens"],
        }
        if body["response_format"] is not None:
            kwargs["response_format"] = body["response_format"]
        if body["seed"] is not None:
            kwargs["seed"] = body["seed"]
        kwargs.update(body.get("sampling", {}))
        async with self._slots:
            if self._rpm is not None:
                await self._rpm.acquire()
            if self._tpm is not None:
                estimate = len(json.dumps(body["messages"], ensure_ascii=False)) // 4 + body["max_tokens"]
                await self._tpm.acquire(min(estimate, s.tokens_per_minute))
            usage.requests += 1
            replica = min(range(len(self._sdks)), key=self._in_flight.__getitem__)
            self._in_flight[replica] += 1
            try:
                completion = await self._sdks[replica].chat.completions.create(**kwargs)
            except openai.APIError:
                raise
            except (ValueError, TypeError) as exc:  # body that is not a chat completion (bad JSON)
                raise UnparseableResponse(f"unparseable response body: {exc}") from exc
            finally:
                self._in_flight[replica] -= 1
        if isinstance(completion, str) or not getattr(completion, "choices", None):
            raise UnparseableResponse("response has no choices")
        choice = completion.choices[0]
        content = choice.message.content if choice.message is not None else None
        if content is None:
            raise UnparseableResponse("response has no message content")
        u = completion.usage
        prompt_tokens = (u.prompt_tokens or 0) if u else 0
        completion_tokens = (u.completion_tokens or 0) if u else 0
        usage.prompt_tokens += prompt_tokens
        usage.completion_tokens += completion_tokens
        return {
            "id": completion.id,
            "model": completion.model,
            "content": content,
            "finish_reason": choice.finish_reason,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
        }

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
                         name: str, stage: str) -> ChatResult:
        """Ask for JSON of shape ``output``; re-ask with the validation error up to
        ``repair_attempts`` times. Transport failures raise :class:`LLMCallError`."""
        fmt = response_format(self.endpoint.structured_output, name, schema)
        convo = list(messages)
        prompt_tokens = completion_tokens = 0
        key, response, error = "", None, "no attempt"
        for attempt in range(self.settings.repair_attempts + 1):
            if attempt:
                self.stage(stage).repairs += 1
            body = self.request_body(convo, fmt)
            key, response = await self.complete(body, stage)
            prompt_tokens += response.get("prompt_tokens") or 0
            completion_tokens += response.get("completion_tokens") or 0
            try:
                parsed = validate_output(output, response.get("content"))
            except OutputInvalid as exc:
                error = str(exc)
                if response.get("finish_reason") == "length":
                    error += f" (the answer was cut off at max_tokens={body['max_tokens']}; be shorter)"
                convo = convo + [
                    {"role": "assistant", "content": response.get("content") or ""},
                    {"role": "user", "content": f"That answer is invalid: {error}. Reply again with only "
                                                "one JSON object that matches the schema."},
                ]
                continue
            return ChatResult(parsed, key, response.get("id"), prompt_tokens, completion_tokens)
        return ChatResult(None, key, response.get("id") if response else None, prompt_tokens, completion_tokens,
                          error=f"invalid output after {self.settings.repair_attempts + 1} answer(s): {error}")
