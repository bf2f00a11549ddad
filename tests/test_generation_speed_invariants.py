"""What the fast generation client must keep while it got cheaper (issue 13): both HTTP carriers
answer and fail alike, connections are kept alive, the response cache commits an answer that comes
alone at the end of its event loop iteration, answers that come together within COMMIT_INTERVAL_S
in one transaction, and at once outside a loop, and a run killed with -9 at 16 requests in flight
resumes without repeating one committed answer."""

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from fake_openai import FakeOpenAI, Fault, client_env

from gsp.llm.cache import COMMIT_INTERVAL_S, ResponseCache
from gsp.llm.client import UnparseableResponse, attempt_cause, completion_fields, describe_error
from gsp.llm.server import free_port
from gsp.llm.transport import (
    HTTPStatusError,
    HttpxTransport,
    PlainHttpTransport,
    RequestTimeout,
    TransportError,
    json_body,
    open_transport,
)
from gsp.settings import PROJECT_ROOT

CARRIERS = {"plain": PlainHttpTransport, "httpx": HttpxTransport}
BODY = json_body({"model": "fake", "messages": [{"role": "user", "content": "Sign: hello"}]})


def post_all(transport, bodies):
    """Each body POSTed in turn; the answers, or the exception each raised."""
    async def go():
        out = []
        try:
            for body in bodies:
                try:
                    out.append(await transport.post(body, {"Authorization": "Bearer sk-t"}))
                except Exception as exc:
                    out.append(exc)
        finally:
            await transport.aclose()
        return out
    return asyncio.run(go())


@pytest.mark.parametrize("carrier", CARRIERS)
def test_both_carriers_answer_alike_and_keep_the_connection_alive(carrier):
    with FakeOpenAI() as srv:
        bodies = [json_body({"model": "fake", "messages": [{"role": "user", "content": f"Sign: s{i}"}]})
                  for i in range(6)]
        answers = post_all(CARRIERS[carrier](srv.base_url, 5.0), bodies)
        assert [a.status for a in answers] == [200] * 6
        fields = [completion_fields(a.content) for a in answers]
        assert [f["id"] for f in fields] == [f"chatcmpl-{r.body_hash[:24]}" for r in srv.records]
        assert all(f"s{i}:" in f["content"] for i, f in enumerate(fields))
        assert srv.connections == 1  # six requests in turn, one kept-alive connection
        assert all(r.authorization == "Bearer sk-t" for r in srv.records)



def test_connections_opened_ahead_carry_the_first_wave_and_a_dead_port_is_left_to_the_requests():
    """A run opens its first wave's connections before it prepares the signs' requests (see
    PlainHttpTransport.open_connections): the wave's requests then find them idle and open none."""
    with FakeOpenAI(latency_s=0.05) as srv:
        transport = PlainHttpTransport(srv.base_url, 5.0)

        async def accepted(wait_s):  # the server accepts in its own thread, after the handshake
            deadline = time.monotonic() + wait_s
            while srv.connections < 4 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            return srv.connections

        async def wave():
            try:
                await transport.open_connections(4)
                opened = await accepted(2.0)
                await transport.open_connections(4)  # four are idle: none more
                await asyncio.sleep(0.2)
                again = srv.connections
                bodies = [json_body({"messages": [{"role": "user", "content": f"Sign: s{i}"}]}) for i in range(4)]
                answers = await asyncio.gather(*(transport.post(b, {}) for b in bodies))
                return opened, again, [a.status for a in answers], srv.connections
            finally:
                await transport.aclose()
        opened, again, statuses, after = asyncio.run(wave())
    assert (opened, again, statuses, after) == (4, 4, [200] * 4, 4)

    dead = PlainHttpTransport(f"http://127.0.0.1:{free_port()}/v1", 1.0)

    async def nothing_listens():
        await dead.open_connections(3)  # no error here: the request that needs one reports it
        with pytest.raises(TransportError):
            await dead.post(BODY, {})
    asyncio.run(nothing_listens())


def test_opening_connections_ahead_gives_up_after_the_endpoint_checks_time(tmp_path):
    """A host that took the endpoint check and then stops completing connections (here: a socket
    whose accept queue is full, so the kernel drops the handshake) must not hold a batch's start
    for a request's time limit: the client opens its connections within preflight_timeout_s and
    leaves the rest to the requests."""
    import socket

    from gsp.llm.client import Endpoint, LLMClient
    from gsp.settings import LLMSettings

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    queued = []
    try:
        for _ in range(4):  # fill the accept queue nobody empties
            sock = socket.socket()
            sock.setblocking(False)
            try:
                sock.connect(listener.getsockname())
            except BlockingIOError:
                pass
            queued.append(sock)
        time.sleep(0.2)
        client = LLMClient(Endpoint(url, "fake", None, "json_schema"),
                           LLMSettings(base_url=url, model="fake", timeout_s=60.0, preflight_timeout_s=0.3))

        async def open_ahead():
            started = time.monotonic()
            try:
                await client.open_connections(3)
            finally:
                await client.aclose()
            return time.monotonic() - started
        took = asyncio.run(open_ahead())
    finally:
        for sock in queued:
            sock.close()
        listener.close()
    assert 0.25 <= took < 5.0, took  # the 0.3 s bound, not the 60 s request limit

@pytest.mark.parametrize("carrier", CARRIERS)
def test_both_carriers_fail_alike(carrier):
    with FakeOpenAI() as srv:
        srv.faults = [Fault("429", times=None, only_if="rate", retry_after=7),
                      Fault("500", times=None, only_if="boom"),
                      Fault("drop", times=None, only_if="drop"),
                      Fault("truncated", times=None, only_if="cut"),
                      Fault("slow", times=None, only_if="slow", delay_s=2.0)]
        bodies = [json_body({"messages": [{"role": "user", "content": word}]})
                  for word in ("rate", "boom", "drop", "cut", "slow", "fine")]
        rate, boom, drop, cut, slow, fine = post_all(CARRIERS[carrier](srv.base_url, 0.5), bodies)
    assert isinstance(rate, HTTPStatusError) and rate.response.headers["retry-after"] == "7"
    assert attempt_cause(rate) == "HTTP 429"
    # the endpoint's own message, worded as the OpenAI SDK worded it (manifests compare across versions)
    assert describe_error(boom) == "HTTP 500: Error code: 500 - internal error"
    assert isinstance(drop, TransportError) and attempt_cause(drop) == "connection"
    assert isinstance(cut, TransportError) and attempt_cause(cut) == "truncated body"
    assert isinstance(slow, RequestTimeout) and attempt_cause(slow) == "timeout"
    assert fine.status == 200  # a dropped or timed-out connection is not reused



def scripted_server(answers: list[bytes]):
    """A loopback HTTP server that reads one request head and body per answer and writes the next
    scripted answer as is; an answer ending in ``b"<close>"`` is sent without it, then the
    connection is closed. Returns (base URL, connections accepted, the server task's stopper)."""
    accepted = []

    async def handle(reader, writer):
        accepted.append(1)
        while answers:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            await reader.readexactly(length)
            answer = answers.pop(0)
            closing = answer.endswith(b"<close>")
            writer.write(answer.removesuffix(b"<close>"))
            await writer.drain()
            if closing:
                break
        writer.close()
    return handle, accepted


def test_the_plain_carrier_reads_chunks_informational_answers_and_close_delimited_bodies():
    answers = [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
               b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
               b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end<close>",
               b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"]
    handle, accepted = scripted_server(answers)

    async def go():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport = PlainHttpTransport(f"http://127.0.0.1:{port}/v1", 5.0)
        out = []
        for _ in range(4):
            try:
                out.append(await transport.post(BODY, {"Authorization": "Bearer sk-t"}))
            except HTTPStatusError as exc:
                out.append(exc.status_code)
        with pytest.raises(ValueError, match="line break"):
            await transport.post(BODY, {"Authorization": "Bearer sk-t\r\nX-Injected: 1"})
        await transport.aclose()
        server.close()
        return out
    chunked, short, until_close, busy = asyncio.run(go())
    assert (chunked.status, chunked.content) == (200, b"hello world")
    assert short.content == b"ok"
    assert until_close.content == b"until the end"
    assert busy == 503
    assert len(accepted) == 2  # kept alive through the first two answers, a new connection after the close

def test_the_plain_carrier_names_cut_answers_and_drops_a_connection_that_says_too_much():
    answers = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n5\r\nhel<close>",   # cut mid-chunk
               b"HTTP/1.1 100 Continue\r\n\r\n<close>",                                      # no final answer
               b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"                             # then a stray
               b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",                              # second answer
               b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"]
    handle, accepted = scripted_server(answers)

    async def go():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        transport = PlainHttpTransport(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", 5.0)
        out = []
        for _ in range(4):
            try:
                out.append(await transport.post(BODY, {}))
            except TransportError as exc:
                out.append(exc)
        await transport.aclose()
        server.close()
        return out
    cut, informational_only, answered, after = asyncio.run(go())
    assert isinstance(cut, TransportError) and attempt_cause(cut) == "truncated body"
    assert isinstance(informational_only, TransportError) and attempt_cause(informational_only) == "connection"
    assert answered.content == b"ok" and after.content == b"next"
    assert len(accepted) == 4  # the connection that sent a stray second answer was not reused

def test_the_carrier_follows_the_scheme_and_the_proxy_settings(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert isinstance(open_transport("http://127.0.0.1:9/v1", 1), PlainHttpTransport)
    assert isinstance(open_transport("https://api.example.org/v1", 1), HttpxTransport)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example.org:3128")
    assert isinstance(open_transport("http://10.1.2.3:8080/v1", 1), HttpxTransport)
    monkeypatch.setenv("NO_PROXY", "10.1.2.3")
    assert isinstance(open_transport("http://10.1.2.3:8080/v1", 1), PlainHttpTransport)


def test_a_body_that_is_not_a_chat_completion_is_unparseable():
    good = completion_fields(b'{"id": "c1", "model": "m", "choices": [{"message": {"content": "{}"}, '
                             b'"finish_reason": "length"}], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}')
    assert good == {"id": "c1", "model": "m", "content": "{}", "finish_reason": "length", "prompt_tokens": 3,
                    "completion_tokens": 2}
    for body, why in ((b"<html>upstream proxy error</html>", "unparseable response body"),
                      (b'{"choices": []}', "no choices"), (b'["a"]', "no choices"),
                      (b'{"choices": [{"message": {"content": null}}]}', "no message content")):
        with pytest.raises(UnparseableResponse, match=why):
            completion_fields(body)


def committed(path) -> int:
    """Rows another process would see in the cache file now."""
    with sqlite3.connect(path) as other:
        return other.execute("SELECT COUNT(*) FROM responses").fetchone()[0]


def test_the_cache_commits_at_once_when_idle_and_batches_commits_under_load(tmp_path):
    cache = ResponseCache(tmp_path / "cache")
    cache.put("outside", {"id": "x"})
    assert committed(cache.path) == 1  # no event loop: committed before put returns

    async def bursts():
        await asyncio.sleep(2 * COMMIT_INTERVAL_S)  # the last commit is old: the next is not delayed
        for i in range(50):
            cache.put(f"k{i}", {"id": f"r{i}"})
        seen = [committed(cache.path)]
        own_view = cache.get("k49")  # queued answers are answers already
        await asyncio.sleep(0)
        seen.append(committed(cache.path))  # the loop iteration's answers, in one commit
        cache.put("soon", {"id": "s"})  # right after a commit: waits for the interval, with what else comes
        await asyncio.sleep(0)
        seen.append(committed(cache.path))
        await asyncio.sleep(2 * COMMIT_INTERVAL_S)
        seen.append(committed(cache.path))
        return seen, own_view
    seen, own_view = asyncio.run(bursts())
    assert seen == [1, 51, 51, 52]
    assert own_view == {"id": "r49"}
    cache.close()


def test_kill_9_at_16_in_flight_loses_at_most_the_uncommitted_answers(tmp_path):
    """The bound the cache's docstring states: kill -9 loses the answers received in the last
    COMMIT_INTERVAL_S (10 ms: at 16 in flight and 50 ms a request, about 3 of them, at most one per
    request in flight, 16) besides those still on the wire (at most 16 more, lost by any client);
    the resumed run asks exactly those again and nothing else."""
    args = [sys.executable, "-m", "cli.main", "generate", "--vocab", str(PROJECT_ROOT / "data" / "vocab" / "autsl.csv"),
            "--no-index", "--no-prefect", "--limit", "40"]
    with FakeOpenAI(latency_s=0.05) as srv:
        env = {**client_env(srv, tmp_path), "GSP_LLM_MODEL": "fake-model", "GSP_LLM_CONCURRENCY": "16"}
        proc = subprocess.Popen(args + ["--out", str(tmp_path / "killed")], env=env, cwd=PROJECT_ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while len(srv.completed()) < 60 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        answered = set(srv.completed())
        assert 60 <= len(answered) < 160, "not killed mid-run"

        cache = ResponseCache(tmp_path / "cache")
        cached_ids = cache.response_ids()
        cache.close()
        lost = {h for h in answered if f"chatcmpl-{h[:24]}" not in cached_ids}
        assert len(lost) <= 2 * 16
        assert len(cached_ids) == len(answered) - len(lost)

        srv.reset()
        resumed = subprocess.run(args + ["--out", str(tmp_path / "resumed")], env=env, cwd=PROJECT_ROOT,
                                 capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        asked_again = {r.body_hash for r in srv.records}
        assert not {f"chatcmpl-{h[:24]}" for h in asked_again} & cached_ids  # nothing committed is paid twice
        assert lost <= asked_again and len(asked_again) == 160 - len(cached_ids)


def test_a_request_that_succeeds_at_once_leaves_no_reference_cycles(tmp_path):
    """Garbage in cycles is what makes CPython's collector run full passes during a run (tenacity's
    per-attempt state left about 40 objects a request); an answered request must leave none."""
    import gc

    from gsp.llm.client import Endpoint, LLMClient
    from gsp.llm.structured import inline_schema
    from gsp.prompts import DescriptionOut
    from gsp.settings import LLMSettings

    with FakeOpenAI() as srv:
        client = LLMClient(Endpoint(srv.base_url, "fake", None, "json_schema"),
                           LLMSettings(base_url=srv.base_url, model="fake", structured_output="json_schema"),
                           ResponseCache(tmp_path / "cache"))

        schema = inline_schema(DescriptionOut)  # once, as a run does (pydantic's generator leaves cycles)

        async def ask(n, tag):
            for i in range(n):
                messages = [{"role": "user", "content": f"Sign: {tag}{i}"}]
                result = await client.structured(messages, DescriptionOut, schema, name="t", stage="Tb")
                assert result.ok
            await client.aclose()

        asyncio.run(ask(5, "warm"))  # warm: first-use caches, the connection pool
        gc.collect()
        gc.disable()
        try:
            asyncio.run(ask(200, "s"))
            found = gc.collect()
        finally:
            gc.enable()
    assert len(srv.records) == 205
    assert found < 200, f"{found} objects in reference cycles after 200 requests"


def test_a_generation_session_freezes_what_existed_before_it_and_unfreezes_after(tmp_path):
    import gc

    from gsp.generate import generation_session, long_lived_objects_frozen
    from gsp.settings import Settings

    assert gc.get_freeze_count() == 0
    with FakeOpenAI() as srv:
        settings = Settings(paths={"artifacts_dir": tmp_path}, llm={"base_url": srv.base_url, "model": "fake"})

        async def inside():
            async with generation_session(settings):
                during = gc.get_freeze_count()
                with long_lived_objects_frozen():  # nested: the outer block still owns the freeze
                    pass
                return during, gc.get_freeze_count()
        during, after_nested = asyncio.run(inside())
    assert during > 10_000 and after_nested > during // 2  # (frozen objects that die leave the count)
    assert gc.get_freeze_count() == 0


def test_the_output_schemas_in_every_request_keep_their_bytes():
    """Every request carries its output schema twice (in the prompt and as the response format),
    so both are part of the cache key: if they changed (a pydantic upgrade, building them once per
    process), every cached answer would be asked and paid for again. Pinned at k = 3; a deliberate
    change updates the digest and says in its commit that cached answers will be asked again."""
    import hashlib

    from gsp.llm.cache import canonical_json
    from gsp.llm.structured import inline_schema
    from gsp.prompts import output_model, schema_text

    shown = {k: [schema_text(output_model(k, 3)), inline_schema(output_model(k, 3))]
             for k in ("P1", "P2", "P3", "P4", "P5")}
    assert output_model("P2", 3) is output_model("P2", 3)  # one class per k and process
    assert hashlib.sha256(canonical_json(shown).encode()).hexdigest() == (
        "dfcb5a4a197cfeb2da74489181b1c83ebaa191071602ab1bbc99ab410efd1393")
