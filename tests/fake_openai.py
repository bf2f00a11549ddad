"""A loopback server that speaks the OpenAI chat-completions protocol, for tests and benchmarks.

Deterministic: the answer is a function of the request body (its SHA-256), so two runs get the same
text and the same response id. It recognises the shape the generator asks for (description,
``variants`` with k items, ``parts`` with body-part tags) from the request's schema or prompt.

Switchable faults (:class:`Fault`): ``429`` (with Retry-After), ``500``, ``drop`` (connection closed
without an answer), ``slow`` (answer after ``delay_s``), ``truncated`` (body shorter than its
Content-Length), ``garbage`` (HTTP body is not JSON), ``invalid_json`` (message content is not
JSON), ``schema_invalid`` (content is JSON of the wrong shape), ``bad_text`` (the right shape, but
every text in it is ``text``: a file path, a gloss echoed back …). A fault applies to requests
whose text contains ``only_if`` (default: all), for the first ``times`` attempts of each distinct
body (``None``: always).

A seeded fault *mix* (:class:`FaultMix`): each attempt draws one kind at random with the given
shares (or none), as an endpoint that misbehaves now and then does; the draw is a function of the
seed, the body and its attempt number, so a run meets the same faults whatever the request order.

``require_key``: every request without ``Authorization: Bearer <require_key>`` gets HTTP 401, as
a provider answers a wrong key. ``models_endpoint=False``: ``GET /models`` answers 404, as some
OpenAI-compatible servers do.

Run standalone: ``python tests/fake_openai.py --port 8011 --latency 0.2``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BODY_PARTS = ("body", "left_hand", "right_hand", "mouth", "face")
FAULT_KINDS = ("429", "500", "drop", "slow", "truncated", "garbage", "invalid_json", "schema_invalid", "bad_text")


@dataclass
class Fault:
    kind: str
    times: int | None = 1
    only_if: str | None = None
    retry_after: float = 1.0
    delay_s: float = 5.0
    total: int | None = None   # stop after this many applications over all bodies
    text: str = "./home.json"  # what every text of a bad_text answer says
    applied: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {self.kind!r}; expected one of {FAULT_KINDS}")


@dataclass
class FaultMix:
    """Faults drawn per attempt: ``shares`` maps a kind to the share of attempts that meet it
    (``{"429": 0.1, "500": 0.1, "drop": 0.05, "truncated": 0.05, "slow": 0.03}``). Applies to
    attempts no explicit :class:`Fault` took."""

    shares: dict[str, float]
    seed: int = 0
    retry_after: float = 1.0
    delay_s: float = 5.0

    def __post_init__(self) -> None:
        unknown = [k for k in self.shares if k not in FAULT_KINDS]
        if unknown:
            raise ValueError(f"unknown fault {unknown[0]!r}; expected one of {FAULT_KINDS}")
        if any(v < 0 for v in self.shares.values()) or sum(self.shares.values()) > 1:
            raise ValueError("fault shares must be non-negative and sum to at most 1")

    def draw(self, digest: str, attempt: int) -> Fault | None:
        h = hashlib.sha256(f"{self.seed}:{digest}:{attempt}".encode()).digest()
        u = int.from_bytes(h[:8], "big") / 2**64
        for kind, share in self.shares.items():
            if u < share:
                return Fault(kind, times=None, retry_after=self.retry_after, delay_s=self.delay_s)
            u -= share
        return None


@dataclass
class Record:
    t: float
    body_hash: str
    status: int          # HTTP status sent (0: connection dropped / truncated)
    response_id: str | None
    fault: str | None
    authorization: str | None


def body_hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _all_text(body: dict) -> str:
    return "\n".join(str(m.get("content", "")) for m in body.get("messages", []))


def _schema(body: dict) -> dict | None:
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_schema":
        return fmt.get("json_schema", {}).get("schema")
    return fmt.get("schema")


def answer_for(body: dict, digest: str) -> dict:
    """The deterministic JSON answer for a request."""
    text = _all_text(body)
    schema = _schema(body)
    shape_text = json.dumps(schema) if schema else text
    sign = re.search(r"^Sign:\s*(.+)$", text, re.M)
    sign = sign.group(1).strip() if sign else "the sign"
    tag = digest[:8]
    if '"parts"' in shape_text:
        n = 1 + int(digest[8:10], 16) % 3
        parts = []
        for i in range(n):
            a = BODY_PARTS[int(digest[10 + i], 16) % 5]
            b = BODY_PARTS[int(digest[14 + i], 16) % 5]
            parts.append({"text": f"part {i + 1} of {sign}: the {a.replace('_', ' ')} moves [{tag}]",
                          "body_parts": sorted({a, b}, key=BODY_PARTS.index)})
        return {"parts": parts}
    if '"variants"' in shape_text:
        k = re.search(r'"minItems":\s*(\d+)', shape_text)
        k = int(k.group(1)) if k else 3
        return {"variants": [f"variant {i + 1} of {sign}: the palm pushes forward [{tag}]" for i in range(k)]}
    return {"description": f"{sign}: the right hand, flat, moves forward from the chest [{tag}]"}


def bad_answer_for(body: dict, text: str) -> dict:
    """An answer of the requested shape whose every text is ``text``."""
    good = answer_for(body, "0" * 64)
    if "parts" in good:
        return {"parts": [{"text": text, "body_parts": ["right_hand"]}]}
    if "variants" in good:
        return {"variants": [text] * len(good["variants"])}
    return {"description": text}


class _QuietServer(ThreadingHTTPServer):
    # the listen backlog: a class attribute, because the socket listens inside __init__ (an
    # instance attribute set afterwards left it at 5, and a burst of new connections was reset)
    request_queue_size = 256
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # clients that hang up are expected
        pass


class FakeOpenAI:
    """Start with ``with FakeOpenAI() as srv:``; ``srv.base_url`` ends in ``/v1``."""

    def __init__(self, latency_s: float = 0.0, port: int = 0, model: str = "fake-model",
                 require_key: str | None = None, models_endpoint: bool = True):
        self.latency_s = latency_s
        self.model = model
        self.require_key = require_key
        self.models_endpoint = models_endpoint
        self.gets: list[str] = []   # paths of the GET requests (the endpoint check)
        self.connections = 0        # TCP connections accepted (a client that keeps them alive opens few)
        self.faults: list[Fault] = []
        self.fault_mix: FaultMix | None = None
        self.records: list[Record] = []
        self.bodies: dict[str, dict] = {}
        self._attempts: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._httpd = _QuietServer(("127.0.0.1", port), self._handler())
        self._thread: threading.Thread | None = None

    # -- public --------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeOpenAI:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def reset(self) -> None:
        with self._lock:
            self.records.clear()
            self._attempts.clear()

    @property
    def request_count(self) -> int:
        return len(self.records)

    def completed(self) -> dict[str, list[str]]:
        """body hash → response ids of the successful (200, well-formed) answers sent."""
        out: dict[str, list[str]] = defaultdict(list)
        for r in self.records:
            if r.status == 200 and r.fault is None:
                out[r.body_hash].append(r.response_id)
        return dict(out)

    # -- internals -----------------------------------------------------------------------
    def requests(self) -> list[tuple[str, str]]:
        """(the user message's first line without "Sign: ", the response schema's name) of every
        request that reached the server, sorted: what a test counts to know what was asked."""
        out = []
        for record in self.records:
            body = self.bodies[record.body_hash]
            user = body["messages"][-1]["content"]
            schema = (body.get("response_format") or {}).get("json_schema") or {}
            out.append((user.splitlines()[0].removeprefix("Sign: "), schema.get("name", "")))
        return sorted(out)

    def _pick_fault(self, digest: str, text: str) -> Fault | None:
        with self._lock:
            attempt = self._attempts[digest]
            self._attempts[digest] += 1
        for fault in self.faults:
            if fault.only_if is not None and fault.only_if not in text:
                continue
            if fault.total is not None and fault.applied >= fault.total:
                continue
            if fault.times is None or attempt < fault.times:
                with self._lock:
                    fault.applied += 1
                return fault
        return self.fault_mix.draw(digest, attempt) if self.fault_mix is not None else None

    def _record(self, *args) -> None:
        with self._lock:
            self.records.append(Record(time.time(), *args))

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with server._lock:
                    server.connections += 1
                # headers and body go out in two writes; without this, Nagle + delayed ACK add ~40 ms
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _send(self, status: int, payload: bytes, headers: dict | None = None,
                      declared_length: int | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(declared_length or len(payload)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)
                self.wfile.flush()

            def _refuse_key(self) -> bool:
                if server.require_key is None or self.headers.get("Authorization") == f"Bearer {server.require_key}":
                    return False
                self._send(401, b'{"error": {"message": "Incorrect API key provided", '
                                b'"type": "invalid_request_error"}}')
                return True

            def do_GET(self) -> None:
                with server._lock:
                    server.gets.append(self.path)
                if self._refuse_key():
                    return
                if self.path.rstrip("/").endswith("/models") and server.models_endpoint:
                    self._send(200, json.dumps({"object": "list", "data": [
                        {"id": server.model, "object": "model", "owned_by": "fake"}]}).encode())
                else:
                    self._send(404, b'{"error": {"message": "not found"}}')

            def parse_request(self) -> bool:
                # the request line is in: the stated latency counts from here, so that what this
                # server spends parsing (serialised by the GIL under a burst of requests) is not
                # added to it
                self.arrived = time.monotonic()
                return super().parse_request()

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                auth = self.headers.get("Authorization")
                if self._refuse_key():
                    return
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError:
                    self._send(400, b'{"error": {"message": "request body is not JSON"}}')
                    return
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, b'{"error": {"message": "not found"}}')
                    return
                digest = body_hash(body)
                with server._lock:
                    server.bodies[digest] = body
                text = _all_text(body)
                fault = server._pick_fault(digest, text)
                kind = fault.kind if fault else None
                if server.latency_s:  # the answer is due ``latency_s`` after the request came in
                    time.sleep(max(0.0, self.arrived + server.latency_s - time.monotonic()))
                if kind == "429":
                    server._record(digest, 429, None, kind, auth)
                    self._send(429, b'{"error": {"message": "rate limited", "type": "rate_limit"}}',
                               {"Retry-After": f"{fault.retry_after:g}"})
                    return
                if kind == "500":
                    server._record(digest, 500, None, kind, auth)
                    self._send(500, b'{"error": {"message": "internal error"}}')
                    return
                if kind == "drop":
                    server._record(digest, 0, None, kind, auth)
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                if kind == "slow":
                    # recorded on arrival: a client that times out never sees the late answer
                    server._record(digest, 0, None, kind, auth)
                    time.sleep(fault.delay_s)
                response_id = "chatcmpl-" + digest[:24]
                if kind == "invalid_json":
                    content = "Sure! Here is the description: the hand moves {"
                elif kind == "schema_invalid":
                    content = json.dumps({"unexpected": "shape", "items": [1, 2]})
                elif kind == "bad_text":
                    content = json.dumps(bad_answer_for(body, fault.text), ensure_ascii=False)
                else:
                    content = json.dumps(answer_for(body, digest), ensure_ascii=False)
                prompt_tokens = max(1, len(text) // 4)
                completion_tokens = max(1, len(content) // 4)
                payload = json.dumps({
                    "id": response_id, "object": "chat.completion", "created": 1700000000,
                    "model": body.get("model", server.model),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens},
                }, ensure_ascii=False).encode()
                if kind == "garbage":
                    server._record(digest, 200, response_id, kind, auth)
                    self._send(200, b"<html>upstream proxy error</html>")
                    return
                if kind == "truncated":
                    server._record(digest, 0, response_id, kind, auth)
                    self.close_connection = True
                    self._send(200, payload[: len(payload) // 2], declared_length=len(payload))
                    return
                if kind != "slow":
                    server._record(digest, 200, response_id, kind, auth)
                try:
                    self._send(200, payload)
                except OSError:  # the client gave up (timeout) or was killed
                    self.close_connection = True

        return Handler



def client_env(srv: FakeOpenAI, tmp_path, api_key: str = "sk-test") -> dict[str, str]:
    """The environment of a `gsp` command that talks to ``srv``: this process's, without any
    GSP_/PREFECT_ setting of the caller, with artifacts, cache and Prefect home under ``tmp_path``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GSP_", "PREFECT_"))}
    env.update({"GSP_ARTIFACTS_DIR": str(tmp_path / "artifacts"), "GSP_CACHE_DIR": str(tmp_path / "cache"),
                "GSP_LLM_BASE_URL": srv.base_url, "GSP_LLM_API_KEY": api_key, "GSP_LLM_MODEL": "fake",
                "GSP_LLM_STRUCTURED_OUTPUT": "json_schema", "GSP_LLM_RETRY_INITIAL_S": "0.05",
                "PREFECT_HOME": str(tmp_path / "prefect")})
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args()
    srv = FakeOpenAI(latency_s=args.latency, port=args.port).start()
    print(f"fake OpenAI server on {srv.base_url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()


if __name__ == "__main__":
    main()
