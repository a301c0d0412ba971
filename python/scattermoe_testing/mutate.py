"""Mutation harness for the rewriter: single-node mutations of the fixtures under models/, each
rewritten by the CLI and checked against the mutant's own outputs in ONNX Runtime.

Every mutant must end one of these ways:
  rewritten-matching  the rewritten model matches the mutant at every token count the mutant runs at
  left                the rewriter replaced nothing (with the reason in its report, or no candidate)
  wrong               the rewritten model fails to load or run, or differs from the mutant: a silent wrong rewrite
  load-failure        the mutant itself does not run in ONNX Runtime at any token count (not a test case)

For speed each mutant is rewritten first without proof: a mutant left then is left with proof too
(the proof only removes candidates). A mutant rewritten without proof is checked (that count is
what proof has to catch: `wrong_without_proof`) and then rewritten again with proof and checked.

  .venv/bin/python python/scattermoe_testing/mutate.py                 # every mutant of every fixture
  .venv/bin/python python/scattermoe_testing/mutate.py --sample 40 --seed 1
  .venv/bin/python python/scattermoe_testing/mutate.py --fixtures mixtral,gpt_oss --jsonl run.jsonl

The CLI is target/release/scattermoe (or $SCATTERMOE_CLI); the plugin as in ort_utils.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scattermoe_testing import ort_utils  # noqa: E402

ROOT = ort_utils.REPO_ROOT
MODELS = ROOT / "models"
CLI = Path(os.environ.get("SCATTERMOE_CLI") or ROOT / "target" / "release" / "scattermoe")
TOKENS = (1, 7, 16)
TOL = {onnx.TensorProto.FLOAT: 1e-4, onnx.TensorProto.FLOAT16: 1e-2, onnx.TensorProto.BFLOAT16: 3e-2}

# ops whose two inputs are swapped by one mutation (commutative ones too: a swap there must change nothing)
BINARY = {"Add", "Sub", "Mul", "Div", "MatMul", "Pow", "Greater", "Less", "Equal", "GreaterOrEqual", "LessOrEqual",
          "Max", "Min", "And", "Or", "Mod"}
# consumers whose integer constant input is a shape, an index, an axis or a k
SHAPE_USERS = {"Expand", "Reshape", "Slice", "Gather", "TopK", "Split", "Unsqueeze", "Squeeze", "Tile", "OneHot",
               "ReduceSum", "ReduceMean", "ReduceMax", "ConstantOfShape", "Range", "Pad", "ScatterND",
               "ScatterElements", "GatherElements", "Equal", "Concat", "Where", "Less", "Greater", "Add", "Sub",
               "Mul", "Div", "CumSum", "Einsum"}


@dataclass
class Mutant:
    fixture: str
    kind: str
    where: str
    base: onnx.ModelProto = field(repr=False)
    # changes a copy of `base` in place (mutants are built one at a time: thousands of copies
    # of a fixture would not fit in memory)
    apply: object = field(repr=False)

    @property
    def model(self) -> onnx.ModelProto:
        m = copy.deepcopy(self.base)
        self.apply(m)
        return m


def _consumers(g):
    c = {}
    for n in g.node:
        for i in n.input:
            c.setdefault(i, []).append(n)
    return c


def _const_arrays(g):
    """(name, array, handle) of every Constant node value and initializer."""
    out = []
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out.append((n.output[0], numpy_helper.to_array(a.t), ("node", n.output[0])))
    for t in g.initializer:
        out.append((t.name, numpy_helper.to_array(t), ("init", t.name)))
    return out


def _set_const(m, handle, arr):
    kind, name = handle
    g = m.graph
    if kind == "node":
        for n in g.node:
            if n.op_type == "Constant" and n.output[0] == name:
                for a in n.attribute:
                    if a.name == "value":
                        a.t.CopyFrom(numpy_helper.from_array(arr.astype(numpy_helper.to_array(a.t).dtype), a.t.name))
                return
    for i, t in enumerate(g.initializer):
        if t.name == name:
            g.initializer[i].CopyFrom(numpy_helper.from_array(arr.astype(numpy_helper.to_array(t).dtype), t.name))
            return


def _const_mutation(handle, arr):
    return lambda m: _set_const(m, handle, arr)


def mutants(fixture: str, m: onnx.ModelProto):
    """Every single-node mutation of `m`, lazily."""
    g = m.graph
    cons = _consumers(g)

    def mk(kind, where, apply):
        return Mutant(fixture, kind, where, m, apply)

    # constants: integers used as shapes/indices/axes/k; float scalars (per-expert alpha, limit, eps...);
    # float tensors: one expert's slice of a stacked weight, two experts swapped, the leading shape
    for name, arr, handle in _const_arrays(g):
        users = {n.op_type for n in cons.get(name, [])}
        if not users:
            continue
        if arr.dtype.kind in "iu" and arr.size <= 16 and users & SHAPE_USERS:
            for i in range(arr.size):
                for delta in (1, -1):
                    a = arr.copy().reshape(-1)
                    with np.errstate(over="ignore"):
                        a[i] += delta
                    yield mk("int-constant", f"{name}[{i}]{delta:+d} (used by {sorted(users)})", _const_mutation(handle, a.reshape(arr.shape)))
        elif arr.dtype.kind == "b" and arr.size <= 4096 and arr.size > 0:
            a = arr.copy().reshape(-1)
            a[0] = not a[0]
            yield mk("bool-constant", f"{name}[0] flipped", _const_mutation(handle, a.reshape(arr.shape)))
        elif arr.dtype.kind == "f" and arr.size <= 4:
            yield mk("float-scalar", f"{name}*1.5+0.25", _const_mutation(handle, arr.astype(np.float64) * 1.5 + 0.25))
            yield mk("float-scalar", f"-{name}", _const_mutation(handle, -arr.astype(np.float64)))
        elif arr.dtype.kind == "f" and arr.ndim >= 2 and arr.shape[0] >= 2:
            a = arr.copy()
            a[[0, 1]] = a[[1, 0]]
            yield mk("weight-swap-leading", f"{name}[0]<->[1]", _const_mutation(handle, a))
            a = arr.copy()
            a[-1] = a[-1] * 2
            yield mk("weight-scale-last", f"{name}[-1]*2", _const_mutation(handle, a))
            # the leading shape: [E, ...] -> [1, E, ...] (a gate tensor with a batch axis)
            yield mk("weight-leading-shape", f"{name} {arr.shape}->{(1,) + arr.shape}", _const_mutation(handle, arr.reshape((1,) + arr.shape)))

    for idx, n in enumerate(g.node):
        label = f"{n.op_type} {n.name or n.output[0]}"
        # attributes
        for ai, a in enumerate(n.attribute):
            if a.type == onnx.AttributeProto.INT:
                for delta in (1, -1):
                    def f(mm, idx=idx, ai=ai, delta=delta):
                        mm.graph.node[idx].attribute[ai].i += delta
                    yield mk("attribute", f"{label}.{a.name}{delta:+d}", f)
            elif a.type == onnx.AttributeProto.INTS and len(a.ints) >= 2:
                v = list(a.ints)
                v[0], v[1] = v[1], v[0]

                def f(mm, idx=idx, ai=ai, v=v):
                    del mm.graph.node[idx].attribute[ai].ints[:]
                    mm.graph.node[idx].attribute[ai].ints.extend(v)
                yield mk("attribute", f"{label}.{a.name} first two swapped", f)
            elif a.type == onnx.AttributeProto.FLOAT:
                def f(mm, idx=idx, ai=ai, v=a.f * 1.5 + 0.25):
                    mm.graph.node[idx].attribute[ai].f = v
                yield mk("attribute", f"{label}.{a.name} changed", f)
            elif a.type == onnx.AttributeProto.STRING and n.op_type == "Einsum":
                eq = a.s.decode()
                lhs, rhs = eq.split("->") if "->" in eq else (eq, "")
                ops = lhs.split(",")
                if len(ops) == 2 and len(ops[1]) >= 2:
                    ops[1] = ops[1][1] + ops[1][0] + ops[1][2:]
                    new = ",".join(ops) + ("->" + rhs if rhs else "")

                    def f(mm, idx=idx, ai=ai, new=new):
                        mm.graph.node[idx].attribute[ai].s = new.encode()
                    yield mk("attribute", f"{label} equation {eq} -> {new}", f)
        # swapped inputs
        if n.op_type in BINARY and len(n.input) == 2 and n.input[0] != n.input[1]:
            def f(mm, idx=idx):
                x = mm.graph.node[idx]
                x.input[0], x.input[1] = x.input[1], x.input[0]
            yield mk("swap-inputs", label, f)
        # a Where condition negated
        if n.op_type == "Where":
            def f(mm, idx=idx):
                x = mm.graph.node[idx]
                neg = x.input[0] + "__not"
                mm.graph.node.insert(idx, helper.make_node("Not", [x.input[0]], [neg], name=neg))
                mm.graph.node[idx + 1].input[0] = neg
            yield mk("where-condition", f"{label} condition negated", f)
        # a deleted node: its consumers read its first input instead (not for graph outputs)
        if n.input and n.output and n.input[0] and n.op_type != "Constant" and not any(o.name == n.output[0] for o in g.output):
            def f(mm, idx=idx, out=n.output[0], src=n.input[0]):
                del mm.graph.node[idx]
                for c in mm.graph.node:
                    for j, v in enumerate(c.input):
                        if v == out:
                            c.input[j] = src
            yield mk("delete-node", label, f)


def _inputs(m: onnx.ModelProto, tokens: int, seed: int):
    rng = np.random.default_rng(seed)
    feeds = {}
    inits = {t.name for t in m.graph.initializer}
    for i in m.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else tokens for d in tt.shape.dim]
        dt = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[i.name] = rng.standard_normal(shape).astype(dt)
    return feeds


def _run(sess, feeds):
    return [np.asarray(o, dtype=np.float64) for o in sess.run(None, feeds)]


def _session(path_or_model, lib=None):
    data = path_or_model
    if isinstance(path_or_model, Path):
        data = str(path_or_model)
    import onnxruntime as ort

    so = ort_utils.session_options(lib, threads=1)
    so.log_severity_level = 4  # mutants that do not run are expected: no error log per attempt
    return ort.InferenceSession(data if isinstance(data, str) else data.SerializeToString(),
                                sess_options=so,
                                providers=["CPUExecutionProvider"])


def reference_runs(m: onnx.ModelProto):
    """{tokens: (feeds, outputs)} where the mutant runs (a traced loop needs every expert hit: a
    few seeds per count), or None when it runs nowhere."""
    if ort_utils.aborts_onnx_runtime(m):
        return None
    try:
        s = _session(m)
    except Exception:
        return None
    out = {}
    for t in TOKENS:
        for seed in range(6):
            feeds = _inputs(m, t, seed)
            try:
                out[t] = (feeds, _run(s, feeds))
                break
            except Exception:
                continue
    return out or None


def compare(path: Path, refs, tol: float):
    """None when the rewritten model at `path` matches every reference, else the problem."""
    try:
        s = _session(path, ort_utils.library_path())
    except Exception as e:
        return f"the rewritten model does not load: {str(e).splitlines()[0][:200]}"
    for t, (feeds, want) in refs.items():
        try:
            got = _run(s, feeds)
        except Exception as e:
            return f"the rewritten model fails at {t} tokens: {str(e).splitlines()[0][:200]}"
        for a, b in zip(got, want):
            if a.shape != b.shape:
                return f"at {t} tokens the output shape is {a.shape}, the mutant's {b.shape}"
            if np.isnan(a).any() != np.isnan(b).any():
                return f"at {t} tokens NaN on one side only"
            den = np.nanmax(np.abs(b)) if b.size else 0.0
            err = np.nanmax(np.abs(a - b)) / den if den > 0 else np.nanmax(np.abs(a - b)) if a.size else 0.0
            if err > tol:
                return f"at {t} tokens relative error {err:.3e} > {tol:.0e}"
    return None


def rewrite(src: Path, dst: Path, prove: bool):
    args = [str(CLI), "rewrite", str(src), str(dst), "--force", "--json"]
    if not prove:
        args.append("--no-prove")
    p = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        return None, (p.stderr.strip().splitlines() or ["exit %d" % p.returncode])[-1]
    return json.loads(p.stdout), None


def check(mu: Mutant, work: Path):
    """The outcome of one mutant: a dict."""
    rec = {"fixture": mu.fixture, "kind": mu.kind, "where": mu.where}
    model = mu.model
    refs = reference_runs(model)
    if refs is None:
        rec["outcome"] = "load-failure"
        return rec
    src = work / "mutant.onnx"
    onnx.save(model, str(src))
    # the loosest of the output's and the float inputs' types: 16-bit rows summed into a float32
    # output (the dynamo exporter's widened sums) are computed in 16 bits, as the proof says
    elems = [model.graph.output[0].type.tensor_type.elem_type] + [i.type.tensor_type.elem_type for i in model.graph.input]
    tol = max(TOL.get(e, 1e-4) for e in elems if e in TOL or e == elems[0])
    dst = work / "rewritten.onnx"
    rep, err = rewrite(src, dst, prove=False)
    if rep is None or not rep["layers"]:
        rec["outcome"] = "left"
        rec["reason"] = err or ("; ".join(r["reason"] for r in rep["rejected"]) if rep["rejected"] else "no candidate")
        return rec
    rec["wrong_without_proof"] = compare(dst, refs, tol)
    rep, err = rewrite(src, dst, prove=True)
    if rep is None or not rep["layers"]:
        rec["outcome"] = "left"
        rec["reason"] = err or "; ".join(r["reason"] for r in rep["rejected"]) or "no candidate"
        return rec
    problem = compare(dst, refs, tol)
    rec["outcome"] = "wrong" if problem else "rewritten-matching"
    if problem:
        rec["problem"] = problem
    return rec


def fixtures(names=None):
    """models/*.onnx by stem; `names` may also name fixtures in a subfolder (`families/gpt_oss_tf4_57`)."""
    all_ = sorted(p.stem for p in MODELS.glob("*.onnx"))
    if not names:
        return all_
    return [n for n in all_ if n in names] + sorted(n for n in names if "/" in n and (MODELS / f"{n}.onnx").is_file())


def _empty_summary():
    return {"generated": 0, "checked": 0, "rewritten-matching": 0, "left": 0, "wrong": 0, "load-failure": 0,
               "rewritten_without_proof": 0, "wrong_without_proof": 0, "wrong_cases": [], "seconds": 0.0}


def _count(summary, rec):
    summary["checked"] += rec["outcome"] != "load-failure"
    summary[rec["outcome"]] += 1
    if "wrong_without_proof" in rec:
        summary["rewritten_without_proof"] += 1
        summary["wrong_without_proof"] += rec["wrong_without_proof"] is not None
    if rec["outcome"] == "wrong":
        summary["wrong_cases"].append(rec)


def summarize(jsonl):
    """The summary of a (possibly unfinished) run's JSON lines, with counts per fixture."""
    s = _empty_summary()
    per = {}
    for line in open(jsonl):
        rec = json.loads(line)
        _count(s, rec)
        _count(per.setdefault(rec["fixture"], _empty_summary()), rec)
    s["per_fixture"] = {f: {k: v for k, v in x.items() if k not in ("wrong_cases", "seconds", "generated")} for f, x in sorted(per.items())}
    s["wrong_without_proof_cases"] = [{k: r[k] for k in ("fixture", "kind", "where", "wrong_without_proof")}
                                      for r in map(json.loads, open(jsonl)) if r.get("wrong_without_proof")]
    return s


def run(names=None, sample=None, seed=0, jsonl=None, log=sys.stderr, shuffle=False):
    """Checks the mutants (a seeded sample of `sample` of them, when given; all of them in a seeded
    order with `shuffle`, so that an unfinished run is a uniform sample); returns the summary."""
    every = []
    for f in fixtures(names):
        m = onnx.load(str(MODELS / f"{f}.onnx"))
        every.extend(mutants(f, m))
    total = len(every)
    if sample is not None and sample < total:
        every = random.Random(seed).sample(every, sample)
    elif shuffle:
        random.Random(seed).shuffle(every)
    summary = _empty_summary()
    summary["generated"] = total
    t0 = time.time()
    sink = open(jsonl, "a") if jsonl else None
    with tempfile.TemporaryDirectory(prefix="scattermoe-mutate-") as d:
        for i, mu in enumerate(every):
            rec = check(mu, Path(d))
            _count(summary, rec)
            if sink:
                sink.write(json.dumps(rec) + "\n")
                sink.flush()
            if log and (i + 1) % 50 == 0:
                print(f"{i + 1}/{len(every)} {time.time() - t0:.0f}s "
                      + " ".join(f"{k}={summary[k]}" for k in ("rewritten-matching", "left", "wrong", "load-failure", "wrong_without_proof")),
                      file=log, flush=True)
    summary["seconds"] = round(time.time() - t0, 1)
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", help="comma-separated fixture names (default: every models/*.onnx; families/NAME for models/families/)")
    ap.add_argument("--sample", type=int, help="check a seeded sample of this many mutants")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jsonl", help="append one JSON line per mutant here")
    ap.add_argument("--shuffle", action="store_true", help="check every mutant in a seeded random order")
    ap.add_argument("--summarize", metavar="JSONL", help="only summarise the JSON lines of a run (finished or not)")
    a = ap.parse_args()
    if a.summarize:
        s = summarize(a.summarize)
        print(json.dumps(s, indent=1))
        return 1 if s["wrong"] else 0
    s = run(a.fixtures.split(",") if a.fixtures else None, a.sample, a.seed, a.jsonl, shuffle=a.shuffle)
    print(json.dumps(s, indent=1))
    return 1 if s["wrong"] else 0


if __name__ == "__main__":
    sys.exit(main())
