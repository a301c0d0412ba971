"""ONNX Runtime helpers: where the library is, sessions with and without it, running models."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LIB = REPO_ROOT / "target" / "release" / "libscattermoe_ort.so"


def library_path() -> Path:
    """$SCATTERMOE_ORT_LIB, else <repo>/target/release/libscattermoe_ort.so."""
    return Path(os.environ.get("SCATTERMOE_ORT_LIB") or DEFAULT_LIB)


def session_options(lib: Path | str | None = None, threads: int | None = None, optimize: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    # DequantizeLinear-fed MatMuls as written: ONNX Runtime would otherwise fuse them into
    # MatMulNBits, which quantizes the activations to int8 (as the rewriter's proof does)
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if lib is not None:
        so.register_custom_ops_library(str(lib))
    return so


def session(model, lib: Path | str | None = None, threads: int | None = None, optimize: bool = True):
    """An InferenceSession on the CPU EP for a ModelProto (or bytes / path); registers `lib` if given."""
    import onnxruntime as ort

    data = model.SerializeToString() if hasattr(model, "SerializeToString") else model
    return ort.InferenceSession(data, sess_options=session_options(lib, threads, optimize),
                                providers=["CPUExecutionProvider"])


def feeds_for(sess, feeds: dict) -> dict:
    """Only the feeds the session takes, cast to the declared element types."""
    casts = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
             "tensor(double)": np.float64, "tensor(float16)": np.float16}
    out = {}
    for i in sess.get_inputs():
        if i.name in feeds:
            v = np.asarray(feeds[i.name])
            out[i.name] = v.astype(casts.get(i.type, v.dtype), copy=False)
    return out


def run(sess, feeds: dict, outputs=None):
    return sess.run(outputs, feeds_for(sess, feeds))


def aborts_onnx_runtime(m) -> str | None:
    """Why ONNX Runtime's loader would abort the process on model `m` (an assertion in its build)
    rather than refuse it, or None: a Split whose num_outputs or split sizes disagree with its
    outputs (found by the mutation harnesses; the rewriter refuses such a region the same way).
    A harness must not hand such a mutant to ONNX Runtime in its own process."""
    for n in m.graph.node:
        if n.op_type != "Split" or n.domain not in ("", "ai.onnx"):
            continue
        for a in n.attribute:
            if a.name == "num_outputs" and a.i != len(n.output):
                return f"Split '{n.name}' has num_outputs = {a.i} but {len(n.output)} outputs"
            if a.name == "split" and len(a.ints) != len(n.output):
                return f"Split '{n.name}' has {len(a.ints)} split sizes but {len(n.output)} outputs"
    return None
