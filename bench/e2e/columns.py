"""The benchmark's columns and how each one is opened, measured and closed.

    export       the dynamo export as written, ORT (CUDA EP on the device, CPU EP with --tiny)
    rewritten    the same after `scattermoe rewrite`, ORT with the op library
    builder      onnxruntime-genai's model builder output (GPT-OSS dimensions only), ORT
    builder_rw   that model after `scattermoe rewrite`, ORT with the op library
    torch        transformers in torch, fastest experts implementation

The MoE share of a decode step compares the column's step with the same graph without its MoE
blocks (export.cut_moe: each MoE node's output replaced by its input, router and experts removed;
for torch the blocks swapped for an identity): share = 1 - t(without) / t(with). Both run the same
loop (same batch, prompt, steps); the graph without MoE computes other tokens, which costs the same.
"""

import ortrun
import torchrun

COLUMNS = ("export", "rewritten", "builder", "builder_rw", "torch")
KIND = {"export": "hf", "rewritten": "hf", "builder": "genai", "builder_rw": "genai"}
NOMOE = {"export": "nomoe", "rewritten": "nomoe", "builder": "builder_nomoe", "builder_rw": "builder_nomoe"}
USES_LIB = {"rewritten", "builder_rw"}


class OrtColumn:
    """`extras`: a checking copy's extra outputs (probe.py), read after each run; such a session waits for
    each run (it is traced, not timed)."""

    def __init__(self, ort, dev, path, kind, lib, threads, graph=False, token_limit=0, head_dim=None, extras=()):
        with dev.ctx():
            self.s = ortrun.Session(ort, path, kind, dev.kind, lib=lib, threads=threads, graph=graph, stream=dev.stream, head_dim=head_dim,
                                    extras=extras, sync=bool(extras))
        self.dev, self.token_limit = dev, token_limit

    def take_extras(self):
        return self.s.take_extras()

    def chunk(self, batch):
        """Prompt positions per run (0: the whole prompt in one run)."""
        return max(1, self.token_limit // batch) if self.token_limit else 0

    def prefill(self, ids):
        with self.dev.ctx():
            return self.s.prefill(ids, self.chunk(ids.shape[0]))

    def decoder(self, state, first, max_len):
        with self.dev.ctx():
            return _InCtx(ortrun.decoder(self.s, state, first, max_len), self.dev)

    def close(self):
        del self.s


class _InCtx:
    """A decoder whose steps run with torch ops on the device's stream."""

    def __init__(self, dec, dev):
        self.dec, self.dev = dec, dev

    @property
    def ids(self):
        return self.dec.ids

    def reset(self):
        with self.dev.ctx():
            self.dec.reset()

    def step(self):
        with self.dev.ctx():
            return self.dec.step()


class TorchColumn:
    """The model rebuilt from its config and seed on the device (configs.build draws the same weights
    the export was made from: the same generator, draws and order on the same device; the check
    "torch vs export" shows it), with the fastest experts implementation."""

    def __init__(self, name, tiny, dtype, seed, dev, impl):
        import torch

        import configs

        self.m = configs.build(name, tiny, getattr(torch, dtype), seed, device=dev.kind, experts_impl=impl)
        self.lm = torchrun.TorchLM(self.m)
        self.impl, self.tap = impl, None
        self.softmax_scores = name != "gptoss"  # the tensor the export's TopK ranks: GPT-OSS's logits, else their softmax

    def tap_on(self):
        """Per-layer readings (probe.TorchTap) from here until tap_off."""
        import probe

        self.tap = probe.TorchTap(self.m, self.m.config.num_experts_per_tok, self.softmax_scores)

    def tap_off(self):
        if self.tap is not None:
            self.tap.remove()
        self.tap = None

    def take_extras(self):
        return self.tap.take() if self.tap is not None else []

    def prefill(self, ids):
        return self.lm.prefill(ids)

    def decoder(self, state, first, max_len):
        return torchrun.TorchDecode(self.lm, state, first)

    def cut(self):
        self.removed = torchrun.cut_moe(self.m)

    def uncut(self):
        torchrun.restore_moe(self.m, self.removed)

    def close(self):
        del self.lm, self.m


def batched_mm_token_limit(cfg, dtype_bytes, budget_bytes):
    """Tokens (batch x positions) per run for the export as written: transformers' batched_mm gathers every
    (token, expert) assignment's weights, k * 3 * d * f elements per token, so a 2048-token prompt
    asks for k * 2048 copies of an expert (Mixtral: 2 * 2048 * 352 MB in bf16). The export's prompt
    runs in chunks whose gathered weights fit `budget_bytes`, each after the last's cache, and whose
    largest gathered tensor (gate and up: k * 2f * d elements a token) stays below 2^31 elements: ONNX
    Runtime's CUDA kernels index such a tensor with 32-bit integers past that (H100, Mixtral float16 in
    chunks of 12 positions: the export left torch first at position 9, the first whose gathered gate-up
    offset passed 2^31 elements, by 0.87 of the layer's output). A decode step (one position per row)
    is never split: at batch 16 Mixtral's holds 3.8e9 elements, and its time is of a run whose result is
    not checked (the check runs batch 1)."""
    d = cfg.hidden_size
    f = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    k = cfg.num_experts_per_tok
    per_token = k * 3 * d * f * dtype_bytes
    int32_tokens = (2**31 - 1) // (k * 2 * f * d)
    return max(1, min(int(budget_bytes // per_token), int32_tokens))
