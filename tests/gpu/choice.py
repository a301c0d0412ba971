"""The GEMM kernel choice of src/cuda/forward/selection.rs for a 16-bit W, in Python for the GPU tests'
host (smoe_cuda.py) and the tools that read benchmark records (decode_choice.py). No torch: a CPU test
(python/tests/test_gpu_choice.py) checks it against the cases selection.rs's unit tests pin.

The thresholds are kernel_table.py's (generated from kernels/manifest.toml); the callers may move them
(smoe_cuda.py's SMOE_* variables, for A/B runs)."""
from kernel_table import (HOPPER_MC_DEEP_K, HOPPER_MC_DEEP_ROWS, HOPPER_MC_ROWS, HOPPER_SMALL_ROWS, HOPPER_TMA_K,
                          HOPPER_TMA_ROWS, HOPPER_TMA_ROWS_H100, SKINNY_ONE_ROW_BYTES, SKINNY_ROWS, SKINNY_SHORT_K,
                          SKINNY_SHORT_K_ROWS, SMALL_ROWS)


def rows_per_expert(n_assign, E):
    """R: rows per active expert, every expert that can have a row counted as active."""
    return n_assign / max(1, min(E, n_assign))


def table_tma_rows(device_name):
    """HOPPER_TMA_ROWS of the card's table (selection.rs `Table::for_device`)."""
    return HOPPER_TMA_ROWS_H100 if "H100" in device_name else HOPPER_TMA_ROWS


def skinny_16bit(n_assign, E, N, K, skinny_rows=SKINNY_ROWS):
    """selection.rs `skinny_16bit`; N None leaves out the one-row rule (it needs W's size); a negative
    skinny_rows turns the skinny kernel off."""
    if skinny_rows < 0:
        return False
    R = rows_per_expert(n_assign, E)
    if R <= skinny_rows or (K <= SKINNY_SHORT_K and R <= SKINNY_SHORT_K_ROWS):
        return True
    return N is not None and R <= 1 and min(E, n_assign) * N * K * 2 <= SKINNY_ONE_ROW_BYTES


def choose(n_assign, E, K, hopper, tma_rows=HOPPER_TMA_ROWS, small_rows=SMALL_ROWS, large_cfg="128x128"):
    """selection.rs `choose`: the tile kernels above the skinny kernel's rows. hopper: the wgmma
    kernels run (sm_90a); large_cfg: the last resort without them."""
    R = rows_per_expert(n_assign, E)
    if R <= 1 and K <= 2048:
        return "32x32"
    if R <= (HOPPER_SMALL_ROWS if hopper else small_rows):
        return "32x64s6" if K >= 8192 else "32x64"
    if hopper:
        if (K >= HOPPER_MC_DEEP_K and R > HOPPER_MC_DEEP_ROWS) or (K >= HOPPER_TMA_K and R >= HOPPER_MC_ROWS):
            return "wgmma_mc"
        return "wgmma_tma" if K >= HOPPER_TMA_K or R >= tma_rows else "wgmma_ws"
    if K < 1024 and R <= 512:
        return "32x64"
    return large_cfg


def pick_cfg(n_assign, E, K, N=None, hopper=True, tma_rows=HOPPER_TMA_ROWS, skinny_rows=SKINNY_ROWS,
             small_rows=SMALL_ROWS, large_cfg="128x128"):
    """selection.rs `pick_cfg` for a 16-bit W [E, N, K]."""
    if skinny_16bit(n_assign, E, N, K, skinny_rows):
        return "skinny"
    return choose(n_assign, E, K, hopper, tma_rows, small_rows, large_cfg)
