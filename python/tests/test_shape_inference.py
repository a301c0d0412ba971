"""Output shapes are inferred from input shapes (ORT custom-op shape inference): static where the
inputs are static, and symbolic dims carried through."""

import onnxruntime
import pytest

from scattermoe_testing import graphs, ort_utils

D, F, E, K = 24, 40, 8, 2

# docs/op-spec.md: shapes are inferred on ONNX Runtime 1.24 and newer (older runtimes crash in their
# own custom-op shape inference on a middle optional input left out, so the library declares none).
pytestmark = pytest.mark.skipif(
    tuple(int(p) for p in onnxruntime.__version__.split(".")[:2]) < (1, 24),
    reason=f"no custom-op shape inference on onnxruntime {onnxruntime.__version__} (< 1.24)",
)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("x_shape,r_shape", [([7, D], [7, K]), ([3, 5, D], [3, 5, K]), ([3, 5, D], [15, K])])
def test_scatter_moe_static_output_shape(lib, dtype, x_shape, r_shape):
    # f32: the op's output is the graph output; bf16: the graph output is a Cast of it
    model = graphs.scatter_moe_model(d=D, f=F, E=E, k=K, dtype=dtype, x_shape=x_shape, routing_shape=r_shape)
    sess = ort_utils.session(model, lib)
    assert sess.get_outputs()[0].shape == x_shape


def test_scatter_moe_bare_node_output_shape_and_type(lib):
    specs = [("X", "f16", [9, D]), ("routing_weights", "f16", [9, K]), ("routing_indices", "int32", [9, K]),
             ("w_in", "f16", [E, 2 * F, D]), ("w_out", "f16", [E, D, F])]
    sess = ort_utils.session(graphs.op_model("ScatterMoE", specs, [("Y", "f16", None)]), lib)
    out = sess.get_outputs()[0]
    assert out.shape == [9, D] and out.type == "tensor(float16)"


def test_scatter_moe_symbolic_dims_carried(lib):
    model = graphs.scatter_moe_model(d=D, f=F, E=E, k=K, x_shape=["batch", "seq", D], routing_shape=["batch", "seq", K])
    shape = ort_utils.session(model, lib).get_outputs()[0].shape
    assert shape == ["batch", "seq", D], shape


@pytest.mark.parametrize("grouped_out,gates,want", [
    (0, False, [6, K, F]),
    (1, False, [6 * K, F]),
    (0, True, [6, F]),
])
def test_parallel_linear_static_output_shape(lib, grouped_out, gates, want):
    model = graphs.parallel_linear_model(d_in=D, d_out=F, E=E, k=K, grouped_out=grouped_out, gates=gates,
                                         x_shape=[6, D], routing_shape=[6, K])
    assert ort_utils.session(model, lib).get_outputs()[0].shape == want


def test_parallel_linear_grouped_in_output_shape(lib):
    model = graphs.parallel_linear_model(d_in=D, d_out=F, E=E, k=K, grouped_in=1, gates=True,
                                         x_shape=[6 * K, D], routing_shape=[2, 3, K])
    assert ort_utils.session(model, lib).get_outputs()[0].shape == [2, 3, F]


def test_capacity_mask_output_shape(lib):
    model = graphs.capacity_mask_model(E=E, k=K, routing_shape=[4, 5, K])
    out = ort_utils.session(model, lib).get_outputs()[0]
    assert out.shape == [4, 5, K] and out.type == "tensor(bool)"
