#!/usr/bin/env python3
"""Prints the crate's module tree with line counts and checks its floors.

    python3 scripts/layout.py          # the tree, then the checks; exit 1 if one fails
    python3 scripts/layout.py --quiet  # the checks only
    python3 scripts/layout.py --root DIR  # another checkout (the tests use a made-up one)

The checks (python/tests/test_layout.py runs them in the test suite):
- floors: a module imports only modules on its own floor or lower ones (FLOORS below, the
  architecture's picture: the contract and ONNX IO at the ground, the CPU kernels and the oracle
  over them, the CUDA host side over those, the runtime adapters over CUDA, the rewriter and the
  CLI on top);
- no import cycles, between top-level modules or between sibling modules of one folder;
- no file in src/ over MAX_LINES lines, except those in OVERSIZE (each with the work that removes it);
- the runtime crates in plugins/ (the ONNX Runtime and TensorRT libraries, each an adapter over the
  crate) sit on PLUGIN_FLOOR: they import (as `scattermoe::a::b`) no module above it, and their
  files (plugins/*/src) are held to MAX_LINES too.

An import is any `crate::a::b` (or `scattermoe::a::b` in the binaries) and any `super::` path
outside comments, so a fully qualified call counts as much as a `use`.
"""

import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
MAX_LINES = 600

# Top-level module -> floor. A module imports only modules on its floor or below.
FLOORS = {
    "spec": 0,  # the op contract
    "onnx": 0,  # model load/save, graph index
    "progress": 0,  # what the long steps report (the CLI draws it)
    "npz": 0,  # NumPy .npz reading, for --verify --inputs
    "cpu": 1,  # the CPU kernels
    "reference": 1,  # the float64 oracle and the simple reference over the CPU kernels
    "signature": 1,  # checked call signatures shared by the runtime adapters
    "cuda": 2,  # the CUDA host side
    "ort": 3,  # ONNX Runtime custom ops
    "ort_ops": 3,  # the same, under the name that does not shadow the `ort` crate
    "trt": 3,  # what TensorRT's ONNX parser reads from a node (the plugin itself: plugins/tensorrt)
    "rewrite": 4,  # the rewriter
    "cli": 5,  # the CLI (in the library, so the Python package runs it too)
    "bin": 5,  # the CLI's main
}

# The floor of the runtime crates (plugins/<name>/src): the runtime adapters'.
PLUGIN_FLOOR = 3

# Files over MAX_LINES today, and the change that brings each under it.
OVERSIZE = {
}

# Import cycles between sibling modules today, and the change that removes each.
CYCLES = {
}


def module_of(path: Path) -> tuple:
    """A file's module, from its path under src/: a/b.rs is ("a", "b"), a/mod.rs and a.rs are ("a",), lib.rs is ()."""
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "bin":
        return ("bin",)
    if parts[-1] in ("mod", "lib"):
        parts.pop()
    return tuple(parts)


def strip_comments(text: str) -> str:
    """Drops // comments (doc comments name paths in prose) and string literals."""
    text = re.sub(r'"(?:[^"\\\n]|\\.)*"', '""', text)
    return re.sub(r"//[^\n]*", "", text)


def expand(tree: str) -> list:
    """`a::{b, c::{d, e}}` -> ["a::b", "a::c::d", "a::c::e"] (a `use` tree, whitespace removed)."""
    i = tree.find("{")
    if i < 0:
        return [tree]
    prefix, body = tree[:i], tree[i + 1 : tree.rindex("}")]
    items, depth, cur = [], 0, ""
    for ch in body:
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
            continue
        depth += (ch == "{") - (ch == "}")
        cur += ch
    items.append(cur)
    return [p for item in items if item for p in expand(prefix + item)]


def imports(mod: tuple, text: str, known: set, own: bool = True) -> set:
    """The modules a file names, each cut to the longest prefix that is a module of the crate.
    `own`: the file is the crate's (`crate::` and `super::` name its modules); a plugin crate's
    file names the crate's modules only as `scattermoe::`."""
    code = strip_comments(text)
    paths = []
    for m in re.finditer(r"\buse\s+([^;]+);", code):
        paths += expand(re.sub(r"\s+", "", m.group(1)))
    paths += [m.group(0) for m in re.finditer(r"\b(?:crate|scattermoe|super)(?:::\w+)+", code)]
    out = set()
    for p in paths:
        parts = [x for x in p.split("::") if x and x not in ("*", "self")]
        parts = [re.sub(r"\s+as\s+\w+$|as\w+$", "", x) if " as " in x else x for x in parts]
        if not parts:
            continue
        if parts[0] == "scattermoe" or (own and parts[0] == "crate"):
            target = parts[1:]
        elif parts[0] == "super" and own:
            ups = 0
            while ups < len(parts) and parts[ups] == "super":
                ups += 1
            target = list(mod[: max(len(mod) - ups, 0)]) + parts[ups:]
        else:
            continue  # an external crate, std, or a local name
        for n in range(len(target), 0, -1):
            if tuple(target[:n]) in known:
                out.add(tuple(target[:n]))
                break
    out.discard(mod)
    return out


def scan():
    files = sorted(SRC.rglob("*.rs"))
    mods = {module_of(f): f for f in files}
    known = set(mods)
    for m in list(known):  # folders without a mod.rs of their own still name modules
        for n in range(1, len(m)):
            known.add(m[:n])
    edges = defaultdict(set)
    for m, f in mods.items():
        for dst in imports(m, f.read_text(), known):
            edges[m].add(dst)
    lines = {f: sum(1 for _ in f.open()) for f in files}
    return files, mods, edges, lines


def scan_plugins(known: set):
    """The runtime crates' files (plugins/<name>/src/**.rs), the crate's modules each names
    (by file), and their line counts."""
    files = sorted((ROOT / "plugins").glob("*/src/**/*.rs"))
    uses = {f: imports((), f.read_text(), known, own=False) for f in files}
    lines = {f: sum(1 for _ in f.open()) for f in files}
    return files, uses, lines


def plugin_of(f: Path) -> str:
    """plugins/tensorrt/src/plugin.rs -> "plugins/tensorrt"."""
    return "/".join(f.relative_to(ROOT).parts[:2])


def check_plugins(files, uses, lines) -> list:
    problems = []
    for f in files:
        rel = f.relative_to(ROOT)
        for d in sorted(uses[f]):
            if d and d[0] in FLOORS and FLOORS[d[0]] > PLUGIN_FLOOR:
                problems.append(
                    f"{rel}: '{plugin_of(f)}' (floor {PLUGIN_FLOOR}) imports 'scattermoe::{'::'.join(d)}' (floor {FLOORS[d[0]]}), a higher floor"
                )
        if lines[f] > MAX_LINES:
            problems.append(f"{rel} has {lines[f]} lines, over {MAX_LINES}: split it")
    return problems


def print_tree(files, lines):
    by_dir = defaultdict(int)
    for f in files:
        for parent in f.relative_to(ROOT).parents:
            by_dir[parent] += lines[f]
    seen = set()
    for f in files:
        rel = f.relative_to(ROOT)
        for parent in reversed(rel.parents):
            if parent != Path(".") and parent not in seen:
                seen.add(parent)
                print(f"{'  ' * (len(parent.parts) - 1)}{parent.name}/  {by_dir[parent]}")
        print(f"{'  ' * (len(rel.parts) - 1)}{rel.name}  {lines[f]}")


def projected(src: tuple, dst: tuple):
    """The edge between the two children of the lowest common ancestor, or None when one module is
    the other's ancestor (a folder and its files share what they need by design)."""
    n = 0
    while n < min(len(src), len(dst)) and src[n] == dst[n]:
        n += 1
    if n == len(src) or n == len(dst):
        return None
    return src[: n + 1], dst[: n + 1]


def cycles(edges):
    """Strongly connected components of more than one module (Tarjan), over projected edges."""
    graph = defaultdict(set)
    for s, ds in edges.items():
        for d in ds:
            e = projected(s, d)
            if e:
                graph[e[0]].add(e[1])
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def check(files, mods, edges, lines) -> list:
    problems, notes = [], []
    for m, f in mods.items():
        if not m:
            continue
        top = m[0]
        if top not in FLOORS:
            problems.append(f"{f.relative_to(ROOT)}: top-level module '{top}' has no floor; add it to FLOORS in scripts/layout.py")
            continue
        for d in sorted(edges[m]):
            if d and d[0] in FLOORS and FLOORS[d[0]] > FLOORS[top]:
                problems.append(
                    f"{f.relative_to(ROOT)}: '{'::'.join(m)}' (floor {FLOORS[top]}) imports '{'::'.join(d)}' (floor {FLOORS[d[0]]}), a higher floor"
                )
    for comp in cycles(edges):
        names = frozenset("::".join(c) for c in comp)
        if names in CYCLES:
            notes.append(f"known cycle {sorted(names)}: {CYCLES[names]}")
        else:
            problems.append(f"import cycle between {', '.join(sorted(names))}")
    for f in files:
        rel = str(f.relative_to(ROOT))
        if lines[f] > MAX_LINES:
            if rel in OVERSIZE:
                notes.append(f"known oversize {rel} ({lines[f]} lines): {OVERSIZE[rel]}")
            else:
                problems.append(f"{rel} has {lines[f]} lines, over {MAX_LINES}: split it")
    for rel in OVERSIZE:
        if not (ROOT / rel).exists() or lines.get(ROOT / rel, 0) <= MAX_LINES:
            notes.append(f"{rel} is no longer over {MAX_LINES} lines: drop it from OVERSIZE")
    for c in CYCLES:
        if not any(frozenset("::".join(x) for x in comp) == c for comp in cycles(edges)):
            notes.append(f"cycle {sorted(c)} is gone: drop it from CYCLES")
    return problems, notes


def main():
    global ROOT, SRC
    if "--root" in sys.argv:
        ROOT = Path(sys.argv[sys.argv.index("--root") + 1]).resolve()
        SRC = ROOT / "src"
    files, mods, edges, lines = scan()
    pfiles, puses, plines = scan_plugins(set(mods) | {m[:n] for m in mods for n in range(1, len(m))})
    if "--quiet" not in sys.argv:
        print_tree(files + pfiles, {**lines, **plines})
        print()
        plugins = defaultdict(set)
        for f in pfiles:
            plugins[plugin_of(f)] |= {d[0] for d in puses[f] if d}
        for name in sorted(plugins):
            print(f"{name} (floor {PLUGIN_FLOOR}) -> {', '.join(sorted(plugins[name], key=lambda d: (-FLOORS.get(d, 99), d)))}")
        tops = defaultdict(set)
        for s, ds in edges.items():
            for d in ds:
                if s and d and s[0] != d[0]:
                    tops[s[0]].add(d[0])
        for t in sorted(tops, key=lambda t: (-FLOORS.get(t, 99), t)):
            print(f"{t} (floor {FLOORS.get(t, '?')}) -> {', '.join(sorted(tops[t], key=lambda d: (-FLOORS.get(d, 99), d)))}")
        print()
    problems, notes = check(files, mods, edges, lines)
    problems += check_plugins(pfiles, puses, plines)
    for n in notes:
        print("note:", n)
    for p in problems:
        print("FAIL:", p)
    if not problems:
        print("layout ok: floors respected, no new cycles, no new file over", MAX_LINES, "lines")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
