"""The torch side of the benchmark on the CPU at a toy size (part of `gpu_bench.py --dry-run` when torch is
importable): input sets and their routing, the float32 reference, torch._grouped_mm, the Hugging Face
export (in float32: ORT's CPU EP has no bfloat16 MatMul) run in ORT against the reference, the
re-export on a new experts-hit count, and loading ScatterMoE's parallel_linear (its Triton kernels need a GPU).
Prints one line per check; returns True when every check passed."""
import os
import tempfile

import torch

from . import hf_export, torch_gmm, triton_smoe, workload


def _line(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    return ok


def check_sets(d, E, k, T, wr):
    sets = workload.make_sets(T, d, E, k, seed=T)
    hits = [workload.experts_hit(s["ri"]) for s in sets]
    ok = len(set(hits)) == 1
    for s in sets:  # the routing each set carries is the routing of its router logits x @ Wr^T (bf16)
        rw32, _, ri = workload.route(s["x"] @ wr.t(), k)
        ok &= torch.equal(ri, s["ri"]) and torch.equal(rw32, s["rw32"])
    return _line(ok, f"{len(sets)} input sets at {T} tokens: experts hit {hits}, routing of x @ Wr^T matches"), sets


def check_reference(sets, w_gu, w_down, k):
    s = sets[0]
    f = w_down.shape[2]
    ref = workload.reference_f32(s["x"], s["rw32"], s["ri"], w_gu, w_down)
    naive = torch.zeros_like(ref)
    for t in range(s["x"].shape[0]):
        for j in range(k):
            e = int(s["ri"][t, j])
            h = w_gu[e].float() @ s["x"][t].float()
            naive[t] += s["rw32"][t, j] * (w_down[e].float() @ (torch.nn.functional.silu(h[:f]) * h[f:]))
    err = workload.rel_err(ref, naive)
    return _line(err < 1e-5, f"float32 reference vs a per-token loop: rel err {err:.1e}"), ref


def check_grouped_mm(sets, ref, w_gu, w_down):
    s = sets[0]
    try:
        y = torch_gmm.forward(s["x"], s["rw"], s["ri"], *torch_gmm.weights(w_gu, w_down))
        err = workload.rel_err(y, ref)
        return _line(err < 3e-2, f"torch._grouped_mm path on CPU: rel err {err:.1e}")
    except RuntimeError as e:  # CPU support of _grouped_mm varies between torch versions
        print(f"--   torch._grouped_mm on CPU: {' '.join(str(e).split())[:160]}")
        return True


def check_export(shape, d, f, E, k, w_gu, w_down, wr, tmp):
    import onnxruntime as ort

    block, version = hf_export.build_block(hf_export.FAMILY[shape], d, f, E, k, device="cpu")
    block = block.float()
    hf_export.load_weights(block, w_gu, w_down, wr)
    ok, traced, last = True, {}, None
    for T in (16, 1, 17):
        sets = workload.make_sets(T, d, E, k, seed=100 + T)
        n_hit = workload.experts_hit(sets[0]["ri"])
        if n_hit not in traced:
            if last is not None:  # an export traced with another hit count must refuse these inputs
                try:
                    last.run(None, {"hidden_states": sets[0]["x"].float().unsqueeze(0).numpy()})
                    print(f"--   an export traced at another hit count ran {n_hit} experts hit")
                except Exception as e:  # noqa: BLE001
                    _line(True, f"an export traced at another hit count refuses {n_hit} experts hit: "
                          f"{' '.join(str(e).split())[:100]}")
            path = os.path.join(tmp, f"{shape}_{T}.onnx")
            nodes = hf_export.export(block, sets[0]["x"].float(), path)
            last = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            traced[n_hit] = (last, T, nodes)
        sess, t_tr, nodes = traced[n_hit]
        for i, st in enumerate(sets):
            ref = workload.reference_f32(st["x"], st["rw32"], st["ri"], w_gu, w_down)
            (y,) = sess.run(None, {"hidden_states": st["x"].float().unsqueeze(0).numpy()})
            err = workload.rel_err(torch.from_numpy(y)[0], ref)
            ok &= _line(err < 1e-4, f"{shape}: HF block (transformers {version}) exported at {t_tr} tokens "
                        f"({n_hit} experts hit, {nodes} nodes), float32 in ORT CPU, set {i} at {T} tokens: "
                        f"rel err {err:.1e}")
    return ok


def check_triton_import(directory):
    try:
        pl = triton_smoe.load(directory)
        return _line(callable(pl), f"ScatterMoE parallel_linear imported from {directory}")
    except Exception as e:  # noqa: BLE001
        print(f"--   ScatterMoE not importable here: {type(e).__name__}: {' '.join(str(e).split())[:160]}")
        return True


def run(triton_dir):
    workload.DEVICE = "cpu"
    torch.manual_seed(0)
    ok = True
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        for shape, (d, f, E, k) in {"mixtral": (64, 48, 8, 2), "qwen3": (64, 32, 16, 4)}.items():
            w_gu, w_down, wr = workload.make_weights(d, f, E, seed=1)
            good, sets = check_sets(d, E, k, 16, wr)
            ok &= good
            good, ref = check_reference(sets, w_gu, w_down, k)
            ok &= good
            ok &= check_grouped_mm(sets, ref, w_gu, w_down)
            try:
                ok &= check_export(shape, d, f, E, k, w_gu, w_down, wr, tmp)
            except ImportError as e:
                print(f"--   HF export not checked: {e}")
        ok &= check_triton_import(triton_dir)
    return ok
