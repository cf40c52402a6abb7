"""Triton forward of the fused op: FlashAttention-2 style online softmax with per-class mass accumulators.

Grid: (query head, sequence, query block: the last first) over the packed (varlen) layout of docs/backends.md.
Scores are kept in log2 units (log2(e) folded into the scale) and exponentiated with exp2. Classes, re-weighting tables
and the window are compile-time flags derived from the arguments (an absent tensor is None, an unbounded
window side is -1), so plain attention pays nothing for them. The key loop runs in three phases: a masked
phase at the left window edge, an unmasked interior and a masked phase at the right (causal) edge; fully
masked key blocks are never visited.

Classes come in runs (a VLM prompt: system text, image, user text, answer), so most key blocks hold one class.
The host packs, per key, its class and the distance to the end of its class run (class_runs); per key block one
scalar then says whether the block has one class c0. Such a block adds rowsum(p) to mass column c0 (no one-hot
product) and scales its scores by per-row table entries T[qclass(i), c0] (one load per query row and block)
instead of a per-score table lookup. Blocks with several classes take the general path: a one-hot product for
the masses, table tiles spread from per-row entries by C selects.

Key masses (key_mass=True): a row's normaliser is known only after all its keys, so a second kernel
(_key_mass_kernel) runs after the forward, with the shape of the dK/dV backward: each program owns a key block of
one (sequence, query head), loops over the query blocks that see it, recomputes P = exp2(z' - lse) and sums P over
the rows of each query class with a small product P^T onehot(query class) [BLOCK_N, CLASS_TILE] (a query block of
one class, from the query classes' runs: its row sums); written once per key, no atomics. About one more Q K^T;
not launched when key masses are not asked.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .configs import CLASS_TILE, dim_bucket, launch_configs, tune_count, with_mass_forms

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Scores live in log2 units inside the kernels: exp(x) = exp2(x * LOG2E), ln(y) = log2(y) * LN2.
LOG2E = tl.constexpr(math.log2(math.e))
LN2 = tl.constexpr(math.log(2.0))
# The interpreter multiplies bf16 tiles wrongly: there the bf16 halves of a split product are widened to fp32
# before tl.dot (the same values, so the same sums up to their order).
BF16_DOT_EMULATED = tl.constexpr(INTERPRET)

# How a key block of several classes adds to the masses (and the backward's class terms): True, a small tensor-core
# product p @ onehot(key class) [BLOCK_N, CLASS_TILE] (the V-augmentation trick done in registers); False, C masked
# row sums. Both are exact. The product is cheaper when most blocks mix classes; when classes come in runs (a VLM
# prompt) most blocks take the one-class path, and a product inside the branch still costs every block waits and
# fences (bench/results/aot_triton_gpu_image.md). None: on a GPU the autotuner of the forward, dQ and dK/dV times both
# on the first launch of each shape (AVAR_TRITON_AUTOTUNE=0: the row sums); elsewhere (the interpreter, the key-mass
# kernels), the product. Tests exercise both.
MASS_DOT = None


def mass_dot_choices(has_classes: bool) -> tuple:
    """The MASS_DOT values the autotuner tries (empty: the launch passes MASS_DOT itself)."""
    return (False, True) if has_classes and MASS_DOT is None and not INTERPRET else ()


def mass_dot_value() -> bool:
    """MASS_DOT as the kernels take it when no autotuner chooses (None: the product)."""
    return True if MASS_DOT is None else bool(MASS_DOT)


def class_pad(num_classes: int, mass_dot: bool) -> int:
    """Columns of the mass accumulator: CLASS_TILE for the product, else the next power of two >= C."""
    if num_classes == 0:
        return 1
    return CLASS_TILE.value if mass_dot else triton.next_power_of_2(num_classes)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (the FlashAttention rule compares with a true fp32 reference).
    return "ieee" if dtype == torch.float32 else "tf32"


def _is_set(name):
    return lambda args: args[name] is not None


# Compile-time feature flags of every kernel, from its arguments (None = absent, -1 = unbounded window side).
FEATURE_FLAGS = {
    "HAS_CLASSES": _is_set("KCLS"),
    "HAS_MUL": _is_set("MUL"),
    "HAS_ABS": _is_set("ABS"),
    "HAS_ADD": _is_set("ADD"),
    "HAS_RW": lambda args: any(args[t] is not None for t in ("MUL", "ABS", "ADD")),
    "HAS_WL": lambda args: args["wl"] >= 0,
    "HAS_WR": lambda args: args["wr"] >= 0,
    "CP": lambda args: class_pad(args["C"], args["MASS_DOT"]),
}


# ----------------------------------------------------------------------------------------------------------
# Shared device helpers (also used by bwd.py)
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _table_tile(T, q_off, qmask, kcls, C: tl.constexpr, KEYS_FIRST: tl.constexpr):
    """T[qclass(i), kclass(j)] of a key block with several classes as a [rows, keys] tile ([keys, rows] if
    KEYS_FIRST), from q_off = the offset of each row's table row: one entry per row and class, spread by C selects
    (no per-score lookup, so the tile keeps the scores' register layout)."""
    for c in tl.static_range(C):
        entry = tl.load(T + q_off + c, mask=qmask, other=0.0)  # [rows]
        if KEYS_FIRST:
            hit = kcls[:, None] == c
            entry = entry[None, :]
        else:
            hit = kcls[None, :] == c
            entry = entry[:, None]
        if c == 0:
            tile = tl.where(hit, entry, 0.0)
        else:
            tile = tl.where(hit, entry, tile)
    return tile


@triton.jit
def _query_block():
    """The query block of a row-major program: grid (query head, sequence, query block), the block on the slowest
    axis and the last blocks first. Under a causal mask those see the most keys, so every head's longest programs
    start in the first waves and the last wave holds short ones (FlashAttention's order)."""
    return tl.num_programs(2) - 1 - tl.program_id(2)


@triton.jit
def _ranges(i0, i_last, shift, bound, w_lo, w_hi, BLOCK: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr):
    """Indices i0..i_last see the other axis in [i + shift - w_lo, i + shift + w_hi] clipped to [0, bound): the
    range [lo, hi) seen by any of them, split into (A masked, B unmasked, C masked) phases of BLOCK.
    Returns (lo, nA, startB, nB, startC, nC)."""
    lo = bound * 0
    hi = bound
    full_lo = lo
    full_hi = hi
    if HAS_LO:
        lo = tl.maximum(i0 + shift - w_lo, 0)
        full_lo = tl.maximum(i_last + shift - w_lo, lo)
    if HAS_HI:
        hi = tl.minimum(i_last + shift + w_hi + 1, bound)
        full_hi = tl.minimum(i0 + shift + w_hi + 1, hi)
    nA = tl.cdiv(tl.maximum(full_lo - lo, 0), BLOCK)
    startB = lo + nA * BLOCK
    nB = tl.maximum(full_hi - startB, 0) // BLOCK
    startC = startB + nB * BLOCK
    nC = tl.cdiv(tl.maximum(hi - startC, 0), BLOCK)
    return lo, nA, startB, nB, startC, nC


@triton.jit
def _row_ranges(m0, m_last, sq, sk, wl, wr, BLOCK: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr):
    """For the query rows m0..m_last: the key phases (row i sees keys i + sk - sq - wl .. i + sk - sq + wr)."""
    return _ranges(m0, m_last, sk - sq, sk, wl, wr, BLOCK, HAS_WL, HAS_WR)


@triton.jit
def _col_ranges(n0, n_last, sq, sk, wl, wr, BLOCK: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr):
    """For the keys n0..n_last: the query phases (key j is seen by rows j - (sk - sq) - wr .. j - (sk - sq) + wl)."""
    return _ranges(n0, n_last, sq - sk, sq, wr, wl, BLOCK, HAS_WR, HAS_WL)


@triton.jit
def _phase(phase: tl.constexpr, lo, nA, startB, nB, startC, nC):
    """(first index, number of blocks) of phase 0 (masked), 1 (unmasked) or 2 (masked) from _ranges."""
    if phase == 0:
        start = lo
        nblocks = nA
    elif phase == 1:
        start = startB
        nblocks = nB
    else:
        start = startC
        nblocks = nC
    return start, nblocks


@triton.jit
def _load_rows(ptrs, rmask, offs_d, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile; masks only what the phase / head-dim padding needs."""
    if MASKED:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs, mask=rmask[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=rmask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _load_tile(base, rows, stride, rmask, offs_d, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Load the [rows, BLOCK_D] tile base[rows * stride + d] (rows: local token indices, widened to int64)."""
    return _load_rows(base + rows[:, None].to(tl.int64) * stride + offs_d[None, :], rmask, offs_d,
                      MASKED, HEAD_DIM, BLOCK_D)


@triton.jit
def _visible(rows, cols, sq, sk, wl, wr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr):
    """rows, cols broadcastable local indices: True where query row sees key col (and col < sk)."""
    vis = cols < sk
    if HAS_WL:
        vis = vis & (cols >= rows + (sk - sq) - wl)
    if HAS_WR:
        vis = vis & (cols <= rows + (sk - sq) + wr)
    return vis


@triton.jit
def _mask_scores(z, rows, cols, sq, sk, wl, wr, MASKED: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr):
    """z with the entries a query row does not see at -inf (only in the masked edge phases)."""
    if MASKED:
        z = tl.where(_visible(rows, cols, sq, sk, wl, wr, HAS_WL, HAS_WR), z, float("-inf"))
    return z


@triton.jit
def _one_class(run, j0, sk, BLOCK: tl.constexpr):
    """From the class run of key j0 (class_runs): (the keys j0 .. j0 + BLOCK - 1 below sk have one class, it)."""
    return run // CLASS_TILE >= tl.minimum(BLOCK, sk - j0), run % CLASS_TILE


@triton.jit
def _spread(entry, other, TRANSPOSED: tl.constexpr):
    """entry [a] repeated along the indices other [b]: an [a, b] tile ([b, a] if TRANSPOSED)."""
    zero = tl.zeros_like(other).to(tl.float32)  # [b]
    if TRANSPOSED:
        tile = zero[:, None] + entry[None, :]
    else:
        tile = entry[:, None] + zero[None, :]
    return tile


@triton.jit
def _table_tiles(q_off, qmask, one_class, c0, KCLS, k_start, cols, sk, kcls, MUL, ABS, ADD, C: tl.constexpr,
                 KEYS_FIRST: tl.constexpr, HAS_MUL: tl.constexpr, HAS_ABS: tl.constexpr, HAS_ADD: tl.constexpr):
    """Tiles of T[qclass(i), kclass(j)] for the present tables (MUL, ABS, ADD; 0.0 for an absent one) over a key
    block, [rows, keys] ([keys, rows] if KEYS_FIRST). q_off: per row, the offset of its table row (head and query
    class). A block of one key class c0 (one_class) spreads one entry per row; else _table_tile, from the key
    classes kcls [keys] if KEYS_FIRST (the program's own block) or loaded here from KCLS + k_start + cols.
    The branch reads no score: triton 3.6's pipeliner rejects a branch on a product's result whose value feeds
    another product (the scores feed P V), so the tiles are built apart and applied after."""
    zero = _spread(tl.zeros_like(q_off).to(tl.float32), cols, KEYS_FIRST)  # the tiles' type, for both branches
    mul_t = zero if HAS_MUL else 0.0
    abs_t = zero if HAS_ABS else 0.0
    add_t = zero if HAS_ADD else 0.0
    if one_class:
        if HAS_MUL:
            mul_t = _spread(tl.load(MUL + q_off + c0, mask=qmask, other=0.0), cols, KEYS_FIRST)
        if HAS_ABS:
            abs_t = _spread(tl.load(ABS + q_off + c0, mask=qmask, other=0.0), cols, KEYS_FIRST)
        if HAS_ADD:
            add_t = _spread(tl.load(ADD + q_off + c0, mask=qmask, other=0.0), cols, KEYS_FIRST)
    else:
        key_cls = kcls if KEYS_FIRST else tl.load(KCLS + k_start + cols, mask=cols < sk, other=0)  # [keys]
        if HAS_MUL:
            mul_t = _table_tile(MUL, q_off, qmask, key_cls, C, KEYS_FIRST)
        if HAS_ABS:
            abs_t = _table_tile(ABS, q_off, qmask, key_cls, C, KEYS_FIRST)
        if HAS_ADD:
            add_t = _table_tile(ADD, q_off, qmask, key_cls, C, KEYS_FIRST)
    return mul_t, abs_t, add_t


@triton.jit
def _scores(a, b, qk_scale, rows, cols, sq, sk, wl, wr, q_off, qmask, one_class, c0, KCLS, k_start, kcls, MUL, ABS,
            ADD, C: tl.constexpr, KEYS_FIRST: tl.constexpr, MASKED: tl.constexpr, HAS_RW: tl.constexpr,
            HAS_MUL: tl.constexpr, HAS_ABS: tl.constexpr, HAS_ADD: tl.constexpr, HAS_WL: tl.constexpr,
            HAS_WR: tl.constexpr, PREC: tl.constexpr):
    """(t, z', mul_t, abs_t) of a block: the raw products t = <q, k> (the backward's slopes reuse them), the scores
    z' = s + MUL s + ABS |s| + ADD in log2 units (s = t * qk_scale), masked, as [rows, keys] tiles from a = q,
    b = k ([keys, rows] from a = k, b = q if KEYS_FIRST, in the key-major kernels), and the MUL and ABS tiles of
    _table_tiles (0.0 if absent). rows, cols: local query and key indices; q_off: per row, the offset of its table
    row. The class and table arguments are read only with HAS_RW (None otherwise)."""
    t = tl.dot(a, tl.trans(b), input_precision=PREC)
    s = t * qk_scale
    z = s
    mul_t = 0.0
    abs_t = 0.0
    if HAS_RW:
        mul_t, abs_t, add_t = _table_tiles(q_off, qmask, one_class, c0, KCLS, k_start, cols, sk, kcls, MUL, ABS, ADD,
                                           C, KEYS_FIRST, HAS_MUL, HAS_ABS, HAS_ADD)
        if HAS_MUL:
            z += s * mul_t
        if HAS_ABS:
            z += tl.abs(s) * abs_t
        if HAS_ADD:
            z += add_t * LOG2E
    if KEYS_FIRST:
        z = _mask_scores(z, rows[None, :], cols[:, None], sq, sk, wl, wr, MASKED, HAS_WL, HAS_WR)
    else:
        z = _mask_scores(z, rows[:, None], cols[None, :], sq, sk, wl, wr, MASKED, HAS_WL, HAS_WR)
    return t, z, mul_t, abs_t


@triton.jit
def _bf16_halves(x):
    """x (fp32) = hi + lo + O(2^-17 |x|), hi and lo bf16 (fp32 under the interpreter, see BF16_DOT_EMULATED)."""
    hi = x.to(tl.bfloat16)
    lo = (x - hi.to(tl.float32)).to(tl.bfloat16)
    if BF16_DOT_EMULATED:
        hi = hi.to(tl.float32)
        lo = lo.to(tl.float32)
    return hi, lo


@triton.jit
def _dot_onehot(x, onehot, acc, X_FIRST: tl.constexpr, PREC: tl.constexpr):
    """acc + x @ onehot (X_FIRST) or acc + onehot @ x, for fp32 x and a 0/1 tile: the one-hot is exact in bf16, so
    two bf16 products of x's halves give 16 significant bits (tf32x3 would take three tf32 products). fp32 inputs
    (PREC "ieee"): one exact product."""
    if PREC == "ieee":
        if X_FIRST:
            acc = tl.dot(x, onehot.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(onehot.to(tl.float32), x, acc, input_precision="ieee")
    else:
        hi, lo = _bf16_halves(x)
        oh = onehot.to(hi.dtype)
        if X_FIRST:
            acc = tl.dot(lo, oh, tl.dot(hi, oh, acc))
        else:
            acc = tl.dot(oh, lo, tl.dot(oh, hi, acc))
    return acc


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------

@triton.heuristics(FEATURE_FLAGS)
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, MASS, CU_Q, CU_K, KCLS, QCLS, RUNS, MUL, ABS, ADD,
                qk_scale, wl, wr,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                stride_lh, stride_mh,
                GROUP, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, C: tl.constexpr, CP: tl.constexpr,
                HAS_CLASSES: tl.constexpr, HAS_RW: tl.constexpr,
                HAS_MUL: tl.constexpr, HAS_ABS: tl.constexpr, HAS_ADD: tl.constexpr,
                HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, MASS_DOT: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    h = tl.program_id(0)
    n = tl.program_id(1)
    pid_m = _query_block()
    q_start = tl.load(CU_Q + n)
    sq = tl.load(CU_Q + n + 1) - q_start
    m0 = pid_m * BLOCK_M
    if m0 >= sq:
        return
    k_start = tl.load(CU_K + n)
    sk = tl.load(CU_K + n + 1) - k_start
    hk = h // GROUP

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, CP)
    mask_m = offs_m < sq
    mask_d = offs_d < HEAD_DIM

    q_rows = (q_start + offs_m).to(tl.int64)
    q = _load_tile(Q + h * stride_qh, q_rows, stride_qt, mask_m, offs_d, True, HEAD_DIM, BLOCK_D)  # [BLOCK_M, BLOCK_D]
    if HAS_RW:
        qcls = tl.load(QCLS + q_start + offs_m, mask=mask_m, other=0)  # [BLOCK_M]
    qcls_row = h * C * C + qcls * C if HAS_RW else None  # [BLOCK_M] per row, its table row (head h's [C, C] slice)

    K_base = K + k_start.to(tl.int64) * stride_kt + hk * stride_kh
    V_base = V + k_start.to(tl.int64) * stride_vt + hk * stride_vh

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_m = tl.zeros([BLOCK_M, CP], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    m_last = tl.minimum(m0 + BLOCK_M, sq) - 1
    lo, nA, startB, nB, startC, nC = _row_ranges(m0, m_last, sq, sk, wl, wr, BLOCK_N, HAS_WL, HAS_WR)
    for phase in tl.static_range(3):
        if phase != 0 or HAS_WL:  # the left-edge phase is empty without a left window
            masked = phase != 1  # the edge phases 0 and 2 mask scores
            start, nblocks = _phase(phase, lo, nA, startB, nB, startC, nC)
            if HAS_CLASSES:  # the class run of each block's first key, loaded one block ahead
                run = tl.load(RUNS + k_start + start, mask=nblocks > 0, other=0)
            for b in range(nblocks):
                j0 = start + b * BLOCK_N
                cols = j0 + offs_n
                kmask = cols < sk
                k = _load_tile(K_base, cols, stride_kt, kmask, offs_d, masked, HEAD_DIM, BLOCK_D)  # [BLOCK_N, BLOCK_D]
                if HAS_CLASSES:
                    one_class, c0 = _one_class(run, j0, sk, BLOCK_N)
                    run = tl.load(RUNS + k_start + j0 + BLOCK_N, mask=j0 + BLOCK_N < sk, other=0)
                else:
                    one_class, c0 = None, None  # read by _scores only with tables
                _, z, _, _ = _scores(q, k, qk_scale, offs_m, cols, sq, sk, wl, wr, qcls_row, mask_m, one_class,
                                     c0, KCLS, k_start, None, MUL, ABS, ADD, C, False, masked, HAS_RW, HAS_MUL,
                                     HAS_ABS, HAS_ADD, HAS_WL, HAS_WR, PREC)  # [BLOCK_M, BLOCK_N]
                m_new = tl.maximum(m_i, tl.max(z, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.math.exp2(z - m_safe[:, None])  # [BLOCK_M, BLOCK_N]
                alpha = tl.math.exp2(m_i - m_safe)
                p_sum = tl.sum(p, 1)
                l_i = l_i * alpha + p_sum
                acc = acc * alpha[:, None]
                v = _load_tile(V_base, cols, stride_vt, kmask, offs_d, masked, HEAD_DIM, BLOCK_D)  # [BLOCK_N, BLOCK_D]
                acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
                if HAS_CLASSES:
                    acc_m = acc_m * alpha[:, None]
                    if one_class:  # the whole row sum goes to c0's column
                        acc_m += tl.where(offs_c[None, :] == c0, p_sum[:, None], 0.0)
                    else:
                        kcls = tl.load(KCLS + k_start + cols, mask=kmask, other=0)  # [BLOCK_N]
                        if MASS_DOT:
                            onehot = (kcls[:, None] == offs_c[None, :]).to(v.dtype)  # [BLOCK_N, CP]
                            acc_m = tl.dot(p.to(v.dtype), onehot, acc_m, input_precision=PREC)
                        else:
                            for c in tl.static_range(C):
                                pc = tl.sum(tl.where(kcls[None, :] == c, p, 0.0), 1)
                                acc_m += tl.where(offs_c[None, :] == c, pc[:, None], 0.0)
                m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    inv = 1.0 / l_safe
    out = acc * inv[:, None]
    tl.store(O + q_rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    tl.store(LSE + h * stride_lh + q_start + offs_m, lse, mask=mask_m)
    if HAS_CLASSES:
        mass = acc_m * inv[:, None]  # [BLOCK_M, CP]
        tl.store(MASS + h * stride_mh + (q_start + offs_m)[:, None].to(tl.int64) * C + offs_c[None, :], mass,
                 mask=mask_m[:, None] & (offs_c[None, :] < C))


# ----------------------------------------------------------------------------------------------------------
# Key masses (second pass over key blocks, after the forward has the final lse)
# ----------------------------------------------------------------------------------------------------------

@triton.heuristics(FEATURE_FLAGS)
@triton.jit
def _key_mass_kernel(Q, K, LSE, KM, CU_Q, CU_K, KCLS, QCLS, RUNS, QRUNS, MUL, ABS, ADD,
                     qk_scale, wl, wr,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_lh, stride_kmh,
                     GROUP, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, C: tl.constexpr, CP: tl.constexpr,
                     HAS_CLASSES: tl.constexpr, HAS_RW: tl.constexpr,
                     HAS_MUL: tl.constexpr, HAS_ABS: tl.constexpr, HAS_ADD: tl.constexpr,
                     HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, MASS_DOT: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """KM[h, j, c] = sum over the rows i of query class c of P[h, i, j]. Grid (query head, sequence, key block):
    per query head (GQA), so every key's row of KM is written once by one program. QRUNS: class_runs of the query
    classes; a query block of one class a0 adds its row sums to column a0 (no one-hot product)."""
    h = tl.program_id(0)
    n = tl.program_id(1)
    pid_n = tl.program_id(2)  # key blocks on the slowest axis, the first first (the most rows see them)
    k_start = tl.load(CU_K + n)
    sk = tl.load(CU_K + n + 1) - k_start
    n0 = pid_n * BLOCK_N
    if n0 >= sk:
        return
    q_start = tl.load(CU_Q + n)
    sq = tl.load(CU_Q + n + 1) - q_start
    hk = h // GROUP

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, CP)
    mask_n = offs_n < sk
    k_rows = (k_start + offs_n).to(tl.int64)
    k = _load_tile(K + hk * stride_kh, k_rows, stride_kt, mask_n, offs_d, True, HEAD_DIM, BLOCK_D)  # [BLOCK_N, BLOCK_D]
    if HAS_RW:
        kcls = tl.load(KCLS + k_start + offs_n, mask=mask_n, other=0)  # [BLOCK_N]
        one_class, c0 = _one_class(tl.load(RUNS + k_start + n0), n0, sk, BLOCK_N)
    else:
        kcls, one_class, c0 = None, None, None  # read by _scores only with tables
    Q_h = Q + h * stride_qh
    LSE_h = LSE + h * stride_lh + q_start

    km = tl.zeros([BLOCK_N, CP], dtype=tl.float32)
    n_last = tl.minimum(n0 + BLOCK_N, sk) - 1
    lo, nA, startB, nB, startC, nC = _col_ranges(n0, n_last, sq, sk, wl, wr, BLOCK_M, HAS_WL, HAS_WR)
    for phase in tl.static_range(3):
        if phase != 0 or HAS_WR:  # the first query phase (a masked upper edge) exists only with a right window
            masked = phase != 1  # the edge phases 0 and 2 mask scores
            start, nblocks = _phase(phase, lo, nA, startB, nB, startC, nC)
            for b in range(nblocks):
                r0 = start + b * BLOCK_M
                rows = r0 + offs_m
                rmask = rows < sq
                q_one, a0 = _one_class(tl.load(QRUNS + q_start + r0), r0, sq, BLOCK_M)
                q = _load_tile(Q_h, (q_start + rows).to(tl.int64), stride_qt, rmask, offs_d, masked, HEAD_DIM,
                               BLOCK_D)  # [BLOCK_M, BLOCK_D]
                lse = tl.load(LSE_h + rows, mask=rmask, other=float("-inf"))
                # rows without keys (and padding rows) get lse = +inf in log2 units: P = 0, no NaN
                lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)  # [BLOCK_M]
                qcls = tl.load(QCLS + q_start + rows, mask=rmask, other=0)  # [BLOCK_M]
                _, zT, _, _ = _scores(k, q, qk_scale, rows, offs_n, sq, sk, wl, wr, h * C * C + qcls * C, rmask,
                                      one_class, c0, KCLS, k_start, kcls, MUL, ABS, ADD, C, True, masked, HAS_RW,
                                      HAS_MUL, HAS_ABS, HAS_ADD, HAS_WL, HAS_WR, PREC)  # [BLOCK_N, BLOCK_M]
                pT = tl.math.exp2(zT - lse2[None, :])  # [BLOCK_N, BLOCK_M]
                if q_one:  # one query class: the whole row sum goes to a0's column
                    km += tl.where(offs_c[None, :] == a0, tl.sum(pT, 1)[:, None], 0.0)
                elif MASS_DOT:  # per key, the row sums by query class: pT @ onehot(query class)
                    onehot = qcls[:, None] == offs_c[None, :]  # [BLOCK_M, CP]
                    km = _dot_onehot(pT, onehot, km, True, PREC)
                else:
                    for c in tl.static_range(C):
                        pc = tl.sum(tl.where(qcls[None, :] == c, pT, 0.0), 1)  # [BLOCK_N]
                        km += tl.where(offs_c[None, :] == c, pc[:, None], 0.0)
    tl.store(KM + h * stride_kmh + k_rows[:, None] * C + offs_c[None, :], km,
             mask=mask_n[:, None] & (offs_c[None, :] < C))


# ----------------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------------

TUNE_KEY = ["HEAD_DIM", "C", "GROUP", "wl", "wr", "MASS_DOT", "PREC"]
_fwd_tuned = {}


_km_tuned = {}


def _get_km(block_d, prec, tables, elem, device):
    if INTERPRET:
        return _key_mass_kernel
    key = (dim_bucket(block_d), prec, tables, elem, str(device), tune_count())
    if key not in _km_tuned:
        configs = launch_configs("km", block_d, prec, True, tables, elem, device)
        _km_tuned[key] = triton.autotune(configs=configs, key=TUNE_KEY)(_key_mass_kernel)
    return _km_tuned[key]


def _get_fwd(block_d, prec, has_classes, tables, elem, device, choices=()):
    if INTERPRET:
        return _fwd_kernel
    key = (dim_bucket(block_d), prec, has_classes, tables, elem, str(device), tune_count(), choices)
    if key not in _fwd_tuned:
        configs = with_mass_forms(launch_configs("fwd", block_d, prec, has_classes, tables, elem, device), choices)
        _fwd_tuned[key] = triton.autotune(configs=configs, key=TUNE_KEY)(_fwd_kernel)
    return _fwd_tuned[key]


def class_runs(key_class: torch.Tensor, cu_seqlens_k: torch.Tensor) -> torch.Tensor:
    """int32 [Tk]: per key, (keys from it to the end of its class run within its sequence) * CLASS_TILE + class.
    On the device, without a host sync: a run starts where the class changes or a sequence starts, and a key's
    run ends at the next start (a reverse cumulative minimum)."""
    tk = key_class.numel()
    if tk == 0:
        return key_class.to(torch.int32)
    idx = torch.arange(tk, device=key_class.device, dtype=torch.int32)
    starts = torch.ones(tk, dtype=torch.bool, device=key_class.device)
    starts[1:] = key_class[1:] != key_class[:-1]
    # an empty sequence starting at tk marks the last key as a start: a shorter run, still a correct one
    starts[cu_seqlens_k[:-1].clamp(max=tk - 1).long()] = True
    next_start = torch.where(starts, idx, tk)[1:].flip(0).cummin(0).values.flip(0)
    run_end = torch.cat([next_start, next_start.new_full((1,), tk)])
    return ((run_end - idx) * CLASS_TILE.value + key_class).to(torch.int32)


INTERPRET_BLOCKS = (16, 16)
# Query (key) blocks lie on grid axis 2, at most 65,535 programs, of at least 16 rows (keys).
MAX_SEQLEN = 65_535 * 16


def check_grid_blocks(name: str, seqlen: int) -> None:
    """Raises, naming the argument, when a sequence has more blocks than grid axis 2 holds."""
    if seqlen > MAX_SEQLEN:
        raise ValueError(f"{name}: the triton backend takes sequences of at most {MAX_SEQLEN:,} tokens, got {seqlen:,}")


def launch_blocks():
    """Fixed (BLOCK_M, BLOCK_N) under the interpreter; {} on a GPU (the autotuner picks them)."""
    return dict(BLOCK_M=INTERPRET_BLOCKS[0], BLOCK_N=INTERPRET_BLOCKS[1]) if INTERPRET else {}


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_class, query_class,
            num_classes, mul, abs_, add, scale, window_left, window_right, out_fp32=False, key_mass=False):
    """-> (out, lse, mass) of docs/backends.md; ``out_fp32``: out in float32 whatever q's dtype (the unrounded
    output, from which the dispatcher forms delta = <dO, O> for fp16/bf16 training); ``key_mass``: a fourth output
    key_mass [Hq, Tk, C] float32 (the attention each key receives from the rows of each query class)."""
    tq, hq, d = q.shape
    tk, hk = k.shape[0], k.shape[1]
    nseq = cu_seqlens_q.numel() - 1
    C = int(num_classes)
    out = torch.empty_like(q, dtype=torch.float32 if out_fp32 else q.dtype)
    lse = torch.empty(hq, tq, device=q.device, dtype=torch.float32)
    mass = torch.empty(hq, tq, C, device=q.device, dtype=torch.float32)
    if tq == 0 or nseq == 0:
        if key_mass:  # no query rows: every key receives nothing
            return out, lse, mass, torch.zeros(hq, tk, C, device=q.device, dtype=torch.float32)
        return out, lse, mass
    check_grid_blocks("max_seqlen_q", max_seqlen_q)
    if key_mass:
        check_grid_blocks("max_seqlen_k", max_seqlen_k)
    block_d = max(16, triton.next_power_of_2(d))
    prec = dot_precision(q.dtype)
    has_classes = C > 0
    tables = sum(t is not None for t in (mul, abs_, add))  # how many of MUL, ABS, ADD (0: no re-weighting)
    choices = mass_dot_choices(has_classes)
    kern = _get_fwd(block_d, prec, has_classes, tables, q.element_size(), q.device, choices)
    # the formulation of the masses: the autotuner's choice, else passed here
    mass_dot = {} if choices else dict(MASS_DOT=mass_dot_value())
    runs = class_runs(key_class, cu_seqlens_k) if has_classes else None

    def grid(meta):
        return (hq, nseq, triton.cdiv(max_seqlen_q, meta["BLOCK_M"]))

    kern[grid](
        Q=q, K=k, V=v, O=out, LSE=lse, MASS=mass if has_classes else None, CU_Q=cu_seqlens_q, CU_K=cu_seqlens_k,
        KCLS=key_class if has_classes else None, QCLS=query_class if has_classes else None,
        RUNS=runs, MUL=mul, ABS=abs_, ADD=add, qk_scale=float(scale) * LOG2E.value, wl=int(window_left),
        wr=int(window_right),
        stride_qt=q.stride(0), stride_qh=q.stride(1), stride_kt=k.stride(0), stride_kh=k.stride(1),
        stride_vt=v.stride(0), stride_vh=v.stride(1), stride_ot=out.stride(0), stride_oh=out.stride(1),
        stride_lh=lse.stride(0), stride_mh=mass.stride(0),
        GROUP=hq // hk, HEAD_DIM=d, BLOCK_D=block_d, C=C, PREC=prec, **mass_dot, **launch_blocks())
    if not key_mass:
        return out, lse, mass
    if not has_classes or tk == 0:
        return out, lse, mass, torch.zeros(hq, tk, C, device=q.device, dtype=torch.float32)
    km = torch.empty(hq, tk, C, device=q.device, dtype=torch.float32)
    _get_km(block_d, prec, tables, q.element_size(), q.device)[
        lambda meta: (hq, nseq, triton.cdiv(max_seqlen_k, meta["BLOCK_N"]))](
        Q=q, K=k, LSE=lse, KM=km, CU_Q=cu_seqlens_q, CU_K=cu_seqlens_k, KCLS=key_class, QCLS=query_class,
        RUNS=runs if tables else None, QRUNS=class_runs(query_class, cu_seqlens_q), MUL=mul, ABS=abs_, ADD=add,
        qk_scale=float(scale) * LOG2E.value, wl=int(window_left), wr=int(window_right),
        stride_qt=q.stride(0), stride_qh=q.stride(1), stride_kt=k.stride(0), stride_kh=k.stride(1),
        stride_lh=lse.stride(0), stride_kmh=km.stride(0),
        GROUP=hq // hk, HEAD_DIM=d, BLOCK_D=block_d, C=C, MASS_DOT=mass_dot_value(), PREC=prec, **launch_blocks())
    return out, lse, mass, km
