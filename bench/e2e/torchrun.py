"""transformers in torch with the same weights, with its fastest experts implementation.

`grouped_mm` (torch's grouped GEMM over tokens sorted by expert) where transformers registers it,
else `batched_mm`. The cache is transformers' DynamicCache; prefill and each decode step are one
call of the model with `logits_to_keep=1`, the greedy step an argmax on the device (no host copy in
the loop). Eager mode (no torch.compile): what `model(...)` gives a user.
"""


def fastest_impl():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return "grouped_mm" if "grouped_mm" in ALL_EXPERTS_FUNCTIONS else "batched_mm"


class NoMoE:
    """Stands in for a decoder layer's MoE block: returns its input (GPT-OSS's block also returns
    router scores, which the layer drops)."""

    @staticmethod
    def make(tuple_out):
        import torch.nn as nn

        class _NoMoE(nn.Module):
            def forward(self, h):
                return (h, None) if tuple_out else h

        return _NoMoE()


def cut_moe(model):
    """The same model with every MoE block replaced by NoMoE (in place); returns the removed blocks."""
    removed = []
    for layer in model.model.layers:
        block = layer.mlp
        removed.append(block)
        layer.mlp = NoMoE.make(type(block).__name__ == "GptOssMLP")
    return removed


def restore_moe(model, removed):
    for layer, block in zip(model.model.layers, removed):
        layer.mlp = block


class TorchLM:
    def __init__(self, model):
        self.m = model

    def prefill(self, ids):
        import torch
        from transformers import DynamicCache

        with torch.no_grad():
            cache = DynamicCache()
            out = self.m(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], cache


class TorchDecode:
    def __init__(self, lm, cache, first_ids):
        self.lm, self.first = lm, first_ids
        self.cache0 = cache
        self.B = first_ids.shape[0]
        self.ids = first_ids.clone()
        self.reset()

    def reset(self):
        import copy

        self.cache = copy.deepcopy(self.cache0)
        self.ids.copy_(self.first)

    def step(self):
        import torch

        with torch.no_grad():
            out = self.lm.m(input_ids=self.ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        logits = out.logits[:, -1]
        self.ids.copy_(logits.argmax(-1, keepdim=True))
        return logits
