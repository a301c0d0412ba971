"""The scattermoe wheel as a user gets it: built by maturin (scripts/build-wheel.sh), installed
into fresh venvs with only onnxruntime (1.31.1 and 1.20.1, the project's pins) and numpy, and used
from a folder outside the repository: the README's Python example (rewrite with verify, register
the library, create a session), the rewritten model run against the original and torch's outputs,
the console script, the library being the workspace's, and no run-time dependency.

SCATTERMOE_WHEEL: a wheel already built (default: build it). SCATTERMOE_WHEEL=0 skips the test.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PINS = {
    "1.31.1": ["onnxruntime==1.31.1", "numpy==2.3.5"],
    "1.20.1": ["onnxruntime==1.20.1", "numpy==2.1.3"],
}

pytestmark = pytest.mark.skipif(os.environ.get("SCATTERMOE_WHEEL") == "0", reason="SCATTERMOE_WHEEL=0")


def readme_python_example() -> str:
    """The README's Python block that uses the package."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    found = [b for b in blocks if "import scattermoe" in b]
    assert len(found) == 1, f"one README Python block imports scattermoe, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def wheel() -> Path:
    given = os.environ.get("SCATTERMOE_WHEEL")
    if given:
        return Path(given)
    out = subprocess.run([str(ROOT / "scripts/build-wheel.sh")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    return ROOT / out.stdout.strip().splitlines()[-1]


def test_the_wheel_ships_the_workspace_library_and_depends_on_nothing(wheel, tmp_path):
    size = wheel.stat().st_size
    print(f"wheel {wheel.name}: {size} bytes ({size / 2**20:.1f} MiB)")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        shipped = z.read("scattermoe/libscattermoe_ort.so")
        entry = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "Requires-Dist" not in meta, meta
    assert "scattermoe=scattermoe:main" in entry.replace(" ", ""), entry
    assert any(re.fullmatch(r"scattermoe/_native\.abi3\.so", n) for n in names), names
    # the workspace's library, its debug info stripped (and nothing else changed)
    stripped = tmp_path / "lib.so"
    subprocess.run(["objcopy", "--strip-debug", str(ROOT / "target/release/libscattermoe_ort.so"), str(stripped)], check=True)
    assert hashlib.sha256(shipped).hexdigest() == hashlib.sha256(stripped.read_bytes()).hexdigest()


DRIVER = r"""
import json, subprocess, sys
from pathlib import Path
import numpy as np
import onnxruntime as ort

assert Path.cwd().resolve() != Path(sys.argv[1]).resolve()
exec(open("example.py").read())  # the README's example: rewrite (verified), register, session
import scattermoe
assert report["layers"][0]["family"] == "hf_loop" and report["verify"]["passed"], report
assert report["layers"][0]["proof"]["cases"] > 0, report

# the rewritten model against the original and torch's outputs, on the fixture's inputs
ref = np.load("model.npz")
plain = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
for t in (7, 16):
    x = ref[f"x_{t}"]
    got = sess.run(None, {"hidden_states": x})[0]
    want = plain.run(None, {"hidden_states": x})[0]
    err = float(np.abs(got - want).max() / np.abs(want).max())
    torch_err = float(np.abs(got - ref[f"y_{t}"]).max() / np.abs(ref[f"y_{t}"]).max())
    assert err < 1e-4 and torch_err < 1e-4, (t, err, torch_err)
print("ort", ort.__version__, "max rel err vs original", err, "vs torch", torch_err)

trt = scattermoe.get_tensorrt_library_path()
assert trt is None or Path(trt).is_file(), trt
# no MoE: an error that says so, and nothing written
try:
    scattermoe.rewrite("model.scattermoe.onnx", "again.onnx")
except scattermoe.NoMoELayerError as e:
    assert "no MoE layer replaced" in str(e) and not Path("again.onnx").exists(), e
else:
    raise AssertionError("a model without MoE layers was rewritten")
# the console script
cli = Path(sys.executable).parent / "scattermoe"
out = subprocess.run([str(cli), "inspect", "model.onnx"], capture_output=True, text=True)
assert out.returncode == 0 and "would rewrite (proven)" in out.stdout, (out.returncode, out.stdout, out.stderr)
out = subprocess.run([str(cli), "inspect", "model.scattermoe.onnx"], capture_output=True, text=True)
assert out.returncode == 3, (out.returncode, out.stdout, out.stderr)
print("ok")
"""


@pytest.mark.parametrize("ort_version", sorted(PINS))
def test_installed_in_a_fresh_venv_it_rewrites_registers_and_runs_from_another_folder(wheel, tmp_path, ort_version):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin/python"
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + PINS[ort_version] + [str(wheel)], check=True)
    work = tmp_path / "work"
    work.mkdir()
    (work / "model.onnx").write_bytes((ROOT / "models/mixtral.onnx").read_bytes())
    (work / "model.npz").write_bytes((ROOT / "models/mixtral.npz").read_bytes())
    (work / "example.py").write_text(readme_python_example())
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DYLIB_PATH", "SCATTERMOE_ORT_LIB", "PYTHONPATH")}
    out = subprocess.run([str(py), "-c", DRIVER, str(ROOT)], cwd=work, capture_output=True, text=True, env=env)
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("ok") and f"ort {ort_version}" in out.stdout, out.stdout
