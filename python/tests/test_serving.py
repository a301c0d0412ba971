"""A rewritten model served by a real Triton server and queried by real clients, all on loopback.

The server is PyTriton (`nvidia-pytriton` 0.7.0: it ships Triton Inference Server 2.51's
`tritonserver` binary and its Python backend), in .venv-serving (made by scripts/setup-python.sh:
PyTriton needs numpy < 2, which .venv does not have). Its model is an ONNX Runtime session on
models/mixtral.onnx rewritten by the CLI, with libscattermoe_ort.so registered (CPU execution
provider), under Triton's dynamic batcher. Three processes, so that nothing is shared but the wire:

  server   .venv-serving: PyTriton, HTTP and gRPC on 127.0.0.1 (free ports), metrics off
  client   .venv-serving: tritonclient 2.73 over HTTP, then over gRPC, 8 requests in flight
  pytest   .venv: the inputs, and the references each response is compared with: a direct
           session on the rewritten model with the library, and the original model

Every request is bounded (client timeouts, a deadline for readiness, for the requests and for the
shutdown); the server is stopped at the end whatever happened, its process group killed if it
does not stop by itself.

SCATTERMOE_SERVING=0 skips the test.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from scattermoe_testing import ort_utils

ROOT = Path(__file__).resolve().parents[2]
SERVING_PYTHON = ROOT / ".venv-serving" / "bin" / "python"
CLI = ROOT / "target" / "release" / "scattermoe"
MODEL = ROOT / "models" / "mixtral.onnx"

REQUESTS = 64  # per protocol
CONCURRENCY = 8
MAX_BATCH = 8
# token counts per request: 1 (a decode step) up to a prefill of 257. The first half of each
# protocol's requests comes in blocks of CONCURRENCY that share a count, so that Triton's dynamic
# batcher (which batches only requests of one shape) gets same-shaped requests at once.
BLOCK_LENGTHS = [1, 16, 7, 64]
MIXED_LENGTHS = [1, 2, 3, 5, 8, 13, 16, 31, 64, 100, 257]
READY_S, REQUESTS_S, STOP_S = 180, 120, 90
READY_MARK = "SCATTERMOE-SERVER-READY"  # SERVER's line once Triton serves (a string Triton never logs)

pytestmark = pytest.mark.skipif(os.environ.get("SCATTERMOE_SERVING") == "0", reason="SCATTERMOE_SERVING=0")

SERVER = r'''
"""PyTriton serving one ONNX Runtime session (the rewritten model, the op library registered)."""
import hashlib, json, sys, threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

model, lib, workspace = sys.argv[1:4]
http_port, grpc_port, metrics_port, max_batch = map(int, sys.argv[4:8])
so = ort.SessionOptions()
so.register_custom_ops_library(lib)
sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
(inp,), (out,) = sess.get_inputs(), sess.get_outputs()
d = inp.shape[-1]
executions = []  # per execution, its requests in order, each by a digest of its input
lock = threading.Lock()


def infer(requests):
    """One execution of the dynamic batcher: every request's tokens in one token axis, one run.

    The model is [1, tokens, d] -> [1, tokens, d] and each token is routed on its own, so the
    requests' tokens side by side are one input; Triton's batch axis is the model's leading 1.
    """
    xs = [r[inp.name] for r in requests]
    flat = np.concatenate([x.reshape(-1, d) for x in xs])[None]
    y = sess.run([out.name], {inp.name: flat})[0][0]
    answers, at = [], 0
    for x in xs:
        n = x.shape[0] * x.shape[1]
        answers.append({out.name: y[at:at + n].reshape(x.shape)})
        at += n
    with lock:
        executions.append([hashlib.sha256(x.tobytes()).hexdigest() for x in xs])
    return answers


config = TritonConfig(
    http_address="127.0.0.1", http_port=http_port, grpc_address="127.0.0.1", grpc_port=grpc_port,
    metrics_address="127.0.0.1", metrics_port=metrics_port, allow_metrics=False,
)
with Triton(config=config, workspace=workspace) as triton:
    triton.bind(
        model_name="moe",
        infer_func=infer,
        inputs=[Tensor(name=inp.name, dtype=np.float32, shape=(-1, d))],
        outputs=[Tensor(name=out.name, dtype=np.float32, shape=(-1, d))],
        config=ModelConfig(max_batch_size=max_batch, batcher=DynamicBatcher(max_queue_delay_microseconds=20000)),
    )
    triton.run()
    print("SCATTERMOE-SERVER-READY", flush=True)
    sys.stdin.read()  # until the test closes it
print("EXECUTIONS " + json.dumps(executions), flush=True)
'''

CLIENT = r'''
"""tritonclient over HTTP, then gRPC: CONCURRENCY requests in flight, one client per thread."""
import json, sys, threading, time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tritonclient.grpc as grpc
import tritonclient.http as http

inputs_path, out_path, http_port, grpc_port, concurrency, deadline = sys.argv[1:7]
concurrency, deadline = int(concurrency), float(deadline)
data = dict(np.load(inputs_path))
local = threading.local()


def client(protocol):
    key = "c_" + protocol
    if not hasattr(local, key):
        if protocol == "http":
            c = http.InferenceServerClient(f"127.0.0.1:{http_port}", connection_timeout=30, network_timeout=30)
        else:
            c = grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        setattr(local, key, c)
    return getattr(local, key)


def one(name):
    protocol = name.split("_")[0]
    x = data[name]
    mod = http if protocol == "http" else grpc
    i = mod.InferInput("hidden_states", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    kw = {"client_timeout": 30} if protocol == "grpc" else {}
    return name, client(protocol).infer("moe", [i], **kw).as_numpy("output")


out, seconds = {}, {}
for protocol in ("http", "grpc"):
    names = sorted((n for n in data if n.startswith(protocol + "_")), key=lambda n: int(n.split("_")[1]))
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for name, y in pool.map(one, names, timeout=deadline):
            out[name] = y
    seconds[protocol] = time.perf_counter() - start
np.savez(out_path, **out)
print("SECONDS " + json.dumps(seconds), flush=True)
'''


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def request_inputs(rng, d: int) -> dict[str, np.ndarray]:
    """REQUESTS inputs [1, tokens, d] per protocol, named PROTOCOL_INDEX; the fixture's own inputs
    (whose outputs torch computed) are the first three gRPC requests."""
    half = REQUESTS // 2
    lengths = [BLOCK_LENGTHS[(i // CONCURRENCY) % len(BLOCK_LENGTHS)] for i in range(half)]
    lengths += [MIXED_LENGTHS[i % len(MIXED_LENGTHS)] for i in range(REQUESTS - half)]
    inputs = {
        f"{protocol}_{i}": rng.standard_normal((1, t, d)).astype(np.float32)
        for protocol in ("http", "grpc")
        for i, t in enumerate(lengths)
    }
    fixture = np.load(MODEL.with_suffix(".npz"))
    for i, t in enumerate((1, 7, 16)):
        inputs[f"grpc_{half + i}"] = fixture[f"x_{t}"]
    return inputs


def original_rows(session, x: np.ndarray, pad: np.ndarray) -> np.ndarray:
    """The original model's output for x's tokens.

    The original is a traced export: it fails when an expert gets no token (its Split is given a
    zero size), which short requests hit (1 to 5 tokens here). Each token is routed on its own
    (no capacity), so x's tokens followed by `pad` (tokens that reach every expert) give x's rows.
    """
    y = session.run(None, {"hidden_states": np.concatenate([x, pad], axis=1)})[0]
    return y[:, : x.shape[1]]


def server_env() -> dict[str, str]:
    """The environment for PyTriton.

    Triton's Python backend runs the model in `triton_python_backend_stub`, linked against
    libpython3.X.so.1.0 and loaded by the usual search path; with an interpreter that is not the
    system's (pyenv here) the stub gets the system's libpython and the interpreter's standard
    library, and fails in multiprocessing ("'_thread.RLock' object has no attribute
    '_recursion_count'"). The interpreter's own LIBDIR first makes them one Python.
    """
    ask = "import sysconfig, json; print(json.dumps([sysconfig.get_config_var(k) for k in ('LIBDIR', 'LDLIBRARY')]))"
    info = subprocess.run([str(SERVING_PYTHON), "-c", ask], capture_output=True, text=True, check=True)
    libdir, ldlibrary = json.loads(info.stdout)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    if ldlibrary and (Path(libdir) / ldlibrary).exists():
        env["LD_LIBRARY_PATH"] = libdir + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    return env


class Server:
    """The server process in its own session (process group), its output read by a thread."""

    def __init__(self, argv: list[str], cwd: Path):
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=server_env(), cwd=cwd, start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.log: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def output(self) -> str:
        return "".join(self.log)

    def wait_ready(self, timeout: float):
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                self.proc.wait(timeout=STOP_S)
                pytest.fail(f"the server exited ({self.proc.returncode}) before it was ready:\n{self.output()[-6000:]}")
            self.log.append(line)
            # Triton's own log shares the pipe and may be cut by the marker (seen: "successf" READY
            # "ully loaded"); one short write is atomic, so the marker itself arrives whole.
            if READY_MARK in line:
                return
        pytest.fail(f"the server was not ready within {timeout} s:\n{self.output()[-6000:]}")

    def stop(self):
        """Close stdin (the server stops Triton and prints its figures); kill its group past STOP_S."""
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.reader.join(timeout=10)
            self._drain()
            pytest.fail(f"the server did not stop within {STOP_S} s; killed. Its output:\n{self.output()[-6000:]}")
        self.reader.join(timeout=10)
        self._drain()

    def _drain(self):
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return
            if line is not None:
                self.log.append(line)


def test_triton_serves_the_rewritten_model_to_concurrent_clients(lib, rng, tmp_path):
    import onnx
    import onnxruntime as ort

    if not SERVING_PYTHON.exists():
        pytest.fail(f"{SERVING_PYTHON.relative_to(ROOT)} is missing: run scripts/setup-python.sh")
    if not CLI.exists():
        pytest.fail(f"{CLI.relative_to(ROOT)} is missing: cargo build --release")

    # the model: the fixture rewritten by the CLI, one ScatterMoE node in place of the experts and
    # one TopKRouter in place of its Softmax/TopK router
    rewritten = tmp_path / "mixtral.scattermoe.onnx"
    r = subprocess.run([str(CLI), "rewrite", str(MODEL), str(rewritten), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["layers"]) == 1, r.stdout
    graph = onnx.load(str(rewritten)).graph
    assert [n.op_type for n in graph.node if n.domain == "ai.scattermoe"] == ["TopKRouter", "ScatterMoE"]
    d = graph.input[0].type.tensor_type.shape.dim[2].dim_value

    inputs = request_inputs(rng, d)
    np.savez(tmp_path / "inputs.npz", **inputs)
    (tmp_path / "server.py").write_text(SERVER)
    (tmp_path / "client.py").write_text(CLIENT)
    http_port, grpc_port, metrics_port = free_ports(3)

    server = Server(
        [str(SERVING_PYTHON), str(tmp_path / "server.py"), str(rewritten), str(lib), str(tmp_path / "pytriton"),
         str(http_port), str(grpc_port), str(metrics_port), str(MAX_BATCH)],
        cwd=tmp_path,
    )
    try:
        server.wait_ready(READY_S)
        client = subprocess.run(
            [str(SERVING_PYTHON), str(tmp_path / "client.py"), str(tmp_path / "inputs.npz"), str(tmp_path / "outputs.npz"),
             str(http_port), str(grpc_port), str(CONCURRENCY), str(REQUESTS_S)],
            capture_output=True, text=True, timeout=REQUESTS_S + 30, env=server_env(),
        )
        assert client.returncode == 0, client.stdout + client.stderr
    finally:
        server.stop()
    out = server.output()
    assert server.proc.returncode == 0, out[-6000:]

    # Triton listened on loopback only, on the ports given
    listening = re.findall(r"Started (?:GRPCInferenceService|HTTPService) at ([\d.]+):(\d+)", out)
    assert sorted(listening) == sorted([("127.0.0.1", str(grpc_port)), ("127.0.0.1", str(http_port))]), listening
    executions = json.loads(re.search(r"EXECUTIONS (\[.*\])", out).group(1))
    seconds = json.loads(re.search(r"^SECONDS (.*)$", client.stdout, re.M).group(1))
    got = dict(np.load(tmp_path / "outputs.npz"))
    assert sorted(got) == sorted(inputs)

    # which requests each execution of the server ran, and in which order
    by_digest = {hashlib.sha256(x.tobytes()).hexdigest(): name for name, x in inputs.items()}
    assert len(by_digest) == len(inputs)
    batches = [[by_digest[h] for h in execution] for execution in executions]
    assert sorted(n for b in batches for n in b) == sorted(inputs), "each request must run exactly once"

    direct = ort.InferenceSession(str(rewritten), ort_utils.session_options(lib), providers=["CPUExecutionProvider"])
    original = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    pad = rng.standard_normal((1, 64, d)).astype(np.float32)
    fixture = np.load(MODEL.with_suffix(".npz"))
    mismatches = []
    # 1. bitwise: each response is what a direct session gives on its execution's input (the
    #    requests' tokens side by side, as the server ran them), with the same library
    for batch in batches:
        flat = np.concatenate([inputs[n] for n in batch], axis=1)
        want = direct.run(None, {"hidden_states": flat})[0]
        at = 0
        for n in batch:
            t = inputs[n].shape[1]
            if got[n].dtype != np.float32 or not np.array_equal(got[n], want[:, at : at + t]):
                mismatches.append((n, "not the direct session's output", got[n].shape, got[n].dtype))
            at += t
    # 2. within f32 tolerance: each response against the direct session on the request alone
    #    (a batched execution sums in another order), the original model, and for the fixture's
    #    inputs torch's outputs
    worst = {"direct": 0.0, "original": 0.0, "torch": 0.0}
    checked_torch = 0
    for name, x in inputs.items():
        y = got[name]
        refs = {"direct": (direct.run(None, {"hidden_states": x})[0], 1e-5), "original": (original_rows(original, x, pad), 1e-4)}
        t = x.shape[1]
        if f"x_{t}" in fixture and np.array_equal(x, fixture[f"x_{t}"]):
            refs["torch"] = (fixture[f"y_{t}"], 1e-4)
            checked_torch += 1
        for what, (ref, tol) in refs.items():
            err = float(np.abs(y - ref).max() / np.abs(ref).max()) if y.shape == ref.shape else float("inf")
            worst[what] = max(worst[what], err)
            if err > tol:
                mismatches.append((name, what, t, err))

    sizes = collections.Counter(len(b) for b in batches)
    batched = sum(v for k, v in sizes.items() if k > 1)
    print(
        f"serving: {len(got)} requests ({REQUESTS} HTTP in {seconds['http']:.2f} s, {REQUESTS} gRPC in {seconds['grpc']:.2f} s), "
        f"{CONCURRENCY} concurrent, token counts {sorted({x.shape[1] for x in inputs.values()})}; "
        f"{len(batches)} executions ({batched} batched; requests per execution: executions {dict(sorted(sizes.items()))}); "
        f"mismatches {len(mismatches)}; max rel err vs direct session alone {worst['direct']:.2e}, "
        f"vs original model {worst['original']:.2e}, vs torch {worst['torch']:.2e} ({checked_torch} fixture inputs)"
    )
    assert not mismatches, mismatches
    assert checked_torch == 3, checked_torch
    # dynamic batching: the same-shaped requests in flight together went in fewer executions
    assert batched > 0, sizes
