"""The quantized columns of bench/gpu_bench.py (a mixin of its Bench): the same layer, the same weights
quantized (bench/peers/quant.py says how), the same input sets and routing, timed as the bf16 columns.

  floor fp8 / floor int4   workload.floor_ms with the weights of the experts hit read in fp8 (1 byte an
                           element) or int4 group 128 (0.5 byte + a bf16 scale per 128)
  ours fp8/ORT             one ScatterMoE node with fp8 w_in / w_out (per-channel float32 scales) on ORT's
                           CUDA EP; host-timed as ours/ORT
  ours int4/ORT, int8/ORT  the same with 4- / 8-bit codes, group 128 along the input, bf16 scales, the
                           default zero point (block_size [1, 128], weight_bits 4 / 8)
  QMoE int4, QMoE int8     com.microsoft.QMoE on ORT's CUDA EP with the same codes and scales, prepacked by
                           ORT's packer into its CUDA layout; fed the router logits; bfloat16, or float16
                           where the EP has no bfloat16 kernel (then noted, and timed on float16 inputs)
  kernels fp8 / int4       our quantized kernels alone (tests/gpu/smoe_cuda.py, kernels/quant_gemm.cu),
                           host-timed and replayed in a CUDA graph
Each column's error is against the float32 evaluation of the unquantized bf16 layer: for the quantized
columns it is the quantization's own error (the accuracy the issue asks for), not a check of the kernels
(tests/gpu/test_kernels.py and tests/gpu_forward.rs check those against float64 references).
"""
import os
import time

QUANT_PEERS = ("ours_fp8", "ours_int4", "ours_int8", "qmoe_int4", "qmoe_int8", "kernels_fp8", "kernels_int4")
OURS = {"ours_fp8": "fp8", "ours_int4": "int4", "ours_int8": "int8"}
QMOE = {"qmoe_int4": 4, "qmoe_int8": 8}
KERNELS = {"kernels_fp8": "fp8", "kernels_int4": "int4"}
LABEL = {"ours_fp8": "ours fp8/ORT", "ours_int4": "ours int4/ORT", "ours_int8": "ours int8/ORT", "qmoe_int4": "QMoE int4",
         "qmoe_int8": "QMoE int8", "kernels_fp8": "kernels fp8", "kernels_int4": "kernels int4"}
FLOORS = ("fp8", "int4")


class QuantColumns:
    """Needs of the host class: torch, peers, args (lib), ortlib, ort, kernels, workload, _session_column,
    _ort_column, _torch_column, short()."""

    def _formats(self, st):
        want = {p for p in self.peers & set(QUANT_PEERS) if p not in st["why"]}  # a layer may rule them out
        fmts = {OURS[p] for p in want if p in OURS} | {KERNELS[p] for p in want if p in KERNELS}
        fmts |= {f"int{QMOE[p]}" for p in want if p in QMOE}
        return want, fmts

    def prepare_quant(self, st, short):
        """Quantize the shape's weights, write them, make the sessions; a failure is kept per column."""
        want, fmts = self._formats(st)
        if not want:
            return
        t0 = time.time()
        try:
            st["q"] = {fmt: self._quantize(st, fmt) for fmt in sorted(fmts)}
        except Exception as e:  # noqa: BLE001
            for p in want:
                st["why"].setdefault(p, f"quantization: {short(e)}")
            return
        if want & set(KERNELS) and self.kernels is not None:
            st["kq"] = {fmt: self._kernel_weights(st, fmt) for fmt in fmts if fmt in KERNELS.values()}
        if self.ort is not None and want & (set(OURS) | set(QMOE)):
            try:
                self._write_quant_onnx(st, want, short)
            except Exception as e:  # noqa: BLE001
                for p in want & (set(OURS) | set(QMOE)):
                    st["why"].setdefault(p, f"quantized weights file: {short(e)}")
        self.torch.cuda.synchronize()
        print(f"{st['shape']}: weights quantized ({', '.join(sorted(fmts))}), written, sessions made in {time.time() - t0:.1f} s",
              flush=True)

    def _quantize(self, st, fmt):
        """{"in": (codes, scales), "out": (codes, scales)} on the device, expert by expert (bounded memory)."""
        from peers import quant

        torch = self.torch

        def per_expert(fn, w):
            parts = [fn(w[e:e + 1]) for e in range(w.shape[0])]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

        if fmt == "fp8":
            fn = quant.quantize_fp8
        else:
            bits = 4 if fmt == "int4" else 8
            fn = lambda w: quant.quantize_int(w, bits)  # noqa: E731
        return {"in": per_expert(fn, st["w_gu"]), "out": per_expert(fn, st["w_down"])}

    def _kernel_weights(self, st, fmt):
        """The two QW (tests/gpu/smoe_cuda.py) our kernels read: fp8 per channel (float32 scales), int4
        group 128 (bf16 scales, default zero point)."""
        from peers import quant
        from smoe_cuda import QW

        d, f = st["d"], st["f"]
        out = []
        for which, K in (("in", d), ("out", f)):
            codes, s = st["q"][fmt][which]
            if fmt == "fp8":
                out.append(QW("fp8", codes, s, None, (1, K), K))
            else:
                out.append(QW("u4" if fmt == "int4" else "u8", codes, s.to(self.torch.bfloat16).contiguous(), None, (1, quant.BLOCK), K))
        return tuple(out)

    def _write_quant_onnx(self, st, want, short):
        import numpy as np

        from peers import onnx_models, quant

        torch, wl = self.torch, self.workload
        d, E, k = st["d"], st["E"], st["k"]
        wf = onnx_models.WeightFile(st["dir"], "qweights.bin")

        def bits16(t):
            return t.contiguous().view(torch.int16).cpu().numpy().view(np.uint16)

        def u8(t):
            return t.contiguous().cpu().numpy()

        for peer, fmt in OURS.items():
            if peer not in want:
                continue
            for which in ("in", "out"):
                codes, s = st["q"][fmt][which]
                wf.add(f"q_{fmt}_{which}", u8(codes), onnx_models.FP8 if fmt == "fp8" else onnx_models.UINT8)
                if fmt == "fp8":
                    wf.add(f"q_{fmt}_{which}_s", s.float().cpu().numpy(), onnx_models.TensorProto.FLOAT)
                else:
                    wf.add(f"q_{fmt}_{which}_s", bits16(s.to(torch.bfloat16)))
        for peer, bits in QMOE.items():
            if peer not in want:
                continue
            fmt = f"int{bits}"
            (c1, s1), (c2, s2) = st["q"][fmt]["in"], st["q"][fmt]["out"]
            c1, s1 = wl.interleave(c1), wl.interleave(s1)  # rows 2i gate i, 2i + 1 up i (swiglu_fusion = 1)
            wf.add(f"qmoe{bits}_fc1", u8(quant.prepack_qmoe(c1, d, bits)), onnx_models.UINT8)
            wf.add(f"qmoe{bits}_fc2", u8(quant.prepack_qmoe(c2, st["f"], bits)), onnx_models.UINT8)
            for key, s in (("fc1_s", s1), ("fc2_s", s2)):
                wf.add(f"qmoe{bits}_{key}", bits16(s.to(torch.bfloat16)))
                wf.add(f"qmoe{bits}_{key}16", s.to(torch.float16).cpu().numpy(), onnx_models.TensorProto.FLOAT16)
        wf.close()
        for peer in sorted(want & (set(OURS) | set(QMOE))):
            try:
                if peer in OURS:
                    path = onnx_models.ours_quant_model(wf, os.path.join(st["dir"], f"{peer}.onnx"), k, OURS[peer], d)
                    st[f"sess_{peer}"] = self.ortlib.make_session(self.ort, path, self.args.lib, profile_dir=st["dir"])
                else:
                    st[f"sess_{peer}"] = self._qmoe_session(st, wf, peer, short)
            except Exception as e:  # noqa: BLE001
                st["why"][peer] = f"session: {short(e)}"
                print(f"{st['shape']}: {peer} session failed: {short(e)}", flush=True)

    def _qmoe_session(self, st, wf, peer, short):
        """bfloat16 first; float16 when ORT's CUDA EP has no bfloat16 QMoE (noted in the row)."""
        from peers import onnx_models, quant

        bits, d, E, k = QMOE[peer], st["d"], st["E"], st["k"]
        path = os.path.join(st["dir"], f"{peer}.onnx")
        try:
            onnx_models.qmoe_model(wf, path, k, bits, d, E, quant.BLOCK)
            return self.ortlib.make_session(self.ort, path, profile_dir=st["dir"])
        except Exception as e:  # noqa: BLE001
            st[f"{peer}_fp16"] = f"bfloat16 refused ({short(e)[:120]}): float16"
            print(f"{st['shape']}: {peer} in bfloat16 refused, trying float16: {short(e)}", flush=True)
        path16 = os.path.join(st["dir"], f"{peer}_fp16.onnx")
        onnx_models.qmoe_model(_Fp16Scales(wf), path16, k, bits, d, E, quant.BLOCK, elem=onnx_models.TensorProto.FLOAT16)
        return self.ortlib.make_session(self.ort, path16, profile_dir=st["dir"])

    def quant_columns(self):
        cols = [(p, LABEL[p], self._col_ours) for p in OURS] + [(p, LABEL[p], self._col_qmoe) for p in QMOE]
        return cols + [(p, LABEL[p], self._col_kernels) for p in KERNELS]

    def quant_floors(self, row, st, peak, bw):
        from peers import quant

        if self._formats(st)[0]:
            for fmt in FLOORS:
                row[f"floor {fmt}"] = quant.floor_ms(row["tokens"], st["d"], st["f"], st["k"], row["experts_hit"], peak, bw, fmt)

    def _col_ours(self, peer, st, T, sets, ref, row):
        self._session_column(st, LABEL[peer], peer, sets, ref, row, {"x": "x", "rw": "rw", "ri": "ri"})

    def _col_qmoe(self, peer, st, T, sets, ref, row):
        if st.get(f"{peer}_fp16"):
            row["notes"][LABEL[peer] + " dtype"] = st[f"{peer}_fp16"]
            for s in sets:
                s.setdefault("x16", s["x"].half())
                s.setdefault("logits16", s["logits"].half())
                s.setdefault("y16", s["y"].half())
            self._session_column(st, LABEL[peer], peer, sets, ref, row, {"x": "x16", "logits": "logits16"}, ykey="y16")
        else:
            self._session_column(st, LABEL[peer], peer, sets, ref, row, {"x": "x", "logits": "logits"})

    def _col_kernels(self, peer, st, T, sets, ref, row):
        K, torch = self.kernels, self.torch
        if "kq" not in st or KERNELS[peer] not in st["kq"]:
            raise RuntimeError("no quantized weights for the kernels")
        q1, q2 = st["kq"][KERNELS[peer]]
        bufs = [K.alloc_forward(T, st["k"], st["E"], st["d"], st["f"], torch.bfloat16) for _ in sets]
        fns = [lambda s=s, b=b: K.forward(s["x"], s["rw"], s["ri"], q1, q2, None, None, b, act="silu", gated=1,
                                          glu_layout="gate_up") for s, b in zip(sets, bufs)]
        self._torch_column(LABEL[peer], fns, ref, row)


class _Fp16Scales:
    """A WeightFile view whose QMoE scale keys name the float16 copies (key + "16")."""

    def __init__(self, wf):
        self.wf = wf

    def tensor(self, key, name=None):
        return self.wf.tensor(key + "16" if key.endswith("_s") else key, name)

    def dims(self, key):
        return self.wf.dims(key)
