"""ONNX Runtime sessions, IO binding on device buffers, and where ORT placed each node (torch-free).

bfloat16 binding: numpy has no bfloat16, but IOBinding.bind_input / bind_output (onnxruntime 1.31
python/onnxruntime_inference_collection.py) take `element_type` either as a numpy type or as an ONNX
TensorProto data type integer; we always pass the integer (TensorProto.BFLOAT16 = 16, INT64 = 7, ...)
with the raw device pointer, so no numpy dtype is involved.
"""
import glob
import json
import os


def load_ort():
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* wheels torch brought
        ort.preload_dlls()
    ort.set_default_logger_severity(3)  # errors only
    return ort


def make_session(ort, path, lib=None, device="cuda", profile_dir=None):
    """CUDA EP first, CPU EP as ORT's fallback for nodes CUDA has no kernel for (reported by `placement`)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if lib:
        so.register_custom_ops_library(lib)
    if profile_dir:  # profiles the first run only: `first_run` ends profiling
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(profile_dir, os.path.basename(path))
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": 0}))
    return ort.InferenceSession(path, so, providers=providers)


def bind(sess, inputs, outputs, device="cuda"):
    """inputs / outputs: {name: (pointer, shape, onnx element type int)} -> IOBinding."""
    io = sess.io_binding()
    for name, (ptr, shape, etype) in inputs.items():
        io.bind_input(name, device, 0, etype, list(shape), ptr)
    for name, (ptr, shape, etype) in outputs.items():
        io.bind_output(name, device, 0, etype, list(shape), ptr)
    return io


def first_run(sess, io):
    """Runs once; if the session profiles, ends profiling and returns {provider: node count}."""
    sess.run_with_iobinding(io)
    if not sess.get_session_options().enable_profiling:
        return None
    path = sess.end_profiling()
    try:
        return placement(path)
    finally:
        for p in glob.glob(path):
            os.remove(p)


def placement(profile_path):
    """{execution provider: number of distinct nodes it ran} from an ORT profile (chrome trace JSON)."""
    with open(profile_path) as fh:
        events = json.load(fh)
    nodes = {}
    for ev in events:
        args = ev.get("args") or {}
        if ev.get("cat") == "Node" and "provider" in args:
            name = ev.get("name", "")
            for suffix in ("_kernel_time", "_fence_before", "_fence_after"):
                name = name[: -len(suffix)] if name.endswith(suffix) else name
            nodes[name] = args["provider"]
    counts = {}
    for prov in nodes.values():
        counts[prov] = counts.get(prov, 0) + 1
    return counts
