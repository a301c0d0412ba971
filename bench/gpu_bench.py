"""GPU benchmark of one SwiGLU MoE layer forward (bfloat16, no biases, random top-k routing): our op and
kernels against the ways the same layer runs elsewhere, in one run, one table and one chart.

Shapes (d, f, E, k): mixtral (4096, 14336, 8, 2), qwen3 = Qwen3-30B-A3B (2048, 768, 128, 8),
fine = fine-grained (1024, 512, 64, 8); tokens 1, 16, 128, 1024, 4096, 16384.

Columns, ms per layer forward (medians); "host" = wall time of one call + torch.cuda.synchronize(),
"graph" = device time of a CUDA-graph replay (peers/timing.py). The host-timed columns of a cell are
timed together, in turn over five rounds (timing.host_ms_interleaved), so that a drift of the clocks
during the cell does not favour one column; each timed slice follows --settle seconds (default 0.3) of
untimed calls of the same column, so that no column is timed in the power state the previous one left
(the H200 runs these layers at its power limit). All use the same weights and the same
inputs; each timed loop cycles over 4 input sets. The router weight is [I_E | 0], and the first E
features of each token a random permutation of E distinct values, so that routing (softmax, top-k,
renormalise) is random and identical in every column, whether given or computed (peers/workload.py):
  floor             max(FLOPs / bf16 matmul rate, bytes / copy bandwidth), both measured at start
                    (8192^3 bf16 matmul, 2 GiB device copy, best of 5); FLOPs = 2 T k 3 d f,
                    bytes = weights of the experts hit + X + Y
  ours/ORT          one ScatterMoE node (ai.scattermoe, glu_layout gate_up) on ORT's CUDA EP, routing
                    weights and indices as inputs; IO binding on torch's device buffers, host-timed
                    session.run_with_iobinding (launches + kernels + ORT's end-of-run stream sync)
  ours/ORT +router  the same node behind the router as ONNX ops (MatMul, Softmax, TopK, renormalise): what
                    `scattermoe rewrite` makes of an exported block; input hidden states only; host-timed
  exported/ORT      the real Hugging Face block (MixtralSparseMoeBlock; Qwen3MoeSparseMoeBlock for qwen3
                    and fine) with these weights, exported by torch.onnx.export(dynamo=False) as
                    models/generate.py does (router included, per-expert loop), traced at the measured
                    token count and exported again whenever the number of experts hit changes (the graph
                    only runs inputs hitting as many), on ORT's CUDA EP (CPU EP for nodes CUDA has no
                    kernel for: node placement is in the log and the JSON); host-timed
  ORT MoE           com.microsoft.MoE (swiglu, interleaved fc1, renormalised top-k) fed the router
                    logits, on ORT's CUDA EP; host-timed. No other dtype is tried if bf16 fails.
  grouped_mm        torch: argsort + torch._grouped_mm x2 + silu*up + index_add_; host-timed
  Triton            ScatterMoE's Triton kernels (scatter2scatter x2, github.com/shawntan/scattermoe,
                    unpacked in .carry/scattermoe): peers/triton_smoe.py; host-timed
  kernels           our fatbins (target/scattermoe-kernels) through tests/gpu/smoe_cuda.py; host-timed
                    (ctypes launches from Python)
  ... (graph)       kernels, grouped_mm, Triton captured in a CUDA graph (one forward per input set)
  fastest (host / graph)  the fastest column of each timing kind (floor excluded)
Quantized columns, in a table of their own (bench/peers/quant_bench.py): floor fp8 / floor int4 (the
floor with the quantized weight bytes), ours fp8/ORT, ours int4/ORT, ours int8/ORT (ScatterMoE with
quantized w_in / w_out), QMoE int4 / QMoE int8 (com.microsoft.QMoE with the same codes and scales),
kernels fp8 / kernels int4 (host and graph); their errors are the quantization's, against the same
float32 reference of the bf16 layer.
A second table gives each column's relative error max|y - ref| / max|ref| against a float32 torch
evaluation of the same routing (input set 0). A cell is "-" when that column failed or was skipped;
the reason is printed under the tables and kept in the JSON ("notes").

Device run (onnxruntime-gpu unpacked at /tmp/ortgpu): bench/run_gpu_bench.sh, which runs
  python3 bench/gpu_bench.py --lib .carry/ort/libscattermoe_ort.so --fatbin-dir target/scattermoe-kernels \
      --triton-dir .carry/scattermoe --out $OUT
and writes $OUT/gpu_bench.{md,json,png} and the log. Without a GPU: `gpu_bench.py --dry-run --out DIR`
builds the ONNX models at a toy size, checks them, runs the ScatterMoE models on ORT's CPU EP with
bf16 IO binding when onnxruntime and the plugin are there, checks the torch side on the CPU when torch
is there (peers/cpu_check.py: routing, reference, HF export in float32), and renders the report from
made-up rows.
"""
import argparse
import functools
import gc
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from peers import onnx_models, report  # noqa: E402  (numpy + onnx only)
from peers.quant_bench import QUANT_PEERS, QuantColumns  # noqa: E402

# The inputs of each ORT session: {model input name: key of an input set}.
SESSION_INPUTS = {"ours": {"x": "x", "rw": "rw", "ri": "ri"}, "ours_router": {"x": "x"},
                  "ortmoe": {"x": "x", "logits": "logits"}}  # (the quantized columns: quant_bench.py)

SHAPES = {  # name: (d, f, E, k)
    "mixtral": (4096, 14336, 8, 2),
    "qwen3": (2048, 768, 128, 8),
    "fine": (1024, 512, 64, 8),
}
PEERS = ("ours", "ours_router", "exported", "ortmoe", "grouped_mm", "triton", "kernels") + QUANT_PEERS


class Skip(Exception):
    """A column that is not measured for a stated reason (unavailable, time budget)."""


def title(shape):
    d, f, E, k = SHAPES[shape]
    return f"{shape}: d {d}, f {f}, E {E}, k {k}, bfloat16"


def short(e):
    s = f"{type(e).__name__}: {e}" if not isinstance(e, Skip) else str(e)
    return " ".join(s.split())[:300]


# ------------------------------------------------------------------------------------------ device run
class Bench(QuantColumns):
    def __init__(self, args):
        import torch

        from peers import ort_session, timing, workload

        self.args, self.torch, self.timing, self.workload, self.ortlib = args, torch, timing, workload, ort_session
        self.t0 = time.time()
        self.peers = set(args.peers.split(","))
        self.tmp = tempfile.mkdtemp(prefix="smoe-bench-")
        self.global_why = {}  # peer -> reason it is unavailable for every shape
        ort_peers = ("ours", "ours_router", "exported", "ortmoe", "ours_fp8", "ours_int4", "ours_int8", "qmoe_int4", "qmoe_int8")
        self.ort = self._try("ORT", ort_session.load_ort, ort_peers)
        self.kernels = self._try("kernels", self._load_kernels, ("kernels", "kernels_fp8", "kernels_int4"))
        self.triton = self._try("Triton", self._load_triton, ("triton",))

    def _try(self, what, fn, peers):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - a peer that cannot load is reported, not fatal
            for p in peers:
                self.global_why[p] = f"{what} unavailable: {short(e)}"
            print(f"{what} unavailable: {short(e)}", flush=True)
            return None

    def _load_kernels(self):
        sys.path.insert(0, os.path.join(REPO, "tests", "gpu"))
        from smoe_cuda import Kernels

        return Kernels(self.args.fatbin_dir)

    def _load_triton(self):
        from peers import triton_smoe

        return triton_smoe.load(self.args.triton_dir)

    def elapsed(self):
        return time.time() - self.t0

    def check_time(self, hard=False):
        limit = self.args.time_limit + (self.args.hard_extra if hard else 0)
        if self.elapsed() > limit:
            raise Skip(f"time budget: {self.elapsed():.0f} s elapsed, limit {limit:.0f} s")

    def meta(self, peak, bw):
        import numpy as np
        import onnx

        torch = self.torch
        m = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, onnx=onnx.__version__,
                 numpy=np.__version__, peak_flops=peak, copy_bw=bw, shapes=SHAPES, sets=self.workload.SETS,
                 budget_s_per_cell=self.args.budget, settle_s_per_slice=self.args.settle)
        if self.ort is not None:
            m["onnxruntime"] = self.ort.__version__
        try:
            import triton

            m["triton"] = triton.__version__
        except ImportError:
            pass
        sc = os.path.join(self.args.triton_dir, "COMMIT")
        if os.path.exists(sc):
            m["scattermoe_commit"] = open(sc).read().strip()
        return m

    # ---------------------------------------------------------------------------------- per shape
    def prepare_shape(self, shape):
        """Weights, their file, the ORT sessions, the HF block; each failure kept as a reason per peer."""
        torch, wl = self.torch, self.workload
        d, f, E, k = SHAPES[shape]
        st = dict(shape=shape, d=d, f=f, E=E, k=k, why=dict(self.global_why), placement={})
        st["w_gu"], st["w_down"], st["wr"] = wl.make_weights(d, f, E, seed=1)
        st["dir"] = os.path.join(self.tmp, shape)
        os.makedirs(st["dir"])
        if self.ort is not None and self.peers & {"ours", "ours_router", "ortmoe"}:
            try:
                self._write_onnx(st)
            except Exception as e:  # noqa: BLE001
                for p in ("ours", "ours_router", "ortmoe"):
                    st["why"].setdefault(p, f"weights file: {short(e)}")
        if "exported" in self.peers and "exported" not in st["why"]:
            try:
                from peers import hf_export

                st["exporter"] = hf_export.Exporter(shape, d, f, E, k, st["w_gu"], st["w_down"], st["wr"],
                                                    os.path.join(st["dir"], "hf"))
            except Exception as e:  # noqa: BLE001
                st["why"]["exported"] = f"HF block: {short(e)}"
        if "grouped_mm" in self.peers:
            from peers import torch_gmm

            st["gmm_w"] = torch_gmm.weights(st["w_gu"], st["w_down"])
        if self.triton is not None:
            from peers import triton_smoe

            st["triton_w"] = triton_smoe.weights(st["w_gu"], st["w_down"])
        self.prepare_quant(st, short)
        torch.cuda.synchronize()
        return st

    def _write_onnx(self, st):
        import numpy as np

        torch, wl = self.torch, self.workload

        def bits(t):
            return t.contiguous().view(torch.int16).cpu().numpy().view(np.uint16)

        t0 = time.time()
        wf = onnx_models.write_weights(st["dir"], bits(st["w_gu"]), bits(wl.interleave(st["w_gu"])),
                                       bits(st["w_down"]), bits(st["wr"].t()))
        builders = {"ours": onnx_models.ours_model, "ours_router": onnx_models.ours_router_model,
                    "ortmoe": onnx_models.ort_moe_model}
        for peer, build in builders.items():
            if peer not in self.peers:
                continue
            try:
                path = build(wf, os.path.join(st["dir"], f"{peer}.onnx"), st["k"])
                st[f"sess_{peer}"] = self.ortlib.make_session(self.ort, path, self.args.lib, profile_dir=st["dir"])
            except Exception as e:  # noqa: BLE001
                st["why"][peer] = f"session: {short(e)}"
                print(f"{st['shape']}: {peer} session failed: {short(e)}", flush=True)
        print(f"{st['shape']}: weights written and ORT sessions created in {time.time() - t0:.1f} s", flush=True)

    def close_shape(self, st):
        if st.get("exporter") is not None:
            st["exporter"].close()
        st.clear()
        gc.collect()
        self.torch.cuda.empty_cache()

    # ---------------------------------------------------------------------------------- per cell
    def cell(self, st, T):
        wl = self.workload
        d, f, E, k = st["d"], st["f"], st["E"], st["k"]
        sets = wl.make_sets(T, d, E, k, seed=1000 + T)
        n_hit = wl.experts_hit(sets[0]["ri"])
        ref = wl.reference_f32(sets[0]["x"], sets[0]["rw32"], sets[0]["ri"], st["w_gu"], st["w_down"])
        row = dict(shape=st["shape"], tokens=T, experts_hit=n_hit, notes={},
                   floor=wl.floor_ms(T, d, f, k, n_hit, self.peak, self.bw))
        self.quant_floors(row, st, self.peak, self.bw)
        columns = [("ours", "ours/ORT", self.col_ours), ("ours_router", "ours/ORT+router", self.col_ours_router),
                   ("ortmoe", "ORT MoE", self.col_ortmoe), ("exported", "exported/ORT", self.col_exported),
                   ("grouped_mm", "grouped_mm", self.col_grouped_mm), ("triton", "Triton", self.col_triton),
                   ("kernels", "kernels", self.col_kernels)]
        columns += [(peer, key, functools.partial(fn, peer)) for peer, key, fn in self.quant_columns()]
        self._host = []  # (key, fn) of the host-timed columns: timed together after the loop
        for peer, key, fn in columns:
            if peer not in self.peers:
                continue
            try:
                if peer in st["why"]:
                    raise Skip(st["why"][peer])
                self.check_time(hard=True)
                fn(st, T, sets, ref, row)
            except Exception as e:  # noqa: BLE001 - one failing column does not stop the others
                row["notes"][key] = short(e)
                if not isinstance(e, Skip):
                    print(f"{st['shape']} T={T} {key} failed: {short(e)}", flush=True)
                    if self.args.verbose:
                        traceback.print_exc()
            finally:
                try:
                    self.torch.cuda.synchronize()
                except Exception as e:  # noqa: BLE001 - a sticky CUDA error: the next columns will say so
                    print(f"{st['shape']} T={T}: CUDA error after {key}: {short(e)}", flush=True)
        times, failed = self.timing.host_ms_interleaved(self._host, self.args.budget, settle_s=self.args.settle)
        row.update(times)
        for key, e in failed.items():
            row["notes"][key] = short(e)
            print(f"{st['shape']} T={T} {key} failed while timed: {short(e)}", flush=True)
        self._host = []
        del sets, ref
        self.torch.cuda.empty_cache()
        return row

    # -- ORT columns: bind every input set, check set 0 against the reference, host-time the cycle
    def _spec(self, t):
        from onnx import TensorProto

        torch = self.torch
        etype = {torch.bfloat16: TensorProto.BFLOAT16, torch.float16: TensorProto.FLOAT16,
                 torch.float32: TensorProto.FLOAT, torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32}
        assert t.is_contiguous()
        return t.data_ptr(), tuple(t.shape), etype[t.dtype]

    def bind_set(self, sess, s, inputs, output="y", view=None, ykey="y"):
        """IO binding of input set `s` to `sess`: inputs = {model input name: key of s}; the output to s[ykey]."""
        view = view or (lambda t: t)
        return self.ortlib.bind(sess, {n: self._spec(view(s[src])) for n, src in inputs.items()},
                                {output: self._spec(view(s[ykey]))})

    def _ort_column(self, key, sess, sets, ref, row, inputs, output="y", view=None, first=False, ykey="y"):
        """Binds every input set, checks set 0 against the reference, host-times the cycle. With first=True
        the check run is the session's first (profiled) run: returns its node placement."""
        ios = [self.bind_set(sess, s, inputs, output, view, ykey) for s in sets]
        sets[0][ykey].fill_(float("nan"))
        self.torch.cuda.synchronize()  # inputs were written on torch's stream; ORT runs on its own
        placement = self.ortlib.first_run(sess, ios[0]) if first else sess.run_with_iobinding(ios[0])
        row[key + "_err"] = self.workload.rel_err(sets[0][ykey], ref)
        runs = [lambda io=io: sess.run_with_iobinding(io) for io in ios]
        self._host.append((key, self.timing.cycle(runs)))
        return placement

    def _session_column(self, st, key, peer, sets, ref, row, inputs, ykey="y"):
        first = key not in st["placement"]
        placement = self._ort_column(key, st[f"sess_{peer}"], sets, ref, row, inputs, first=first, ykey=ykey)
        if first:
            st["placement"][key] = placement
            print(f"{st['shape']}: {key} node placement {placement}", flush=True)

    def col_ours(self, st, T, sets, ref, row):
        self._session_column(st, "ours/ORT", "ours", sets, ref, row, SESSION_INPUTS["ours"])

    def col_ours_router(self, st, T, sets, ref, row):
        self._session_column(st, "ours/ORT+router", "ours_router", sets, ref, row, SESSION_INPUTS["ours_router"])

    def col_ortmoe(self, st, T, sets, ref, row):
        self._session_column(st, "ORT MoE", "ortmoe", sets, ref, row, SESSION_INPUTS["ortmoe"])

    def col_exported(self, st, T, sets, ref, row):
        ex = st["exporter"]
        n_hit = row["experts_hit"]
        if ex.current is None or ex.current.n_hit != n_hit:
            self.check_time()  # a new export only while within the soft limit
        t0 = time.time()
        sess, cur = ex.session_for(n_hit, sets[0]["x"], lambda p: self.ortlib.make_session(
            self.ort, p, profile_dir=os.path.dirname(p)))
        out_type = sess.get_outputs()[0].type
        if out_type != "tensor(bfloat16)":
            raise RuntimeError(f"the exported block's output is {out_type}, not bfloat16")
        first = cur.placement is None
        if first:
            print(f"{st['shape']} T={T}: HF block exported (traced at {cur.traced_tokens} tokens, {n_hit} experts hit, "
                  f"{cur.nodes} nodes, transformers {ex.transformers_version}) and loaded in {time.time() - t0:.1f} s",
                  flush=True)
        row["exported_traced_tokens"], row["exported_nodes"] = cur.traced_tokens, cur.nodes
        placement = self._ort_column("exported/ORT", sess, sets, ref, row, {"hidden_states": "x"}, output="output",
                                     view=lambda t: t.unsqueeze(0), first=first)
        if first:
            cur.placement = placement
            st["placement"][f"exported/ORT (traced at {cur.traced_tokens}, {n_hit} experts hit)"] = placement
            print(f"{st['shape']}: exported/ORT node placement {placement}", flush=True)
        row["exported_placement"] = cur.placement

    # -- torch-side columns: check set 0, host-time the cycle, and (graph) replay a CUDA graph
    def _torch_column(self, key, fns, ref, row, graph=True):
        y0 = fns[0]()
        self.torch.cuda.synchronize()
        row[key + "_err"] = self.workload.rel_err(y0, ref)
        del y0
        self._host.append((key, self.timing.cycle(fns)))
        if graph:
            try:
                row[key + "/graph"] = self.timing.graph_ms(fns, self.args.budget)
            except Exception as e:  # noqa: BLE001
                row["notes"][key + "/graph"] = short(e)
                print(f"{row['shape']} T={row['tokens']} {key}/graph failed: {short(e)}", flush=True)

    def col_grouped_mm(self, st, T, sets, ref, row):
        from peers import torch_gmm

        w1t, w2t = st["gmm_w"]
        fns = [lambda s=s: torch_gmm.forward(s["x"], s["rw"], s["ri"], w1t, w2t) for s in sets]
        self._torch_column("grouped_mm", fns, ref, row)

    def col_triton(self, st, T, sets, ref, row):
        from peers import triton_smoe

        w1, w2 = st["triton_w"]
        fns = [lambda s=s: triton_smoe.forward(self.triton, s["x"], s["rw"], s["ri"], w1, w2) for s in sets]
        self._torch_column("Triton", fns, ref, row)

    def col_kernels(self, st, T, sets, ref, row):
        K, torch = self.kernels, self.torch
        bufs = [K.alloc_forward(T, st["k"], st["E"], st["d"], st["f"], torch.bfloat16) for _ in sets]
        fns = [lambda s=s, b=b: self.kernels_forward(st, s, b) for s, b in zip(sets, bufs)]
        self._torch_column("kernels", fns, ref, row)

    def kernels_forward(self, st, s, bufs):
        """One layer forward of input set `s` by our kernels alone (buffers from alloc_forward)."""
        return self.kernels.forward(s["x"], s["rw"], s["ri"], st["w_gu"], st["w_down"], None, None, bufs,
                                    act="silu", gated=1, glu_layout="gate_up")

    # ---------------------------------------------------------------------------------- the run
    def run(self):
        torch = self.torch
        torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference stays float32
        self.peak, self.bw = self.timing.ceilings()
        meta = self.meta(self.peak, self.bw)
        print(f"measured ceilings: bf16 matmul {self.peak / 1e12:.0f} TFLOP/s, copy {self.bw / 1e12:.2f} TB/s; "
              + ", ".join(f"{k} {v}" for k, v in meta.items() if k in ("device", "torch", "onnxruntime", "triton")),
              flush=True)
        rows = []
        shapes = self.args.shapes.split(",")
        try:
            with torch.no_grad():
                for shape in shapes:
                    st = self.prepare_shape(shape)
                    try:
                        for T in map(int, self.args.tokens.split(",")):
                            row = self.cell(st, T)
                            rows.append(row)
                            print(json.dumps(row), flush=True)
                            report.write_json(os.path.join(self.args.out, "gpu_bench.json"), meta, rows)
                    finally:
                        meta.setdefault("placement", {})[shape] = st.get("placement")
                        self.close_shape(st)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
            meta["elapsed_s"] = self.elapsed()
            write_outputs(self.args.out, meta, rows, [s for s in shapes if any(r["shape"] == s for r in rows)])


def write_outputs(out, meta, rows, shapes):
    os.makedirs(out, exist_ok=True)
    report.write_json(os.path.join(out, "gpu_bench.json"), meta, rows)
    md = ["## Time per layer forward (ms, median)", "", report.table(rows), "",
          "## Relative error vs float32 torch on the same routing (max|y-ref|/max|ref|)", "", report.error_table(rows)]
    if any(k in r for r in rows for k, _, _ in report.QUANT_COLUMNS[2:]):
        md += ["", "## Quantized weights: time per layer forward (ms, median)", "", report.table(rows, report.QUANT_COLUMNS), "",
               "## Quantized weights: relative error vs float32 torch of the bf16 layer (the quantization's error)", "",
               report.error_table(rows, report.QUANT_ERROR_COLUMNS)]
    why = report.notes(rows)
    if why:
        md += ["", "## Not measured", "", why]
    text = "\n".join(md)
    print("\n" + text, flush=True)
    with open(os.path.join(out, "gpu_bench.md"), "w") as fh:
        fh.write(text + "\n")
    try:
        report.chart(os.path.join(out, "gpu_bench.png"), rows, shapes, title)
    except Exception as e:  # noqa: BLE001 - matplotlib may be absent on the device
        print(f"chart not written: {short(e)}", flush=True)


def render(args):
    """Tables and chart from earlier runs (a device call is time-boxed, so one table may take two runs)."""
    meta, merged = {"runs": []}, {}
    for path in args.render:
        with open(path) as fh:
            run = json.load(fh)
        meta["runs"].append(run.get("meta", {}))
        for row in run["rows"]:
            key = (row["shape"], row["tokens"])
            have = merged.setdefault(key, {"notes": {}})
            notes = {**have["notes"], **row.get("notes", {})}
            have.update(row)
            have["notes"] = {c: why for c, why in notes.items() if c not in have}  # a measured cell needs no why
    order = {s: i for i, s in enumerate(SHAPES)}
    rows = [merged[k] for k in sorted(merged, key=lambda k: (order.get(k[0], 99), k[1]))]
    write_outputs(args.out, meta, rows, list(dict.fromkeys(r["shape"] for r in rows)))
    return 0


# ------------------------------------------------------------------------------------------ dry run
def dry_run(args):
    """GPU-free check: build every ONNX model at a toy size, check it, run the ScatterMoE ones (and try
    com.microsoft.MoE) on ORT's CPU EP through bf16 IO binding, render the report from made-up rows."""
    import numpy as np
    import onnx

    d, f, E, k, T = 64, 32, 8, 2, 5
    rng = np.random.default_rng(0)
    w_gu = onnx_models.bf16_bits(rng.standard_normal((E, 2 * f, d)) * d**-0.5)
    w_down = onnx_models.bf16_bits(rng.standard_normal((E, d, f)) * f**-0.5)
    wr = np.zeros((E, d), np.float32)
    wr[:, :E] = np.eye(E)
    tmp = tempfile.mkdtemp(prefix="smoe-dry-")
    ok = True
    try:
        wf = onnx_models.write_weights(tmp, w_gu, onnx_models.interleave_gate_up(w_gu), w_down,
                                       onnx_models.bf16_bits(wr.T))
        paths = {name: build(wf, os.path.join(tmp, name + ".onnx"), k) for name, build in (
            ("ours", onnx_models.ours_model), ("ours_router", onnx_models.ours_router_model),
            ("ortmoe", onnx_models.ort_moe_model))}
        onnx.checker.check_model(paths["ours_router"])  # the bf16-MatMul form the GPU runs; CPU runs this one:
        paths["ours_router"] = onnx_models.ours_router_model(wf, os.path.join(tmp, "ours_router_f32mm.onnx"), k,
                                                             f32_matmul=True)
        for name, p in paths.items():
            onnx.checker.check_model(p)
            print(f"ok   {name}: {len(onnx.load(p, load_external_data=False).graph.node)} nodes, checker passed")
        # inputs as workload.py makes them: x[:, :E] a permutation of distinct logits per token
        grid = ((np.arange(E) - E / 2) * (8.0 / E)).astype(np.float32)
        x = rng.standard_normal((T, d)).astype(np.float32)
        for t in range(T):
            x[t, :E] = grid[rng.permutation(E)]
        xb = onnx_models.bf16_bits(x)
        xf = onnx_models.bf16_to_f32(xb)
        logits = xf[:, :E]
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        ri = np.argsort(-p, axis=1)[:, :k].astype(np.int64)
        pk = np.take_along_axis(p, ri, 1)
        rw32 = pk / pk.sum(1, keepdims=True)
        ref = reference_np(xf, rw32, ri, onnx_models.bf16_to_f32(w_gu), onnx_models.bf16_to_f32(w_down))
        ok &= run_cpu_checks(args, paths, xb, onnx_models.bf16_bits(rw32), ri, onnx_models.bf16_bits(logits), ref)
        from peers import quant_dry

        ok &= quant_dry.run(args, tmp, w_gu, w_down, xb, onnx_models.bf16_bits(rw32), ri, onnx_models.bf16_bits(logits), xf,
                            logits, rw32, reference_np)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if importlib.util.find_spec("torch") is None:
        print("--   torch not importable here: torch side not checked")
    else:
        from peers import cpu_check

        ok &= cpu_check.run(args.triton_dir)
    rows = fake_rows()
    write_outputs(args.out, {"dry_run": True}, rows, list(SHAPES))
    for name in ("gpu_bench.json", "gpu_bench.md", "gpu_bench.png"):
        print(("ok   " if os.path.exists(os.path.join(args.out, name)) else "--   ") + f"wrote {name}")
    return 0 if ok else 1


def reference_np(x, rw32, ri, w_gu, w_down):
    import numpy as np

    f = w_down.shape[2]
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ri.shape[1]):
            h = w_gu[ri[t, j]] @ x[t]
            a = h[:f] / (1 + np.exp(-h[:f])) * h[f:]
            y[t] += rw32[t, j] * (w_down[ri[t, j]] @ a)
    return y


def run_cpu_checks(args, paths, xb, rwb, ri, lgb, ref):
    """The models on ORT's CPU EP, bound through the same bf16 IO-binding path the GPU run uses."""
    from onnx import TensorProto

    from peers import ort_session

    try:
        ort = ort_session.load_ort()
    except ImportError as e:
        print(f"--   onnxruntime not importable here ({e}): models built and checked only")
        return True
    if not os.path.exists(args.lib):
        print(f"--   no plugin at {args.lib}: ScatterMoE models built and checked only")
    import numpy as np

    def spec(a, etype):
        return a.ctypes.data, a.shape, etype

    BF, I64 = TensorProto.BFLOAT16, TensorProto.INT64
    feeds = {"ours": {"x": spec(xb, BF), "rw": spec(rwb, BF), "ri": spec(ri, I64)},
             "ours_router": {"x": spec(xb, BF)}, "ortmoe": {"x": spec(xb, BF), "logits": spec(lgb, BF)}}
    ok = True
    for name, path in paths.items():
        if name != "ortmoe" and not os.path.exists(args.lib):
            continue
        y = np.full(xb.shape, 0x7FC0, np.uint16)  # bf16 NaN: the run must write every element
        try:
            sess = ort_session.make_session(ort, path, args.lib if os.path.exists(args.lib) else None, device="cpu",
                                            profile_dir=os.path.dirname(path))
            io = ort_session.bind(sess, feeds[name], {"y": spec(y, BF)}, device="cpu")
            placement = ort_session.first_run(sess, io)
            err = float(np.abs(onnx_models.bf16_to_f32(y) - ref).max() / np.abs(ref).max())
            good = err < 3e-2
            print(("ok   " if good else "FAIL ") + f"{name} on ORT {ort.__version__} CPU EP, bf16 IO binding: "
                  f"rel err {err:.1e}, placement {placement}")
            ok &= good or name == "ortmoe"  # com.microsoft.MoE on CPU is informative only
        except Exception as e:  # noqa: BLE001
            print(("--   " if name == "ortmoe" else "FAIL ") + f"{name} on the CPU EP: {short(e)}")
            ok &= name == "ortmoe"
    return ok


def fake_rows():
    import numpy as np

    rng = np.random.default_rng(1)
    rows = []
    for shape in SHAPES:
        for T in (1, 16, 128, 1024, 4096, 16384):
            r = dict(shape=shape, tokens=T, experts_hit=8, notes={"Triton": "made-up row"}, floor=0.01 * T**0.5)
            for key, _, how in report.COLUMNS[1:]:
                if key != "Triton" and key != "Triton/graph":
                    r[key] = r["floor"] * (1.2 + rng.random()) * (1 if how == "graph" else 1.5)
                    r[key.split("/graph")[0] + "_err"] = 3e-3 * rng.random()
            rows.append(r)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", default=os.path.join(REPO, ".carry/ort/libscattermoe_ort.so"), help="libscattermoe_ort.so")
    ap.add_argument("--fatbin-dir", default=os.path.join(REPO, "target/scattermoe-kernels"))
    ap.add_argument("--triton-dir", default=os.path.join(REPO, ".carry/scattermoe"),
                    help="folder holding the scattermoe package (github.com/shawntan/scattermoe)")
    ap.add_argument("--out", default=".")
    ap.add_argument("--shapes", default="mixtral,qwen3,fine")
    ap.add_argument("--tokens", default="1,16,128,1024,4096,16384")
    ap.add_argument("--peers", default=",".join(PEERS), help="subset of " + ",".join(PEERS))
    ap.add_argument("--budget", type=float, default=0.3, help="seconds of timing per column and cell")
    ap.add_argument("--settle", type=float, default=0.3,
                    help="seconds of untimed calls of a column before each of its timed slices (timing.py)")
    ap.add_argument("--time-limit", type=float, default=360,
                    help="seconds after which no new export starts; every column stops at this + --hard-extra")
    ap.add_argument("--hard-extra", type=float, default=60)
    ap.add_argument("--dry-run", action="store_true", help="no GPU: build and check the models, render a report")
    ap.add_argument("--verbose", action="store_true", help="tracebacks of failing columns")
    ap.add_argument("--render", nargs="+", metavar="JSON",
                    help="no GPU: merge the rows of earlier runs' gpu_bench.json (a later file's cells win for the "
                         "same shape and token count) and write the tables and chart to --out")
    args = ap.parse_args()
    bad = [s for s in args.shapes.split(",") if s not in SHAPES] + [p for p in args.peers.split(",") if p not in PEERS]
    if bad:
        ap.error(f"unknown shape or peer: {', '.join(bad)}")
    os.makedirs(args.out, exist_ok=True)
    if args.render:
        return render(args)
    if args.dry_run:
        return dry_run(args)
    Bench(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
