"""Triton backward of the fused op (docs/backends.md), deterministic, no atomics.

Two kernels, both recomputing P = exp(z' - lse) blockwise:
- dK/dV: grid (kv head, sequence, key block); loops over the query heads of the kv head's group and over
  the query blocks that see the key block; accumulates dk, dv in fp32 registers.
- dQ: grid (query head, sequence, query block: the last first); loops over the visible key blocks.
dP = dO V^T + dmass[i, class(j)], dZ' = P (dP - delta), dZ = dZ' (1 + MUL + ABS sign(z)). On a key block of one
class c0 (see fwd.py) the dmass term is the column dmass[:, c0] and the table entries are per-row values, spread
along the keys; a block of several classes takes a one-hot product onehot(key class) x dmass^T (two bf16 products
of dmass's halves, exact enough for an fp32 operand) or C selects (fwd.MASS_DOT), and table tiles from per-row
entries. Those tiles are built in branches that read no product and added after (triton 3.6, fwd._table_tiles).
Learned tables (constexpr WANT_DMUL / WANT_DABS / WANT_DADD, off in the plain backward): the dK/dV kernel sums
dZ' z, dZ' |z|, dZ' per (key, query class) with a product dZ'-tile x onehot(query class) [BLOCK_M, CLASS_TILE]
over its query blocks, reduces over its keys per key class with onehot(key class) once per query head, and
stores a [3, C, C] slot per (sequence, key block, query head); PyTorch sums the slots (deterministic, no atomics).
A loss on key masses (dkey_mass, constexpr HAS_DKM from the DKM argument, off otherwise): dP_ij += dKM[j, qclass(i)]
in both kernels, a tile spread from the key block's dKM rows [BLOCK_N, CLASS_TILE] by a product with
onehot(query class) (a query block of one class, from the query classes' runs: the column dKM[:, a0]); its share
of the row constant, sum_j P_ij dKM[j, qclass(i)], needs every key of a row, so a
small row-major kernel (_bwd_km_delta_kernel, one more Q K^T) adds it to delta first.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import dim_bucket, launch_configs, tune_count, with_mass_forms
from .fwd import (
    CLASS_TILE,
    FEATURE_FLAGS,
    INTERPRET,
    LN2,
    LOG2E,
    TUNE_KEY,
    _col_ranges,
    _dot_onehot,
    _load_tile,
    _one_class,
    _phase,
    _query_block,
    _row_ranges,
    _scores,
    _spread,
    check_grid_blocks,
    class_runs,
    dot_precision,
    launch_blocks,
    mass_dot_choices,
    mass_dot_value,
)


@triton.jit
def _row_stats(LSE_h, DELTA_h, rows, rmask):
    """Per query row: the forward's log-sum-exp in log2 units (+inf for empty rows, so P = 0) and delta."""
    lse = tl.load(LSE_h + rows, mask=rmask, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    di = tl.load(DELTA_h + rows, mask=rmask, other=0.0)
    return lse2, di


@triton.jit
def _load_dkm(DKM_h, krows, kmask, offs_c, C: tl.constexpr):
    """The dKM rows [keys, CP] of the keys at the global indices krows (0 past C and for masked keys)."""
    return tl.load(DKM_h + krows[:, None].to(tl.int64) * C + offs_c[None, :],
                   mask=kmask[:, None] & (offs_c[None, :] < C), other=0.0)


@triton.jit
def _add_dkm(acc, dkm, qcls, offs_c, C: tl.constexpr, KEYS_FIRST: tl.constexpr, MASS_DOT: tl.constexpr,
             PREC: tl.constexpr):
    """acc + dKM[j, qclass(i)] as a [rows, keys] tile ([keys, rows] if KEYS_FIRST), from the keys' dKM rows
    dkm [keys, CP] and the rows' classes qcls [rows]: a product with onehot(query class) (MASS_DOT; dkm's bf16
    halves, see _dot_onehot), else C selects."""
    if MASS_DOT:
        onehot = qcls[:, None] == offs_c[None, :]  # [rows, CP]
        if KEYS_FIRST:
            acc = _dot_onehot(dkm, tl.trans(onehot), acc, True, PREC)
        else:
            acc = _dot_onehot(tl.trans(dkm), onehot, acc, False, PREC)
    else:
        for c in tl.static_range(C):
            col = tl.sum(tl.where(offs_c[None, :] == c, dkm, 0.0), 1)  # [keys] dKM[j, c]
            if KEYS_FIRST:
                acc += tl.where(qcls[None, :] == c, col[:, None], 0.0)
            else:
                acc += tl.where(qcls[:, None] == c, col[None, :], 0.0)
    return acc


@triton.jit
def _slope(ds, t, mul_t, abs_t, abs_sign, HAS_MUL: tl.constexpr, HAS_ABS: tl.constexpr):
    """dZ = dZ' (1 + MUL + ABS sign(s)) from the raw products t (s = t * qk_scale, sign(s) = sign(t) * abs_sign)
    and the table tiles of _scores; ADD has no effect on the slope."""
    fac = 1.0
    if HAS_MUL:
        fac = fac + mul_t
    if HAS_ABS:
        fac = fac + abs_t * tl.where(t > 0, abs_sign, tl.where(t < 0, -abs_sign, 0.0))
    return ds * fac


@triton.jit
def _dmass_tile(dm_rows, rows, rmask, one_class, c0, KCLS, k_start, cols, sk, kcls, offs_c, C: tl.constexpr,
                KEYS_FIRST: tl.constexpr, MASS_DOT: tl.constexpr, PREC: tl.constexpr):
    """dmass[i, kclass(j)] (the masses' share of dP) as a [rows, keys] tile ([keys, rows] if KEYS_FIRST); dm_rows:
    per row, the start of its dmass row. A key block of one class c0 spreads the column dmass[:, c0]; else a
    product onehot(key class) x dmass^T (MASS_DOT; dmass's bf16 halves, see _dot_onehot) or C selects, from the key
    classes kcls [keys] if KEYS_FIRST, else loaded here. Built apart from dP, as _table_tiles (triton 3.6)."""
    if one_class:
        tile = _spread(tl.load(dm_rows + c0, mask=rmask, other=0.0), cols, KEYS_FIRST)
    else:
        key_cls = kcls if KEYS_FIRST else tl.load(KCLS + k_start + cols, mask=cols < sk, other=0)  # [keys]
        tile = _spread(tl.zeros_like(rows).to(tl.float32), cols, KEYS_FIRST)
        if MASS_DOT:
            dm = tl.load(dm_rows[:, None] + offs_c[None, :], mask=rmask[:, None] & (offs_c[None, :] < C),
                         other=0.0)  # [rows, CP]
            onehot = key_cls[:, None] == offs_c[None, :]  # [keys, CP]
            if KEYS_FIRST:
                tile = _dot_onehot(tl.trans(dm), onehot, tile, False, PREC)
            else:
                tile = _dot_onehot(dm, tl.trans(onehot), tile, True, PREC)
        else:
            for c in tl.static_range(C):
                dmc = tl.load(dm_rows + c, mask=rmask, other=0.0)  # [rows]
                if KEYS_FIRST:
                    tile += tl.where(key_cls[:, None] == c, dmc[None, :], 0.0)
                else:
                    tile += tl.where(key_cls[None, :] == c, dmc[:, None], 0.0)
    return tile


@triton.jit
def _dkm_tile(acc, q_one, a0, dkm, qcls, offs_c, C: tl.constexpr, KEYS_FIRST: tl.constexpr, MASS_DOT: tl.constexpr,
              PREC: tl.constexpr):
    """acc + dKM[j, qclass(i)] (the key masses' share of dP) from the keys' dKM rows dkm [keys, CP]: a block of one
    query class a0 (q_one) adds the column dKM[:, a0], else _add_dkm. acc is never a product's result (triton 3.6,
    see _table_tiles)."""
    if q_one:
        acc += _spread(tl.sum(tl.where(offs_c[None, :] == a0, dkm, 0.0), 1), qcls, not KEYS_FIRST)
    else:
        acc = _add_dkm(acc, dkm, qcls, offs_c, C, KEYS_FIRST, MASS_DOT, PREC)
    return acc


@triton.heuristics(FEATURE_FLAGS)
@triton.jit
def _bwd_km_delta_kernel(Q, K, LSE, DELTA, DKM, DELTA_OUT, CU_Q, CU_K, KCLS, QCLS, RUNS, QRUNS, MUL, ABS, ADD,
                         qk_scale, wl, wr,
                         stride_qt, stride_qh, stride_kt, stride_kh, stride_lh, stride_dkmh,
                         GROUP, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, C: tl.constexpr, CP: tl.constexpr,
                         HAS_CLASSES: tl.constexpr, HAS_RW: tl.constexpr,
                         HAS_MUL: tl.constexpr, HAS_ABS: tl.constexpr, HAS_ADD: tl.constexpr,
                         HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, MASS_DOT: tl.constexpr, PREC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """DELTA_OUT_i = DELTA_i + sum_j P_ij dKM[j, qclass(i)]: the key masses' share of the row constant (their
    gradient adds dKM[j, qclass(i)] to dP_ij). Grid as the forward's, and its key loop."""
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
    q_rows = (q_start + offs_m).to(tl.int64)
    q = _load_tile(Q + h * stride_qh, q_rows, stride_qt, mask_m, offs_d, True, HEAD_DIM, BLOCK_D)  # [BLOCK_M, BLOCK_D]
    lse = tl.load(LSE + h * stride_lh + q_start + offs_m, mask=mask_m, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)  # empty rows: P = 0
    qcls = tl.load(QCLS + q_start + offs_m, mask=mask_m, other=0)  # [BLOCK_M]
    # a block of one query class a0 reads the column dKM[:, a0] (no one-hot product)
    q_one, a0 = _one_class(tl.load(QRUNS + q_start + m0), m0, sq, BLOCK_M)
    qcls_row = h * C * C + qcls * C if HAS_RW else None  # [BLOCK_M] per row, its table row (head h's [C, C] slice)
    DKM_h = DKM + h * stride_dkmh
    K_base = K + k_start.to(tl.int64) * stride_kt + hk * stride_kh

    term = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_last = tl.minimum(m0 + BLOCK_M, sq) - 1
    lo, nA, startB, nB, startC, nC = _row_ranges(m0, m_last, sq, sk, wl, wr, BLOCK_N, HAS_WL, HAS_WR)
    for phase in tl.static_range(3):
        if phase != 0 or HAS_WL:  # the left-edge phase is empty without a left window
            masked = phase != 1  # the edge phases 0 and 2 mask scores
            start, nblocks = _phase(phase, lo, nA, startB, nB, startC, nC)
            if HAS_RW:  # the class run of each block's first key, loaded one block ahead
                run = tl.load(RUNS + k_start + start, mask=nblocks > 0, other=0)
            for b in range(nblocks):
                j0 = start + b * BLOCK_N
                cols = j0 + offs_n
                kmask = cols < sk
                k = _load_tile(K_base, cols, stride_kt, kmask, offs_d, masked, HEAD_DIM, BLOCK_D)  # [BLOCK_N, BLOCK_D]
                if HAS_RW:
                    one_class, c0 = _one_class(run, j0, sk, BLOCK_N)
                    run = tl.load(RUNS + k_start + j0 + BLOCK_N, mask=j0 + BLOCK_N < sk, other=0)
                else:
                    one_class, c0 = None, None  # read by _scores only with tables
                _, z, _, _ = _scores(q, k, qk_scale, offs_m, cols, sq, sk, wl, wr, qcls_row, mask_m, one_class,
                                     c0, KCLS, k_start, None, MUL, ABS, ADD, C, False, masked, HAS_RW, HAS_MUL,
                                     HAS_ABS, HAS_ADD, HAS_WL, HAS_WR, PREC)  # [BLOCK_M, BLOCK_N]
                p = tl.math.exp2(z - lse2[:, None])  # [BLOCK_M, BLOCK_N]
                if q_one:
                    col = tl.load(DKM_h + (k_start + cols).to(tl.int64) * C + a0, mask=kmask, other=0.0)  # [BLOCK_N]
                    term += tl.sum(p * col[None, :], 1)
                else:
                    dkm = _load_dkm(DKM_h, k_start + cols, kmask, offs_c, C)  # [BLOCK_N, CP]
                    g = _add_dkm(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), dkm, qcls, offs_c, C, False,
                                 MASS_DOT, PREC)  # [BLOCK_M, BLOCK_N] dKM[j, qclass(i)]
                    term += tl.sum(p * g, 1)
    di = tl.load(DELTA + h * stride_lh + q_start + offs_m, mask=mask_m, other=0.0)
    tl.store(DELTA_OUT + h * stride_lh + q_start + offs_m, di + term, mask=mask_m)


@triton.heuristics({**FEATURE_FLAGS, "WANT_TG": lambda args: args["TG"] is not None,
                    "HAS_DKM": lambda args: args["DKM"] is not None})
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DMASS, DKM, DK, DV, CU_Q, CU_K, KCLS, QCLS, RUNS, QRUNS, MUL, ABS, ADD,
                     TG,
                     scale, qk_scale, wl, wr, HQ, NKB,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                     stride_lh, stride_dmh, stride_dkmh,
                     GROUP, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, C: tl.constexpr, CP: tl.constexpr,
                     HAS_CLASSES: tl.constexpr, HAS_RW: tl.constexpr,
                     HAS_MUL: tl.constexpr, HAS_ABS: tl.constexpr, HAS_ADD: tl.constexpr,
                     HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, MASS_DOT: tl.constexpr, PREC: tl.constexpr,
                     WANT_DMUL: tl.constexpr, WANT_DABS: tl.constexpr, WANT_DADD: tl.constexpr,
                     WANT_TG: tl.constexpr, HAS_DKM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    hk = tl.program_id(0)
    n = tl.program_id(1)
    pid_n = tl.program_id(2)  # key blocks on the slowest axis, the first first (the most rows see them)
    k_start = tl.load(CU_K + n)
    sk = tl.load(CU_K + n + 1) - k_start
    n0 = pid_n * BLOCK_N
    if n0 >= sk:
        return
    q_start = tl.load(CU_Q + n)
    sq = tl.load(CU_Q + n + 1) - q_start

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, CP)
    mask_n = offs_n < sk
    mask_d = offs_d < HEAD_DIM
    k_rows = (k_start + offs_n).to(tl.int64)
    k = _load_tile(K + hk * stride_kh, k_rows, stride_kt, mask_n, offs_d, True, HEAD_DIM, BLOCK_D)  # [BLOCK_N, BLOCK_D]
    v = _load_tile(V + hk * stride_vh, k_rows, stride_vt, mask_n, offs_d, True, HEAD_DIM, BLOCK_D)  # [BLOCK_N, BLOCK_D]
    if HAS_CLASSES:
        kcls = tl.load(KCLS + k_start + offs_n, mask=mask_n, other=0)  # [BLOCK_N]
        # the program's key block has one class c0 (the usual case) or takes the one-hot products
        one_class, c0 = _one_class(tl.load(RUNS + k_start + n0), n0, sk, BLOCK_N)
    else:
        kcls, one_class, c0 = None, None, None  # read by _scores only with tables
    if WANT_TG:
        offs_t = tl.arange(0, CLASS_TILE)
        onehot_k = (kcls[:, None] == offs_t[None, :]) & mask_n[:, None]  # [BLOCK_N, CLASS_TILE]
    abs_sign = tl.where(qk_scale > 0, 1.0, tl.where(qk_scale < 0, -1.0, 0.0))

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    n_last = tl.minimum(n0 + BLOCK_N, sk) - 1
    lo, nA, startB, nB, startC, nC = _col_ranges(n0, n_last, sq, sk, wl, wr, BLOCK_M, HAS_WL, HAS_WR)
    for g in range(GROUP):
        h = hk * GROUP + g
        Q_h = Q + h * stride_qh
        DO_h = DO + h * stride_doh
        if HAS_DKM:  # this key block's dKM rows for head h: [BLOCK_N, CP]
            dkm = _load_dkm(DKM + h * stride_dkmh, k_rows, mask_n, offs_c, C)
        if WANT_TG:
            tmul = tl.zeros([BLOCK_N, CLASS_TILE], dtype=tl.float32)
            tabs = tl.zeros([BLOCK_N, CLASS_TILE], dtype=tl.float32)
            tadd = tl.zeros([BLOCK_N, CLASS_TILE], dtype=tl.float32)
        for phase in tl.static_range(3):
            if phase != 0 or HAS_WR:  # the first query phase (a masked upper edge) exists only with a right window
                masked = phase != 1  # the edge phases 0 and 2 mask scores
                start, nblocks = _phase(phase, lo, nA, startB, nB, startC, nC)
                for b in range(nblocks):
                    rows = start + b * BLOCK_M + offs_m
                    rmask = rows < sq
                    g_rows = (q_start + rows).to(tl.int64)
                    # [BLOCK_M, BLOCK_D] tiles
                    q = _load_tile(Q_h, g_rows, stride_qt, rmask, offs_d, masked, HEAD_DIM, BLOCK_D)
                    do = _load_tile(DO_h, g_rows, stride_dot, rmask, offs_d, masked, HEAD_DIM, BLOCK_D)
                    lse2, di = _row_stats(LSE + h * stride_lh + q_start, DELTA + h * stride_lh + q_start, rows, rmask)
                    if HAS_RW or HAS_DKM:
                        qcls = tl.load(QCLS + q_start + rows, mask=rmask, other=0)  # [BLOCK_M]
                    q_off = h * C * C + qcls * C if HAS_RW else None  # [BLOCK_M] per row, its table row
                    tT, zT, mul_t, abs_t = _scores(k, q, qk_scale, rows, offs_n, sq, sk, wl, wr, q_off, rmask,
                                                   one_class, c0, KCLS, k_start, kcls, MUL, ABS, ADD, C, True, masked,
                                                   HAS_RW, HAS_MUL, HAS_ABS, HAS_ADD, HAS_WL, HAS_WR,
                                                   PREC)  # [BLOCK_N, BLOCK_M]
                    pT = tl.math.exp2(zT - lse2[None, :])  # [BLOCK_N, BLOCK_M]
                    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
                    dpT = tl.dot(v, tl.trans(do), input_precision=PREC)  # [BLOCK_N, BLOCK_M]
                    if HAS_CLASSES:  # + dmass[i, class(j)] (+ dKM[j, qclass(i)]), a tile built apart from dP
                        dm_rows = DMASS + h * stride_dmh + g_rows * C  # [BLOCK_M] row starts of dmass
                        extra = _dmass_tile(dm_rows, rows, rmask, one_class, c0, KCLS, k_start, offs_n, sk, kcls,
                                            offs_c, C, True, MASS_DOT, PREC)  # [BLOCK_N, BLOCK_M]
                        if HAS_DKM:
                            r0 = start + b * BLOCK_M
                            q_one, a0 = _one_class(tl.load(QRUNS + q_start + r0), r0, sq, BLOCK_M)
                            extra = _dkm_tile(extra, q_one, a0, dkm, qcls, offs_c, C, True, MASS_DOT, PREC)
                        dpT += extra
                    dzT = pT * (dpT - di[None, :])  # [BLOCK_N, BLOCK_M]
                    if WANT_TG:
                        # table gradients: per key j and query class a, sum_i dZ'_ji [* z_ji | * |z_ji|] over
                        # class(i) = a (a small product with onehot(query class)); reduced over key classes below
                        sT = tT * qk_scale
                        onehot_q = qcls[:, None] == offs_t[None, :]  # [BLOCK_M, CLASS_TILE]
                        if WANT_DMUL:
                            tmul = _dot_onehot(dzT * sT, onehot_q, tmul, True, PREC)
                        if WANT_DABS:
                            tabs = _dot_onehot(dzT * tl.abs(sT), onehot_q, tabs, True, PREC)
                        if WANT_DADD:
                            tadd = _dot_onehot(dzT, onehot_q, tadd, True, PREC)
                    dsT = _slope(dzT, tT, mul_t, abs_t, abs_sign, HAS_MUL, HAS_ABS) if HAS_RW else dzT
                    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PREC)
        if WANT_TG:
            # reduce over this block's keys per key class: [CLASS_TILE query classes, CLASS_TILE key classes] per
            # table, stored (no atomics) to this program's slot TG[n, pid_n, h, table, a, b]; summed in torch
            TG_h = TG + ((n * NKB + pid_n) * HQ + h).to(tl.int64) * (3 * C * C)
            tmask = (offs_t[:, None] < C) & (offs_t[None, :] < C)
            toffs = offs_t[:, None] * C + offs_t[None, :]
            zero = tl.zeros([CLASS_TILE, CLASS_TILE], dtype=tl.float32)
            if WANT_DMUL:
                tl.store(TG_h + toffs, _dot_onehot(tl.trans(tmul), onehot_k, zero, True, PREC), mask=tmask)
            if WANT_DABS:
                tl.store(TG_h + C * C + toffs, _dot_onehot(tl.trans(tabs), onehot_k, zero, True, PREC), mask=tmask)
            if WANT_DADD:
                tl.store(TG_h + 2 * C * C + toffs, _dot_onehot(tl.trans(tadd), onehot_k, zero, True, PREC),
                         mask=tmask)

    smask = mask_n[:, None] & mask_d[None, :]
    tl.store(DK + k_rows[:, None] * stride_dkt + hk * stride_dkh + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=smask)
    tl.store(DV + k_rows[:, None] * stride_dvt + hk * stride_dvh + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=smask)


@triton.heuristics({**FEATURE_FLAGS, "HAS_DKM": lambda args: args["DKM"] is not None})
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DMASS, DKM, DQ, CU_Q, CU_K, KCLS, QCLS, RUNS, QRUNS, MUL, ABS, ADD,
                   scale, qk_scale, wl, wr,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lh, stride_dmh, stride_dkmh,
                   GROUP, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, C: tl.constexpr, CP: tl.constexpr,
                   HAS_CLASSES: tl.constexpr, HAS_RW: tl.constexpr,
                   HAS_MUL: tl.constexpr, HAS_ABS: tl.constexpr, HAS_ADD: tl.constexpr,
                   HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, MASS_DOT: tl.constexpr, PREC: tl.constexpr,
                   HAS_DKM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
    # [BLOCK_M, BLOCK_D] tiles
    q = _load_tile(Q + h * stride_qh, q_rows, stride_qt, mask_m, offs_d, True, HEAD_DIM, BLOCK_D)
    do = _load_tile(DO + h * stride_doh, q_rows, stride_dot, mask_m, offs_d, True, HEAD_DIM, BLOCK_D)
    lse2, di = _row_stats(LSE + h * stride_lh + q_start, DELTA + h * stride_lh + q_start, offs_m, mask_m)
    if HAS_CLASSES:
        dm_rows = DMASS + h * stride_dmh + q_rows * C  # [BLOCK_M] row starts of dmass
    if HAS_RW or HAS_DKM:
        qcls = tl.load(QCLS + q_start + offs_m, mask=mask_m, other=0)  # [BLOCK_M]
    qcls_row = h * C * C + qcls * C if HAS_RW else None  # [BLOCK_M] per row, its table row (head h's [C, C] slice)
    if HAS_DKM:  # a block of one query class a0 takes the column dKM[:, a0] (no one-hot product)
        DKM_h = DKM + h * stride_dkmh
        q_one, a0 = _one_class(tl.load(QRUNS + q_start + m0), m0, sq, BLOCK_M)
    abs_sign = tl.where(qk_scale > 0, 1.0, tl.where(qk_scale < 0, -1.0, 0.0))
    K_base = K + k_start.to(tl.int64) * stride_kt + hk * stride_kh
    V_base = V + k_start.to(tl.int64) * stride_vt + hk * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
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
                # [BLOCK_N, BLOCK_D] tiles
                k = _load_tile(K_base, cols, stride_kt, kmask, offs_d, masked, HEAD_DIM, BLOCK_D)
                v = _load_tile(V_base, cols, stride_vt, kmask, offs_d, masked, HEAD_DIM, BLOCK_D)
                if HAS_CLASSES:
                    one_class, c0 = _one_class(run, j0, sk, BLOCK_N)
                    run = tl.load(RUNS + k_start + j0 + BLOCK_N, mask=j0 + BLOCK_N < sk, other=0)
                else:
                    one_class, c0 = None, None  # read by _scores only with tables
                t, z, mul_t, abs_t = _scores(q, k, qk_scale, offs_m, cols, sq, sk, wl, wr, qcls_row, mask_m,
                                             one_class, c0, KCLS, k_start, None, MUL, ABS, ADD, C, False, masked,
                                             HAS_RW, HAS_MUL, HAS_ABS, HAS_ADD, HAS_WL, HAS_WR,
                                             PREC)  # [BLOCK_M, BLOCK_N]
                p = tl.math.exp2(z - lse2[:, None])  # [BLOCK_M, BLOCK_N]
                dp = tl.dot(do, tl.trans(v), input_precision=PREC)  # [BLOCK_M, BLOCK_N]
                if HAS_CLASSES:  # + dmass[i, class(j)] (+ dKM[j, qclass(i)]), a tile built apart from dP
                    extra = _dmass_tile(dm_rows, offs_m, mask_m, one_class, c0, KCLS, k_start, cols, sk, None, offs_c,
                                        C, False, MASS_DOT, PREC)  # [BLOCK_M, BLOCK_N]
                    if HAS_DKM:
                        dkm = _load_dkm(DKM_h, k_start + cols, kmask, offs_c, C)  # [BLOCK_N, CP]
                        extra = _dkm_tile(extra, q_one, a0, dkm, qcls, offs_c, C, False, MASS_DOT, PREC)
                    dp += extra
                ds = p * (dp - di[:, None])
                if HAS_RW:
                    ds = _slope(ds, t, mul_t, abs_t, abs_sign, HAS_MUL, HAS_ABS)
                dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    tl.store(DQ + q_rows[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


# ----------------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------------

_tuned = {}


_KERNELS = {"dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel, "kmd": _bwd_km_delta_kernel}


def _get(kind, configs, key, want_tg=False, choices=()):
    fn = _KERNELS[kind]
    if INTERPRET:
        return fn
    key = (kind, want_tg, choices) + key
    if key not in _tuned:
        configs = with_mass_forms(configs, choices)
        # The table-gradient slots a config writes depend on its BLOCK_N: the autotuner zeroes the buffer before
        # each trial and after choosing, so no trial config leaves stale slots behind.
        extra = dict(key=TUNE_KEY + ["WANT_DMUL", "WANT_DABS", "WANT_DADD"], reset_to_zero=["TG"]) if want_tg else \
            dict(key=TUNE_KEY)
        _tuned[key] = triton.autotune(configs=configs, **extra)(fn)
    return _tuned[key]


def backward(dout, dmass, delta, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
             key_class, query_class, num_classes, mul, abs_, add, scale, window_left, window_right,
             table_grads=None, dkey_mass=None):
    """-> (dq, dk, dv); with ``table_grads=(need_mul, need_abs, need_add)`` -> (dq, dk, dv, dtables), dtables
    float32 [3, Hq, C, C] (zeros for the tables not asked), reduced per class pair inside the dK/dV kernel.
    ``dkey_mass`` [Hq, Tk, C]: the gradient of a loss on key masses; its share of delta is added here."""
    tq, hq, d = q.shape
    tk, hk, _ = k.shape
    nseq = cu_seqlens_q.numel() - 1
    C = int(num_classes)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    want = tuple(bool(w) for w in table_grads) if table_grads is not None else (False, False, False)
    # a table gradient only for a present table (with classes); others stay zero
    want = tuple(w and t is not None and C > 0 for w, t in zip(want, (mul, abs_, add)))
    want_tg = any(want)
    if table_grads is not None:
        dtables = torch.zeros(3, hq, C, C, device=q.device, dtype=torch.float32)
    if nseq == 0 or (tq == 0 and tk == 0):
        return (dq, dk, dv) if table_grads is None else (dq, dk, dv, dtables)
    dout = dout.contiguous()
    lse = lse.float().contiguous()
    delta = delta.float().contiguous()
    has_classes = C > 0
    if has_classes:
        dmass = (torch.zeros(hq, tq, C, device=q.device, dtype=torch.float32) if dmass is None
                 else dmass.float().contiguous())
    else:
        dmass = None
    check_grid_blocks("max_seqlen_q", max_seqlen_q)
    check_grid_blocks("max_seqlen_k", max_seqlen_k)
    block_d = max(16, triton.next_power_of_2(d))
    tables = sum(t is not None for t in (mul, abs_, add))  # how many of MUL, ABS, ADD (0: no re-weighting)
    prec = dot_precision(q.dtype)
    # a loss on key masses (only with classes; without rows or keys it has no effect)
    has_dkm = dkey_mass is not None and has_classes and tq > 0 and tk > 0
    dkm = dkey_mass.float().contiguous() if has_dkm else None
    runs = class_runs(key_class, cu_seqlens_k) if has_classes else None
    qruns = class_runs(query_class, cu_seqlens_q) if has_dkm else None
    shape = (block_d, prec, has_classes, tables, q.element_size())
    key = (dim_bucket(block_d),) + shape[1:] + (str(q.device), tune_count(), has_dkm)
    if has_dkm:
        # delta + sum_j P_ij dKM[j, qclass(i)] (a pass over each row's keys), into a new buffer: the autotuner may
        # run the kernel more than once
        delta_km = torch.empty_like(delta)
        _get("kmd", launch_configs("kmd", *shape, q.device), key)[
            lambda meta: (hq, nseq, triton.cdiv(max_seqlen_q, meta["BLOCK_M"]))](
            Q=q, K=k, LSE=lse, DELTA=delta, DKM=dkm, DELTA_OUT=delta_km, CU_Q=cu_seqlens_q, CU_K=cu_seqlens_k,
            KCLS=key_class, QCLS=query_class, RUNS=runs if tables else None, QRUNS=qruns, MUL=mul, ABS=abs_, ADD=add,
            qk_scale=float(scale) * LOG2E.value, wl=int(window_left), wr=int(window_right),
            stride_qt=q.stride(0), stride_qh=q.stride(1), stride_kt=k.stride(0), stride_kh=k.stride(1),
            stride_lh=lse.stride(0), stride_dkmh=dkm.stride(0),
            GROUP=hq // hk, HEAD_DIM=d, BLOCK_D=block_d, C=C, MASS_DOT=mass_dot_value(), PREC=prec,
            **launch_blocks())
        delta = delta_km
    common = dict(
        Q=q, K=k, V=v, DO=dout, LSE=lse, DELTA=delta, DMASS=dmass, DKM=dkm, CU_Q=cu_seqlens_q, CU_K=cu_seqlens_k,
        KCLS=key_class if has_classes else None, QCLS=query_class if has_classes else None,
        RUNS=runs, QRUNS=qruns, MUL=mul, ABS=abs_, ADD=add, scale=float(scale), qk_scale=float(scale) * LOG2E.value,
        wl=int(window_left), wr=int(window_right),
        stride_qt=q.stride(0), stride_qh=q.stride(1), stride_kt=k.stride(0), stride_kh=k.stride(1),
        stride_vt=v.stride(0), stride_vh=v.stride(1), stride_dot=dout.stride(0), stride_doh=dout.stride(1),
        stride_lh=lse.stride(0), stride_dmh=dmass.stride(0) if has_classes else 0,
        stride_dkmh=dkm.stride(0) if has_dkm else 0,
        GROUP=hq // hk, HEAD_DIM=d, BLOCK_D=block_d, C=C, PREC=prec, **launch_blocks())
    # the formulation of the class terms: the autotuner's choice, else passed here
    choices = mass_dot_choices(has_classes)
    if not choices:
        common["MASS_DOT"] = mass_dot_value()

    dkdv_configs = launch_configs("dkdv", *shape, q.device, has_km=has_dkm)
    tg, nkb = None, 1
    if want_tg and tk > 0:
        # one [3, C, C] slot per (sequence, key block, query head), sized for the smallest BLOCK_N of any config
        min_bn = common["BLOCK_N"] if INTERPRET else min(c.kwargs["BLOCK_N"] for c in dkdv_configs)
        nkb = triton.cdiv(max_seqlen_k, min_bn)
        tg = torch.zeros(nseq, nkb, hq, 3, C, C, device=q.device, dtype=torch.float32)

    if tk > 0:
        _get("dkdv", dkdv_configs, key, want_tg, choices)[
            lambda meta: (hk, nseq, triton.cdiv(max_seqlen_k, meta["BLOCK_N"]))](
            DK=dk, DV=dv, TG=tg, HQ=hq, NKB=nkb, stride_dkt=dk.stride(0), stride_dkh=dk.stride(1),
            stride_dvt=dv.stride(0), stride_dvh=dv.stride(1),
            WANT_DMUL=want[0], WANT_DABS=want[1], WANT_DADD=want[2], **common)
    if tq > 0:
        _get("dq", launch_configs("dq", *shape, q.device, has_km=has_dkm), key, choices=choices)[
            lambda meta: (hq, nseq, triton.cdiv(max_seqlen_q, meta["BLOCK_M"]))](
            DQ=dq, stride_dqt=dq.stride(0), stride_dqh=dq.stride(1), **common)
    if table_grads is None:
        return dq, dk, dv
    if want_tg and tk > 0:
        # deterministic reduction over sequences and key blocks; the kernel's scores are in log2 units
        dtables = tg.sum((0, 1)).transpose(0, 1).contiguous()
        dtables[:2] *= LN2.value
    return dq, dk, dv, dtables
