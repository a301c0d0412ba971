"""Every column of one prepared model: the check, then decode at each batch, then prefill; the CUDA-graph
decode rows; the MoE share. Writes DIR/results/<model>-<dtype>.json (and a copy in OUT)."""

import json
import os
import shutil
import time
import traceback

import columns as C
import configs
import export
import measure
import ortrun


# the column whose greedy tokens each column is fed in the check (the others run free)
REFERENCE = {"rewritten": "export", "builder_rw": "builder", "torch": "export"}


def _short(e):
    return " ".join(f"{type(e).__name__}: {e}".split())[:600]


def prompts(cfg, ph, seed, device):
    """Token ids, the same for every column: the check's prompt [1, check], each decode batch's prompt
    [B, prompt], the prefill prompt [1, prefill]."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)

    def ids(b, s):
        return torch.tensor(rng.integers(0, cfg.vocab_size - 4, (b, s)), dtype=torch.int64, device=device)

    return dict(check=ids(1, ph["check_prompt"]), decode={b: ids(b, ph["prompt"]) for b in ph["batches"]},
                prefill=ids(1, ph["prefill"]))


def _mem(dev, base, col):
    if dev.kind != "cuda":
        return None
    if isinstance(col, C.TorchColumn):
        return round(dev.torch.cuda.max_memory_allocated() / 2**30, 3)
    return round((dev.used() - base) / 2**30, 3)


def decode_rows(dev, col, pr, ph, suffix=""):
    """{decode_b<B><suffix>: timing} for each batch, each from its prompt's prefill (untimed)."""
    out = {}
    for b in ph["batches"]:
        logits, state = col.prefill(pr["decode"][b])
        first = logits.argmax(-1, keepdim=True)
        dec = col.decoder(state, first, ph["prompt"] + ph["steps"] + 1)
        out[f"decode_b{b}{suffix}"] = measure.time_decode(dev, dec, ph["steps"], ph["repeats"], ph["warmup"])
        del dec, state, logits
    return out


def open_column(a, ort, dev, name, p, cfg, graph=False, path_key=None):
    if name == "torch":
        import torchrun

        return C.TorchColumn(a.model, a.tiny, a.dtype, a.seed, dev, torchrun.fastest_impl())
    lib = a.lib if (name in C.USES_LIB) else None
    limit = 0
    if name == "export":
        import torch

        limit = C.batched_mm_token_limit(cfg, torch.tensor([], dtype=getattr(torch, a.dtype)).element_size(), a.gather_budget_gib * 2**30)
    kind = C.KIND.get(name) or ("genai" if "builder" in name else "hf")
    return C.OrtColumn(ort, dev, p[path_key or name], kind, lib, a.threads, graph=graph, token_limit=limit,
                       head_dim=configs.past_shape(cfg, 1, 0)[3])


def measure_column(a, ort, dev, name, p, cfg, ph, pr, traces, log):
    rec = dict(column=name)
    dev.settle()
    base = dev.used()
    t0 = time.time()
    col = open_column(a, ort, dev, name, p, cfg)
    rec["open_s"] = round(time.time() - t0, 2)
    if dev.kind == "cuda":  # torch's peak from here: the model as it runs, not its float32 construction
        dev.settle()
        dev.torch.cuda.reset_peak_memory_stats()
    if isinstance(col, C.OrtColumn) and col.token_limit and col.chunk(1) < ph["prefill"]:
        rec["prefill_chunk"] = col.chunk(1)
    if name == "torch":
        rec["experts_implementation"] = col.impl
    ref = REFERENCE.get(name)  # fed its original's greedy tokens, so that each step is comparable
    force = traces[ref]["fed"] if ref in traces else None
    traces[name] = measure.greedy_trace(col, dev, pr["check"], ph["greedy"], force=force)
    rec["mem_gib"] = {}
    for k, v in decode_rows(dev, col, pr, ph).items():
        rec[k] = v
        rec["mem_gib"][k] = _mem(dev, base, col)
    rec["prefill"] = measure.time_prefill(dev, lambda: col.prefill(pr["prefill"]), ph["repeats"])
    rec["mem_gib"]["prefill"] = _mem(dev, base, col)
    if name == "torch":  # the MoE share: the same model with its MoE blocks swapped for an identity
        col.cut()
        rec["nomoe"] = decode_rows(dev, col, pr, ph)
        col.uncut()
    col.close()
    del col
    log(f"  {name}: " + ", ".join(f"{k} {v['ms']:.3f} ms" for k, v in rec.items() if isinstance(v, dict) and "ms" in v))
    if dev.kind == "cuda" and not a.no_graph and name != "torch":
        why = ortrun.cuda_graph_reason(C.KIND[name])
        if why:
            rec["graph_note"] = why
        else:
            try:
                dev.settle()
                g = open_column(a, ort, dev, name, p, cfg, graph=True)
                rec.update(decode_rows(dev, g, pr, ph, suffix="_graph"))
                g.close()
                del g
            except Exception as e:  # noqa: BLE001 - a graph that does not capture is a result
                rec["graph_note"] = f"capture failed: {_short(e)}"
                traceback.print_exc()
    return rec


def nomoe_rows(a, ort, dev, p, cfg, ph, pr, key, graph, cache):
    """Decode timings of the model without MoE blocks (cached per file and graph mode)."""
    ck = (key, graph)
    if ck not in cache:
        dev.settle()
        col = open_column(a, ort, dev, key, p, cfg, graph=graph, path_key=key)
        cache[ck] = decode_rows(dev, col, pr, ph, suffix="_graph" if graph else "")
        col.close()
    return cache[ck]


def moe_share(rec, nomoe):
    out = {}
    for k, v in nomoe.items():
        if isinstance(rec.get(k), dict) and rec[k].get("ms"):
            out[k] = round(1.0 - v["ms"] / rec[k]["ms"], 4)
    return out


def run(a, name, dtype, ph, tol, log):
    import torch

    ort = ortrun.load_ort()
    a.model = name
    p = export.paths(a.work, name, dtype)
    prep = json.load(open(p["prepared"]))
    cfg = configs.hf_config(name, a.tiny, "batched_mm")
    dev = measure.Device(a.device)
    pr = prompts(cfg, ph, a.seed, a.device)
    res = dict(model=name, dtype=dtype, tiny=a.tiny, device=_device_name(dev), onnxruntime=ort.__version__, torch=torch.__version__,
               phases={k: list(v) if isinstance(v, tuple) else v for k, v in ph.items()}, layers=cfg.num_hidden_layers,
               full_depth=configs.MODELS[name]["full_depth"], columns={}, notes=dict(prep.get("notes", {})), checks={},
               prepared={k: v for k, v in prep.items() if k != "notes"})
    traces, cache = {}, {}
    wanted = [c for c in a.columns.split(",") if c]
    log(f"{name} {dtype} on {res['device']}: columns {', '.join(wanted)}")
    for col in wanted:
        if col.startswith("builder") and ("builder" in res["notes"] or not os.path.exists(p[col])):
            res["notes"].setdefault(col, res["notes"].get("builder") or "no builder model (GPT-OSS dimensions only)")
            continue
        try:
            rec = measure_column(a, ort, dev, col, p, cfg, ph, pr, traces, log)
            if col != "torch":
                key = C.NOMOE[col]
                rec["nomoe"] = nomoe_rows(a, ort, dev, p, cfg, ph, pr, key, False, cache)
                if any(k.endswith("_graph") for k in rec):
                    rec["nomoe"].update(nomoe_rows(a, ort, dev, p, cfg, ph, pr, key, True, cache))
            rec["moe_share"] = moe_share(rec, rec.get("nomoe", {}))
            res["columns"][col] = rec
            _save(a, res)  # a call cut short by its time limit still returns the columns it measured
        except Exception as e:  # noqa: BLE001 - a column that fails is reported; the others go on
            traceback.print_exc()
            res["columns"][col] = dict(column=col, error=_short(e))
            log(f"  {col}: FAILED {_short(e)}")
    res["checks"] = checks(traces, tol, [c for c in wanted if c in res["columns"]], dtype)
    res["checks_ok"] = all(c["ok"] for c in res["checks"].values() if c.get("gate")) and bool(res["checks"])
    for k, c in res["checks"].items():
        log(f"  check {k}: {'ok' if c['ok'] else 'FAILED: ' + c['why']} (max rel err {c['max_rel_err']:.3g}, tol {c['tol']:g})")
    _save(a, res)
    if a.device == "cuda" and not a.keep:
        shutil.rmtree(p["root"], ignore_errors=True)  # the device's disk holds one model's files at a time
    return res


def _save(a, res):
    """DIR/results/<model>-<dtype>.json, and its copy OUT/e2e-<model>-<dtype>.json."""
    os.makedirs(os.path.join(a.work, "results"), exist_ok=True)
    path = os.path.join(a.work, "results", f"{res['model']}-{res['dtype']}.json")
    with open(path, "w") as fh:
        json.dump(res, fh, indent=1)
    os.makedirs(a.out, exist_ok=True)
    shutil.copy(path, os.path.join(a.out, f"e2e-{res['model']}-{res['dtype']}.json"))


def checks(traces, tol, ran, dtype):
    """rewritten vs export and builder_rw vs builder gate the run (a pair of which one column ran and the
    other failed fails too); torch vs export and torch vs builder are shown, not gated (the same model in
    other arithmetic: transformers' grouped_mm, the builder's fused ops; torch is fed the export's tokens
    and the builder runs free, so that pair is compared up to the first token they were fed differently)."""
    out = {}
    pairs = (("export", "rewritten", True), ("builder", "builder_rw", True), ("export", "torch", False), ("builder", "torch", False))
    for ref, got, gate in pairs:
        key = f"{got} vs {ref}"
        if ref in traces and got in traces:
            rec = measure.compare(traces[ref], traces[got], tol, dtype)
            if not gate and not rec["same_history"]:  # two free-running columns: comparable up to their first different token
                d = next((i for i, (x, y) in enumerate(zip(traces[ref]["fed"], traces[got]["fed"])) if x != y), None)
                rec["note"] = f"fed different tokens from step {d}: compared up to there"
                rec["why"] = "; ".join(w for w in rec["why"].split("; ") if w != "not fed the reference's tokens")
                rec["ok"] = not rec["why"]
            out[key] = dict(rec, gate=gate)
        elif gate and ref in ran and got in ran:
            lost = ref if ref not in traces else got
            out[key] = dict(ok=False, gate=True, why=f"{lost} did not run", max_rel_err=float("nan"), tol=tol, steps=0,
                            tokens_equal=False, first_diff=None)
    return out


def _device_name(dev):
    if dev.kind == "cuda":
        return dev.torch.cuda.get_device_name()
    import platform

    return f"CPU ({platform.processor() or platform.machine()})"
