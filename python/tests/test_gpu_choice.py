"""The Python host of the GPU tests chooses kernels as the library does: tests/gpu/choice.py against
the cases src/cuda/forward/selection.rs's unit tests pin (the same rows, experts, W and K), so that a
change to one side that the other misses fails here, on the CPU, before a device run times the wrong
kernel."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests", "gpu"))
import choice  # noqa: E402
from kernel_table import HOPPER_TMA_ROWS, HOPPER_TMA_ROWS_H100  # noqa: E402

# (rows, experts, W's rows, K, the choice on sm_90a with the default table): selection.rs,
# few_rows_per_expert_take_the_skinny_kernel's `measured` table
MEASURED = [
    (4, 128, 2880, 2880, "skinny"),
    (4, 128, 5760, 2880, "32x64"),
    (2, 8, 4096, 14336, "32x64s6"),
    (2, 8, 28672, 4096, "32x64"),
    (8, 128, 1536, 2048, "skinny"),
    (8, 128, 2048, 768, "skinny"),
    (128, 128, 1536, 2048, "32x32"),
    (512, 128, 2048, 768, "skinny"),
    (512, 128, 1536, 2048, "32x64"),
    (512, 64, 1024, 1024, "skinny"),
    (1024, 64, 1024, 1024, "32x64"),
    (8, 256, 7168, 2048, "32x32"),
]

# kernel_choice_follows_the_measured_thresholds (W too wide for the one-row rule)
WIDE = 1 << 20
THRESHOLDS = [
    (128, 8, 4096, "32x64"), (128, 8, 14336, "32x64s6"), (256, 8, 4096, "wgmma_tma"), (256, 8, 14336, "wgmma_tma"),
    (256, 8, 1024, "wgmma_ws"), (512, 8, 14336, "wgmma_tma"), (1024, 8, 14336, "wgmma_mc"), (32768, 8, 14336, "wgmma_mc"),
    (2048, 8, 4096, "wgmma_tma"), (4096, 8, 4096, "wgmma_tma"), (8192, 8, 4096, "wgmma_mc"), (32768, 8, 4096, "wgmma_mc"),
    (8192, 128, 2048, "wgmma_ws"), (32768, 128, 768, "wgmma_tma"), (8192, 64, 512, "wgmma_ws"), (32768, 64, 1024, "wgmma_tma"),
]
SM80 = [(32768, 8, 4096, "128x128"), (8192, 32, 768, "32x64"), (131072, 128, 768, "128x128"), (256, 8, 4096, "32x64")]


@pytest.mark.parametrize("n,e,wn,k,want", MEASURED)
def test_the_measured_decode_cases(n, e, wn, k, want):
    assert choice.pick_cfg(n, e, k, wn, hopper=True) == want


@pytest.mark.parametrize("n,e,k,want", THRESHOLDS)
def test_the_hopper_thresholds(n, e, k, want):
    assert choice.pick_cfg(n, e, k, WIDE, hopper=True) == want


@pytest.mark.parametrize("n,e,k,want", SM80)
def test_the_choice_without_wgmma(n, e, k, want):
    assert choice.pick_cfg(n, e, k, WIDE, hopper=False) == want


def test_the_h100_table_takes_wgmma_tma_from_above_the_small_tiles():
    """selection.rs the_h100_takes_wgmma_tma_from_the_small_tiles_up."""
    assert choice.table_tma_rows("NVIDIA H100 80GB HBM3") == HOPPER_TMA_ROWS_H100
    assert choice.table_tma_rows("NVIDIA H200") == HOPPER_TMA_ROWS
    for n, e, wn, k in [(8192, 128, 1536, 2048), (8192, 64, 1024, 1024), (2048, 64, 1024, 1024), (4096, 32, 5760, 2880),
                        (32768, 256, 7168, 2048)]:
        assert choice.pick_cfg(n, e, k, wn, hopper=True, tma_rows=HOPPER_TMA_ROWS) == "wgmma_ws"
        assert choice.pick_cfg(n, e, k, wn, hopper=True, tma_rows=HOPPER_TMA_ROWS_H100) == "wgmma_tma"


def test_a_negative_skinny_threshold_turns_the_skinny_kernel_off():
    """SMOE_SKINNY_ROWS=-1, the A/B runs' 'before': the tiles alone."""
    assert choice.pick_cfg(8, 128, 768, 2048, hopper=True) == "skinny"
    assert choice.pick_cfg(8, 128, 768, 2048, hopper=True, skinny_rows=-1) == "32x32"
    assert choice.pick_cfg(0, 8, 4096, 4096, hopper=False) == "skinny"  # no rows: a choice that exists
