"""The LLM client against the loopback chat-completions server: structured-output modes, retries
on every fault kind, Retry-After, re-asks on invalid output, rate limits, the response cache."""

import asyncio
import json
import socket
import time

import httpx
import pytest
from fake_openai import FakeOpenAI, Fault

from gsp.llm.cache import ResponseCache
from gsp.llm.client import Endpoint, FatalLLMError, LLMCallError, LLMClient, endpoint_host, retry_after_seconds
from gsp.llm.structured import OutputInvalid, inline_schema, parse_json
from gsp.prompts import DescriptionOut, PartsOut
from gsp.settings import LLMSettings

MESSAGES = [{"role": "system", "content": "Describe signs."}, {"role": "user", "content": "Sign: hello"}]


@pytest.fixture
def srv():
    with FakeOpenAI() as server:
        yield server


def make_client(srv, tmp_path, mode="json_schema", cache=True, key="sk-test", **llm):
    llm = {"retry_initial_s": 0.05, "retry_max_s": 3.0, "timeout_s": 5.0, **llm}
    settings = LLMSettings(base_url=srv.base_url, model="fake", structured_output=mode, **llm)
    return LLMClient(Endpoint(srv.base_url, "fake", key, mode), settings,
                     ResponseCache(tmp_path / "cache") if cache else None)


def ask(client, messages=MESSAGES, model=DescriptionOut, stage="Tb"):
    async def go():
        try:
            return await client.structured(messages, model, inline_schema(model), name="t", stage=stage)
        finally:
            await client.aclose()
    return asyncio.run(go())


@pytest.mark.parametrize("mode, expected", [
    ("json_schema", {"type": "json_schema"}),
    ("json_object", {"type": "json_object"}),
    ("json_object_schema", {"type": "json_object"}),
])
def test_structured_output_modes(srv, tmp_path, mode, expected):
    # the prompts always state the schema too (json_object mode has nothing else to go by)
    messages = [{"role": "system", "content": "Answer with JSON: " + json.dumps(inline_schema(PartsOut))},
                MESSAGES[1]]
    result = ask(make_client(srv, tmp_path, mode), messages=messages, model=PartsOut, stage="Tp")
    assert result.ok and result.parsed.parts
    (body,) = srv.bodies.values()
    fmt = body["response_format"]
    assert fmt["type"] == expected["type"]
    if mode == "json_schema":
        parts_schema = fmt["json_schema"]["schema"]["properties"]["parts"]
        assert parts_schema["items"]["properties"]["body_parts"]["items"]["enum"] \
            == ["body", "left_hand", "right_hand", "mouth", "face"]
    elif mode == "json_object_schema":
        assert "$ref" not in json.dumps(fmt["schema"]) and "parts" in fmt["schema"]["properties"]
    else:
        assert set(fmt) == {"type"}
    assert body["seed"] == 0 and body["temperature"] == 0.3


@pytest.mark.parametrize("kind", ["429", "500", "drop", "truncated", "garbage", "slow"])
def test_transient_faults_are_retried(srv, tmp_path, kind):
    srv.faults = [Fault(kind, times=2, retry_after=0.1, delay_s=3.0)]
    client = make_client(srv, tmp_path, timeout_s=1.0) if kind == "slow" else make_client(srv, tmp_path)
    result = ask(client)
    assert result.ok, result.error
    assert srv.request_count == 3
    assert client.usage["Tb"].retries == 2 and client.usage["Tb"].requests == 3


def test_retry_after_is_honoured(srv, tmp_path):
    srv.faults = [Fault("429", times=1, retry_after=1.5)]
    client = make_client(srv, tmp_path, retry_initial_s=0.01)
    assert ask(client).ok
    first, second = srv.records
    assert first.status == 429 and second.status == 200
    assert second.t - first.t >= 1.4  # the server asked for 1.5 s; the backoff alone would be ~0.01 s


def test_retries_exhausted_is_a_call_error_with_the_reason(srv, tmp_path):
    srv.faults = [Fault("500", times=None)]
    client = make_client(srv, tmp_path, max_retries=2)
    with pytest.raises(LLMCallError, match=r"HTTP 500.*after 3 attempt"):
        ask(client)
    assert srv.request_count == 3


def test_auth_failure_is_fatal(tmp_path):
    # a real loopback server that refuses the key
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Refuse(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b'{"error": {"message": "invalid key"}}'
            self.send_response(401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        class S:
            base_url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
        with pytest.raises(FatalLLMError, match="401") as info:
            ask(make_client(S, tmp_path, key="sk-VERYSECRET"))
        assert "VERYSECRET" not in str(info.value)
    finally:
        httpd.shutdown()


@pytest.mark.parametrize("kind", ["invalid_json", "schema_invalid"])
def test_invalid_output_is_re_asked_with_the_error(srv, tmp_path, kind):
    srv.faults = [Fault(kind, total=1)]
    client = make_client(srv, tmp_path)
    result = ask(client)
    assert result.ok
    assert client.usage["Tb"].repairs == 1
    bodies = list(srv.bodies.values())
    assert len(bodies) == 2
    repair = bodies[1]["messages"]
    assert repair[-2]["role"] == "assistant" and repair[-1]["content"].startswith("That answer is invalid")


def test_always_invalid_output_fails_after_bounded_re_asks(srv, tmp_path):
    srv.faults = [Fault("schema_invalid", times=None)]
    client = make_client(srv, tmp_path, repair_attempts=2)
    result = ask(client)
    assert not result.ok
    assert "invalid output after 3 answer(s)" in result.error and "description" in result.error
    assert srv.request_count == 3


def test_an_endpoints_own_repair_cap_wins_over_the_settings(srv, tmp_path):
    """The embedded model's endpoint carries local_repair_attempts: fewer re-asks than the settings'."""
    srv.faults = [Fault("schema_invalid", times=None)]
    settings = LLMSettings(base_url=srv.base_url, model="fake", repair_attempts=2, timeout_s=5.0)
    client = LLMClient(Endpoint(srv.base_url, "fake", None, "json_schema", repair_attempts=1), settings)
    result = ask(client)
    assert not result.ok and "invalid output after 2 answer(s)" in result.error
    assert srv.request_count == 2


def test_cache_makes_a_repeat_free_and_survives_reopening(srv, tmp_path):
    first = ask(make_client(srv, tmp_path))
    assert srv.request_count == 1
    again = make_client(srv, tmp_path)  # a new client over the same cache file, as after a restart
    second = ask(again)
    assert srv.request_count == 1
    assert again.usage["Tb"].cached == 1 and again.usage["Tb"].requests == 0
    assert second.parsed == first.parsed and second.response_id == first.response_id
    # the key is not in the cache file
    raw = (tmp_path / "cache" / "llm_responses.sqlite").read_bytes()
    assert b"sk-test" not in raw


def test_cache_key_depends_on_what_determines_the_answer(srv, tmp_path):
    ask(make_client(srv, tmp_path))
    ask(make_client(srv, tmp_path, temperature=0.9))
    ask(make_client(srv, tmp_path, mode="json_object"))
    ask(make_client(srv, tmp_path), messages=MESSAGES[:1] + [{"role": "user", "content": "Sign: bye"}])
    assert srv.request_count == 4
    ask(make_client(srv, tmp_path, key="another-key"))  # the key does not change the answer
    assert srv.request_count == 4


def test_requests_per_minute_limit(srv, tmp_path):
    rpm = 600  # 10 per second
    client = make_client(srv, tmp_path, cache=False, requests_per_minute=rpm, concurrency=16)

    async def go():
        try:
            await asyncio.gather(*(client.structured(
                [{"role": "user", "content": f"Sign: s{i}"}], DescriptionOut, inline_schema(DescriptionOut),
                name="t", stage="Tb") for i in range(30)))
        finally:
            await client.aclose()
    asyncio.run(go())
    times = sorted(r.t for r in srv.records)
    assert len(times) == 30
    # leaky bucket of 10 with 10/s: in any window of length w at most 10 + 10·w requests (+1 jitter)
    for i in range(len(times)):
        for j in range(i, len(times)):
            assert j - i + 1 <= 10 + 10 * (times[j] - times[i]) + 1


def test_tokens_per_minute_limit(srv, tmp_path):
    # each request reserves ~len(messages)/4 + max_tokens ≈ 110 tokens; 6000/min = 100/s
    client = make_client(srv, tmp_path, cache=False, tokens_per_minute=6000, max_tokens=100, concurrency=8)

    async def go():
        try:
            await asyncio.gather(*(client.structured(
                [{"role": "user", "content": f"Sign: s{i}"}], DescriptionOut, inline_schema(DescriptionOut),
                name="t", stage="Tb") for i in range(70)))
        finally:
            await client.aclose()
    asyncio.run(go())
    times = sorted(r.t for r in srv.records)
    # the bucket holds one minute (6000 tokens ≈ 54 requests); the rest must wait for it to drain
    assert times[-1] - times[0] >= 1.0


def test_helpers():
    assert endpoint_host("https://user:pw@api.moonshot.cn/v1?x=1") == "https://api.moonshot.cn/v1"
    assert parse_json('```json\n{"a": "line\nbreak"}\n```') == {"a": "line\nbreak"}
    assert parse_json('Here: {"a": 1} done') == {"a": 1}
    with pytest.raises(OutputInvalid):
        parse_json("no json here")

    class E(Exception):
        class response:
            headers = {"retry-after": "2"}
    assert retry_after_seconds(E()) == 2.0


def test_endpoint_sampling_parameters_are_sent_and_part_of_the_cache_key(srv, tmp_path):
    settings = LLMSettings(base_url=srv.base_url, model="fake", retry_initial_s=0.05, timeout_s=5.0)
    penalised = LLMClient(Endpoint(srv.base_url, "fake", None, "json_schema", sampling={"frequency_penalty": 1.0}),
                          settings, ResponseCache(tmp_path / "cache"))
    assert ask(penalised).ok
    (body,) = srv.bodies.values()
    assert body["frequency_penalty"] == 1.0
    plain = LLMClient(Endpoint(srv.base_url, "fake", None, "json_schema"), settings, ResponseCache(tmp_path / "cache"))
    assert ask(plain).ok
    assert srv.request_count == 2  # a different sampling setup is a different answer, not a cache hit
    assert all("frequency_penalty" not in b for b in srv.bodies.values() if b is not body)


def test_requests_spread_over_replicas(tmp_path):
    with FakeOpenAI(latency_s=0.2) as first, FakeOpenAI(latency_s=0.2) as second:
        settings = LLMSettings(base_url=first.base_url, model="fake", timeout_s=5.0)
        client = LLMClient(Endpoint(first.base_url, "fake", None, "json_schema", replicas=(second.base_url,)),
                           settings, None, concurrency=2)

        async def go():
            try:
                return await asyncio.gather(*(client.structured(
                    [{"role": "user", "content": f"Sign: s{i}"}], DescriptionOut, inline_schema(DescriptionOut),
                    name="t", stage="Tb") for i in range(8)))
            finally:
                await client.aclose()
        results = asyncio.run(go())
        assert all(r.ok for r in results)
        assert first.request_count + second.request_count == 8
        # each request goes to an idle replica: with two slots, neither server takes them all
        assert first.request_count >= 2 and second.request_count >= 2


# --- circuit breaker, endpoint check, quality re-asks (issue 8) ------------------------------

def test_breaker_verdict_needs_a_full_window_of_one_cause():
    from gsp.llm.client import breaker_verdict

    assert breaker_verdict(["HTTP 500"] * 3, window=4, share=0.8) is None          # window not full
    assert breaker_verdict(["HTTP 500"] * 4, window=4, share=0.8) == ("HTTP 500", 4)
    mixed = ["HTTP 500", "connection error", "HTTP 500", None, "HTTP 500"]
    assert breaker_verdict(mixed, window=5, share=0.8) is None                     # 3 of 5 alike
    assert breaker_verdict(mixed + ["HTTP 500"] * 3, window=5, share=0.8) == ("HTTP 500", 4)
    assert breaker_verdict(["HTTP 500"] * 9, window=0, share=0.8) is None          # disabled


def test_circuit_breaker_stops_sending_and_fails_the_rest_with_the_cause(srv, tmp_path):
    srv.faults = [Fault("500", times=None)]
    client = make_client(srv, tmp_path, cache=False, breaker_window=5, concurrency=2, max_retries=6)

    async def go():
        try:
            return await asyncio.gather(*(client.structured(
                [{"role": "user", "content": f"Sign: s{i}"}], DescriptionOut, inline_schema(DescriptionOut),
                name="t", stage="Tb") for i in range(12)), return_exceptions=True)
        finally:
            await client.aclose()
    started = time.monotonic()
    outcomes = asyncio.run(go())
    assert all(isinstance(o, LLMCallError) for o in outcomes)
    assert all("HTTP 500" in str(o) for o in outcomes)
    assert sum("circuit breaker" in str(o) for o in outcomes) >= 11
    # without the breaker: 12 requests × 7 attempts; with it, the window plus what was in flight
    assert srv.request_count <= 5 + 2
    assert time.monotonic() - started < 5


def test_rate_limiting_does_not_trip_the_breaker(srv, tmp_path):
    srv.faults = [Fault("429", times=3, retry_after=0.05)]
    client = make_client(srv, tmp_path, breaker_window=2)
    assert ask(client).ok and not client.breaker.is_open


def test_endpoint_check(tmp_path):
    from gsp.llm.client import EndpointUnavailable, check_endpoint

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(EndpointUnavailable, match=rf"127\.0\.0\.1:{port}/v1: connection refused"):
        check_endpoint(f"http://127.0.0.1:{port}/v1", "sk-SECRET", timeout_s=2, attempts=2)
    assert time.monotonic() - started < 3
    with FakeOpenAI(require_key="sk-right") as server:
        with pytest.raises(EndpointUnavailable, match="rejected the key \\(HTTP 401") as info:
            check_endpoint(server.base_url, "sk-WRONG-SECRET", timeout_s=2)
        assert "WRONG-SECRET" not in str(info.value)
        check_endpoint(server.base_url, "sk-right", "fake-model", timeout_s=2)  # passes
    with FakeOpenAI(models_endpoint=False) as server:
        check_endpoint(server.base_url, None, timeout_s=2)  # no /models (404) is not a failure
        assert server.gets == ["/v1/models"]


def test_connect_failure_names_the_cause():
    from gsp.llm.client import connect_failure

    def chained(outer: Exception, inner: BaseException) -> Exception:
        try:
            try:
                raise inner
            except BaseException as exc:
                raise outer from exc
        except Exception as exc:
            return exc
    assert connect_failure(chained(httpx.ConnectError("boom"), socket.gaierror(-2, "Name or service not known")),
                           5) == "unknown host (DNS lookup failed)"
    assert connect_failure(chained(httpx.ConnectError("x"), ConnectionRefusedError(111, "refused")), 5) \
        == "connection refused"
    assert connect_failure(httpx.ConnectTimeout("slow"), 5) == "no answer within 5 s"


def test_quality_check_re_asks_with_the_problem_and_fails_with_it(srv, tmp_path):
    srv.faults = [Fault("bad_text", total=1, text="./home.json")]
    client = make_client(srv, tmp_path)
    def check(parsed):
        return "quality: looks like a file path" if parsed.description.startswith("./") else None

    async def go(c):
        try:
            return await c.structured(MESSAGES, DescriptionOut, inline_schema(DescriptionOut), name="t",
                                      stage="Tb", check=check)
        finally:
            await c.aclose()
    result = asyncio.run(go(client))
    assert result.ok and not result.parsed.description.startswith("./")
    assert client.usage["Tb"].rejected == 1 and client.usage["Tb"].repairs == 1
    repair = list(srv.bodies.values())[1]["messages"]
    assert repair[-2]["content"] == json.dumps({"description": "./home.json"})
    assert repair[-1]["content"].startswith("That answer is unusable: quality: looks like a file path")

    srv.faults = [Fault("bad_text", times=None, only_if="Sign: bye", text="./bye.json")]
    stubborn = make_client(srv, tmp_path, repair_attempts=2)
    result = asyncio.run(_ask_checked(stubborn, check))
    assert not result.ok
    assert result.error == "quality: looks like a file path (still after 3 answer(s))"


async def _ask_checked(client, check):
    try:
        return await client.structured([MESSAGES[0], {"role": "user", "content": "Sign: bye"}], DescriptionOut,
                                        inline_schema(DescriptionOut), name="t", stage="Tb", check=check)
    finally:
        await client.aclose()
