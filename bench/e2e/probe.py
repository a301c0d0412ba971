"""Per-layer readings for the check: each MoE block's output and its router's choice, at every position
the check runs (the prompt, then each decode step).

ONNX models: a checking copy (`checking_copy`) of the model file, beside it and sharing its external
data, with extra graph outputs per MoE layer i:

    check/moe_i    the block's output, as float32
    check/topv_i   the top k + 1 router scores (float32) and
    check/topi_i   their experts (int64): TopK(scores, k + 1) on the tensor the model's own TopK ranks

The layers are found in the rewritten graph (`layer_map`): each ScatterMoE node's output is the name
of the block's output in the original too (the rewrite keeps it, so that its consumers stay), and the
router scores are the nearest tensor above the TopK (or the fused router's TopKRouter) that feeds the
node's routing indices which the original graph also has (the export's softmax or router logits; the
builder's router logits, which its com.microsoft.MoE ranks inside). Both models of a pair then give the same readings under the same names.

torch: forward hooks on each layer's MoE block and router (`TorchTap`), under the same names.
"""

import os

MOE, TOPV, TOPI = "check/moe_{}", "check/topv_{}", "check/topi_{}"


def names(layers):
    """The extra outputs of a checking copy with `layers` MoE layers, in order."""
    return [f.format(i) for i in range(layers) for f in (MOE, TOPV, TOPI)]


def layer_map(rw_path, orig_path, report):
    """[{moe, scores, k}] per rewritten layer, in graph order. `report`: the rewrite's JSON report (k per
    ScatterMoE node). Raises ValueError when a layer's readings cannot be named in both graphs."""
    import onnx

    rw = onnx.load(rw_path, load_external_data=False).graph
    og = onnx.load(orig_path, load_external_data=False).graph
    in_orig = {o for n in og.node for o in n.output} | {i.name for i in og.input}
    producer = {o: n for n in rw.node for o in n.output}
    ks = {layer["node"]: layer["k"] for layer in report["layers"]}
    out = []
    for n in rw.node:
        if n.op_type != "ScatterMoE":
            continue
        if n.output[0] not in in_orig:
            raise ValueError(f"{n.name}: its output {n.output[0]} is not a tensor of the original graph")
        # the router's TopK, or the TopKRouter node a fused router became (its input: the logits)
        topk = _find_above(producer, n.input[2], lambda p: p.op_type in ("TopK", "TopKRouter"))
        if topk is None:
            raise ValueError(f"{n.name}: no TopK above its routing indices {n.input[2]}")
        scores = _first_name_above(producer, topk.input[0], in_orig)
        if scores is None:
            raise ValueError(f"{n.name}: the scores {topk.input[0]} that its TopK ranks have no tensor of the original graph above them")
        out.append(dict(node=n.name, moe=n.output[0], scores=scores, k=int(ks[n.name])))
    if not out:
        raise ValueError(f"{rw_path}: no ScatterMoE node")
    return out


def _find_above(producer, name, want, depth=8):
    """The nearest node above tensor `name` (breadth first, every input) for which want(node)."""
    frontier, seen = [name], set()
    for _ in range(depth):
        nxt = []
        for t in frontier:
            p = producer.get(t)
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            if want(p):
                return p
            nxt += [i for i in p.input if i]
        frontier = nxt
    return None


def _first_name_above(producer, name, known, depth=8):
    """`name` if `known` has it, else the nearest tensor above it (first inputs first) that `known` has."""
    frontier = [name]
    for _ in range(depth):
        nxt = []
        for t in frontier:
            if t in known:
                return t
            p = producer.get(t)
            if p is not None:
                nxt += [i for i in p.input if i]
        frontier = nxt
    return None


def checking_copy(src, layers):
    """Writes <src folder>/model.check.onnx: `src` with the extra outputs of `layers` (layer_map); the
    initializers stay in src's external data (same folder, same relative location). Returns its path."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load(src, load_external_data=False)
    g = m.graph
    for i, layer in enumerate(layers):
        moe, topv, topi = MOE.format(i), TOPV.format(i), TOPI.format(i)
        k1 = f"check/k_{i}"
        g.node.extend([
            helper.make_node("Cast", [layer["moe"]], [moe], to=TensorProto.FLOAT, name=f"check/cast_moe_{i}"),
            helper.make_node("Cast", [layer["scores"]], [f"check/scores_{i}"], to=TensorProto.FLOAT, name=f"check/cast_scores_{i}"),
            helper.make_node("Constant", [], [k1], value=helper.make_tensor(k1, TensorProto.INT64, [1], [layer["k"] + 1]),
                             name=f"check/const_k_{i}"),
            helper.make_node("TopK", [f"check/scores_{i}", k1], [topv, topi], axis=-1, largest=1, sorted=1, name=f"check/topk_{i}"),
        ])
        g.output.extend([helper.make_tensor_value_info(moe, TensorProto.FLOAT, None),
                         helper.make_tensor_value_info(topv, TensorProto.FLOAT, None),
                         helper.make_tensor_value_info(topi, TensorProto.INT64, None)])
    dst = os.path.join(os.path.dirname(src), "model.check.onnx")
    onnx.save(m, dst)
    return dst


def stack(log, prompt):
    """Per-layer arrays over every run of a trace: {name: [positions, last dim]} from the runs' extras, in
    run order (a run's rows are its positions, batch 1), and "prompt": the prompt's positions."""
    import numpy as np

    layers = sum(1 for k in log[0] if k.startswith("check/moe_")) if log else 0
    out = dict(prompt=prompt)
    for name in names(layers):
        missing = [i for i, run in enumerate(log) if name not in run]
        if missing:
            raise ValueError(f"no {name} in run {missing[0]} of {len(log)} (a hook that did not fire?)")
        parts = [np.asarray(run[name]) for run in log]
        out[name] = np.concatenate([p.reshape(-1, p.shape[-1]) for p in parts], 0)
    return out


class TorchTap:
    """Forward hooks on a transformers MoE LM: per call, each layer's MoE output and its router's top k + 1
    scores (on the tensor the export's TopK ranks: GPT-OSS's router logits, Mixtral's and Qwen3's
    softmax of them) into `log`, one dict per call, named as a checking copy's outputs."""

    def __init__(self, model, k, softmax_scores):
        self.log, self.k, self.softmax, self.hooks, self.cur = [], k, softmax_scores, [], {}
        layers = model.model.layers
        for i, layer in enumerate(layers):
            mlp = layer.mlp
            router = mlp.router if hasattr(mlp, "router") else mlp.gate
            self.hooks.append(router.register_forward_hook(self._router(i)))
            self.hooks.append(mlp.register_forward_hook(self._moe(i, i == len(layers) - 1)))

    def _router(self, i):
        def hook(mod, inp, out):
            import torch

            logits = out[0].float()
            s = torch.softmax(logits, -1) if self.softmax else logits
            v, idx = s.topk(self.k + 1, dim=-1)
            self.cur[TOPV.format(i)] = v.cpu().numpy()
            self.cur[TOPI.format(i)] = idx.cpu().numpy()

        return hook

    def _moe(self, i, last):
        def hook(mod, inp, out):
            o = out[0] if isinstance(out, tuple) else out
            self.cur[MOE.format(i)] = o.float().reshape(-1, o.shape[-1]).cpu().numpy()
            if last:
                self.log.append(self.cur)
                self.cur = {}

        return hook

    def take(self):
        out, self.log = self.log, []
        return out

    def remove(self):
        for h in self.hooks:
            h.remove()
