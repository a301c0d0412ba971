"""The README's C snippet, taken from README.md, compiled as C99 against ONNX Runtime's C header and
run: it registers the op library with ONNX Runtime 1.31.1 (the onnxruntime package of this
interpreter), and the options it made open a rewritten model, which they cannot without it.

The header is Debian 13's libonnxruntime-dev (ONNX Runtime 1.21), unpacked by
scripts/setup-ort-headers.sh into .ort-headers/include (SCATTERMOE_ORT_INCLUDE: another folder).
A program built against an older header runs on a newer ONNX Runtime: GetApi(ORT_API_VERSION)
hands it the API of the header's version.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLI = ROOT / "target" / "release" / "scattermoe"

# The snippet runs as the start of main(); the rest uses what it made (options, status).
PROGRAM = """#include <stdio.h>
#include <onnxruntime_c_api.h>

int main(int argc, char** argv) {
%s
    if (status != NULL) {
        fprintf(stderr, "register: %%s\\n", api->GetErrorMessage(status));
        return 1;
    }
    OrtEnv* env = NULL;
    OrtSession* session = NULL;
    size_t inputs = 0;
    if (argc != 2) return 2;
    status = api->CreateEnv(ORT_LOGGING_LEVEL_WARNING, "readme", &env);
    if (status == NULL) status = api->CreateSession(env, argv[1], options, &session);
    if (status == NULL) status = api->SessionGetInputCount(session, &inputs);
    if (status != NULL) {
        fprintf(stderr, "session: %%s\\n", api->GetErrorMessage(status));
        return 1;
    }
    printf("ORT_API_VERSION %%d, %%s: %%zu input\\n", ORT_API_VERSION, OrtGetApiBase()->GetVersionString(), inputs);
    api->ReleaseSession(session);
    api->ReleaseEnv(env);
    api->ReleaseSessionOptions(options);
    return 0;
}
"""


def readme_c_snippet() -> str:
    blocks = re.findall(r"```c\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) == 1, f"one C block in README.md, found {len(blocks)}"
    return blocks[0]


def include_dir() -> Path:
    given = os.environ.get("SCATTERMOE_ORT_INCLUDE")
    path = Path(given) if given else ROOT / ".ort-headers" / "include"
    if not (path / "onnxruntime_c_api.h").exists():
        pytest.fail(f"{path}/onnxruntime_c_api.h is missing: run scripts/setup-ort-headers.sh (or set SCATTERMOE_ORT_INCLUDE)")
    return path


def test_the_readme_c_snippet_compiles_as_c_and_registers_the_library(lib, tmp_path):
    import onnxruntime

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("no C compiler (cc) on PATH")
    if not CLI.exists():
        pytest.fail(f"{CLI.relative_to(ROOT)} is missing: cargo build --release")
    ort_lib = next((Path(onnxruntime.__file__).parent / "capi").glob("libonnxruntime.so.*"))
    body = "\n".join("    " + line for line in readme_c_snippet().splitlines())
    (tmp_path / "readme.c").write_text(PROGRAM % body)
    exe = tmp_path / "readme"
    # the wheel's library is libonnxruntime.so.1.X.Y, its soname libonnxruntime.so.1: a link by
    # that name where the program looks (its rpath)
    ortdir = tmp_path / "ort"
    ortdir.mkdir()
    (ortdir / "libonnxruntime.so.1").symlink_to(ort_lib.resolve())
    build = subprocess.run(
        [cc, "-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", f"-I{include_dir()}", str(tmp_path / "readme.c"),
         str(ortdir / "libonnxruntime.so.1"), f"-Wl,-rpath,{ortdir}", "-o", str(exe)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr

    model = tmp_path / "mixtral.scattermoe.onnx"
    subprocess.run([str(CLI), "rewrite", str(ROOT / "models/mixtral.onnx"), str(model), "--quiet"], check=True)
    # the snippet names the library by file name: the loader finds it on LD_LIBRARY_PATH
    libdir = tmp_path / "lib"
    libdir.mkdir()
    (libdir / "libscattermoe_ort.so").symlink_to(lib.resolve())
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    run = subprocess.run([str(exe), str(model)], capture_output=True, text=True, timeout=120,
                         env={**env, "LD_LIBRARY_PATH": str(libdir)})
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{onnxruntime.__version__}: 1 input" in run.stdout, run.stdout
    print(run.stdout.strip())

    # without the library found, the snippet's status is ONNX Runtime's error, and no session opens
    alone = tmp_path / "elsewhere"
    alone.mkdir()
    run = subprocess.run([str(exe), str(model)], capture_output=True, text=True, timeout=120, env=env, cwd=alone)
    assert run.returncode == 1 and run.stderr.startswith("register: ") and "libscattermoe_ort.so" in run.stderr, run.stderr
