"""ONNX Runtime sessions of the benchmark's models, run through IO binding on torch tensors.

Every input and output is a torch tensor on the session's device, bound by pointer: no host copy
in a timed loop. On CUDA, ORT runs on a torch stream (`user_compute_stream`) and the decode loop
runs with `disable_synchronize_execution_providers`, so that the greedy step (argmax of the logits
into the next input ids) is a torch op ordered on the same stream and nothing waits for the host
until the loop ends.

Two graph kinds:
  hf     the dynamo export (export.py): input_ids, past_key_i / past_value_i -> logits [B, 1, V],
         present_key_i / present_value_i = past + new (a Concat: the cache grows by one position per
         step, so a decode step never has the shapes of the previous one)
  genai  onnxruntime-genai's builder model: input_ids, attention_mask (and position_ids where it has them:
         its CPU float16 model), past_key_values.i.key/value ->
         logits [B, S, V] (float32, every position), present.i.key/value (GroupQueryAttention). Prefill
         runs with an empty past; decode with the past and present bound to one max-length buffer per
         layer (GroupQueryAttention's shared buffer, as onnxruntime-genai runs it) and an attention
         mask of max length: every decode step has the same shapes and addresses, which is what ORT's
         CUDA graph (enable_cuda_graph) needs.

ORT's CUDA graph: a session with enable_cuda_graph captures on its first run (that Run call runs the
graph again itself until it has captured) and from then on replays the capture for every run with the
same `gpu_graph_id` run option, without reading the run's bindings. So a graph session's prefill runs
carry gpu_graph_id -1 (never captured, never replayed), and each fixed-shape decoder its own id
(`Session.graph_options`): its first step captures that decoder's step, its bindings included.
Without this, the prefill of the first decode prompt was captured and every later "decode step" of
every batch replayed it (the graph rows came out one time for batch 1 and 16, and wrote to the
prefill's freed tensors).
"""

import os

# torch dtype name -> ONNX TensorProto element type
ETYPE = {"float32": 1, "float16": 10, "bfloat16": 16, "int64": 7, "int32": 6}
ONNX_TO_TORCH = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16", "tensor(int64)": "int64"}


def load_ort():
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* wheels torch brought
        try:
            ort.preload_dlls()
        except Exception:  # noqa: BLE001 - CPU-only builds
            pass
    ort.set_default_logger_severity(3)
    return ort


class Session:
    """One ORT session of one model file, with its IO layout read from the graph."""

    def __init__(self, ort, path, kind, device, lib=None, threads=0, graph=False, stream=None, head_dim=None, extras=(), sync=False):
        """`extras`: graph outputs (a checking copy's, probe.py) bound to host memory and read after every
        run into `extras_log`; they need `sync` (ORT waits for its run before returning)."""
        import torch

        self.torch, self.kind, self.device, self.graph, self.path = torch, kind, device, graph, path
        self.extras, self.extras_log = list(extras), []
        if self.extras and not sync:
            raise ValueError("extra outputs are read on the host after each run: open the session with sync=True")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        if lib:
            so.register_custom_ops_library(lib)
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            opts = {"device_id": 0, "arena_extend_strategy": "kSameAsRequested"}
            if stream is not None:
                opts["user_compute_stream"] = str(stream.cuda_stream)
            if graph:
                opts["enable_cuda_graph"] = "1"
            providers.insert(0, ("CUDAExecutionProvider", opts))
        self.sess = ort.InferenceSession(path, so, providers=providers)
        self._ort, self._async = ort, device == "cuda" and stream is not None and not sync
        self._graph_ids = 0
        # every run but a graph decoder's: a graph session's prefill is never captured (gpu_graph_id -1)
        self.run_options = self._options(-1 if graph else None)
        ins = {i.name: i for i in self.sess.get_inputs()}
        outs = {o.name: o for o in self.sess.get_outputs()}
        if kind == "hf":
            self.past_in = sorted((n for n in ins if n.startswith("past_")), key=_layer_order)
            self.past_out = [n.replace("past_", "present_", 1) for n in self.past_in]
        else:
            self.past_in = sorted((n for n in ins if n.startswith("past_key_values.")), key=_layer_order)
            self.past_out = [n.replace("past_key_values.", "present.", 1) for n in self.past_in]
        missing = [n for n in self.past_out if n not in outs]
        if missing:
            raise RuntimeError(f"{path}: no output {missing[0]} for input {self.past_in[0]}")
        p0 = ins[self.past_in[0]]
        self.kv_dtype = getattr(torch, ONNX_TO_TORCH[p0.type])
        self.kv_heads, self.head_dim = p0.shape[1], p0.shape[3]
        if not isinstance(self.head_dim, int):  # the builder names it kv_cache_dim: the model's head dim
            if head_dim is None:
                raise RuntimeError(f"{path}: head dim of {p0.name} is symbolic ({self.head_dim}) and none was given")
            self.head_dim = head_dim
        # the builder's CPU float16 model rotates with RotaryEmbedding nodes that take the positions as an input
        self.position_ids = "position_ids" in ins
        self.shared_kv = kind == "genai" and _has_op(path, "GroupQueryAttention")  # past and present may share a buffer
        lo = outs["logits"]
        self.logits_dtype = getattr(torch, ONNX_TO_TORCH[lo.type])
        self.vocab = lo.shape[-1]
        self.layers = len(self.past_in) // 2

    def _options(self, graph_id):
        o = self._ort.RunOptions()
        if self._async:
            o.add_run_config_entry("disable_synchronize_execution_providers", "1")
        if graph_id is not None:
            o.add_run_config_entry("gpu_graph_id", str(graph_id))
        return o

    def graph_options(self):
        """Run options of one fixed-shape decoder: on a graph session, an id of its own (its first run
        captures, the later ones replay); otherwise the session's."""
        if not self.graph:
            return self.run_options
        self._graph_ids += 1
        return self._options(self._graph_ids)

    def kv(self, batch, length):
        return self.torch.empty((batch, self.kv_heads, length, self.head_dim), dtype=self.kv_dtype, device=self.device)

    def bind(self, io, inputs, outputs):
        for name, t in inputs.items():
            _bind(io.bind_input, name, t, self.device)
        for name, t in outputs.items():
            _bind(io.bind_output, name, t, self.device)

    def io_binding(self):
        """A binding whose first outputs are the extras, on the host (ORT allocates them each run)."""
        io = self.sess.io_binding()
        for name in self.extras:
            io.bind_output(name, "cpu")
        return io

    def run(self, io, options=None):
        for name in self.extras:  # fresh host buffers each run: ORT would write into the last run's otherwise
            io.bind_output(name, "cpu")
        self.sess.run_with_iobinding(io, options or self.run_options)
        if self.extras:  # the first len(extras) bound outputs (io_binding); rebinding keeps a name's place
            outs = io.get_outputs()
            self.extras_log.append({n: outs[i].numpy().copy() for i, n in enumerate(self.extras)})

    def take_extras(self):
        out, self.extras_log = self.extras_log, []
        return out

    # ------------------------------------------------------------------ prefill (both kinds)
    def forward(self, ids, past=None, past_len=0):
        """One run on ids [B, S] after `past` (list of [B, H, P, D] tensors, or None: empty); returns
        (logits of the last position [B, V], presents [B, H, P + S, D])."""
        torch = self.torch
        B, S = ids.shape
        if past is None:
            past = [self.kv(B, 0) for _ in self.past_in]
        P = past[0].shape[2]
        ins = {"input_ids": ids}
        ins.update(dict(zip(self.past_in, past)))
        if self.kind == "genai":
            ins["attention_mask"] = torch.ones((B, P + S), dtype=torch.int64, device=self.device)
            if self.position_ids:
                ins["position_ids"] = torch.arange(P, P + S, dtype=torch.int64, device=self.device).expand(B, S).contiguous()
        presents = [self.kv(B, P + S) for _ in self.past_out]
        lS = 1 if self.kind == "hf" else S
        logits = torch.empty((B, lS, self.vocab), dtype=self.logits_dtype, device=self.device)
        io = self.io_binding()
        self.bind(io, ins, dict(zip(self.past_out, presents), logits=logits))
        self.run(io)
        return logits[:, -1], presents

    def prefill(self, ids, chunk=0):
        """The prompt in runs of at most `chunk` positions (0: one run), each after the last's presents."""
        S = ids.shape[1]
        step = chunk or S
        past = None
        for at in range(0, S, step):
            logits, past = self.forward(ids[:, at:at + step].contiguous(), past)
        return logits, past


def _bind(fn, name, t, device):
    dt = str(t.dtype).replace("torch.", "")
    ptr = t.data_ptr()
    if t.numel() == 0:
        ptr = _dummy(device, t)  # a valid address for an empty tensor (ORT reads none of it)
    fn(name, device, 0, ETYPE[dt], list(t.shape), ptr)


_DUMMIES = {}


def _dummy(device, t):
    import torch

    if device not in _DUMMIES:
        _DUMMIES[device] = torch.zeros(64, dtype=torch.float32, device=device)
    return _DUMMIES[device].data_ptr()


def _has_op(path, op):
    import onnx

    return any(n.op_type == op for n in onnx.load(path, load_external_data=False).graph.node)


def _layer_order(name):
    import re

    m = re.search(r"(\d+)", name)
    return (int(m.group(1)) if m else 0, 0 if "key" in name else 1)


class HFDecode:
    """Greedy decode on the export's graph: each step binds the last presents as the past and new
    output tensors of one more position (the cache grows; no fixed shape to capture). Also a builder
    graph without GroupQueryAttention (its CPU float16 model concatenates its cache), given the
    attention mask and positions it asks for."""

    def __init__(self, s, prompt_presents, first_ids):
        self.s, self.torch = s, s.torch
        self.prompt, self.first = prompt_presents, first_ids
        self.B = first_ids.shape[0]
        self.ids = first_ids.clone()
        self.logits = s.torch.empty((self.B, 1, s.vocab), dtype=s.logits_dtype, device=s.device)
        self.io = s.io_binding()
        self.reset()

    def reset(self):
        self.ids.copy_(self.first)
        self.past = self.prompt

    def step(self):
        s = self.s
        P = self.past[0].shape[2]
        present = [s.kv(self.B, P + 1) for _ in s.past_out]
        ins = dict(input_ids=self.ids, **dict(zip(s.past_in, self.past)))
        if s.kind == "genai":
            ins["attention_mask"] = self.torch.ones((self.B, P + 1), dtype=self.torch.int64, device=s.device)
            if s.position_ids:
                ins["position_ids"] = self.torch.full((self.B, 1), P, dtype=self.torch.int64, device=s.device)
        s.bind(self.io, ins, dict(zip(s.past_out, present), logits=self.logits))
        s.run(self.io)
        self.past = present
        self.ids.copy_(self.logits[:, -1].argmax(-1, keepdim=True))
        return self.logits[:, -1]


class GenaiDecode:
    """Greedy decode on the builder's graph with GroupQueryAttention's shared past/present buffer of
    `max_len` positions and a max-length attention mask: fixed shapes and addresses every step."""

    def __init__(self, s, prompt_presents, first_ids, max_len):
        torch = s.torch
        self.s, self.torch, self.B = s, torch, first_ids.shape[0]
        self.prompt, self.first, self.max_len = prompt_presents, first_ids, max_len
        self.L0 = prompt_presents[0].shape[2]
        if self.L0 >= max_len:
            raise ValueError(f"prompt of {self.L0} does not fit a buffer of {max_len}")
        self.kvbuf = [s.kv(self.B, max_len) for _ in s.past_in]
        self.mask = torch.zeros((self.B, max_len), dtype=torch.int64, device=s.device)
        self.ids = first_ids.clone()
        self.logits = torch.empty((self.B, 1, s.vocab), dtype=s.logits_dtype, device=s.device)
        self.io = s.io_binding()
        self.pos_ids = torch.zeros((self.B, 1), dtype=torch.int64, device=s.device)
        ins = dict(input_ids=self.ids, attention_mask=self.mask, **dict(zip(s.past_in, self.kvbuf)))
        if s.position_ids:
            ins["position_ids"] = self.pos_ids
        s.bind(self.io, ins, dict(zip(s.past_out, self.kvbuf), logits=self.logits))
        self.options = s.graph_options()  # the same bindings every step: one captured graph on a graph session
        self.reset()

    def reset(self):
        for buf, p in zip(self.kvbuf, self.prompt):
            buf[:, :, : self.L0].copy_(p)
        self.mask.zero_()
        self.mask[:, : self.L0] = 1
        self.pos = self.L0
        self.ids.copy_(self.first)

    def step(self):
        if self.pos >= self.max_len:
            raise RuntimeError(f"decode past the buffer of {self.max_len} positions")
        self.mask[:, self.pos] = 1  # the new token's position counts in the total length
        self.pos_ids.fill_(self.pos)
        self.s.run(self.io, self.options)
        self.pos += 1
        self.ids.copy_(self.logits[:, -1].argmax(-1, keepdim=True))
        return self.logits[:, -1]


def decoder(s, prompt_presents, first_ids, max_len):
    if s.kind == "hf" or not s.shared_kv:
        return HFDecode(s, prompt_presents, first_ids)
    return GenaiDecode(s, prompt_presents, first_ids, max_len)


def cuda_graph_reason(kind):
    """Why a column's decode step is not captured by ORT's CUDA graph (None when it is tried)."""
    if kind == "hf":
        return ("not capturable: the export's cache grows by a Concat each step (past P -> present P + 1), so no two "
                "decode steps have the same shapes, and ORT replays a captured graph only at the shapes and "
                "addresses it was captured with")
    return None


def env_threads():
    return int(os.environ.get("E2E_THREADS", "0"))


def not_runnable(err, ort_version, dtype):
    """The reason, in one line naming the node, why ONNX Runtime refused to load a graph (its type check:
    a bfloat16 TopK at opset 18; or no kernel for a node's types), or None for any other error."""
    import re

    msg = " ".join(str(err).split())
    m = re.search(r"Type '([^']+)' of input parameter \(([^)]*)\) of operator \(([^)]*)\) in node \(([^)]*)\) is invalid", msg)
    if m:
        typ, arg, op, node = m.groups()
        why = f"node '{node}' ({op}) takes {typ} (its input {arg}), a type ONNX Runtime's {op} does not accept, so the graph does not load"
    else:
        m = re.search(r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'", msg)
        if not m:
            return None
        op, ver, node = m.groups()
        why = f"node '{node}' ({op}, opset {ver}) has no kernel for its types in any execution provider of this session"
    hint = "; float16 runs (DTYPE=fp16)" if dtype == "bfloat16" else ""
    return f"not runnable by ONNX Runtime {ort_version} in {dtype}: {why}{hint}"
