#!/usr/bin/env python3
"""Structured mutation fuzzing of `scattermoe rewrite`: ONNX-level mutations of the fixtures in
models/ (dims, dtypes, attributes, initializer values, node deletion, rewiring), each mutant run
through the CLI. Every run must end in exit 0, a clean error (exit 1 with an `error:` line) or exit 3 (no MoE
layer replaced, nothing written)
within the time limit; a signal, a panic (101), an abort (134) or a hang is a crash. Every
successful rewrite is compared against its mutant in ONNX Runtime (CPU, with the plugin) at
several token counts, on random inputs: a mismatch beyond the output type's tolerance, or a
rewritten model failing where the mutant runs, is a wrong output.

    .venv/bin/python fuzz/mutate_cli.py --runs 20000 --seed 1 [--jobs 2] [--time-limit 60]

Exits non-zero on any crash, hang or wrong output; prints the counts. Needs numpy, onnx and
onnxruntime (the project's .venv) and a built target/release/{scattermoe,libscattermoe_ort.so}.
"""

from __future__ import annotations

import argparse
import warnings
import collections
import multiprocessing as mp
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
from scattermoe_testing import ort_utils  # noqa: E402

TOL = {TensorProto.FLOAT: 1e-4, TensorProto.FLOAT16: 1e-2, TensorProto.BFLOAT16: 3e-2}
LENGTHS = (1, 5, 16)
FLOAT_TYPES = [TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16]
INT_TYPES = [TensorProto.INT64, TensorProto.INT32, TensorProto.INT8, TensorProto.UINT8, TensorProto.BOOL]


# ---------------------------------------------------------------------------------------------
# mutations: each edits the model in place and returns a short description
# ---------------------------------------------------------------------------------------------


def _pick(rng, seq):
    return seq[rng.randrange(len(seq))] if seq else None


def m_init_dims(m, rng):
    t = _pick(rng, list(m.graph.initializer))
    if t is None or not t.dims:
        return None
    i = rng.randrange(len(t.dims))
    choice = rng.choice(["+1", "-1", "0", "x2", "swap", "drop", "add1", "neg", "huge"])
    d = list(t.dims)
    if choice == "+1":
        d[i] += 1
    elif choice == "-1":
        d[i] -= 1
    elif choice == "0":
        d[i] = 0
    elif choice == "x2":
        d[i] *= 2
    elif choice == "swap" and len(d) > 1:
        j = rng.randrange(len(d))
        d[i], d[j] = d[j], d[i]
    elif choice == "drop":
        d.pop(i)
    elif choice == "add1":
        d.insert(i, 1)
    elif choice == "neg":
        d[i] = -d[i] - 1
    elif choice == "huge":
        d[i] = rng.choice([2**31, 2**40, 2**61, 2**63 - 1])
    del t.dims[:]
    t.dims.extend(d)
    return f"dims {t.name} {choice}"


def m_reshape_init(m, rng):
    """Same elements, another consistent shape (a transposed-looking weight)."""
    t = _pick(rng, [t for t in m.graph.initializer if len(t.dims) >= 2])
    if t is None:
        return None
    a = numpy_helper.to_array(t)
    axes = list(range(a.ndim))
    rng.shuffle(axes)
    b = np.ascontiguousarray(np.transpose(a, axes))
    t.CopyFrom(numpy_helper.from_array(b, t.name))
    return f"transpose {t.name} {axes}"


def m_init_dtype(m, rng):
    t = _pick(rng, list(m.graph.initializer))
    if t is None:
        return None
    a = numpy_helper.to_array(t)
    if rng.random() < 0.5:
        # consistent re-encoding into another type
        to = _pick(rng, FLOAT_TYPES + INT_TYPES)
        if to == TensorProto.BFLOAT16:
            return None
        np_t = helper.tensor_dtype_to_np_dtype(to)
        t.CopyFrom(numpy_helper.from_array(a.astype(np_t), t.name))
        return f"retype {t.name} {to}"
    # only the type code changes: the byte count no longer matches (or silently does)
    t.data_type = _pick(rng, FLOAT_TYPES + INT_TYPES + [TensorProto.STRING, TensorProto.COMPLEX64, 0, 99])
    return f"dtype code {t.name} {t.data_type}"


def m_init_values(m, rng):
    t = _pick(rng, [t for t in m.graph.initializer if helper.tensor_dtype_to_np_dtype(t.data_type).kind in "fiub"])
    if t is None:
        return None
    a = numpy_helper.to_array(t).copy()
    if a.size == 0:
        return None
    flat = a.reshape(-1)
    i = rng.randrange(flat.size)
    if a.dtype.kind == "f":
        flat[i] = rng.choice([0.0, -flat[i], flat[i] * 3, np.inf, np.nan, 1e30])
    elif a.dtype.kind == "b":
        flat[i] = not flat[i]
    else:
        info = np.iinfo(a.dtype)
        flat[i] = rng.choice([0, 1, -1 if info.min < 0 else 0, int(flat[i]) + 1, int(flat[i]) - 1 if flat[i] > info.min else 0,
                              info.max, info.min])
    t.CopyFrom(numpy_helper.from_array(a, t.name))
    return f"value {t.name}[{i}]"


def m_truncate_raw(m, rng):
    t = _pick(rng, [t for t in m.graph.initializer if t.raw_data])
    if t is None:
        return None
    t.raw_data = t.raw_data[: rng.randrange(len(t.raw_data))]
    return f"truncate {t.name}"


def m_attribute(m, rng):
    n = _pick(rng, [n for n in m.graph.node if n.attribute])
    if n is None:
        return None
    a = _pick(rng, list(n.attribute))
    kind = rng.choice(["int", "float", "string", "ints", "drop", "perturb", "unknown"])
    if kind == "drop":
        n.attribute.remove(a)
        return f"attr drop {n.op_type}.{a.name}"
    if kind == "unknown":
        n.attribute.append(helper.make_attribute("fuzz_unknown", rng.randrange(5)))
        return f"attr unknown {n.op_type}"
    if kind == "perturb":
        if a.type == onnx.AttributeProto.INT:
            a.i = rng.choice([a.i + 1, a.i - 1, 0, -1, 2**40, -(2**62)])
        elif a.type == onnx.AttributeProto.FLOAT:
            a.f = rng.choice([0.0, -a.f, a.f * 2, float("inf"), float("nan")])
        elif a.type == onnx.AttributeProto.INTS and a.ints:
            j = rng.randrange(len(a.ints))
            a.ints[j] = rng.choice([a.ints[j] + 1, -a.ints[j], 0, 2**40])
        elif a.type == onnx.AttributeProto.STRING:
            a.s = rng.choice([b"", b"bogus", a.s[::-1]])
        else:
            return None
        return f"attr perturb {n.op_type}.{a.name}"
    value = {"int": rng.randrange(-2, 4), "float": 0.5, "string": "x", "ints": [1, -1]}[kind]
    new = helper.make_attribute(a.name, value)
    n.attribute.remove(a)
    n.attribute.append(new)
    return f"attr retype {n.op_type}.{a.name} {kind}"


def m_delete_node(m, rng):
    if not m.graph.node:
        return None
    i = rng.randrange(len(m.graph.node))
    n = m.graph.node[i]
    del m.graph.node[i]
    return f"delete {n.op_type} {n.name}"


def _values(m):
    vals = [i.name for i in m.graph.input] + [t.name for t in m.graph.initializer]
    for n in m.graph.node:
        vals.extend(o for o in n.output if o)
    return vals


def m_rewire(m, rng):
    n = _pick(rng, [n for n in m.graph.node if n.input])
    if n is None:
        return None
    j = rng.randrange(len(n.input))
    # a value defined before the node (keeps the graph acyclic most of the time), or any value
    idx = list(m.graph.node).index(n)
    before = [i.name for i in m.graph.input] + [t.name for t in m.graph.initializer]
    for p in m.graph.node[:idx]:
        before.extend(o for o in p.output if o)
    pool = before if rng.random() < 0.8 else _values(m)
    v = _pick(rng, pool)
    if v is None:
        return None
    n.input[j] = v
    return f"rewire {n.op_type}.in{j} <- {v}"


def m_swap_inputs(m, rng):
    n = _pick(rng, [n for n in m.graph.node if len(n.input) >= 2])
    if n is None:
        return None
    a, b = rng.sample(range(len(n.input)), 2)
    n.input[a], n.input[b] = n.input[b], n.input[a]
    return f"swap {n.op_type} in{a}<->in{b}"


def m_input_shape(m, rng):
    i = _pick(rng, list(m.graph.input))
    if i is None or not i.type.tensor_type.HasField("shape"):
        return None
    dims = i.type.tensor_type.shape.dim
    if not dims:
        return None
    d = dims[rng.randrange(len(dims))]
    c = rng.choice(["static", "symbolic", "clear"])
    if c == "static":
        d.dim_value = rng.choice([1, 2, 7, 16])
    elif c == "symbolic":
        d.dim_param = rng.choice(["T", "batch", "x"])
    else:
        d.Clear()
    return f"input shape {i.name} {c}"


def m_input_type(m, rng):
    i = _pick(rng, list(m.graph.input))
    if i is None:
        return None
    i.type.tensor_type.elem_type = _pick(rng, FLOAT_TYPES + [TensorProto.INT64])
    return f"input type {i.name} {i.type.tensor_type.elem_type}"


def m_opset(m, rng):
    o = _pick(rng, list(m.opset_import))
    if o is None:
        return None
    o.version = rng.choice([1, 7, 13, 17, 18, 21, 99])
    return f"opset {o.domain or 'ai.onnx'} {o.version}"


def m_graph_output(m, rng):
    if rng.random() < 0.5 and m.graph.output:
        del m.graph.output[rng.randrange(len(m.graph.output))]
        return "drop graph output"
    v = _pick(rng, _values(m))
    if v is None:
        return None
    m.graph.output.append(helper.make_empty_tensor_value_info(v))
    return f"add graph output {v}"


MUTATIONS = [m_init_dims, m_reshape_init, m_init_dtype, m_init_values, m_truncate_raw, m_attribute, m_delete_node,
             m_rewire, m_swap_inputs, m_input_shape, m_input_type, m_opset, m_graph_output]
# value-level mutations keep more mutants rewritable (and so compared in ORT)
WEIGHTS = [3, 1, 2, 6, 1, 4, 3, 3, 2, 2, 1, 1, 1]


# ---------------------------------------------------------------------------------------------
# comparison in ONNX Runtime
# ---------------------------------------------------------------------------------------------


def _np_type(elem):
    return {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64,
            TensorProto.INT64: np.int64, TensorProto.INT32: np.int32}.get(elem)


def _feeds(sess_inputs, tokens, seed):
    rng = np.random.default_rng(seed)
    out = {}
    casts = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32}
    for i in sess_inputs:
        t = casts.get(i.type)
        if t is None:
            return None
        shape = [d if isinstance(d, int) and d >= 0 else tokens for d in i.shape]
        if np.issubdtype(t, np.integer):
            out[i.name] = rng.integers(0, 2, size=shape).astype(t)
        else:
            out[i.name] = rng.standard_normal(shape).astype(t)
    return out


def compare(mutant: Path, rewritten: Path, lib: str, out_elem: int):
    """'equal', 'mutant-fails' (nothing to compare), or a description of the wrong output."""
    import onnxruntime as ort

    # a mutant on which ONNX Runtime's loader aborts the process (rather than refusing it) would
    # take this worker down with it: it is a mutant ONNX Runtime cannot load
    if ort_utils.aborts_onnx_runtime(onnx.load(str(mutant), load_external_data=False)):
        return "mutant-fails"

    def sess(p):
        so = ort.SessionOptions()
        so.log_severity_level = 4
        so.intra_op_num_threads = 1
        so.register_custom_ops_library(lib)
        return ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])

    try:
        so = sess(mutant)
    except Exception:  # noqa: BLE001 - a mutant ORT refuses is not a reference
        return "mutant-fails"
    try:
        sr = sess(rewritten)
    except Exception as e:  # noqa: BLE001
        return f"rewritten model does not load while the mutant does: {str(e).splitlines()[0][:300]}"
    tol = TOL.get(out_elem, 1e-4)
    compared = 0
    for tokens in LENGTHS:
        for seed in range(4):
            f = _feeds(so.get_inputs(), tokens, seed)
            if f is None:
                return "mutant-fails"
            try:
                a = so.run(None, f)
            except Exception:  # noqa: BLE001 - the mutant cannot run these inputs; try others
                continue
            try:
                b = sr.run(None, {k: v for k, v in f.items() if k in {i.name for i in sr.get_inputs()}})
            except Exception as e:  # noqa: BLE001
                return f"rewritten fails at {tokens} tokens where the mutant runs: {str(e).splitlines()[0][:300]}"
            if len(a) != len(b):
                return f"output count differs ({len(a)} vs {len(b)})"
            for x, y in zip(a, b):
                x = np.asarray(x)
                y = np.asarray(y)
                if x.shape != y.shape:
                    return f"output shape differs at {tokens} tokens: {x.shape} vs {y.shape}"
                if x.dtype.kind in "fc":
                    xf, yf = x.astype(np.float64), y.astype(np.float64)
                    # Where the mutant's output is inf or NaN it defines nothing to match: which of
                    # the two a sum ends in depends on its order (inf + -inf), and a dense original
                    # multiplies every expert's output, inf included, by a routing weight of 0,
                    # which the scattered op never computes. Where the mutant is finite, the
                    # rewritten model must be finite and close.
                    fin = np.isfinite(xf)
                    if not np.isfinite(yf[fin]).all():
                        return f"non-finite output where the mutant is finite at {tokens} tokens"
                    den = max(np.abs(xf[fin]).max(initial=0.0), 1e-30)
                    err = np.abs(xf[fin] - yf[fin]).max(initial=0.0) / den
                    if err > tol:
                        return f"rel err {err:.3g} > {tol} at {tokens} tokens (seed {seed})"
                elif not np.array_equal(x, y):
                    return f"integer output differs at {tokens} tokens"
            compared += 1
            break
    return "equal" if compared else "mutant-fails"


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


# --only: the mutant is also written to the current folder (set before the workers fork)
KEEP = False


def one(args):
    i, seed, fixtures, exe, lib, time_limit, workdir = args
    rng = random.Random(seed * 1_000_003 + i)
    name = rng.choice(sorted(fixtures))
    m = onnx.ModelProto()
    m.ParseFromString(fixtures[name])
    applied = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        f = rng.choices(MUTATIONS, WEIGHTS)[0]
        try:
            d = f(m, rng)
        except Exception:  # noqa: BLE001 - a mutation that cannot apply to this model
            d = None
        if d:
            applied.append(d)
    if KEEP:
        Path(f"mutant-{seed}-{i}.onnx").write_bytes(m.SerializeToString())
        print(f"mutant-{seed}-{i}.onnx: {name} {applied}", file=sys.stderr)
    d = Path(workdir) / f"r{i}"
    d.mkdir()
    res = _one(i, name, m, applied, d, exe, lib, time_limit)
    # the run's index: `--seed S --only I` builds the same mutant again
    return (*res, i) if res[0] in ("crash", "hang", "wrong") else res


def _one(i, name, m, applied, d, exe, lib, time_limit):
    try:
        src = d / "in.onnx"
        src.write_bytes(m.SerializeToString())
        out = d / "out.onnx"
        t0 = time.time()
        try:
            p = subprocess.run([exe, "rewrite", str(src), str(out)], capture_output=True, timeout=time_limit)
        except subprocess.TimeoutExpired:
            return ("hang", name, applied, f"no exit after {time_limit} s")
        dt = time.time() - t0
        err = p.stderr.decode(errors="replace")
        if p.returncode == 3:
            # no MoE layer replaced: documented exit status; nothing may be written
            if out.exists() or any(".tmp" in x.name for x in d.iterdir()):
                return ("wrong", name, applied, "exit 3 (nothing replaced) left output or temporaries")
            return ("unchanged", name, applied, dt)
        if p.returncode not in (0, 1):
            return ("crash", name, applied, f"exit {p.returncode}: {err[-500:]}")
        if p.returncode == 1:
            if "error:" not in err:
                return ("crash", name, applied, f"exit 1 without an error line: {err[-300:]}")
            if out.exists() or any(".tmp" in x.name for x in d.iterdir()):
                return ("wrong", name, applied, "failed rewrite left output or temporaries")
            return ("refused", name, applied, dt)
        if "0 MoE layers replaced" in err:
            return ("unchanged", name, applied, dt)
        out_elem = m.graph.output[0].type.tensor_type.elem_type if m.graph.output else TensorProto.FLOAT
        r = compare(src, out, lib, out_elem)
        if r == "equal":
            return ("equal", name, applied, dt)
        if r == "mutant-fails":
            return ("mutant-fails", name, applied, dt)
        return ("wrong", name, applied, r)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main():
    warnings.simplefilter("ignore", RuntimeWarning)  # overflowing casts are mutations on purpose
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=None, help="stop starting runs after this long")
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--exe", default=str(REPO / "target/release/scattermoe"))
    ap.add_argument("--only", type=int, default=None, help="run only this run index (to reproduce a finding; writes its mutant to the current folder)")
    ap.add_argument("--lib", default=os.environ.get("SCATTERMOE_ORT_LIB") or str(REPO / "target/release/libscattermoe_ort.so"))
    a = ap.parse_args()
    global KEEP
    KEEP = a.only is not None
    fixtures = {p.stem: p.read_bytes() for p in sorted((REPO / "models").glob("*.onnx"))}
    counts = collections.Counter()
    bad = []
    t0 = time.time()
    os.environ.setdefault("SCATTERMOE_ORT_LIB", a.lib)
    with tempfile.TemporaryDirectory(prefix="scattermoe-mutate-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as wd:
        runs = [a.only] if a.only is not None else range(a.runs)
        work = ((i, a.seed, fixtures, a.exe, a.lib, a.time_limit, wd) for i in runs)
        with mp.Pool(a.jobs) as pool:
            results = pool.imap_unordered(one, work)  # chunksize 1: the iterator then takes a timeout
            while True:
                # A worker stuck outside the CLI's own time limit (in ONNX Runtime, comparing a
                # mutant) would block the run for ever: no result for this long is a hang.
                try:
                    res = results.next(timeout=4 * a.time_limit + 60)
                except StopIteration:
                    break
                except mp.TimeoutError:
                    counts["hang"] += 1
                    bad.append(("hang", "?", [], "no result from any worker"))
                    print(f"HANG: no result from any worker for {4 * a.time_limit + 60:.0f} s; stopping", file=sys.stderr, flush=True)
                    pool.terminate()
                    break
                counts[res[0]] += 1
                if res[0] in ("crash", "hang", "wrong"):
                    bad.append(res)
                    print(f"{res[0].upper()}: {res[1]} {res[2]}: {res[3]}", file=sys.stderr, flush=True)
                    if len(res) > 4:
                        print(f"  reproduce: fuzz/mutate_cli.py --seed {a.seed} --only {res[4]}", file=sys.stderr, flush=True)
                n = sum(counts.values())
                if n % 500 == 0:
                    print(f"{n} runs, {time.time() - t0:.0f} s: {dict(counts)}", file=sys.stderr, flush=True)
                if a.seconds is not None and time.time() - t0 > a.seconds:
                    pool.terminate()
                    break
    n = sum(counts.values())
    print(f"seed {a.seed}: {n} CLI runs in {time.time() - t0:.0f} s: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"crashes {counts['crash']}, hangs {counts['hang']}, wrong outputs {counts['wrong']}, "
          f"rewrites compared equal in ORT {counts['equal']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
