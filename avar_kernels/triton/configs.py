"""Launch configs of the Triton kernels: candidate lists per kernel, head-dim bucket, classes and table, the
measured best first, pruned by a shared-memory estimate for the device's architecture.

A config row is (BLOCK_M, BLOCK_N, num_warps, num_stages). The estimate over-counts the buffers Triton 3.x
allocates (checked config by config against the compiled kernels by bench/aot_triton.py), so a kept config
launches; without pruning, the first config of a list could exceed the limit and raise OutOfResources when it is
the only one tried (AVAR_TRITON_AUTOTUNE=0).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Opt-in shared memory per block (bytes): H100 / H200 (sm_90), A100 (sm_80).
SMEM_LIMIT = {90: 232_448, 80: 166_912}
# Width of the one-hot class tiles fed to tl.dot (the smallest N and K of a tensor-core product); class ids (< 8)
# fit below it, which packs a key's class run as distance * CLASS_TILE + class (fwd.class_runs).
CLASS_TILE = tl.constexpr(16)


def tune_count() -> int:
    """AVAR_TRITON_AUTOTUNE=full tries every kept config, =0 only the first (no tuning), default the first two (a
    compile is seconds, and each key - head dim, classes, window, GQA group, dtypes - is tuned once per process)."""
    mode = os.environ.get("AVAR_TRITON_AUTOTUNE", "2").lower()
    return {"full": 99, "0": 1, "off": 1, "1": 1}.get(mode, 2 if not mode.isdigit() else max(1, int(mode)))


def dim_bucket(block_d: int) -> int:
    """Head dims share config lists by bucket: 64 (D <= 64), 128 or 256."""
    return 64 if block_d <= 64 else (128 if block_d <= 128 else 256)


def candidate_rows(kernel: str, block_d: int, prec: str, has_classes: bool, tables: int,
                   has_km: bool = False, arch: int = 90) -> list[tuple]:
    """Every candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) of a kernel ('fwd', 'dq', 'dkdv'; 'km': the key
    masses' pass over key blocks, 'kmd': the backward's key-mass share of delta), best first. ``tables``: how many
    of the MUL / ABS / ADD tables are present (0: no re-weighting; 3: a learned table's usual form); ``arch``: the
    GPU's compute capability x 10 (the lists are ordered for sm_90; before it, MMA_SYNC_FIRST).

    Measured on an H200 (bf16, D=128): the forward with masses is fastest at 128 x 64, 8 warps, 3 stages. The
    other orders come from the sm_90a compile (bench/results/aot_triton.md): configs without register spills
    first, the larger tile first among those (triton 3.6, the GPU image's); the autotuner decides between the
    first two on the device (with classes, each in both formulations of the class terms, fwd.MASS_DOT).
    """
    dim = dim_bucket(block_d)
    rows = _rows(kernel, dim, prec, has_classes, tables, has_km)
    first = MMA_SYNC_FIRST.get((kernel, dim)) if arch < 90 and prec != "ieee" else None
    return [first, *(r for r in rows if r != first)] if first else rows


# Before sm_90 (mma.sync: no wgmma, the accumulators stay in registers) the D=256 forward and dQ spill at the sm_90
# firsts (triton 3.6, sm_80: 128 x 32 on 8 warps 104 B-2 KB, 64 x 32 on 4 warps 56-820 B); 64 x 32 on 8 warps spills
# 0-12 B (bench/results/aot_triton_sm80_d256.md).
MMA_SYNC_FIRST = {("fwd", 256): (64, 32, 8, 2), ("dq", 256): (64, 32, 8, 2)}


def _rows(kernel: str, dim: int, prec: str, has_classes: bool, tables: int, has_km: bool) -> list[tuple]:
    if kernel == "km":  # the dK/dV shape without V and dO: q and lse pipelined, one product of P^T with onehot
        if prec == "ieee":
            return [(32, 64, 4, 2), (32, 32, 4, 2)] if dim <= 128 else [(16, 32, 4, 2), (32, 32, 4, 2)]
        if dim <= 128:
            return [(64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3)]
        return [(32, 64, 8, 2), (32, 128, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2)]
    if kernel == "kmd":  # the forward's shape without V: q held, K and dKM pipelined
        if prec == "ieee":
            return [(64, 32, 4, 2), (32, 32, 4, 2)] if dim <= 128 else [(32, 32, 4, 2), (16, 32, 4, 2)]
        if dim <= 128:
            return [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 4)]
        return [(64, 64, 8, 2), (64, 32, 4, 2), (32, 64, 8, 2), (32, 32, 4, 2)]
    if prec == "ieee":  # fp32: CUDA-core products, small tiles (a rare path; keeps compiles short)
        small = dim <= 128
        return {"fwd": [(64, 32, 4, 2), (32, 32, 4, 2)] if small else [(32, 32, 4, 2), (16, 32, 4, 2)],
                "dq": [(64, 32, 4, 2), (32, 32, 4, 2)] if small else [(32, 16, 4, 2), (32, 32, 4, 2)],
                "dkdv": [(32, 64, 4, 2), (32, 32, 4, 2)] if small else [(16, 32, 4, 2), (32, 32, 4, 2)]}[kernel]
    if kernel == "fwd":
        if dim <= 64:
            if has_classes:  # triton 3.6, sm_90a: 128 x 64 on 4 warps spills 1 KB with a table, 8 warps none
                return [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3), (128, 64, 4, 3)]
            return [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3)]
        if dim <= 128:
            if tables >= 3:  # triton 3.6, sm_90a: with all three tables 128 x 64 spills 92-516 B, 128 x 32 none
                return [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 8, 3), (128, 64, 8, 4)]
            if has_classes:
                return [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (64, 64, 4, 3)]
            # 128 x 128 spills 64 B (triton 3.6, sm_90a), 128 x 64 none: the spill-free one first, the autotuner
            # weighs both
            return [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)]
        # D=256, triton 3.6, sm_90a: 128 x 32 on 8 warps is spill-free with and without classes and tables (64 x 64
        # on 4 warps spilled 92 B plain)
        if has_classes:
            return [(128, 32, 8, 2), (64, 32, 8, 2), (64, 64, 8, 2), (128, 64, 8, 2)]
        return [(128, 32, 8, 2), (64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2)]
    if kernel == "dkdv":  # BLOCK_M = query rows per step, BLOCK_N = keys owned by the program
        if dim <= 64:
            return [(32, 128, 8, 3), (16, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 4)]
        if dim <= 128:
            if tables >= 3:  # the three tables' gradients (sm_90a, triton 3.6): 16 x 128 spills 116-148 B, 16 x 64
                # on 8 warps 0 (row sums) or 8 B (product)
                return [(16, 64, 8, 2), (16, 128, 8, 2), (32, 64, 8, 2), (32, 64, 4, 2)]
            if tables or has_km:  # the table / dKM terms need the registers of a 32-row step (sm_90a: 32 x 128
                # spills 40 B with dKM, 16 x 128 none)
                return [(16, 128, 8, 2), (32, 128, 8, 2), (32, 64, 4, 2), (32, 64, 4, 3)]
            return [(32, 128, 8, 2), (32, 128, 8, 3), (16, 128, 8, 2), (32, 64, 4, 3)]
        # D=256 (triton 3.6, sm_90a): every wgmma tile spills (16 x 64: 52 B plain, 120-632 B with classes); 16 x 32
        # on 4 warps (mma.sync) does not: it goes first, and the autotuner weighs the two
        return [(16, 32, 4, 2), (16, 64, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2)]
    if dim <= 64:
        return [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 4)]
    if dim <= 128:
        if tables >= 3:  # the three tables' gradients (sm_90a, triton 3.6): 128 x 64 spills 0.9-1.3 KB, 128 x 32
            # and 64 x 32 on 8 warps none in either formulation
            return [(128, 32, 8, 2), (64, 32, 8, 3), (64, 32, 4, 3), (128, 64, 8, 2)]
        if tables:  # triton 3.6, sm_90a: 128 x 64 spill-free with the row sums (40 B with the product), 64 x 32
            # spill-free with the product (40 B with the row sums and all three tables)
            return [(128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)]
        return [(128, 64, 8, 2), (64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3)]
    # dQ at D=256 (triton 3.6, sm_90a): 128 x 32 on 8 warps spill-free but with the product and a table (248 B);
    # 64 x 32 on 4 warps spilled 176 B plain. Kept where the shared memory allows (sm_90, not sm_80).
    if has_classes:
        return [(128, 32, 8, 2), (32, 64, 8, 2), (16, 64, 8, 2), (64, 32, 4, 2)]
    return [(128, 32, 8, 2), (64, 32, 4, 2), (64, 16, 4, 2), (32, 32, 4, 2)]


def smem_estimate(kernel: str, row: tuple, block_d: int, elem: int, has_classes: bool, tables: int,
                  arch: int, has_km: bool = False) -> int:
    """Bytes of shared memory a config needs, from above: tiles held for the whole program, `stages` buffers of
    each pipelined load on sm_90 (wgmma), `stages - 1` before, the one-hot class tiles and the halves of the
    operand they multiply (bf16; fp32 for fp32 inputs), reduction and layout-conversion scratch. Table entries are
    loaded per row into registers: no shared memory. ``has_km``: dq / dkdv with a key-mass gradient (the dKM tile's
    halves [BLOCK_N, CLASS_TILE] and onehot(query class) [BLOCK_M, CLASS_TILE])."""
    bm, bn, warps, stages = row
    bufs = stages if arch >= 90 else stages - 1
    # before sm_90 (mma.sync) a score tile changes register layout through shared memory, and dq's dmass too
    relayout = 0 if arch >= 90 else bm * bn * 4 + (bm * CLASS_TILE.value * 4 if has_classes else 0)
    # two warp groups sharing 64 rows split the columns and trade row statistics through shared memory (bounded
    # by 32 B per head-dim column, fitted on the compiled kernels)
    split = 32 * block_d if warps == 8 and bm <= 64 else 0
    onehot = 2 if elem < 4 else 4  # bytes per element of a one-hot product's operands
    # dKM rows (fp32, pipelined in dq, held in dkdv), their bf16 halves and onehot(query class); dkdv also spreads
    # them to a [BLOCK_N, BLOCK_M] tile (bm * bn * 2: fitted on the compiled D=256 kernels)
    km = 0
    if has_km:
        km = (2 * bn + bm) * CLASS_TILE.value * onehot + (bufs if kernel == "dq" else 1) * bn * CLASS_TILE.value * 4
        km += bm * bn * 2 if kernel == "dkdv" else 0
    if kernel == "km":  # K held; q, lse pipelined; P^T (halves, in registers) @ onehot(query class)
        relayout = 0 if arch >= 90 else bm * bn * 4 + bn * CLASS_TILE.value * 4
        split = 32 * block_d if warps == 8 and bn <= 64 else 0  # as above, the key block split over warp groups
        total = bn * block_d * elem + bufs * (bm * block_d * elem + 4 * bm) + 8 * bn + relayout + split
        return total + (bn + bm) * CLASS_TILE.value * onehot
    if kernel == "kmd":  # q held; K, dKM pipelined; onehot(query class) @ dKM halves^T
        total = bm * block_d * elem + bufs * (bn * block_d * elem + bn * CLASS_TILE.value * 4) + 8 * bm + split
        return total + relayout + (bm + 2 * bn) * CLASS_TILE.value * onehot
    if kernel == "fwd":  # q held; K, V pipelined; p @ onehot(key class) [BLOCK_N, CLASS_TILE]; row scratch (16 B
        # per row: triton 3.6 takes 512 B more than 8 B per row at 64 x 64 with classes)
        total = bm * block_d * elem + bufs * 2 * bn * block_d * elem + 16 * bm + split + relayout
        return total + (bn * CLASS_TILE.value * onehot if has_classes else 0)
    if kernel == "dq":  # q, dO held; K, V pipelined; dmass halves [BLOCK_M, CLASS_TILE] @ onehot^T
        total = 2 * bm * block_d * elem + bufs * 2 * bn * block_d * elem + 8 * bm + split + relayout + km
        return total + ((2 * bm + bn) * CLASS_TILE.value * onehot if has_classes else 0)
    # dkdv: K, V held; q, dO, lse, delta pipelined; onehot [BLOCK_N, CLASS_TILE] @ dmass halves^T; with tables, the
    # table-gradient products' one-hot(query class) tiles and accumulators
    total = 2 * bn * block_d * elem + bufs * (2 * bm * block_d * elem + 2 * bm * 4) + 8 * bn + relayout + km
    if has_classes:  # twice the one-hot operands: layout copies of them (triton 3.6, D=256: 2.9 KB more than once)
        total += 2 * (bn + 2 * bm) * CLASS_TILE.value * onehot
    if tables:
        total += (3 * bn + 2 * bm) * CLASS_TILE.value * 4
    return total


@functools.lru_cache(maxsize=None)
def device_arch_and_limit(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    return props.major * 10 + props.minor, props.shared_memory_per_block_optin


def kept_rows(kernel: str, block_d: int, prec: str, has_classes: bool, tables: int, elem: int, arch: int,
              limit: int, has_km: bool = False) -> list[tuple]:
    """The candidates whose estimate fits `limit` bytes on `arch` (best first); if none does, the smallest (the
    estimate is an upper bound)."""
    rows = candidate_rows(kernel, block_d, prec, has_classes, tables, has_km, arch)
    need = {r: smem_estimate(kernel, r, block_d, elem, has_classes, tables, arch, has_km) for r in rows}
    return [r for r in rows if need[r] <= limit] or [min(rows, key=need.get)]


def launch_configs(kernel: str, block_d: int, prec: str, has_classes: bool, tables: int, elem: int,
                   device: torch.device, has_km: bool = False) -> list[triton.Config]:
    """The configs to try on `device`: kept_rows for its architecture, at most tune_count() of them."""
    if device.type == "cuda":
        arch, limit = device_arch_and_limit(device.index if device.index is not None else torch.cuda.current_device())
        rows = kept_rows(kernel, block_d, prec, has_classes, tables, elem, arch, limit, has_km)
    else:  # nothing launches (the AOT report records the arguments): every candidate
        rows = candidate_rows(kernel, block_d, prec, has_classes, tables, has_km)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in rows[:tune_count()]]


def with_mass_forms(configs: list[triton.Config], choices: tuple) -> list[triton.Config]:
    """Each config with each formulation of the class terms (MASS_DOT in `choices`, see fwd.MASS_DOT) for the
    autotuner to time; without tuning (one config), the first formulation only."""
    if not choices:
        return configs
    forms = choices if tune_count() > 1 else choices[:1]
    return [triton.Config({**c.kwargs, "MASS_DOT": m}, num_warps=c.num_warps, num_stages=c.num_stages)
            for c in configs for m in forms]
