#!/usr/bin/env python3
"""Checks that every path the docs cite exists.

    python3 scripts/doc_paths.py           # exit 1 and a list if a cited path is missing
    python3 scripts/doc_paths.py --list    # every citation found, and what it resolved to
    python3 scripts/doc_paths.py --root DIR  # another checkout (the tests use a made-up one)

Scanned: README.md and every folder of the repository (docs/, bench/, tests/, python/, src/,
kernels/, scripts/, cpp/, plugins/, models/): markdown in full, code files in their comments and
docstrings only (a string a test builds at run time is no citation), for paths that
start at a folder of the repository (`bench/results/gpu_bench.md`) and, in markdown, file names in
backticks or links (`gpu_bench.md`). A path resolves when it exists from the repository root or
from the citing file's folder (`{a,b}` alternatives each exist, `*` matches something); a bare file
name resolves when a file of that name is in the repository; a file that left the tree resolves
when docs/results.md says at which commit to read it (`git show COMMIT:PATH`).
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP = ("src", "docs", "bench", "tests", "scripts", "models", "kernels", "cpp", "plugins", "python")
SCANNED = ("README.md", "docs", "bench", "tests", "python", "src", "kernels", "scripts", "cpp", "plugins", "models")
TEXT = {".md", ".py", ".sh", ".rs", ".toml", ".txt", ".cpp", ".h", ".cu", ".cuh"}
# Result logs are printouts of past runs: the paths in them are the device's, not this tree's.
SKIP_DIRS = {"results", "__pycache__"}
EXT = r"(?:md|py|sh|rs|json|log|png|onnx|toml|cu|cuh|cpp|txt|npz|csv)"
# Other projects' files, cited by their path in that project.
EXTERNAL = {"python/onnxruntime_inference_collection.py"}

# A path from a top-level folder: `bench/results/gpu_bench.md`, `tests/gpu/results/`, `src/spec/`.
ROOTED = re.compile(r"(?<![\w./$-])((?:%s)/[\w.{},*/-]*)" % "|".join(TOP))
# In markdown, also a bare file name in backticks or a link target: `gpu_bench.md`, (results.md).
BARE = re.compile(r"(?:`|\]\()([\w.{},*-]+\.%s)(?:`|\))" % EXT)


def expand(p: str) -> list:
    m = re.search(r"\{([^{}]*)\}", p)
    if not m:
        return [p]
    return [q for alt in m.group(1).split(",") for q in expand(p[: m.start()] + alt + p[m.end() :])]


def history() -> set:
    """Paths that left the tree, each with the commit to read it from, as docs/results.md lists them."""
    doc = ROOT / "docs" / "results.md"
    if not doc.exists():
        return set()
    return {m.group(1) for m in re.finditer(r"git show [0-9a-f]{7,40}:([\w./-]+)", doc.read_text())}


def basenames() -> set:
    return {f.name for top in TOP if (ROOT / top).is_dir() for f in (ROOT / top).rglob("*") if f.is_file()} | {
        f.name for f in ROOT.iterdir() if f.is_file()
    }


def resolves(path: str, cited_in: Path, moved: set, names: set) -> bool:
    path = path.rstrip(".,;:")
    if "/" not in path:
        return all(any(Path(n).match(p) for n in names) or p in {Path(m).name for m in moved} for p in expand(path))
    for p in expand(path):
        p = p.rstrip("/")
        ok = False
        for base in (ROOT, cited_in.parent):
            if "*" in p:
                ok = ok or any(base.glob(p))
            else:
                ok = ok or (base / p).exists()
        if not ok and p not in moved and not any(m.startswith(p + "/") for m in moved):
            return False
    return True


def files():
    for name in SCANNED:
        top = ROOT / name
        if top.is_file():
            yield top
            continue
        for f in sorted(top.rglob("*")):
            if f.is_file() and f.suffix in TEXT and not (SKIP_DIRS & set(f.relative_to(ROOT).parts)):
                yield f


def citations():
    for f in files():
        text = f.read_text(errors="replace")
        if f.suffix in (".rs", ".cpp", ".h", ".cu", ".cuh"):
            text = "\n".join(re.findall(r"//[^\n]*", text))
        elif f.suffix in (".py", ".sh", ".toml"):
            text = "\n".join(re.findall(r"#[^\n]*", text) + re.findall(r'"""(.*?)"""', text, re.S))
        found = [m.group(1) for m in ROOTED.finditer(text)]
        if f.suffix == ".md":
            found += [m.group(1) for m in BARE.finditer(text)]
        for c in found:
            c = c.rstrip(".,;:")
            # a folder named in prose ("src/", "tests/") or a pattern with a placeholder
            if c.rstrip("/") in TOP or c in EXTERNAL or re.search(r"[A-Z]{3,}(?![\w.]*\.md)|<|\$", c):
                continue
            yield f, c


def main():
    global ROOT
    if "--root" in sys.argv:
        ROOT = Path(sys.argv[sys.argv.index("--root") + 1]).resolve()
    moved, names = history(), basenames()
    missing = []
    for f, c in citations():
        ok = resolves(c, f, moved, names)
        if "--list" in sys.argv:
            print(f"{'ok     ' if ok else 'MISSING'} {f.relative_to(ROOT)}: {c}")
        if not ok:
            missing.append(f"{f.relative_to(ROOT)} cites {c}, which does not exist")
    for m in missing:
        print("FAIL:", m)
    if not missing:
        print("every cited path exists")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
