"""Load the ScatterMoE fatbins through the CUDA driver API (ctypes, like the Rust host's cudarc)
and launch them on torch's current stream. Used by test_kernels.py and bench_forward.py."""
import ctypes
import os

import torch

CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
ROUTING_CHUNK = 4096

GLU = {"gate_up": 0, "up_gate": 1, "interleaved": 2}
# The kernel catalogue (geometry, clusters, TMA forms, activation codes, thresholds), generated from
# kernels/manifest.toml: the same table the library's driver and kernel choice read.
import choice  # noqa: E402  (the kernel choice for a 16-bit W, torch-free)
from kernel_table import (ACT, CLUSTER, F32_CFG, FULL_GRID_K, GEMM_MODULE, GROUPED_A, MODULES,  # noqa: E402
                          PLAIN_THREADS, QUANT_CFGS, QUANT_MODULE, QUANT_SKINNY_ROWS, QUANT_WGMMA_ROWS, SKINNY_ROWS,
                          SMALL_ROWS, TC_CFGS, TMA_W)
TNAME = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


class QW:
    """A quantized weight as the contract stores it (docs/op-spec.md, "Quantized expert weights"):
    fmt "fp8" | "u8" | "u4"; data uint8 [E, N, Kb] (Kb = K, or ceil(K / 2) for u4); scale [E, nbo, nbi]
    in T or float32; zero uint8 of the scale's shape or None (the format's default); block (bo, bi)
    (per output channel: (1, K)); K the logical input size."""

    def __init__(self, fmt, data, scale, zero, block, K):
        self.fmt, self.data, self.scale, self.zero, self.block, self.K = fmt, data, scale, zero, block, K

    @property
    def shape(self):
        return (self.data.shape[0], self.data.shape[1], self.K)


class CUlaunchConfig(ctypes.Structure):
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p), ("attrs", ctypes.c_void_p),
                ("numAttrs", ctypes.c_uint)]


class CUlaunchAttribute(ctypes.Structure):
    """One launch attribute: its id, then a 64-byte union of values (cuda.h)."""
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


CU_LAUNCH_ATTRIBUTE_COOPERATIVE = 2
CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6
# the decode kernel's bound on T * k (kernels/moe_decode.cu, DECODE_MAX_N)
DECODE_MAX_N = 512
DECODE_ONE_ROW_BYTES = 150 << 20  # src/cuda/forward/decode.rs


class TmaMap(ctypes.Structure):
    _align_ = 64
    _fields_ = [("words", ctypes.c_uint64 * 16)]


class Arg:
    """ctypes wrappers for kernel parameters."""

    @staticmethod
    def ptr(t):
        return ctypes.c_void_p(0 if t is None else t.data_ptr())


def _check(rc, what):
    if rc != 0:
        raise RuntimeError(f"{what} failed with CUresult {rc}")


class Kernels:
    def __init__(self, fatbin_dir):
        torch.cuda.init()
        torch.zeros(1, device="cuda")  # primary context current on this thread
        self.cu = ctypes.CDLL("libcuda.so.1")
        self.mods = {}
        self.fns = {}
        self._occ = {}
        for name in MODULES:
            self.load_module(name, os.path.join(fatbin_dir, f"{name}.fatbin"))
        props = torch.cuda.get_device_properties(0)
        self.sms = props.multi_processor_count
        # rows per expert at or below which the small-tile kernel wins (measured on H200)
        self.small_rows = int(os.environ.get("SMOE_SMALL_ROWS", str(SMALL_ROWS)))
        self.large_cfg = os.environ.get("SMOE_LARGE_CFG", "wgmma_ws" if props.major == 9 else "128x128")
        # wgmma kernels exist as SASS for sm_90a only
        # rows per expert at or below which the skinny kernel runs (16-bit W, quantized W); the
        # environment can move them (a negative value: never), for A/B runs against the mma.sync choice
        self.skinny_rows = float(os.environ.get("SMOE_SKINNY_ROWS", str(SKINNY_ROWS)))
        self.quant_skinny_rows = float(os.environ.get("SMOE_QUANT_SKINNY_ROWS", str(QUANT_SKINNY_ROWS)))
        self.quant_wgmma_rows = float(os.environ.get("SMOE_QUANT_WGMMA_ROWS", str(QUANT_WGMMA_ROWS)))
        # the per-card table of selection.rs (`Table::for_device`: the H100's, else the default);
        # SMOE_HOPPER_TMA_ROWS moves it for A/B runs
        tma_rows = choice.table_tma_rows(torch.cuda.get_device_name())
        self.hopper_tma_rows = float(os.environ.get("SMOE_HOPPER_TMA_ROWS", str(tma_rows)))
        # programmatic dependent launch, as the library launches (src/cuda/driver.rs pdl_supported:
        # sm_90 and newer); SMOE_PDL=0 turns it off for A/B runs
        self.pdl = props.major >= 9 and os.environ.get("SMOE_PDL", "1") != "0"
        self._pdl_attr = CUlaunchAttribute()
        self._pdl_attr.id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        self._pdl_attr.value[0] = 1
        # the whole op in one cooperative launch at decode (kernels/moe_decode.cu), as the
        # library chooses it; SMOE_FUSED_DECODE=0 turns it off for A/B runs, =force takes it at every
        # T * k <= DECODE_MAX_N with 16-bit W even where the skinny kernel is not the GEMMs' choice
        mode = os.environ.get("SMOE_FUSED_DECODE", "1")
        self.fused_decode = mode != "0"
        self.fused_decode_force = mode == "force"
        self._coop_no_pdl = False

    def load_module(self, name, path):
        """Loads a fatbin as module `name` (the catalogue's, or an experiment's beside them)."""
        data = open(path, "rb").read()
        buf = ctypes.create_string_buffer(data, len(data))
        mod = ctypes.c_void_p()
        _check(self.cu.cuModuleLoadData(ctypes.byref(mod), buf), f"cuModuleLoadData({name})")
        self.mods[name] = (mod, buf)

    def fn(self, module, name, dyn_smem=0):
        key = (module, name)
        if key not in self.fns:
            f = ctypes.c_void_p()
            _check(self.cu.cuModuleGetFunction(ctypes.byref(f), self.mods[module][0], name.encode()),
                   f"cuModuleGetFunction({name})")
            if dyn_smem > 0:  # static smem counts too: opt in whenever dynamic smem is used
                _check(self.cu.cuFuncSetAttribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                                  ctypes.c_int(dyn_smem)), "cuFuncSetAttribute")
            self.fns[key] = f
        return self.fns[key]

    def occupancy(self, f, threads, smem):
        key = (f.value, threads, smem)
        if key in self._occ:
            return self._occ[key]
        n = ctypes.c_int()
        _check(self.cu.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(n), f, ctypes.c_int(threads),
                                                                    ctypes.c_size_t(smem)), "occupancy")
        self._occ[key] = n.value
        return n.value

    def launch_plain(self, module, name, grid, args):
        """A kernel with a plain launch, at its block size in the catalogue."""
        self.launch(self.fn(module, name), grid, (PLAIN_THREADS[name],), 0, args)

    def launch(self, f, grid, block, smem, args, cooperative=False):
        """cooperative: every CTA resident at once (the decode kernel's grid barriers)."""
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        arr = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args])
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        if self.pdl or cooperative:
            attrs = (CUlaunchAttribute * 2)()
            n = 0
            if self.pdl and not (cooperative and self._coop_no_pdl):
                attrs[n] = self._pdl_attr
                n += 1
            if cooperative:
                attrs[n].id = CU_LAUNCH_ATTRIBUTE_COOPERATIVE
                attrs[n].value[0] = 1
                n += 1
            cfg = CUlaunchConfig(*grid, *block, smem, stream.value, ctypes.addressof(attrs), n)
            rc = self.cu.cuLaunchKernelEx(ctypes.byref(cfg), f, arr, None)
            if rc != 0 and cooperative and n == 2:
                # the driver refused the two attributes together: cooperative alone from now on
                print(f"note: cooperative launch with programmatic dependent launch refused (CUresult {rc}); "
                      "launching the decode kernel cooperative only", flush=True)
                self._coop_no_pdl = True
                return self.launch(f, grid, block, smem, args, cooperative)
            _check(rc, f"cuLaunchKernelEx (programmatic dependent launch {n - cooperative > 0}, cooperative {cooperative})")
            return
        _check(self.cu.cuLaunchKernel(f, *[ctypes.c_uint(g) for g in grid], *[ctypes.c_uint(b) for b in block],
                                      ctypes.c_uint(smem), stream, arr, None), "cuLaunchKernel")

    # ------------------------------------------------------------------ routing
    @staticmethod
    def routing_ws_bytes(T, k, E):
        nb = (T * k + ROUTING_CHUNK - 1) // ROUTING_CHUNK
        return 4 * (2 * nb * E + nb + 64)

    def alloc_routing(self, T, k, E):
        N = T * k
        dev = "cuda"
        return dict(
            ws=torch.empty(self.routing_ws_bytes(T, k, E) // 4, dtype=torch.int32, device=dev),
            offsets=torch.empty(E + 1, dtype=torch.int32, device=dev),
            sidx=torch.empty(max(N, 1), dtype=torch.int32, device=dev),
            pos=torch.empty(max(N, 1), dtype=torch.int32, device=dev),
            kept=torch.empty(max(N, 1), dtype=torch.uint8, device=dev),
            error=torch.empty(2, dtype=torch.int32, device=dev),
        )

    def routing(self, idx, E, bufs, capacity=None, capacity_order=0, kept_out=None, small=None):
        """idx: [T, k] int32/int64 on the device. capacity: int64 device tensor [1] or None.
        small: the one-block kernel (None: when the library uses it, one block and no capacity)."""
        T, k = idx.shape
        N = T * k
        sfx = "i32" if idx.dtype == torch.int32 else "i64"
        nb = (N + ROUTING_CHUNK - 1) // ROUTING_CHUNK
        orders = 2 if (capacity is not None and capacity_order == 0) else 1
        ci = ctypes.c_int
        if small is None:
            small = nb == 1 and capacity is None and kept_out is None
        if small:
            assert nb == 1 and capacity is None and kept_out is None
            self.launch_plain("routing", f"scattermoe_routing_small_{sfx}", (1,),
                              [Arg.ptr(idx), ci(N), ci(E), Arg.ptr(bufs["offsets"]), Arg.ptr(bufs["sidx"]),
                               Arg.ptr(bufs["pos"]), Arg.ptr(bufs["kept"]), Arg.ptr(bufs["error"])])
            return
        if nb > 0:
            self.launch_plain("routing", f"scattermoe_routing_count_{sfx}", (nb, orders),
                              [Arg.ptr(idx), ci(N), ci(T), ci(k), ci(E), Arg.ptr(bufs["ws"])])
        self.launch_plain("routing", "scattermoe_routing_scan", (1,),
                          [ci(N), ci(E), ci(nb), ci(orders), Arg.ptr(capacity), Arg.ptr(bufs["ws"]),
                           Arg.ptr(bufs["offsets"]), Arg.ptr(bufs["error"])])
        kdt = 0
        if kept_out is not None:
            kdt = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}[kept_out.dtype]
        if nb > 0:
            self.launch_plain("routing", f"scattermoe_routing_scatter_{sfx}", (nb, orders),
                              [Arg.ptr(idx), ci(N), ci(T), ci(k), ci(E), Arg.ptr(bufs["ws"]), Arg.ptr(bufs["offsets"]),
                               Arg.ptr(capacity), ci(capacity_order), Arg.ptr(bufs["sidx"]), Arg.ptr(bufs["pos"]),
                               Arg.ptr(bufs["kept"]), Arg.ptr(kept_out), ci(kdt)])

    # ------------------------------------------------------------------ grouped GEMM
    def pick_cfg(self, N_assign, E, K, N=None):
        """The library's choice for a 16-bit W [E, N, K] (choice.py, mirroring
        src/cuda/forward/selection.rs) with this host's thresholds: the card's table and the SMOE_*
        overrides. N None: the skinny kernel's one-row rule (it needs W's size) is left out."""
        return choice.pick_cfg(N_assign, E, K, N, hopper=self.large_cfg == "wgmma_ws", tma_rows=self.hopper_tma_rows,
                               skinny_rows=self.skinny_rows, small_rows=self.small_rows, large_cfg=self.large_cfg)

    def gemm(self, X, W, bias, Y, sidx, offsets, row_scale, k, n_assign, grouped_in, grouped_out,
             act="none", gated=0, glu_layout="gate_up", alpha=1.702, limit=7.0, cfg=None, grid=None):
        E, N, K = W.shape
        dt = X.dtype
        if dt == torch.float32:
            BM, BN, threads, smem = F32_CFG
            name = "scattermoe_gemm_f32"
        else:
            if cfg is None:
                cfg = self.pick_cfg(n_assign, E, K, N)
                if cfg == "wgmma_mc" and grouped_in:
                    cfg += "_ga"
            if cfg in GROUPED_A and (not grouped_in or K % 8 or X.data_ptr() % 16):
                cfg = cfg[: -len("_ga")]  # as the library: the _ga kernels take aligned grouped input only
            BM, BN, threads, smem = TC_CFGS[cfg]
            name = f"scattermoe_gemm_{TNAME[dt]}_{cfg}"
        c = CLUSTER.get(cfg, 1) if dt != torch.float32 else 1
        tma = dt != torch.float32 and cfg in TMA_W
        if tma and (K % 8 or W.data_ptr() % 16):
            return self.gemm(X, W, bias, Y, sidx, offsets, row_scale, k, n_assign, grouped_in, grouped_out,
                             act, gated, glu_layout, alpha, limit, "wgmma_ws", grid)
        f = self.fn("grouped_gemm" if dt == torch.float32 else GEMM_MODULE[cfg], name, smem)
        Nout = N // 2 if gated else N
        BNo = BN // 2 if gated else BN
        units = ((n_assign + BM * c - 1) // (BM * c) + min(E, n_assign)) * ((Nout + BNo - 1) // BNo)
        if grid is None and tma and K >= FULL_GRID_K:
            grid = units * c  # one CTA (pair) per unit (FULL_GRID_K)
        if grid is None:
            resident = self.resident_clusters(f, threads, smem, c) * c if c > 1 else \
                self.sms * max(1, self.occupancy(f, threads, smem))
            grid = max(c, min(units * c, resident) // c * c)
        ci, cf = ctypes.c_int, ctypes.c_float
        args = [Arg.ptr(X), Arg.ptr(W), Arg.ptr(bias), Arg.ptr(Y), Arg.ptr(sidx), Arg.ptr(offsets),
                Arg.ptr(row_scale), ci(k), ci(N), ci(K), ci(E), ci(grouped_in), ci(grouped_out),
                ci(ACT[act]), ci(gated), ci(GLU[glu_layout]), cf(alpha), cf(limit)]
        if tma:
            args.append(self.w_map(W, gated, glu_layout))
        if cfg in GROUPED_A:
            args.append(self.rows_map(X, n_assign))
        self.launch(f, (grid,), (threads,), smem, args)

    def pick_qcfg(self, N_assign, E, K, block_in=None):
        """The choice for quantized W (src/cuda/forward/selection.rs pick_quant_cfg): the skinny kernel
        up to QUANT_SKINNY_ROWS rows per expert; on sm_90a above QUANT_WGMMA_ROWS wgmma_ws's quantized
        form where its packed path takes W (K % 16 == 0, block_in a multiple of 64 or >= K; block_in
        None: one block across K); else the mma.sync tiles, with the thresholds used where there is
        no wgmma."""
        R = choice.rows_per_expert(N_assign, E)
        bi = K if block_in is None else min(block_in, K)
        if R <= self.quant_skinny_rows:
            return "skinny"
        if self.large_cfg == "wgmma_ws" and R > self.quant_wgmma_rows and K % 16 == 0 and (bi % 64 == 0 or bi >= K):
            return "wgmma_ws"
        return choice.choose(N_assign, E, K, hopper=False)

    def qgemm(self, X, q, bias, Y, sidx, offsets, row_scale, k, n_assign, grouped_in, grouped_out,
              act="none", gated=0, glu_layout="gate_up", alpha=1.702, limit=7.0, cfg=None, grid=None):
        """One grouped GEMM with quantized W (kernels/quant_gemm.cu); q: a QW."""
        E, N, K = q.shape
        dt = X.dtype
        cfg = cfg or self.pick_qcfg(n_assign, E, K, q.block[1])
        BM, BN, threads, smem = QUANT_CFGS[cfg][q.fmt]
        name = f"scattermoe_qgemm_{TNAME[dt]}_{q.fmt}_{cfg}"
        f = self.fn(QUANT_MODULE[cfg], name, smem)
        Nout = N // 2 if gated else N
        BNo = BN // 2 if gated else BN
        units = ((n_assign + BM - 1) // BM + min(E, n_assign)) * ((Nout + BNo - 1) // BNo)
        if grid is None:
            grid = max(1, min(units, self.sms * max(1, self.occupancy(f, threads, smem))))
        assert q.scale.dtype in (dt, torch.float32) and q.data.dtype == torch.uint8
        ci, cf = ctypes.c_int, ctypes.c_float
        args = [Arg.ptr(X), Arg.ptr(q.data), Arg.ptr(bias), Arg.ptr(Y), Arg.ptr(sidx), Arg.ptr(offsets),
                Arg.ptr(row_scale), ci(k), ci(N), ci(K), ci(E), ci(grouped_in), ci(grouped_out),
                ci(ACT[act]), ci(gated), ci(GLU[glu_layout]), cf(alpha), cf(limit),
                Arg.ptr(q.scale), Arg.ptr(q.zero), ci(int(q.scale.dtype == torch.float32)), ci(q.block[0]),
                ci(q.block[1])]
        self.launch(f, (grid,), (threads,), smem, args)

    def resident_clusters(self, f, threads, smem, c):
        key = ("clusters", f.value, threads, smem, c)
        if key not in self._occ:
            cfg = CUlaunchConfig((self.sms + c - 1) // c * c, 1, 1, threads, 1, 1, smem, None, None, 0)
            n = ctypes.c_int()
            _check(self.cu.cuOccupancyMaxActiveClusters(ctypes.byref(n), f, ctypes.byref(cfg)),
                   "cuOccupancyMaxActiveClusters")
            self._occ[key] = max(1, n.value)
        return self._occ[key]

    def w_map(self, W, gated, glu_layout):
        """The 4-D TMA map of W [E, N, K] the TMA kernels read (src/cuda/tensor_map.rs)."""
        E, N, K = W.shape
        row, f = 2 * K, N // 2
        if not gated:
            dims, strides, box = (K, N, 1, E), (row, row * N, row * N), (64, 128, 1, 1)
        elif glu_layout == "interleaved":
            dims, strides, box = (K, 2, f, E), (row, 2 * row, row * N), (64, 1, 128, 1)
        else:
            dims, strides, box = (K, f, 2, E), (row, row * f, row * N), (64, 128, 1, 1)
        return self._encode(W, dims, strides, box)

    def _encode(self, t, dims, strides, box):
        m = TmaMap()
        u64, u32 = ctypes.c_uint64, ctypes.c_uint32
        dtype = {torch.float16: 6, torch.bfloat16: 9}[t.dtype]
        _check(self.cu.cuTensorMapEncodeTiled(
            ctypes.byref(m), ctypes.c_int(dtype), u32(4), ctypes.c_void_p(t.data_ptr()), (u64 * 4)(*dims),
            (u64 * 3)(*strides), (u32 * 4)(*box), (u32 * 4)(1, 1, 1, 1), ctypes.c_int(0), ctypes.c_int(3),
            ctypes.c_int(3), ctypes.c_int(0)), "cuTensorMapEncodeTiled")
        return m

    def rows_map(self, X, rows):
        """The TMA map of X [rows, K] wgmma_mc_ga reads A through (src/cuda/tensor_map.rs encode_rows)."""
        K = X.shape[-1]
        row = 2 * K
        return self._encode(X, (K, rows, 1, 1), (row, row * rows, row * rows), (64, 128, 1, 1))

    # ------------------------------------------------------------------ combine
    def combine(self, O, pos, w, kept, Y, T, k, d):
        V = 16 // O.element_size()
        total = T * ((d + V - 1) // V)
        if total == 0:
            return
        ci = ctypes.c_int
        name = f"scattermoe_combine_{TNAME[O.dtype]}"
        block = PLAIN_THREADS[name]
        self.launch_plain("combine", name, ((total + block - 1) // block,),
                          [Arg.ptr(O), Arg.ptr(pos), Arg.ptr(w), Arg.ptr(kept), Arg.ptr(Y), ci(T), ci(k), ci(d)])

    # ------------------------------------------------------------------ the whole op at decode
    def use_decode(self, N, E, d, f, n, w1, w2, capacity, cfg1, cfg2, dtype):
        """As the library (src/cuda/forward/decode.rs, decode_kernel): 16-bit W or both W quantized in
        one format, no capacity, no forced configuration, 1 <= T * k <= DECODE_MAX_N, and each GEMM
        on the skinny kernel, or for 16-bit W at one row per expert with at most DECODE_ONE_ROW_BYTES
        of hit W."""
        q1, q2 = isinstance(w1, QW), isinstance(w2, QW)
        if q1 != q2 or (q1 and w1.fmt != w2.fmt):
            return False
        if q1:
            skinny = self.pick_qcfg(N, E, d, w1.block[1]) == "skinny" and self.pick_qcfg(N, E, f, w2.block[1]) == "skinny"
        else:
            def takes(nn, kd):
                one_row = N <= E and N * nn * kd * 2 <= DECODE_ONE_ROW_BYTES
                return self.pick_cfg(N, E, kd, nn) == "skinny" or one_row
            skinny = takes(n, d) and takes(d, f)
        return (self.fused_decode and dtype != torch.float32 and capacity is None and cfg1 is None and cfg2 is None
                and 0 < N <= DECODE_MAX_N and E <= 1024 and (self.fused_decode_force or skinny))

    def decode_grid(self, f_, T, k, E, d, f, n, gated):
        """CTAs of the decode kernel: the most units of its phases (the skinny kernel's bound, 8 x 32
        units), at most the CTAs resident at once (its grid barriers need them all)."""
        N = T * k
        BM, BN, threads = 8, 32, 128
        nout1, bno1 = (n // 2, BN // 2) if gated else (n, BN)
        u1 = ((N + BM - 1) // BM + min(E, N)) * ((nout1 + bno1 - 1) // bno1)
        u2 = ((N + BM - 1) // BM + min(E, N)) * ((d + BN - 1) // BN)
        V = 8
        comb = (T * ((d + V - 1) // V) + threads - 1) // threads
        resident = self.sms * max(1, self.occupancy(f_, threads, 0))
        return max(1, min(resident, max(u1, u2, comb)))

    def moe_decode(self, x, rw, ri, w1, w2, b1, b2, bufs, act="silu", gated=1, glu_layout="gate_up", alpha=1.702,
                   limit=7.0):
        T, k = ri.shape
        E, n, d = w1.shape
        f = w2.shape[2]
        quant = isinstance(w1, QW)
        name = f"scattermoe_moe_decode_{TNAME[x.dtype]}" + (f"_{w1.fmt}" if quant else "")
        fn = self.fn("moe_decode", name)
        grid = self.decode_grid(fn, T, k, E, d, f, n, gated)
        ci, cf = ctypes.c_int, ctypes.c_float
        data = (lambda w: w.data) if quant else (lambda w: w)
        args = [Arg.ptr(x), Arg.ptr(data(w1)), Arg.ptr(b1), Arg.ptr(data(w2)), Arg.ptr(b2), Arg.ptr(rw), Arg.ptr(ri),
                ci(ri.element_size()), ci(T), ci(k), ci(d), ci(f), ci(E), ci(ACT[act]), ci(gated), ci(GLU[glu_layout]),
                cf(alpha), cf(limit), Arg.ptr(bufs["H"]), Arg.ptr(bufs["O"]), Arg.ptr(bufs["Y"]), Arg.ptr(bufs["error"])]
        if quant:  # each W's scale, zero point, scale type and blocks, as qgemm passes them
            for q in (w1, w2):
                args += [Arg.ptr(q.scale), Arg.ptr(q.zero), ci(int(q.scale.dtype == torch.float32)), ci(q.block[0]),
                         ci(q.block[1])]
        self.launch(fn, (grid,), (PLAIN_THREADS[name],), 0, args, cooperative=True)

    # ------------------------------------------------------------------ full forward
    def alloc_forward(self, T, k, E, d, f, dtype):
        b = self.alloc_routing(T, k, E)
        b["H"] = torch.empty(max(T * k, 1), f, dtype=dtype, device="cuda")
        b["O"] = torch.empty(max(T * k, 1), d, dtype=dtype, device="cuda")
        b["Y"] = torch.empty(max(T, 1), d, dtype=dtype, device="cuda")
        return b

    def forward(self, x, rw, ri, w1, w2, b1, b2, bufs, act="silu", gated=1, glu_layout="gate_up",
                alpha=1.702, limit=7.0, capacity=None, capacity_order=0, cfg1=None, cfg2=None, stages=None):
        """w1, w2: T tensors, or QW (quantized; each on its own)."""
        T, k = ri.shape
        E, n, d = w1.shape
        f = w2.shape[2]
        N = T * k
        if stages is None and self.use_decode(N, E, d, f, n, w1, w2, capacity, cfg1, cfg2, x.dtype):
            self.moe_decode(x, rw, ri, w1, w2, b1, b2, bufs, act, gated, glu_layout, alpha, limit)
            return bufs["Y"][:T]
        st = stages or ("route", "g1", "g2", "comb")
        if "route" in st:
            self.routing(ri, E, bufs, capacity, capacity_order)
        if "g1" in st:
            g = self.qgemm if isinstance(w1, QW) else self.gemm
            g(x, w1, b1, bufs["H"], bufs["sidx"], bufs["offsets"], None, k, N, 0, 1, act, gated,
              glu_layout, alpha, limit, cfg=cfg1)
        if "g2" in st:
            g = self.qgemm if isinstance(w2, QW) else self.gemm
            g(bufs["H"], w2, b2, bufs["O"], bufs["sidx"], bufs["offsets"], None, k, N, 1, 1, "none", 0,
              cfg=cfg2)
        if "comb" in st:
            self.combine(bufs["O"], bufs["pos"], rw.reshape(-1), bufs["kept"] if capacity is not None else None,
                         bufs["Y"], T, k, d)
        return bufs["Y"][:T]
