"""The MoE layers the GPU benchmark measures (numpy- and torch-free: the report and the ONNX builders read it).

A layer is the routed experts of one model's MoE block, bfloat16:
  mixtral      Mixtral-8x7B         d 4096, f 14336, E 8,   k 2   SwiGLU (silu), gate_up, no biases
  qwen3        Qwen3-30B-A3B        d 2048, f 768,   E 128, k 8   SwiGLU (silu), gate_up, no biases
  fine         fine-grained         d 1024, f 512,   E 64,  k 8   SwiGLU (silu), gate_up, no biases
  deepseek_v3  DeepSeek-V3 routed   d 7168, f 2048,  E 256, k 8   SwiGLU (silu), gate_up, no biases
  gpt_oss      GPT-OSS-120B         d 2880, f 2880,  E 128, k 4   GPT-OSS's clamped SwiGLU (swiglu_oai, alpha 1.702,
                                                                  limit 7), gate and up interleaved as the model
                                                                  stores them, biases on both projections

`w_gu` [E, 2f, d] holds gate and up in the layer's `glu` layout (ScatterMoE's glu_layout attribute), the
layout the model stores: DeepSeek-V3 keeps the gate rows first, GPT-OSS interleaves them (its gate_up_proj
is [E, d, 2f] with gate in the even columns; ours is its transpose). Every column computes the layer from
those weights: the columns that need another layout (com.microsoft.MoE reads interleaved rows) get a copy.

Routing is the benchmark's for every layer (softmax over the E logits, top-k, renormalised; workload.py),
so that every column computes the same function. DeepSeek-V3's own router (sigmoid scores, group-limited
top-k, routed_scaling_factor) and GPT-OSS's (top-k of the logits, softmax over the k: the same weights)
only appear in the exported column (hf_export.py), whose error is taken against its own routing weights.
"""
from dataclasses import asdict, dataclass

ACTIVATIONS = ("silu", "swiglu_oai")
GLU_LAYOUTS = ("gate_up", "up_gate", "interleaved")


@dataclass(frozen=True)
class Layer:
    d: int
    f: int
    E: int
    k: int
    family: str  # the Hugging Face block of the exported column (hf_export.FAMILIES)
    activation: str = "silu"  # ScatterMoE's `activation` (gated = 1 always)
    glu: str = "gate_up"  # ScatterMoE's `glu_layout`: where gate and up live among w_gu's 2f rows
    bias: bool = False  # b_gu [E, 2f] and b_down [E, d]
    alpha: float = 1.702  # swiglu_oai only
    limit: float = 7.0  # swiglu_oai only
    router: str = "softmax_topk"  # how ours/ORT+router writes the router: softmax_topk, or topk_softmax (GPT-OSS's order)

    def __post_init__(self):
        assert self.activation in ACTIVATIONS and self.glu in GLU_LAYOUTS, self

    @property
    def dims(self):
        return self.d, self.f, self.E, self.k

    def expert_bytes(self, n_experts=None):
        """bf16 bytes of the weights (and biases) of n_experts experts (all E by default)."""
        n = self.E if n_experts is None else n_experts
        return n * (3 * self.f * self.d + (2 * self.f + self.d if self.bias else 0)) * 2

    def scattermoe_attrs(self):
        """The ScatterMoE node's attributes for this layer (docs/op-spec.md)."""
        a = dict(activation=self.activation, gated=1, glu_layout=self.glu)
        if self.activation == "swiglu_oai":
            a.update(alpha=self.alpha, limit=self.limit)
        return a

    def describe(self):
        s = f"d {self.d}, f {self.f}, E {self.E}, k {self.k}"
        if self.activation == "swiglu_oai":
            s += f", swiglu_oai (alpha {self.alpha}, limit {self.limit:g})"
        if self.glu != "gate_up":
            s += f", {self.glu}"
        if self.bias:
            s += ", biases"
        return s + ", bfloat16"

    def to_json(self):
        return asdict(self)


SHAPES = {
    "mixtral": Layer(4096, 14336, 8, 2, "mixtral"),
    "qwen3": Layer(2048, 768, 128, 8, "qwen3_moe"),
    "fine": Layer(1024, 512, 64, 8, "qwen3_moe"),
    "deepseek_v3": Layer(7168, 2048, 256, 8, "deepseek_v3"),
    "gpt_oss": Layer(2880, 2880, 128, 4, "gpt_oss", activation="swiglu_oai", glu="interleaved", bias=True,
                     router="topk_softmax"),
}
