"""Test helpers for the ScatterMoE ONNX Runtime custom-op library.

- ``graphs``: ONNX model builders (a model with one ScatterMoE / ParallelLinear node, and the same
  MoE layer written in standard ONNX ops as a per-expert loop, the way exporters write it).
- ``reference``: a float64 numpy reference of both ops, straight from docs/op-spec.md.
- ``data``: random inputs and routings (distinct top-k like a real router, empty experts, ...).
- ``ort_utils``: locating the library, building sessions, running, comparing.

Nothing here needs installing: put ``<repo>/python`` on ``sys.path``.
"""

from . import data, graphs, ort_utils, reference  # noqa: F401
