"""ScatterMoE for ONNX models.

- ``get_library_path()``: the ONNX Runtime custom-op library shipped in this package, for
  ``SessionOptions.register_custom_ops_library`` (CPU and CUDA execution providers).
- ``get_tensorrt_library_path()``: the TensorRT plugin library, or None when this build has none.
- ``rewrite(in_path, out_path, verify=False, target="onnxruntime")``: replaces the MoE layers of an
  exported model with ScatterMoE nodes; returns the report as a dict.
- the ``scattermoe`` command (``main``): ``scattermoe rewrite`` and ``scattermoe inspect``.

Nothing is imported at run time but the standard library: ONNX Runtime comes from the user's own
onnxruntime or onnxruntime-gpu package.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

from . import _native

__all__ = ["get_library_path", "get_tensorrt_library_path", "rewrite", "NoMoELayerError", "main"]

_HERE = Path(__file__).resolve().parent

PathLike = Union[str, "os.PathLike[str]"]


def get_library_path() -> str:
    """Path of libscattermoe_ort.so, the ONNX Runtime op library in this package."""
    return str(_HERE / "libscattermoe_ort.so")


def get_tensorrt_library_path() -> Optional[str]:
    """Path of libscattermoe_trt.so (TensorRT plugins), or None when the package was built
    without TensorRT's headers."""
    p = _HERE / "libscattermoe_trt.so"
    return str(p) if p.is_file() else None


def _onnxruntime_library() -> Optional[str]:
    """libonnxruntime.so of the onnxruntime package this interpreter would import, found without
    importing it."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.origin:
        return None
    libs = sorted((Path(spec.origin).parent / "capi").glob("libonnxruntime.so*"))
    return str(libs[-1]) if libs else None


_native.configure(_onnxruntime_library(), get_library_path())


class NoMoELayerError(RuntimeError):
    """No MoE layer was replaced, so nothing was written (``allow_none=True`` writes the model
    unchanged). ``report`` holds the rewrite's report."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def rewrite(
    in_path: PathLike,
    out_path: PathLike,
    verify: bool = False,
    target: str = "onnxruntime",
    *,
    prove: bool = True,
    force: bool = False,
    allow_none: bool = False,
    lengths: Sequence[int] = (1, 13, 16),
    inputs: Optional[PathLike] = None,
    keep_router: bool = False,
) -> dict:
    """Rewrites ``in_path`` into ``out_path`` as ``scattermoe rewrite`` does and returns the report
    as a dict: ``layers`` (each replaced layer, with its proof), ``rejected`` (candidates left as
    is, with the reason), node and initializer counts, and ``verify`` (with ``verify=True``: the
    comparison of both models in ONNX Runtime on random inputs at ``lengths`` tokens, or on the
    arrays of the .npz ``inputs``). ``target="tensorrt"`` writes nodes TensorRT's ONNX parser maps
    to the plugin. ``keep_router=True`` keeps each layer's router as ONNX nodes (by default one that
    computes exactly what TopKRouter computes becomes that node). Raises RuntimeError on a bad input or a failed verification (nothing written),
    NoMoELayerError when no layer was replaced and ``allow_none`` is off."""
    out = json.loads(
        _native.rewrite(
            os.fspath(in_path),
            os.fspath(out_path),
            bool(verify),
            target,
            bool(prove),
            bool(force),
            bool(allow_none),
            [int(n) for n in lengths],
            None if inputs is None else os.fspath(inputs),
            bool(keep_router),
        )
    )
    report = out["report"]
    report["verify"] = out["verify"]
    if not out["written"]:
        n = len(report["rejected"])
        why = f"{n} candidate(s) found, each left as is" if n else "no MoE layer found"
        raise NoMoELayerError(f"no MoE layer replaced in {os.fspath(in_path)} ({why}): nothing written", report)
    return report


def main() -> None:
    """The ``scattermoe`` command."""
    sys.exit(_native.cli(["scattermoe", *sys.argv[1:]]))
