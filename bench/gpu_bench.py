"""GPU benchmark of one MoE layer forward (bfloat16, random top-k routing): our op and kernels against the
ways the same layer runs elsewhere, in one run, one table and one chart.

Layers (peers/layers.py; d, f, E, k): mixtral (4096, 14336, 8, 2), qwen3 = Qwen3-30B-A3B (2048, 768, 128, 8),
fine = fine-grained (1024, 512, 64, 8), deepseek_v3 = DeepSeek-V3's routed experts (7168, 2048, 256, 8), all
SwiGLU without biases; gpt_oss = GPT-OSS-120B (2880, 2880, 128, 4) with biases on both projections and its
clamped SwiGLU (swiglu_oai, alpha 1.702, limit 7) over gate and up interleaved as the model stores them.
Tokens 1, 16, 128, 1024, 4096, 16384.

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
                    bytes = weights and biases of the experts hit + X + Y
  ours/ORT          one ScatterMoE node (ai.scattermoe; the layer's activation, glu_layout and biases) on
                    ORT's CUDA EP, routing weights and indices as inputs; IO binding on torch's device
                    buffers, host-timed session.run_with_iobinding (launches + kernels + ORT's end-of-run
                    stream sync). Layers whose experts exceed --shared-weights-gb (deepseek_v3) take the
                    expert weights as graph inputs bound to torch's tensors, not as initializers: the same
                    kernel work (peers/onnx_models.py says why), without ORT's own copy of 22.5 GB
  ours/ORT +router  the same node behind the router: its MatMul (GPT-OSS: + bias) and one TopKRouter node
                    (softmax, top-k, renormalise; GPT-OSS: top-k, softmax over the k): what `scattermoe
                    rewrite` makes of an exported block; input hidden states only; host-timed. With
                    --router-ops, the router as ONNX ops instead (Softmax, TopK, ReduceSum, Div, Casts: what
                    `scattermoe rewrite --keep-router` leaves)
  exported/ORT      the real Hugging Face block (MixtralSparseMoeBlock; Qwen3MoeSparseMoeBlock for qwen3
                    and fine; DeepseekV3MoE's gate and experts without its shared experts; GptOssMLP) with these
                    weights, exported by torch.onnx.export(dynamo=False) as models/generate.py does (router
                    included, per-expert loop), traced at the measured token count and exported again whenever
                    the number of experts hit changes (the graph only runs inputs hitting as many), on ORT's
                    CUDA EP (CPU EP for nodes CUDA has no kernel for: node placement is in the log and the
                    JSON); host-timed. DeepSeek-V3's block routes with its own weights (peers/hf_export.py):
                    its error is against the reference with those; its exports run only in a run of their
                    own (--peers exported: each session holds the 21 GiB of experts again), and any export
                    is skipped, saying so, when its session would not fit the free device memory. GPT-OSS's
                    bf16 export cannot be loaded by ORT (TopK over bfloat16): "-" with that reason
  ORT MoE           com.microsoft.MoE (swiglu, interleaved fc1, renormalised top-k; GPT-OSS: biases,
                    activation_alpha 1.702, activation_beta 1, swiglu_limit 7) fed the router logits, on ORT's
                    CUDA EP; host-timed. No other dtype is tried if bf16 fails.
  grouped_mm        torch: argsort + torch._grouped_mm x2 + activation + index_add_ (biases gathered per row);
                    host-timed
  Triton            ScatterMoE's Triton kernels (scatter2scatter x2 with expert_biases, github.com/shawntan/
                    scattermoe, unpacked in .carry/scattermoe): peers/triton_smoe.py; host-timed
  vLLM fused_moe    vLLM's Triton kernel fused_moe_kernel x2 with its tuned config for the shape and GPU (else its
                    default heuristic; the section "vLLM fused_moe's tile configuration" names which),
                    alignment, activation and sum in torch, from vLLM's wheel unpacked in .carry/vllm:
                    peers/vllm_moe.py says how and why; host-timed
  kernels           our fatbins (target/scattermoe-kernels) through tests/gpu/smoe_cuda.py; host-timed
                    (ctypes launches from Python); the scratch H and O are shared by the input sets
  ... (graph)       kernels, grouped_mm, Triton, vLLM captured in a CUDA graph (one forward per input set)
  fastest (host / graph)  the fastest column of each timing kind (floor excluded)
  ours/ORT / floor, kernels (graph) / floor   the two as multiples of the floor
  routing/G1/G2/comb us   device time of each part of the kernels' forward: one CUDA graph per part over
                    the input sets, event-timed like the graph columns (peers/breakdown.py)
  G1/G2 kernel      the GEMM configurations the kernels' forward ran (smoe_cuda's choice, which mirrors
                    the library's: tests/gpu/choice.py)
Quantized columns, in a table of their own (bench/peers/quant_bench.py), for the SwiGLU layers without
biases that fit (mixtral, qwen3, fine): floor fp8 / floor int4 (the floor with the quantized weight bytes),
ours fp8/ORT, ours int4/ORT, ours int8/ORT (ScatterMoE with quantized w_in / w_out), QMoE int4 / QMoE int8
(com.microsoft.QMoE with the same codes and scales), kernels fp8 / kernels int4 (host and graph); their
errors are the quantization's, against the same float32 reference of the bf16 layer.
A second table gives each column's relative error max|y - ref| / max|ref| against a float32 torch
evaluation of the same routing (input set 0). A cell is "-" when that column failed or was skipped;
the reason is printed under the tables and kept in the JSON ("notes").

--repeat-close: after a layer's rows, the rows where ours (ours/ORT among the host-timed columns, kernels
(graph) among the graph ones) and the fastest peer column are within --close (5%) of each other are timed
again, those columns only, and both passes are shown ("Repeats of the close rows").
Memory: each row keeps torch's peak allocation and the most device memory in use after any column (ORT's
included) in "mem_gb", and the log prints them: DeepSeek-V3's experts alone are 22.5 GB.

Device run (onnxruntime-gpu unpacked at /tmp/ortgpu): bench/run_gpu_bench.sh, which runs
  python3 bench/gpu_bench.py --lib LIB --fatbin-dir FATBINS --triton-dir .carry/scattermoe --out $OUT \
      --name <device>-<NAME> --no-chart <its arguments>
and writes $OUT/<device>-<NAME>.{md,json,log} (--no-chart there: `--render` draws the chart here);
bench/results/README.md gives the calls of the full table on one GPU, and how both GPUs' tables are made.
Without a GPU: `gpu_bench.py --dry-run --out DIR` (peers/dry_run.py) builds the ONNX models of toy layers,
checks them, runs them on ORT's CPU EP when onnxruntime and the plugin are there, checks the torch side on
the CPU when torch is there (peers/cpu_check.py: routing, reference, HF export in float32), and renders
the report from made-up rows.
"""
import argparse
import functools
import gc
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

from peers import breakdown, onnx_models, report  # noqa: E402  (numpy + onnx only)
from peers.layers import SHAPES  # noqa: E402
from peers.outputs import render, write_outputs  # noqa: E402,F401  (render: --render, and the tests)
from peers.quant_bench import QUANT_PEERS, QuantColumns  # noqa: E402

# The inputs of each ORT session: {model input name: key of an input set, or of the layer's weights}.
SESSION_INPUTS = {"ours": {"x": "x", "rw": "rw", "ri": "ri"}, "ours_router": {"x": "x"},
                  "ortmoe": {"x": "x", "logits": "logits"}}  # (the quantized columns: quant_bench.py)
PEERS = ("ours", "ours_router", "exported", "ortmoe", "grouped_mm", "triton", "vllm", "kernels") + QUANT_PEERS
# the peer that measures each column (for --repeat-close)
PEER_OF = {"ours/ORT": "ours", "ours/ORT+router": "ours_router", "ORT MoE": "ortmoe", "exported/ORT": "exported",
           "grouped_mm": "grouped_mm", "Triton": "triton", "vLLM": "vllm", "kernels": "kernels"}
GB = 1 << 30


class Skip(Exception):
    """A column that is not measured for a stated reason (unavailable, time budget)."""


def short(e):
    s = f"{type(e).__name__}: {e}" if not isinstance(e, Skip) else str(e)
    return " ".join(s.split())[:300]


def peer_of(key):
    return PEER_OF[key.split("/graph")[0]]


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
        self.repeating = False  # in the --repeat-close pass
        ort_peers = ("ours", "ours_router", "exported", "ortmoe", "ours_fp8", "ours_int4", "ours_int8", "qmoe_int4", "qmoe_int8")
        self.ort = self._try("ORT", ort_session.load_ort, ort_peers)
        self.kernels = self._try("kernels", self._load_kernels, ("kernels", "kernels_fp8", "kernels_int4"))
        self.triton = self._try("Triton", self._load_triton, ("triton",))
        self.vllm = self._try("vLLM", self._load_vllm, ("vllm",)) if "vllm" in self.peers else None

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

    def _load_vllm(self):
        from peers import vllm_moe

        return vllm_moe.load(self.args.vllm_dir)

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
                 numpy=np.__version__, peak_flops=peak, copy_bw=bw, shapes={n: l.to_json() for n, l in SHAPES.items()},
                 sets=self.workload.SETS, budget_s_per_cell=self.args.budget, settle_s_per_slice=self.args.settle,
                 device_memory_gb=torch.cuda.get_device_properties(0).total_memory / GB)
        if self.ort is not None:
            m["onnxruntime"] = self.ort.__version__
        try:
            import triton

            m["triton"] = triton.__version__
        except ImportError:
            pass
        if getattr(self, "vllm", None) is not None:
            m["vllm"] = self.vllm.version
        sc = os.path.join(self.args.triton_dir, "COMMIT")
        if os.path.exists(sc):
            m["scattermoe_commit"] = open(sc).read().strip()
        return m

    def device_used_gb(self):
        free, total = self.torch.cuda.mem_get_info()
        return (total - free) / GB

    # ---------------------------------------------------------------------------------- per shape
    def prepare_shape(self, shape):
        """Weights, their file, the ORT sessions, the HF block; each failure kept as a reason per peer."""
        torch, wl = self.torch, self.workload
        layer = SHAPES[shape]
        d, f, E, k = layer.dims
        st = dict(shape=shape, layer=layer, d=d, f=f, E=E, k=k, why=dict(self.global_why), placement={})
        st["w"] = wl.make_weights(layer, seed=1)
        st.update(st["w"])  # w_gu, w_down, wr, b_gu, b_down
        st["weights_as_inputs"] = layer.expert_bytes() > self.args.shared_weights_gb * GB
        st["dir"] = os.path.join(self.tmp, shape)
        os.makedirs(st["dir"])
        print(f"{shape}: {layer.describe()}; experts {layer.expert_bytes() / GB:.1f} GiB"
              + (", bound to ScatterMoE's sessions as graph inputs" if st["weights_as_inputs"] else "")
              + f"; device memory in use {self.device_used_gb():.1f} GiB", flush=True)
        if self.ort is not None and self.peers & {"ours", "ours_router", "ortmoe"}:
            try:
                self._write_onnx(st)
            except Exception as e:  # noqa: BLE001
                for p in ("ours", "ours_router", "ortmoe"):
                    st["why"].setdefault(p, f"weights file: {short(e)}")
        if "exported" in self.peers and "exported" not in st["why"]:
            from peers.hf_export import UNLOADABLE

            if layer.family in UNLOADABLE:
                st["why"]["exported"] = f"the HF block's export cannot be loaded: {UNLOADABLE[layer.family]}"
            elif st["weights_as_inputs"] and self.peers - {"exported"}:
                st["why"]["exported"] = (f"each export's session holds the {layer.expert_bytes() / GB:.0f} GiB of experts again: "
                                         "measured in a run of its own (--peers exported), beside no other column")
        if "exported" in self.peers and "exported" not in st["why"]:
            try:
                from peers import hf_export

                st["exporter"] = hf_export.Exporter(layer, st["w"], os.path.join(st["dir"], "hf"))
            except Exception as e:  # noqa: BLE001
                st["why"]["exported"] = f"HF block: {short(e)}"
        if "grouped_mm" in self.peers:
            from peers import torch_gmm

            st["gmm_w"] = torch_gmm.weights(st["w_gu"], st["w_down"])
        if self.triton is not None:
            from peers import triton_smoe

            st["triton_w"] = triton_smoe.weights(st["w_gu"], st["w_down"])
        if layer.activation != "silu" or layer.glu != "gate_up" or layer.bias or st["weights_as_inputs"]:
            for p in self.peers & set(QUANT_PEERS):  # quant_bench.py quantizes SwiGLU gate_up layers without biases
                st["why"].setdefault(p, "the quantized columns cover the SwiGLU layers without biases whose experts fit "
                                        "beside their quantized copies (mixtral, qwen3, fine)")
        self.prepare_quant(st, short)
        torch.cuda.synchronize()
        return st

    def _write_onnx(self, st):
        import numpy as np

        torch, wl, layer = self.torch, self.workload, st["layer"]

        def bits(t):
            return t.contiguous().view(torch.int16).cpu().numpy().view(np.uint16)

        def per_expert(t, fn=lambda t: t):  # (shape, chunks): a bounded host copy at a time
            return tuple(t.shape), (bits(fn(t[e:e + 1])) for e in range(t.shape[0]))

        t0 = time.time()
        want = self.peers & {"ours", "ours_router", "ortmoe"}
        tensors = {"wr_t": bits(st["wr"].t()), "wr_b": np.zeros(st["E"], np.uint16), "w_down": per_expert(st["w_down"])}
        if layer.bias:
            tensors["b_down"] = bits(st["b_down"])
        if (want & {"ours", "ours_router"} and not st["weights_as_inputs"]) or ("ortmoe" in want and layer.glu == "interleaved"):
            tensors["w_gu"] = per_expert(st["w_gu"])
            if layer.bias:
                tensors["b_gu"] = bits(st["b_gu"])
        if "ortmoe" in want and layer.glu != "interleaved":
            tensors["w_il"] = per_expert(st["w_gu"], lambda t: wl.to_interleaved(t, layer))
            if layer.bias:
                tensors["b_il"] = bits(wl.to_interleaved(st["b_gu"], layer))
        wf = onnx_models.write_weights(st["dir"], tensors)
        builders = {"ours": functools.partial(onnx_models.ours_model, weights_as_inputs=st["weights_as_inputs"]),
                    "ours_router": functools.partial(onnx_models.ours_router_model, weights_as_inputs=st["weights_as_inputs"],
                                                     router_ops=self.args.router_ops),
                    "ortmoe": onnx_models.ort_moe_model}
        for peer, build in builders.items():
            if peer not in self.peers:
                continue
            try:
                path = build(wf, os.path.join(st["dir"], f"{peer}.onnx"), layer)
                st[f"sess_{peer}"] = self.ortlib.make_session(self.ort, path, self.args.lib, profile_dir=st["dir"])
            except Exception as e:  # noqa: BLE001
                st["why"][peer] = f"session: {short(e)}"
                print(f"{st['shape']}: {peer} session failed: {short(e)}", flush=True)
        print(f"{st['shape']}: weights written and ORT sessions created in {time.time() - t0:.1f} s; device memory in use "
              f"{self.device_used_gb():.1f} GiB", flush=True)

    def session_inputs(self, st, peer):
        """{model input: key of an input set or of st["w"]}: the expert weights too when they are graph inputs."""
        inputs = dict(SESSION_INPUTS[peer])
        if peer in ("ours", "ours_router") and st["weights_as_inputs"]:
            inputs.update({n: key for n, key in onnx_models.EXPERT_INPUTS if st["w"].get(key) is not None})
        return inputs

    def close_shape(self, st):
        if st.get("exporter") is not None:
            st["exporter"].close()
        st.clear()
        gc.collect()
        self.torch.cuda.empty_cache()

    # ---------------------------------------------------------------------------------- per cell
    def cell(self, st, T, peers=None):
        """One row: every column of `peers` (default: the run's) at T tokens."""
        torch, wl = self.torch, self.workload
        peers = self.peers if peers is None else peers
        layer = st["layer"]
        torch.cuda.reset_peak_memory_stats()
        sets = wl.make_sets(T, st["d"], st["E"], st["k"], seed=1000 + T)
        n_hit = wl.experts_hit(sets[0]["ri"])
        ref = wl.reference_f32(sets[0]["x"], sets[0]["rw32"], sets[0]["ri"], st["w"], layer)
        row = dict(shape=st["shape"], tokens=T, experts_hit=n_hit, notes={},
                   floor=wl.floor_ms(T, layer, n_hit, self.peak, self.bw))
        self.quant_floors(row, st, self.peak, self.bw)
        columns = [("ours", "ours/ORT", self.col_ours), ("ours_router", "ours/ORT+router", self.col_ours_router),
                   ("ortmoe", "ORT MoE", self.col_ortmoe), ("exported", "exported/ORT", self.col_exported),
                   ("grouped_mm", "grouped_mm", self.col_grouped_mm), ("triton", "Triton", self.col_triton),
                   ("vllm", "vLLM", self.col_vllm), ("kernels", "kernels", self.col_kernels)]
        columns += [(peer, key, functools.partial(fn, peer)) for peer, key, fn in self.quant_columns()]
        self._host = []  # (key, fn) of the host-timed columns: timed together after the loop
        used = self.device_used_gb()
        for peer, key, fn in columns:
            if peer not in peers:
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
                    used = max(used, self.device_used_gb())
                except Exception as e:  # noqa: BLE001 - a sticky CUDA error: the next columns will say so
                    print(f"{st['shape']} T={T}: CUDA error after {key}: {short(e)}", flush=True)
        times, failed = self.timing.host_ms_interleaved(self._host, self.args.budget, settle_s=self.args.settle)
        row.update(times)
        for key, e in failed.items():
            row["notes"][key] = short(e)
            print(f"{st['shape']} T={T} {key} failed while timed: {short(e)}", flush=True)
        self._host = []
        row["mem_gb"] = dict(torch_peak=torch.cuda.max_memory_allocated() / GB, device_used_max=max(used, self.device_used_gb()))
        print(f"{st['shape']} T={T}: memory: torch peak {row['mem_gb']['torch_peak']:.1f} GiB allocated, device in use up to "
              f"{row['mem_gb']['device_used_max']:.1f} GiB (ORT's included)", flush=True)
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

    def bind_set(self, sess, s, inputs, output="y", view=None, ykey="y", shared=None):
        """IO binding of input set `s` to `sess`: inputs = {model input name: key of s, or of `shared` (the
        layer's weights, bound as they are)}; the output to s[ykey]."""
        view = view or (lambda t: t)
        ins = {n: self._spec(view(s[src]) if src in s else shared[src]) for n, src in inputs.items()}
        return self.ortlib.bind(sess, ins, {output: self._spec(view(s[ykey]))})

    def _ort_column(self, key, sess, sets, ref, row, inputs, output="y", view=None, first=False, ykey="y", shared=None):
        """Binds every input set, checks set 0 against the reference, host-times the cycle. With first=True
        the check run is the session's first (profiled) run: returns its node placement."""
        ios = [self.bind_set(sess, s, inputs, output, view, ykey, shared) for s in sets]
        sets[0][ykey].fill_(float("nan"))
        self.torch.cuda.synchronize()  # inputs were written on torch's stream; ORT runs on its own
        placement = self.ortlib.first_run(sess, ios[0]) if first else sess.run_with_iobinding(ios[0])
        row[key + "_err"] = self.workload.rel_err(sets[0][ykey], ref)
        runs = [lambda io=io: sess.run_with_iobinding(io) for io in ios]
        self._host.append((key, self.timing.cycle(runs)))
        return placement

    def _session_column(self, st, key, peer, sets, ref, row, inputs, ykey="y"):
        first = key not in st["placement"]
        placement = self._ort_column(key, st[f"sess_{peer}"], sets, ref, row, inputs, first=first, ykey=ykey, shared=st.get("w"))
        if first:
            st["placement"][key] = placement
            print(f"{st['shape']}: {key} node placement {placement}", flush=True)

    def col_ours(self, st, T, sets, ref, row):
        self._session_column(st, "ours/ORT", "ours", sets, ref, row, self.session_inputs(st, "ours"))

    def col_ours_router(self, st, T, sets, ref, row):
        self._session_column(st, "ours/ORT+router", "ours_router", sets, ref, row, self.session_inputs(st, "ours_router"))

    def col_ortmoe(self, st, T, sets, ref, row):
        self._session_column(st, "ORT MoE", "ortmoe", sets, ref, row, self.session_inputs(st, "ortmoe"))

    def col_exported(self, st, T, sets, ref, row):
        from peers import hf_export

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
                  f"{cur.nodes} nodes, transformers {ex.transformers_version}) and loaded in {time.time() - t0:.1f} s; "
                  f"device memory in use {self.device_used_gb():.1f} GiB", flush=True)
        row["exported_traced_tokens"], row["exported_nodes"] = cur.traced_tokens, cur.nodes
        rw = hf_export.routing_weights(st["layer"].family, sets[0]["logits"], sets[0]["ri"])
        if rw is not None:  # the block's own routing weights (DeepSeek-V3)
            ref = self.workload.reference_f32(sets[0]["x"], rw, sets[0]["ri"], st["w"], st["layer"])
            row["exported_ref"] = "the block's own routing weights"
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
        fns = [lambda s=s: torch_gmm.forward(s["x"], s["rw"], s["ri"], w1t, w2t, st["b_gu"], st["b_down"], st["layer"])
               for s in sets]
        self._torch_column("grouped_mm", fns, ref, row)

    def col_triton(self, st, T, sets, ref, row):
        from peers import triton_smoe

        w1, w2 = st["triton_w"]
        fns = [lambda s=s: triton_smoe.forward(self.triton, s["x"], s["rw"], s["ri"], w1, w2, st["b_gu"], st["b_down"],
                                               st["layer"]) for s in sets]
        self._torch_column("Triton", fns, ref, row)

    def col_vllm(self, st, T, sets, ref, row):
        from peers import vllm_moe

        # vLLM looks its config up per batch size; once per row here, so no file is read in the timed loop.
        config, source = self.vllm.config(T, st["E"], st["f"], st["d"], st["k"], self.torch.cuda.get_device_name())
        row["vllm_config"] = f"{source}: " + ", ".join(f"{k} {v}" for k, v in config.items())
        fns = [lambda s=s: vllm_moe.forward(self.vllm, s["x"], s["rw"], s["ri"], st["w_gu"], st["w_down"], st["b_gu"],
                                            st["b_down"], st["layer"], config=config) for s in sets]
        self._torch_column("vLLM", fns, ref, row)

    def col_kernels(self, st, T, sets, ref, row):
        K, torch = self.kernels, self.torch
        bufs = [K.alloc_routing(T, st["k"], st["E"]) for _ in sets]
        scratch = K.alloc_forward(T, st["k"], st["E"], st["d"], st["f"], torch.bfloat16)
        for b in bufs:  # H and O are scratch within one forward: shared by the sets (DeepSeek-V3: 2.4 GB each)
            b.update(H=scratch["H"], O=scratch["O"], Y=torch.empty(max(T, 1), st["d"], dtype=torch.bfloat16, device=st["w_gu"].device))
        fns = [lambda s=s, b=b: self.kernels_forward(st, s, b) for s, b in zip(sets, bufs)]
        self._torch_column("kernels", fns, ref, row)
        n, d, f = T * st["k"], st["d"], st["f"]
        row["kernels_cfgs"] = f"{K.pick_cfg(n, st['E'], d, 2 * f)}/{K.pick_cfg(n, st['E'], f, d)}"
        if "kernels/graph" in row and not self.repeating:  # every set's full forward has run: its buffers hold its routing
            try:
                row["kernels_parts"] = breakdown.parts_us(lambda i, stages: self.kernels_forward(st, sets[i], bufs[i], stages),
                                                          len(sets), self.timing.graph_ms, self.args.budget)
            except Exception as e:  # noqa: BLE001
                row["notes"][report.PARTS_HEADER] = short(e)
                print(f"{row['shape']} T={row['tokens']} kernels breakdown failed: {short(e)}", flush=True)

    def kernels_forward(self, st, s, bufs, stages=None):
        """One layer forward of input set `s` by our kernels alone (buffers from alloc_forward), or some
        parts of it (stages: of smoe_cuda's route, g1, g2, comb)."""
        layer = st["layer"]
        return self.kernels.forward(s["x"], s["rw"], s["ri"], st["w_gu"], st["w_down"], st["b_gu"], st["b_down"], bufs,
                                    act=layer.activation, gated=1, glu_layout=layer.glu, alpha=layer.alpha,
                                    limit=layer.limit, stages=stages)

    # ---------------------------------------------------------------------------------- the run
    def repeat_close(self, st, rows):
        """The second pass of --repeat-close over this layer's rows: the close columns timed again (the
        breakdown is not: it is device time of one column, not a race between two)."""
        self.repeating = True
        try:
            self._repeat_rows(st, rows)
        finally:
            self.repeating = False

    def _repeat_rows(self, st, rows):
        for row in rows:
            row["close"] = report.close_pairs(row, self.args.close)
            if not row["close"]:
                continue
            peers = {peer_of(k) for pair in row["close"] for k in pair[:2]}
            try:
                self.check_time(hard=True)
                again = self.cell(st, row["tokens"], peers)
            except Exception as e:  # noqa: BLE001
                row["notes"]["repeat"] = short(e)
                continue
            row["repeat"] = {k: again.get(k) for pair in row["close"] for k in pair[:2]}
            print(f"{st['shape']} T={row['tokens']} repeat of the close columns: "
                  + ", ".join(f"{k} {row[k]:.3f} -> {v:.3f}" if isinstance(v, float) else f"{k} -" for k, v in row["repeat"].items()),
                  flush=True)

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
                    mine = []
                    try:
                        for T in map(int, self.args.tokens.split(",")):
                            row = self.cell(st, T)
                            rows.append(row)
                            mine.append(row)
                            print(json.dumps(row), flush=True)
                            report.write_json(os.path.join(self.args.out, self.args.name + ".json"), meta, rows)
                        if self.args.repeat_close:
                            self.repeat_close(st, mine)
                    finally:
                        meta.setdefault("placement", {})[shape] = st.get("placement")
                        self.close_shape(st)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
            meta["elapsed_s"] = self.elapsed()
            meta["mem_gb_max"] = {k: max([r["mem_gb"][k] for r in rows if "mem_gb" in r] or [0]) for k in ("torch_peak", "device_used_max")}
            write_outputs(self.args.out, self.args.name, meta, rows, [s for s in shapes if any(r["shape"] == s for r in rows)],
                          chart=not self.args.no_chart)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", default=os.path.join(REPO, ".carry/ort/libscattermoe_ort.so"), help="libscattermoe_ort.so")
    ap.add_argument("--fatbin-dir", default=os.path.join(REPO, "target/scattermoe-kernels"))
    ap.add_argument("--vllm-dir", default=os.path.join(REPO, ".carry/vllm"),
                    help="vLLM's wheel, unpacked (its fused_moe.py and configs/): peers/vllm_moe.py")
    ap.add_argument("--triton-dir", default=os.path.join(REPO, ".carry/scattermoe"),
                    help="folder holding the scattermoe package (github.com/shawntan/scattermoe)")
    ap.add_argument("--out", default=".")
    ap.add_argument("--name", default="gpu_bench", help="stem of the output files (NAME.md, NAME.json, NAME.png)")
    ap.add_argument("--shapes", default="mixtral,qwen3,fine,deepseek_v3,gpt_oss", help="subset of " + ",".join(SHAPES))
    ap.add_argument("--tokens", default="1,16,128,1024,4096,16384")
    ap.add_argument("--peers", default=",".join(PEERS), help="subset of " + ",".join(PEERS))
    ap.add_argument("--budget", type=float, default=0.3, help="seconds of timing per column and cell")
    ap.add_argument("--settle", type=float, default=0.3,
                    help="seconds of untimed calls of a column before each of its timed slices (timing.py)")
    ap.add_argument("--time-limit", type=float, default=360,
                    help="seconds after which no new export starts; every column stops at this + --hard-extra")
    ap.add_argument("--hard-extra", type=float, default=60)
    ap.add_argument("--repeat-close", action="store_true",
                    help="after each layer, time again the rows where ours and the fastest peer are within --close")
    ap.add_argument("--close", type=float, default=0.05, help="what --repeat-close calls close (0.05: within 5%%)")
    ap.add_argument("--shared-weights-gb", type=float, default=8.0,
                    help="ScatterMoE's sessions take experts larger than this (GiB) as graph inputs bound to torch's tensors")
    ap.add_argument("--router-ops", action="store_true",
                    help="ours/ORT +router with the router as ONNX ops (as --keep-router leaves it), not TopKRouter")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: build and check the models, render a report")
    ap.add_argument("--verbose", action="store_true", help="tracebacks of failing columns")
    ap.add_argument("--no-chart", action="store_true", help="write no NAME.png (the device run: --render draws it)")
    ap.add_argument("--render", nargs="+", metavar="JSON",
                    help="no GPU: merge the rows of earlier runs' JSON (a later file's cells win for the same shape "
                         "and token count) and write the tables and chart to --out as --name")
    ap.add_argument("--render-repeats", nargs="+", metavar="JSON", default=[],
                    help="with --render: runs that timed close rows again; their cells become those rows' repeats")
    args = ap.parse_args()
    bad = [s for s in args.shapes.split(",") if s not in SHAPES] + [p for p in args.peers.split(",") if p not in PEERS]
    if bad:
        ap.error(f"unknown shape or peer: {', '.join(bad)}")
    os.makedirs(args.out, exist_ok=True)
    if args.render:
        return render(args)
    if args.dry_run:
        from peers import dry_run

        return dry_run.run(args, write_outputs, SHAPES)
    Bench(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
