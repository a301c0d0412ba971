"""Shared fixtures: the library path, per-test seeded RNGs (seed printed on failure), comparisons.

Environment:
  SCATTERMOE_ORT_LIB            the custom-op library (default <repo>/target/release/libscattermoe_ort.so)
  SCATTERMOE_SEED               base seed (default: random each run; printed in the header and on failure)
  SCATTERMOE_ALLOW_MISSING_LIB  1: skip the tests that need the library when it is absent (default: fail)
"""

from __future__ import annotations

import os
import random
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

PYTHON_DIR = Path(__file__).resolve().parents[1]
if str(PYTHON_DIR) not in sys.path:
    sys.path.insert(0, str(PYTHON_DIR))

from scattermoe_testing import ort_utils  # noqa: E402

BASE_SEED = int(os.environ.get("SCATTERMOE_SEED") or random.SystemRandom().randrange(2**31))


def pytest_report_header(config):
    lib = ort_utils.library_path()
    import onnxruntime

    return [
        f"scattermoe: base seed {BASE_SEED} (reproduce with SCATTERMOE_SEED={BASE_SEED})",
        f"scattermoe: library {lib} ({'present' if lib.exists() else 'MISSING'}), onnxruntime {onnxruntime.__version__}",
    ]


def test_seed(nodeid: str) -> int:
    return (BASE_SEED + zlib.crc32(nodeid.encode())) % (2**32)


test_seed.__test__ = False  # not a test


@pytest.fixture
def rng(request):
    seed = test_seed(request.node.nodeid)
    request.node._scattermoe_seed = seed
    return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and hasattr(item, "_scattermoe_seed"):
        rep.sections.append((
            "scattermoe seed",
            f"rng seed {item._scattermoe_seed}; reproduce with "
            f"SCATTERMOE_SEED={BASE_SEED} .venv/bin/python -m pytest 'python/{item.nodeid}'",
        ))


@pytest.fixture(scope="session")
def lib() -> Path:
    path = ort_utils.library_path()
    if not path.exists():
        msg = f"custom-op library {path} not found (cargo build --release --workspace, or set SCATTERMOE_ORT_LIB)"
        if os.environ.get("SCATTERMOE_ALLOW_MISSING_LIB") == "1":
            pytest.skip(msg)
        pytest.fail(msg)
    return path

