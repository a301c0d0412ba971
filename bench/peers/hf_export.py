"""The original exported graph: the real Hugging Face MoE block (transformers' MixtralSparseMoeBlock,
Qwen3MoeSparseMoeBlock; the fine-grained shape uses the Qwen3-MoE block at its sizes) with the
benchmark's weights copied in, exported as models/generate.py exports the fixtures:
torch.onnx.export(dynamo=False, opset 17, constant folding, dynamic token axis), router included,
bfloat16 weights (external data when over 2 GB).

The exporter traces the loop over the experts the traced input hits: the graph Splits the hit list
into exactly that many pieces, so it runs only on inputs that hit as many experts (it fails on the
others, e.g. at 1 token after a 16-token trace). `Exporter` therefore exports again whenever the hit
count changes (input sets of one token count share it by construction, see workload.py), tracing with
the token count being measured, and keeps one export (and its session) at a time.

As exported, Qwen3-MoE's router computes softmax(logits, dtype=float) as a bfloat16 Softmax followed by
a Cast (the TorchScript exporter's rendering), so that graph's routing weights carry bf16 rounding;
the routing itself (top-k) is unaffected by the logits workload.py builds.
"""
import contextlib
import os
import shutil
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "models"))
from generate import FirstOutput  # noqa: E402  (the fixtures' wrapper: exports the hidden states only)

FAMILY = {"mixtral": "mixtral", "qwen3": "qwen3_moe", "fine": "qwen3_moe"}


def build_block(family, d, f, E, k, device="cuda"):
    import transformers as tr

    eager = {"experts_implementation": "eager"}  # the per-expert loop, as the fixtures were exported
    if family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block

        cfg = tr.MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=E, num_experts_per_tok=k, **eager)
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block

        cfg = tr.Qwen3MoeConfig(hidden_size=d, moe_intermediate_size=f, num_experts=E, num_experts_per_tok=k,
                                norm_topk_prob=True, **eager)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            block = Block(cfg)
    finally:
        torch.set_default_dtype(prev)
    return block.to(torch.bfloat16).eval(), tr.__version__


def load_weights(block, w_gu, w_down, wr):
    """Copies the benchmark's weights into the block's fused expert parameters and router."""
    want = {"gate_up_proj": w_gu, "down_proj": w_down, "gate.weight": wr}
    params = dict(block.named_parameters())
    done = set()
    with torch.no_grad():
        for name, p in params.items():
            for suffix, w in want.items():
                if name.endswith(suffix) and tuple(p.shape) == tuple(w.shape):
                    p.copy_(w)
                    done.add(suffix)
    if done != set(want):
        layout = ", ".join(f"{n} {tuple(p.shape)}" for n, p in params.items())
        raise RuntimeError(f"block parameters not in the expected fused layout: {layout}")


@contextlib.contextmanager
def _shape_inference_without_big_values(limit=16 << 20):
    """The TorchScript exporter's graph-level shape inference (run twice per export) rebuilds every node as
    a one-node ONNX model, embedding the full value of each parameter the node reads: each expert's
    Gather(gate_up_proj | down_proj, idx) serialises the whole fused tensor, 2 x hit x (805 + 403) MB for
    qwen3 (874 s on CPU at 84 hit). Those Gathers' indices are dynamic, so the values never fold; hiding
    tensors over `limit` from that pass alone leaves them typed graph inputs with their shapes.
    The exported file is byte-identical (checked: fine/qwen3 at 16 tokens, mixtral graph)."""
    orig = torch._C._jit_pass_onnx_graph_shape_type_inference

    def lean(graph, params_dict, opset):
        small = {name: v for name, v in params_dict.items()
                 if not (isinstance(v, torch.Tensor) and v.numel() * v.element_size() > limit)}
        return orig(graph, small, opset)

    torch._C._jit_pass_onnx_graph_shape_type_inference = lean
    try:
        yield
    finally:
        torch._C._jit_pass_onnx_graph_shape_type_inference = orig


def export(block, x, path, opset=17):
    """x: [T, d] bf16 on the GPU, traced as [1, T, d] (the blocks take [batch, seq, d])."""
    with torch.no_grad(), _shape_inference_without_big_values():
        torch.onnx.export(FirstOutput(block).eval(), (x.unsqueeze(0),), path, dynamo=False, opset_version=opset,
                          input_names=["hidden_states"], output_names=["output"],
                          dynamic_axes={"hidden_states": {1: "S"}, "output": {1: "S"}}, do_constant_folding=True)
    import onnx

    m = onnx.load(path, load_external_data=False)
    nodes = len(m.graph.node)
    if m.ir_version > 10:  # as generate.py does; the weights stay where the exporter put them
        m.ir_version = 10
        onnx.save(m, path)
    return nodes


@dataclass
class Export:
    n_hit: int  # experts the traced input hit: the only inputs the graph runs on hit as many
    traced_tokens: int
    nodes: int
    session: object
    directory: str
    placement: dict = None  # {execution provider: nodes}, filled by the first run


class Exporter:
    """One HF block per layer shape; one export + ORT session per distinct experts-hit count, kept one at a time."""

    def __init__(self, shape, d, f, E, k, w_gu, w_down, wr, workdir):
        self.block, self.transformers_version = build_block(FAMILY[shape], d, f, E, k, w_gu.device)
        load_weights(self.block, w_gu, w_down, wr)
        self.workdir = workdir
        self.current = None
        self.failed = {}  # n_hit -> why its export or session failed

    def session_for(self, n_hit, x, make_session):
        """(session, Export) for inputs hitting n_hit experts; exports (traced with x) when n_hit changed."""
        if n_hit in self.failed:
            raise RuntimeError(self.failed[n_hit])
        if self.current is None or self.current.n_hit != n_hit:
            self.drop()
            directory = os.path.join(self.workdir, f"hit{n_hit}")
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, "block.onnx")
            try:
                nodes = export(self.block, x, path)
                self.current = Export(n_hit, x.shape[0], nodes, make_session(path), directory)
            except Exception as e:  # not tried again for this hit count
                shutil.rmtree(directory, ignore_errors=True)
                self.failed[n_hit] = f"export/session traced at {x.shape[0]} tokens: {type(e).__name__}: {e}"
                raise RuntimeError(self.failed[n_hit]) from e
        return self.current.session, self.current

    def drop(self):
        if self.current is not None:
            shutil.rmtree(self.current.directory, ignore_errors=True)
            self.current = None

    def close(self):
        self.drop()
        del self.block
