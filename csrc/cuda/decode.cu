// Split-KV decode kernel ("flash-decoding") with per-class attention mass and class-wise re-weighting, on the
// tensor cores. See decode.h for the interface. Design:
//   * grid (B * Hk, num_splits, row tiles): a CTA of 4 warps holds 16 query rows of one kv head (its GQA group x Sq
//     rows, in tiles of 16; decode's 1-8 rows per kv head are one tile) for one split of the keys, so each K/V
//     element of the split is read once per row tile;
//   * the split's keys go to the warps in chunks of 16 (warp w takes chunks w, w + 4, ...); each warp streams its
//     own chunks through a private 3-stage (2 at D = 256) cp.async pipeline of 16-byte copies (zero-filled past the
//     end, the keys' class ids in the same group) and needs no CTA barrier inside the key loop;
//   * per chunk: S = Q K^T with mma.sync m16n8k16 (fp32 accumulation; K through ldmatrix, Q's fragments loaded once
//     and kept in registers), times the scale, the class-wise re-weighting, the mask (length, bottom-right causal),
//     an online softmax per row in registers;
//     O += P V with P kept in registers as the A operand and V through ldmatrix.trans, and one more n8 product
//     P x onehot(key class) for the per-class masses, whose sum is the softmax denominator;
//   * the 4 warps' partial (max, O, masses) are merged through shared memory; each split writes normalized (out,
//     lse, mass) to an fp32 workspace and the combine kernel merges the splits with weights exp(lse_split -
//     lse_total). With one split the CTA writes the final outputs itself.
//   * key masses (optional): a second kernel over the cache after the final lse is known, recomputing the scores
//     with the forward's score_chunk and summing P per key and query class (decode_key_mass_kernel).
// Compiled by a host compiler with -DAVAR_DECODE_EMULATE, the same source runs on the CPU under the warp emulator
// of emulate/simt.h (tests/test_decode_emulated.py): the PTX below has an emulated twin there, nothing else does.
#include "decode.h"

#if defined(AVAR_DECODE_EMULATE)
#include "emulate/simt.h"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

// Config members unused by some head dims (and all but one with AVAR_DECODE_ONLY_HDIM) are not an issue.
#pragma nv_diag_suppress 177

#if defined(AVAR_DECODE_EMULATE)
#define AVAR_DYNAMIC_SMEM(name) unsigned char* name = ::avar_emu::dynamic_smem()
#define AVAR_LAUNCH(kernel, grid, block, smem, stream, ...) \
    ::avar_emu::launch(grid, block, smem, [=] { kernel(__VA_ARGS__); })
#else
#define AVAR_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define AVAR_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif

namespace avar {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kChunk = 16;           // keys per warp step (the k of the P V product)
constexpr int kTileRows = 16;        // query rows per CTA (the m of every product)
constexpr int kKeysPerCta = kWarps * kChunk;  // keys one round of the 4 warps covers; the split planner's tile
constexpr int kCombineRowsPerBlock = 4;
constexpr float kLog2e = 1.4426950408889634f;

template <int D> struct Tile {
    static constexpr int kStages = D >= 256 ? 2 : 3;  // per warp; 2 at D = 256 to stay within shared memory
    static constexpr int kStride = D + 8;              // elements per shared-memory row: ldmatrix without conflicts
    static constexpr int kChunks = D / 8;              // 16-byte pieces of a row
    static_assert(D % 16 == 0, "head dim must be a multiple of 16");
};

template <typename T> struct Vec2;
template <> struct Vec2<__half> { using type = __half2; };
template <> struct Vec2<__nv_bfloat16> { using type = __nv_bfloat162; };

template <typename T> __device__ __forceinline__ typename Vec2<T>::type from_float2(float a, float b);
template <> __device__ __forceinline__ __half2 from_float2<__half>(float a, float b) { return __floats2half2_rn(a, b); }
template <> __device__ __forceinline__ __nv_bfloat162 from_float2<__nv_bfloat16>(float a, float b) {
    return __floats2bfloat162_rn(a, b);
}
// Explicit conversions: torch's extension build defines __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, which remove the implicit float -> __half / __nv_bfloat16 constructors.
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// Two floats -> one 32-bit register of two 16-bit values (the first in the low half), an mma operand.
template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b) {
    const typename Vec2<T>::type h = from_float2<T>(a, b);
    uint32_t u;
    memcpy(&u, &h, 4);
    return u;
}

template <typename T> __device__ __forceinline__ void store8(T* ptr, const float* f) {
    uint4 u;
    typename Vec2<T>::type* h = reinterpret_cast<typename Vec2<T>::type*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = from_float2<T>(f[2 * i], f[2 * i + 1]);
    *reinterpret_cast<uint4*>(ptr) = u;
}

// ---- The PTX the kernels use (warp-collective or asynchronous); emulate/simt.h models each one on the host.

// 16-byte (or 4-byte) async copy global -> shared; pred = false zero-fills the destination without reading.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
#if defined(AVAR_DECODE_EMULATE)
    avar_emu::cp_async(smem, gmem, 16, pred);
#else
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(pred ? 16 : 0));
#endif
}
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool pred) {
#if defined(AVAR_DECODE_EMULATE)
    avar_emu::cp_async(smem, gmem, 4, pred);
#else
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(pred ? 4 : 0));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(AVAR_DECODE_EMULATE)
    avar_emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
#if defined(AVAR_DECODE_EMULATE)
    avar_emu::cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Four 8x8 matrices of 16-bit values from shared memory: lane 8 m + i gives the address of row i of matrix m; r[m]
// is lane l's pair at row l / 4, columns 2 (l % 4) .. + 1 of matrix m (with trans: of the transposed matrix).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
#if defined(AVAR_DECODE_EMULATE)
    avar_emu::ldmatrix_x4(r, smem, false);
#else
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
#if defined(AVAR_DECODE_EMULATE)
    avar_emu::ldmatrix_x4(r, smem, true);
#else
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
#endif
}

// d += A B, A 16 x 16 (four registers, row-major fragment), B 16 x 8 (b0, b1, column-major fragment), fp32 d.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(AVAR_DECODE_EMULATE)
    const uint32_t b[2] = {b0, b1};
    avar_emu::mma_16816<T>(d, a, b);
#else
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
#endif
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
// Over the 4 lanes of a quad (the lanes that hold one accumulator row).
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

// ---- Pieces shared by the split (forward) kernel and the key-mass kernel: both must see the same z', so the row
// loads, the chunk loads and the score computation exist once.

// Per-row re-weight coefficients of a row tile: [3][kTileRows][kDecodeMaxClasses] floats (MUL, ABS, ADD).
constexpr int kCoefFloats = 3 * kTileRows * kDecodeMaxClasses;

// The rows r < Rc of a tile are rows row0 + r of its kv head's group; row -> (query head hg, query qi) = divmod(row,
// Sq). Loads q of those rows into Qs [kTileRows, kStride] (q's dtype; zeros for r >= Rc) and each row's re-weight
// coefficients over the key classes into coef (zeros without tables). All threads of the CTA take part.
template <typename T, int D>
__device__ __forceinline__ void load_row_tile(const DecodeParams& p, int b, int kvh, int row0, int Rc, T* Qs,
                                              float* coef) {
    constexpr int DC = Tile<D>::kChunks;
    constexpr int ST = Tile<D>::kStride;
    const int tid = threadIdx.x, Sq = p.Sq, C = p.C, group = p.Hq / p.Hk;
    const bool has_rw = p.mul != nullptr || p.abs_ != nullptr || p.add != nullptr;
    const T* __restrict__ qg = static_cast<const T*>(p.q);
    for (int idx = tid; idx < kTileRows * DC; idx += kThreads) {
        const int r = idx / DC, c = idx % DC;
        uint4 u = make_uint4(0u, 0u, 0u, 0u);
        if (r < Rc) {
            const int gr = row0 + r, hg = gr / Sq, qi = gr % Sq, h = kvh * group + hg;
            u = *reinterpret_cast<const uint4*>(qg + b * p.q_batch_stride + qi * p.q_seq_stride +
                                                h * p.q_head_stride + c * 8);
        }
        *reinterpret_cast<uint4*>(Qs + r * ST + c * 8) = u;
    }
    constexpr int NC = kTileRows * kDecodeMaxClasses;
    for (int idx = tid; idx < NC; idx += kThreads) {
        const int r = idx / kDecodeMaxClasses, c = idx % kDecodeMaxClasses;
        float mu = 0.f, ab = 0.f, ad = 0.f;
        if (has_rw && r < Rc && c < C) {
            const int gr = row0 + r, hg = gr / Sq, qi = gr % Sq, h = kvh * group + hg;
            const int a = p.query_class != nullptr ? p.query_class[b * p.query_class_batch_stride + qi] : 0;
            const int64_t t = (int64_t(h) * C + a) * C + c;
            if (p.mul) mu = p.mul[t];
            if (p.abs_) ab = p.abs_[t];
            if (p.add) ad = p.add[t];
        }
        coef[idx] = mu;
        coef[NC + idx] = ab;
        coef[2 * NC + idx] = ad;
    }
}

// One warp issues the cp.async copies of the K rows (and V rows when vs != nullptr) of keys j0 .. j0 + 15 of kv head
// kvh of sequence b into ks / vs [kChunk, kStride], paged through block_table or not, zero-filling keys >= kend,
// and the keys' classes into cls [kChunk] (0 without classes or past kend). The caller commits and waits.
// A chunk never straddles a page: chunks start at multiples of 16 and pages hold a multiple of 16 keys.
template <typename T, int D>
__device__ __forceinline__ void load_chunk(const DecodeParams& p, int b, int kvh, int j0, int kend, T* ks, T* vs,
                                           int* cls) {
    constexpr int DC = Tile<D>::kChunks;
    constexpr int ST = Tile<D>::kStride;
    const int lane = threadIdx.x % 32;
    const T* __restrict__ kg = static_cast<const T*>(p.k);
    const T* __restrict__ vg = static_cast<const T*>(p.v);
    int64_t page = b, row = j0;
    if (p.block_table != nullptr) {
        const int blk = j0 / p.block_size;  // one division per chunk
        page = j0 < kend ? p.block_table[b * p.block_table_batch_stride + blk] : 0;
        row = j0 - blk * p.block_size;
    }
    const T* kb = kg + page * p.k_batch_stride + row * p.k_seq_stride + int64_t(kvh) * p.k_head_stride;
    const T* vb = vg + page * p.v_batch_stride + row * p.v_seq_stride + int64_t(kvh) * p.v_head_stride;
    static_assert(kChunk * DC % 32 == 0, "a chunk is a whole number of 16-byte pieces per lane");
    if constexpr (32 % DC == 0) {
        // D = 64, 128, 256: a lane keeps its column piece c and steps 32 / DC keys per copy, so its addresses are
        // one base plus a constant step (no per-copy 64-bit multiplies).
        constexpr int KP = 32 / DC;
        const int n0 = lane / DC, c = lane % DC;
        const T* kp = kb + n0 * p.k_seq_stride + c * 8;
        const T* vp = vb + n0 * p.v_seq_stride + c * 8;
        const int64_t kstep = KP * p.k_seq_stride, vstep = KP * p.v_seq_stride;
#pragma unroll
        for (int it = 0; it < kChunk / KP; ++it) {
            const int n = n0 + it * KP;
            const bool ok = j0 + n < kend;
            cp_async16(ks + n * ST + c * 8, ok ? kp : kg, ok);
            if (vs != nullptr) cp_async16(vs + n * ST + c * 8, ok ? vp : vg, ok);
            kp += kstep;
            vp += vstep;
        }
    } else {
#pragma unroll
        for (int it = 0; it < kChunk * DC / 32; ++it) {
            const int idx = lane + 32 * it, n = idx / DC, c = idx % DC;
            const bool ok = j0 + n < kend;
            cp_async16(ks + n * ST + c * 8, ok ? kb + n * p.k_seq_stride + c * 8 : kg, ok);
            if (vs != nullptr) cp_async16(vs + n * ST + c * 8, ok ? vb + n * p.v_seq_stride + c * 8 : vg, ok);
        }
    }
    if (lane < kChunk) {
        const int j = j0 + lane;
        if (p.key_class != nullptr) {
            const bool ok = j < kend;
            cp_async4(cls + lane, ok ? p.key_class + b * p.key_class_batch_stride + j : p.key_class, ok);
        } else {
            cls[lane] = 0;
        }
    }
}

// The last key row r of the tile sees (-1: none): kend - 1, or its bottom-right causal limit (query qi sees key j
// iff j <= qi + seqlen - Sq). Rows r >= Rc see nothing.
__device__ __forceinline__ int row_key_limit(const DecodeParams& p, int row0, int r, int Rc, int kend, int seqlen) {
    if (r >= Rc) return -1;
    const int qi = (row0 + r) % p.Sq;
    return p.causal ? min(kend - 1, qi + seqlen - p.Sq) : kend - 1;
}

// The A fragments of the Q tile for each 16-wide k step (ldmatrix: rows lane % 16, columns + 8 for lanes >= 16);
// the key loops keep them in registers.
template <typename T, int D> struct QFrags {
    uint32_t r[D / 16][4];
};
template <typename T, int D> __device__ __forceinline__ QFrags<T, D> load_q_frags(const T* Qs) {
    constexpr int ST = Tile<D>::kStride;
    const int lane = threadIdx.x % 32;
    const T* qa = Qs + (lane % 16) * ST + (lane / 16) * 8;
    QFrags<T, D> q;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(q.r[kk], qa + kk * 16);
    return q;
}

// s[nt][e] = z' of tile row g + 8 (e / 2) and key j0 + nt * 8 + 2 t + e % 2 of a warp's chunk (g = lane / 4, t =
// lane % 4: the mma accumulator layout): q . k on the tensor cores with fp32 accumulation, times the scale, the
// class-wise re-weighting with the row's coefficients for the key's class, then -inf past the row's last visible
// key lim[e / 2].
template <typename T, int D>
__device__ __forceinline__ void score_chunk(const QFrags<T, D>& q, const T* ks, const int* cls, const float* coef,
                                            bool has_rw, float scale, int j0, const int (&lim)[2], float (&s)[2][4]) {
    constexpr int ST = Tile<D>::kStride;
    constexpr int NC = kTileRows * kDecodeMaxClasses;
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
    // ldmatrix addresses of K: keys (lane / 16) * 8 + lane % 8, columns + 8 for odd lane / 8 (B fragments of keys
    // 0-7 and 8-15).
    const T* ka = ks + ((lane / 16) * 8 + lane % 8) * ST + ((lane / 8) % 2) * 8;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t kf[4];
        ldmatrix_x4(kf, ka + kk * 16);
        mma_16816<T>(s[0], q.r[kk], kf[0], kf[1]);
        mma_16816<T>(s[1], q.r[kk], kf[2], kf[3]);
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int n = nt * 8 + 2 * t + (e & 1), r = g + 8 * (e >> 1);
            float z = s[nt][e] * scale;
            if (has_rw) {
                const int w = r * kDecodeMaxClasses + cls[n];
                z = z + z * coef[w] + coef[NC + w] * fabsf(z) + coef[2 * NC + w];
            }
            s[nt][e] = j0 + n <= lim[e >> 1] ? z : -INFINITY;
        }
}

// ---- The split kernel.

// Shared memory of the split kernel (bytes): row coefficients, the Q tile, then per warp kStages x (K chunk, V chunk)
// (after the key loop reused for the warps' partial results: max [16], O [16, D], masses [16, 8] fp32, and each row's
// merge weights), then per warp kStages x 16 key classes.
template <typename T, int D> struct SplitSmem {
    static constexpr int kCoef = 0;
    static constexpr int kQ = kCoef + kCoefFloats * 4;
    static constexpr int kStageElems = 2 * kChunk * Tile<D>::kStride;
    static constexpr int kPipe = kQ + kTileRows * Tile<D>::kStride * int(sizeof(T));
    static constexpr int kPipeBytes = kWarps * Tile<D>::kStages * kStageElems * int(sizeof(T));
    static constexpr int kPartFloats = kTileRows * (1 + D + kDecodeMaxClasses);  // one warp's partial result
    static constexpr int kMergeBytes = kWarps * kPartFloats * 4;
    static constexpr int kRowStats = kPipe + kMergeBytes;  // then per row: the warps' weights, 1 / l, lse
    static constexpr int kRowFloats = kWarps + 2;
    static constexpr int kMergeEnd = kMergeBytes + kTileRows * kRowFloats * 4;
    static constexpr int kCls = kPipe + (kPipeBytes > kMergeEnd ? kPipeBytes : kMergeEnd);
    static constexpr int kBytes = kCls + kWarps * Tile<D>::kStages * kChunk * 4;
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(const DecodeParams p) {
    using L = SplitSmem<T, D>;
    constexpr int ST = Tile<D>::kStride;
    constexpr int NS = Tile<D>::kStages;
    constexpr int OT = D / 8;  // n8 tiles of O
    AVAR_DYNAMIC_SMEM(smem);
    float* coef = reinterpret_cast<float*>(smem + L::kCoef);
    T* Qs = reinterpret_cast<T*>(smem + L::kQ);

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int b = blockIdx.x / p.Hk;
    const int kvh = blockIdx.x % p.Hk;
    const int split = blockIdx.y;
    const int group = p.Hq / p.Hk;
    const int row0 = blockIdx.z * kTileRows;
    const int Rc = min(group * p.Sq - row0, kTileRows);  // rows held by this CTA
    const int Sq = p.Sq, C = p.C;
    const int seqlen = p.cache_seqlens[b];
    const int kbeg = split * p.keys_per_split;
    const int kend = min(kbeg + p.keys_per_split, seqlen);
    const int nchunks = kend > kbeg ? (kend - kbeg + kChunk - 1) / kChunk : 0;
    const int my_chunks = nchunks > warp ? (nchunks - warp + kWarps - 1) / kWarps : 0;
    const bool has_rw = p.mul != nullptr || p.abs_ != nullptr || p.add != nullptr;

    T* wstage = reinterpret_cast<T*>(smem + L::kPipe) + warp * NS * L::kStageElems;
    int* wcls = reinterpret_cast<int*>(smem + L::kCls) + warp * NS * kChunk;
    // Chunk i of this warp (keys kbeg + (warp + 4 i) * 16 ...) into stage i % NS; one commit group per chunk, empty
    // past the warp's last chunk, so that wait_group<NS - 1> always means "chunk i has landed".
    auto issue = [&](int i) {
        if (i < my_chunks) {
            const int st = i % NS;
            load_chunk<T, D>(p, b, kvh, kbeg + (warp + i * kWarps) * kChunk, kend, wstage + st * L::kStageElems,
                             wstage + st * L::kStageElems + kChunk * ST, wcls + st * kChunk);
        }
        cp_async_commit();
    };
#pragma unroll
    for (int i = 0; i < NS - 1; ++i) issue(i);
    load_row_tile<T, D>(p, b, kvh, row0, Rc, Qs, coef);
    __syncthreads();  // the Q tile and coefficients are read by every warp

    const int lim[2] = {row_key_limit(p, row0, g, Rc, kend, seqlen), row_key_limit(p, row0, g + 8, Rc, kend, seqlen)};
    const QFrags<T, D> qf = load_q_frags<T, D>(Qs);
    float o[OT][4];     // O of rows g, g + 8 (accumulator layout), columns nt * 8 + 2 t ..
    float ms[4];        // masses: columns = key classes (class 0 = all keys without classes)
    float m[2] = {-INFINITY, -INFINITY};  // running max of rows g, g + 8 (over this warp's keys)
#pragma unroll
    for (int nt = 0; nt < OT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[nt][e] = 0.f;
#pragma unroll
    for (int e = 0; e < 4; ++e) ms[e] = 0.f;

    for (int i = 0; i < my_chunks; ++i) {
        issue(i + NS - 1);
        cp_async_wait<NS - 1>();
        __syncwarp();  // every lane's copies of chunk i are visible to the warp
        const int st = i % NS;
        const T* ks = wstage + st * L::kStageElems;
        const T* vs = ks + kChunk * ST;
        const int* cls = wcls + st * kChunk;
        const int j0 = kbeg + (warp + i * kWarps) * kChunk;

        float s[2][4];
        score_chunk<T, D>(qf, ks, cls, coef, has_rw, p.scale, j0, lim, s);

        // Online softmax over the chunk: rows g (e = 0, 1) and g + 8 (e = 2, 3); a row's 16 scores sit in a quad.
        float alpha[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const float mx = quad_max(fmaxf(fmaxf(s[0][2 * h], s[0][2 * h + 1]), fmaxf(s[1][2 * h], s[1][2 * h + 1])));
            const float m_new = fmaxf(m[h], mx);
            // No visible key yet: P = 0 (exp2(-inf)) and nothing to rescale.
            const float base = m_new == -INFINITY ? 0.f : m_new * kLog2e;
            alpha[h] = m_new == -INFINITY ? 1.f : exp2f(m[h] * kLog2e - base);
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int e = 2 * h; e < 2 * h + 2; ++e) s[nt][e] = exp2f(s[nt][e] * kLog2e - base);
            m[h] = m_new;
        }
        // Rescale only when some row's max moved (warp-uniform branch): after the first chunks it rarely does.
        if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
            for (int nt = 0; nt < OT; ++nt) {
                o[nt][0] *= alpha[0];
                o[nt][1] *= alpha[0];
                o[nt][2] *= alpha[1];
                o[nt][3] *= alpha[1];
            }
            ms[0] *= alpha[0];
            ms[1] *= alpha[0];
            ms[2] *= alpha[1];
            ms[3] *= alpha[1];
        }

        // P as the A operand (the accumulator layout of S is the A layout of a k = 16 product).
        const uint32_t pa[4] = {pack2<T>(s[0][0], s[0][1]), pack2<T>(s[0][2], s[0][3]), pack2<T>(s[1][0], s[1][1]),
                                pack2<T>(s[1][2], s[1][3])};
        // Masses: B[key][class] = onehot(class(key)); this lane's operand is keys 2t, 2t + 1 (and + 8) at class g.
        mma_16816<T>(ms, pa, pack2<T>(cls[2 * t] == g ? 1.f : 0.f, cls[2 * t + 1] == g ? 1.f : 0.f),
                     pack2<T>(cls[2 * t + 8] == g ? 1.f : 0.f, cls[2 * t + 9] == g ? 1.f : 0.f));
        // O += P V: V rows lane % 16, columns + 8 for lanes >= 16, transposed (B fragments of two n8 column tiles).
        const T* va = vs + (lane % 16) * ST + (lane / 16) * 8;
#pragma unroll
        for (int dt = 0; dt < D / 16; ++dt) {
            uint32_t vf[4];
            ldmatrix_x4_trans(vf, va + dt * 16);
            mma_16816<T>(o[2 * dt], pa, vf[0], vf[1]);
            mma_16816<T>(o[2 * dt + 1], pa, vf[2], vf[3]);
        }
        __syncwarp();  // the stage is refilled by the next iteration's issue
    }
    cp_async_wait<0>();
    __syncthreads();  // every warp is done with its stages: they become the partial results

    // ---- merge the 4 warps' partial results: part[w] = max [16], O [16, D], masses [16, 8].
    float* part = reinterpret_cast<float*>(smem + L::kPipe);
    {
        float* mine = part + warp * L::kPartFloats;
        float* pm = mine;
        float* po = mine + kTileRows;
        float* pc = po + kTileRows * D;
        if (t == 0) {
            pm[g] = m[0];
            pm[g + 8] = m[1];
        }
#pragma unroll
        for (int nt = 0; nt < OT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) po[(g + 8 * (e >> 1)) * D + nt * 8 + 2 * t + (e & 1)] = o[nt][e];
#pragma unroll
        for (int e = 0; e < 4; ++e) pc[(g + 8 * (e >> 1)) * kDecodeMaxClasses + 2 * t + (e & 1)] = ms[e];
    }
    __syncthreads();

    // Per row, once: the warps' weights exp(m_w - m), 1 / l and lse, with l = sum of the weighted class columns.
    float* stats = reinterpret_cast<float*>(smem + L::kRowStats);
    if (tid < Rc) {
        const int r = tid;
        float* rs = stats + r * L::kRowFloats;
        float mx = -INFINITY;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, part[w * L::kPartFloats + r]);
        float l = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
            const float* pw = part + w * L::kPartFloats;
            const float f = pw[r] == -INFINITY ? 0.f : exp2f((pw[r] - mx) * kLog2e);
            const float* pc = pw + kTileRows + kTileRows * D + r * kDecodeMaxClasses;
            float sw = 0.f;
#pragma unroll
            for (int e = 0; e < kDecodeMaxClasses; ++e) sw += pc[e];
            l += f * sw;
            rs[w] = f;
        }
        // l = 0: no visible key (out = 0, mass = 0, lse = -inf); a NaN l (NaN scores) propagates.
        const bool empty = l <= 0.f;
        rs[kWarps] = empty ? 0.f : 1.f / l;
        rs[kWarps + 1] = empty ? -INFINITY : mx + logf(l);
    }
    __syncthreads();

    // Thread = (row r, 8-column piece c of O, or c = D / 8: lse and masses).
    const int64_t rows_total = int64_t(p.B) * p.Hq * Sq;
    for (int idx = tid; idx < Rc * (OT + 1); idx += kThreads) {
        const int r = idx / (OT + 1), c = idx % (OT + 1);
        const float* rs = stats + r * L::kRowFloats;
        const float inv = rs[kWarps];
        float vals[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            float acc = 0.f;
#pragma unroll
            for (int w = 0; w < kWarps; ++w) {
                const float* pw = part + w * L::kPartFloats;
                const float x = c < OT ? pw[kTileRows + r * D + c * 8 + e]
                                       : pw[kTileRows + kTileRows * D + r * kDecodeMaxClasses + e];
                acc += rs[w] * x;
            }
            vals[e] = acc * inv;
        }
        const int gr = row0 + r, hg = gr / Sq, qi = gr % Sq, h = kvh * group + hg;
        const int64_t row_id = (int64_t(b) * p.Hq + h) * Sq + qi;
        const float lse_v = rs[kWarps + 1];
        if (p.num_splits == 1) {
            if (c < OT) {
                T* dst = static_cast<T*>(p.out) + b * p.out_batch_stride + qi * p.out_seq_stride +
                         h * p.out_head_stride + c * 8;
                store8(dst, vals);
            } else {
                p.lse[row_id] = lse_v;
#pragma unroll
                for (int e = 0; e < kDecodeMaxClasses; ++e)
                    if (e < C) p.mass[row_id * C + e] = vals[e];
            }
        } else {
            const int64_t wrow = int64_t(split) * rows_total + row_id;
            if (c < OT) {
                float4* dst = reinterpret_cast<float4*>(p.ws_out + wrow * D + c * 8);
                dst[0] = make_float4(vals[0], vals[1], vals[2], vals[3]);
                dst[1] = make_float4(vals[4], vals[5], vals[6], vals[7]);
            } else {
                p.ws_lse[wrow] = lse_v;
#pragma unroll
                for (int e = 0; e < kDecodeMaxClasses; ++e)
                    if (e < C) p.ws_mass[wrow * C + e] = vals[e];
            }
        }
    }
}

// One warp per output row: lse_total = logsumexp_s lse_s; out = sum_s exp(lse_s - lse_total) out_s (same for mass).
constexpr size_t kCombineSmemBytes = sizeof(float) * kCombineRowsPerBlock * kDecodeMaxSplits;

template <typename T>
__global__ void __launch_bounds__(32 * kCombineRowsPerBlock) decode_combine_kernel(const DecodeParams p) {
    AVAR_DYNAMIC_SMEM(smem);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float* wsh = reinterpret_cast<float*>(smem) + warp * kDecodeMaxSplits;  // this row's split weights
    const int64_t rows_total = int64_t(p.B) * p.Hq * p.Sq;
    const int64_t row = int64_t(blockIdx.x) * kCombineRowsPerBlock + warp;
    if (row >= rows_total) return;
    const int S = p.num_splits;
    float mx = -INFINITY;
    for (int s = lane; s < S; s += 32) mx = fmaxf(mx, p.ws_lse[s * rows_total + row]);
    mx = warp_max(mx);
    float sum = 0.f;
    for (int s = lane; s < S; s += 32) {
        const float w = mx == -INFINITY ? 0.f : __expf(p.ws_lse[s * rows_total + row] - mx);
        wsh[s] = w;
        sum += w;
    }
    sum = warp_sum(sum);
    __syncwarp();
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    const int qi = int(row % p.Sq);
    const int h = int((row / p.Sq) % p.Hq);
    const int b = int(row / (int64_t(p.Sq) * p.Hq));
    T* out = static_cast<T*>(p.out) + b * p.out_batch_stride + qi * p.out_seq_stride + h * p.out_head_stride;
    for (int d = lane; d < p.D; d += 32) {
        float acc = 0.f;
        for (int s = 0; s < S; ++s) {
            const float w = wsh[s];
            if (w != 0.f) acc += w * p.ws_out[(s * rows_total + row) * p.D + d];
        }
        out[d] = from_float<T>(acc * inv);
    }
    for (int c = lane; c < p.C; c += 32) {
        float acc = 0.f;
        for (int s = 0; s < S; ++s) {
            const float w = wsh[s];
            if (w != 0.f) acc += w * p.ws_mass[(s * rows_total + row) * p.C + c];
        }
        p.mass[row * p.C + c] = acc * inv;
    }
    if (lane == 0) p.lse[row] = (sum > 0.f && mx != -INFINITY) ? mx + logf(sum) : -INFINITY;
}

// ---- Key masses: key_mass[b, h, j, c] = sum over the new rows i of query class c of P[b, h, i, j].
// A row's normaliser is its final lse, known only after every split and the combine, so this is a second kernel:
// grid (key block of kKeysPerCta keys, B * Hk). Each warp loads its 16-key K chunk once (no V), then the CTA walks
// the kv head's GQA group in row tiles of whole query heads (a head's Sq rows are summed together, so a tile never
// splits a head); per tile each warp recomputes its chunk's scores with score_chunk (the forward's z', same code
// and operands) and sums P = exp(z' - lse) per key and query class (P = 0 for masked keys and for rows that see no
// key, lse = -inf). Each key belongs to one CTA: no atomics, and blocks past a cache's end write their zeros (the
// output is not pre-zeroed).

template <typename T, int D> struct KeyMassSmem {
    static constexpr int kCoef = 0;
    static constexpr int kQ = kCoef + kCoefFloats * 4;
    static constexpr int kK = kQ + kTileRows * Tile<D>::kStride * int(sizeof(T));
    static constexpr int kP = kK + kWarps * kChunk * Tile<D>::kStride * int(sizeof(T));  // per warp P [16, 17]
    static constexpr int kCls = kP + kWarps * kTileRows * (kChunk + 1) * 4;
    static constexpr int kLse = kCls + kWarps * kChunk * 4;
    static constexpr int kQcls = kLse + kTileRows * 4;
    static constexpr int kBytes = kQcls + kDecodeMaxSq * 4;
};

// Whole query heads per row tile of the key-mass kernel (Sq <= kTileRows, so at least one).
inline int key_mass_heads_per_tile(const DecodeParams& p) {
    return std::max(1, std::min(p.Hq / p.Hk, kTileRows / std::max(1, p.Sq)));
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) decode_key_mass_kernel(const DecodeParams p, const int heads_per_tile) {
    using L = KeyMassSmem<T, D>;
    constexpr int ST = Tile<D>::kStride;
    constexpr int PST = kChunk + 1;
    AVAR_DYNAMIC_SMEM(smem);
    float* coef = reinterpret_cast<float*>(smem + L::kCoef);
    T* Qs = reinterpret_cast<T*>(smem + L::kQ);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    T* ks = reinterpret_cast<T*>(smem + L::kK) + warp * kChunk * ST;
    float* Ps = reinterpret_cast<float*>(smem + L::kP) + warp * kTileRows * PST;
    int* cls = reinterpret_cast<int*>(smem + L::kCls) + warp * kChunk;
    float* lse_s = reinterpret_cast<float*>(smem + L::kLse);
    int* qcls_s = reinterpret_cast<int*>(smem + L::kQcls);

    const int Sq = p.Sq, C = p.C, group = p.Hq / p.Hk;
    const int j0 = blockIdx.x * kKeysPerCta;
    const int b = blockIdx.y / p.Hk;
    const int kvh = blockIdx.y % p.Hk;
    const int seqlen = p.cache_seqlens[b];
    // key_mass[b, h, j .. j + n - 1, :] is n * C contiguous floats per query head h.
    auto km_keys = [&](int hg, int j) {
        return p.key_mass + ((int64_t(b) * p.Hq + int64_t(kvh) * group + hg) * p.Sk_max + j) * C;
    };
    if (j0 >= seqlen) {  // no row sees these keys
        const int nkeys = min(kKeysPerCta, p.Sk_max - j0);
        for (int hg = 0; hg < group; ++hg) {
            float* dst = km_keys(hg, j0);
            for (int idx = tid; idx < nkeys * C; idx += kThreads) dst[idx] = 0.f;
        }
        return;
    }

    const int jw = j0 + warp * kChunk;                // this warp's keys
    const int nk = max(0, min(kChunk, p.Sk_max - jw));  // of which inside the output
    load_chunk<T, D>(p, b, kvh, jw, seqlen, ks, nullptr, cls);
    cp_async_commit();
    for (int qi = tid; qi < Sq; qi += kThreads) qcls_s[qi] = p.query_class[b * p.query_class_batch_stride + qi];
    const bool has_rw = p.mul != nullptr || p.abs_ != nullptr || p.add != nullptr;

    for (int h0 = 0; h0 < group; h0 += heads_per_tile) {
        const int nh = min(heads_per_tile, group - h0);
        const int row0 = h0 * Sq, Rc = nh * Sq;
        if (h0 > 0) __syncthreads();  // the previous tile's Q, coefficients and lse have been read
        load_row_tile<T, D>(p, b, kvh, row0, Rc, Qs, coef);
        for (int r = tid; r < kTileRows; r += kThreads) {
            const int gr = row0 + r, h = kvh * group + gr / Sq, qi = gr % Sq;
            lse_s[r] = r < Rc ? p.lse[(int64_t(b) * p.Hq + h) * Sq + qi] : -INFINITY;
        }
        cp_async_wait<0>();
        __syncthreads();
        const int lim[2] = {row_key_limit(p, row0, g, Rc, seqlen, seqlen),
                            row_key_limit(p, row0, g + 8, Rc, seqlen, seqlen)};
        float s[2][4];
        score_chunk<T, D>(load_q_frags<T, D>(Qs), ks, cls, coef, has_rw, p.scale, jw, lim, s);
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = g + 8 * (e >> 1), n = nt * 8 + 2 * t + (e & 1);
                const float lse = lse_s[r];
                // NaN in s or lse propagates (as in plain attention); masked keys and empty rows add nothing.
                Ps[r * PST + n] = (s[nt][e] == -INFINITY || lse == -INFINITY) ? 0.f : __expf(s[nt][e] - lse);
            }
        __syncwarp();
        // Lane = (head, key, class) of the tile; consecutive lanes write consecutive floats.
        for (int idx = lane; idx < nh * nk * C; idx += 32) {
            const int hl = idx / (nk * C), rem = idx % (nk * C), n = rem / C, c = rem % C;
            float acc = 0.f;
            for (int qi = 0; qi < Sq; ++qi)
                if (qcls_s[qi] == c) acc += Ps[(hl * Sq + qi) * PST + n];
            km_keys(h0 + hl, jw)[rem] = acc;
        }
    }
}

template <typename T, int D> constexpr size_t split_smem_bytes() { return size_t(SplitSmem<T, D>::kBytes); }
template <typename T, int D> constexpr size_t key_mass_smem_bytes() { return size_t(KeyMassSmem<T, D>::kBytes); }

inline int row_tiles(const DecodeParams& p) { return ((p.Hq / p.Hk) * p.Sq + kTileRows - 1) / kTileRows; }

// The split kernel's shared-memory limit and the largest shared-memory carveout (its K/V chunks come through
// cp.async.cg, not L1), raised once (avar_decode_prepare), not per launch: cudaFuncSetAttribute costs a driver call.
template <typename Kernel> cudaError_t prepare_smem(Kernel kernel, size_t bytes) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
    if (err != cudaSuccess) return err;
    return cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
}

template <typename T, int D> cudaError_t prepare_split(const DecodeParams&, int* ctas_per_sm) {
    cudaError_t err = prepare_smem(decode_split_kernel<T, D>, split_smem_bytes<T, D>());
    if (err != cudaSuccess) return err;
    err = cudaFuncSetAttribute(decode_key_mass_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               int(key_mass_smem_bytes<T, D>()));
    if (err != cudaSuccess) return err;
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(ctas_per_sm, decode_split_kernel<T, D>, kThreads,
                                                         split_smem_bytes<T, D>());
}

template <typename T, int D> cudaError_t launch_split(const DecodeParams& p, cudaStream_t stream) {
    const dim3 grid(unsigned(p.B * p.Hk), unsigned(p.num_splits), unsigned(row_tiles(p)));
    auto* kernel = decode_split_kernel<T, D>;
    const size_t smem = split_smem_bytes<T, D>();
    AVAR_LAUNCH(kernel, grid, dim3(kThreads), smem, stream, p);
    return cudaGetLastError();
}

template <typename T, int D> cudaError_t launch_key_mass(const DecodeParams& p, cudaStream_t stream) {
    const int64_t blocks = (int64_t(p.Sk_max) + kKeysPerCta - 1) / kKeysPerCta;
    if (blocks == 0) return cudaSuccess;
    const dim3 grid(unsigned(blocks), unsigned(p.B * p.Hk));
    const int hpt = key_mass_heads_per_tile(p);
    auto* kernel = decode_key_mass_kernel<T, D>;
    const size_t smem = key_mass_smem_bytes<T, D>();
    AVAR_LAUNCH(kernel, grid, dim3(kThreads), smem, stream, p, hpt);
    return cudaGetLastError();
}

template <typename T> cudaError_t launch_combine(const DecodeParams& p, cudaStream_t stream) {
    const int64_t rows = int64_t(p.B) * p.Hq * p.Sq;
    const unsigned blocks = unsigned((rows + kCombineRowsPerBlock - 1) / kCombineRowsPerBlock);
    auto* kernel = decode_combine_kernel<T>;
    AVAR_LAUNCH(kernel, dim3(blocks), dim3(32 * kCombineRowsPerBlock), kCombineSmemBytes, stream, p);
    return cudaGetLastError();
}

// AVAR_DECODE_ONLY_HDIM (a head dim) compiles a single head dim: used by the quick nvcc check.
#if defined(AVAR_DECODE_ONLY_HDIM)
#define AVAR_HDIM_CASE(DIM, ...)                      \
    case DIM:                                         \
        if constexpr (DIM == AVAR_DECODE_ONLY_HDIM) { \
            constexpr int kD = DIM;                   \
            return __VA_ARGS__();                     \
        } else {                                      \
            return cudaErrorNotSupported;             \
        }
#else
#define AVAR_HDIM_CASE(DIM, ...) \
    case DIM: {                  \
        constexpr int kD = DIM;  \
        return __VA_ARGS__();    \
    }
#endif

template <typename T> cudaError_t dispatch_prepare(const DecodeParams& p, int* ctas_per_sm) {
    switch (p.D) {
        AVAR_HDIM_CASE(64, [&] { return prepare_split<T, kD>(p, ctas_per_sm); })
        AVAR_HDIM_CASE(80, [&] { return prepare_split<T, kD>(p, ctas_per_sm); })
        AVAR_HDIM_CASE(96, [&] { return prepare_split<T, kD>(p, ctas_per_sm); })
        AVAR_HDIM_CASE(128, [&] { return prepare_split<T, kD>(p, ctas_per_sm); })
        AVAR_HDIM_CASE(256, [&] { return prepare_split<T, kD>(p, ctas_per_sm); })
        default:
            return cudaErrorInvalidValue;
    }
}

template <typename T> cudaError_t dispatch_split(const DecodeParams& p, cudaStream_t stream) {
    switch (p.D) {
        AVAR_HDIM_CASE(64, [&] { return launch_split<T, kD>(p, stream); })
        AVAR_HDIM_CASE(80, [&] { return launch_split<T, kD>(p, stream); })
        AVAR_HDIM_CASE(96, [&] { return launch_split<T, kD>(p, stream); })
        AVAR_HDIM_CASE(128, [&] { return launch_split<T, kD>(p, stream); })
        AVAR_HDIM_CASE(256, [&] { return launch_split<T, kD>(p, stream); })
        default:
            return cudaErrorInvalidValue;
    }
}

template <typename T> cudaError_t dispatch_key_mass(const DecodeParams& p, cudaStream_t stream) {
    switch (p.D) {
        AVAR_HDIM_CASE(64, [&] { return launch_key_mass<T, kD>(p, stream); })
        AVAR_HDIM_CASE(80, [&] { return launch_key_mass<T, kD>(p, stream); })
        AVAR_HDIM_CASE(96, [&] { return launch_key_mass<T, kD>(p, stream); })
        AVAR_HDIM_CASE(128, [&] { return launch_key_mass<T, kD>(p, stream); })
        AVAR_HDIM_CASE(256, [&] { return launch_key_mass<T, kD>(p, stream); })
        default:
            return cudaErrorInvalidValue;
    }
}

}  // namespace

bool avar_decode_supported_head_dim(int D) {
#if defined(AVAR_DECODE_ONLY_HDIM)
    return D == AVAR_DECODE_ONLY_HDIM;
#else
    return D == 64 || D == 80 || D == 96 || D == 128 || D == 256;
#endif
}

int avar_decode_rows_per_cta(int D) { return avar_decode_supported_head_dim(D) ? kTileRows : 0; }

void avar_decode_plan(DecodeParams& p, int64_t resident_ctas, int forced_splits) {
    const int R = (p.Hq / std::max(1, p.Hk)) * p.Sq;
    const int64_t base_ctas = int64_t(p.B) * p.Hk * ((R + kTileRows - 1) / kTileRows);
    const DecodeSplitPlan plan = avar_decode_split_plan(base_ctas, resident_ctas, p.Sk_max, kKeysPerCta,
                                                        forced_splits);
    p.num_splits = plan.num_splits;
    p.keys_per_split = plan.keys_per_split;
}

cudaError_t avar_decode_prepare(const DecodeParams& p, int* ctas_per_sm) {
    if (p.Hk <= 0 || p.Hq % p.Hk != 0 || p.Sq <= 0 || !avar_decode_supported_head_dim(p.D))
        return cudaErrorInvalidValue;
    return p.dtype == DecodeDtype::kBFloat16 ? dispatch_prepare<__nv_bfloat16>(p, ctas_per_sm)
                                             : dispatch_prepare<__half>(p, ctas_per_sm);
}

size_t avar_decode_workspace_floats(const DecodeParams& p) {
    if (p.num_splits <= 1) return 0;
    const size_t rows = size_t(p.B) * p.Hq * p.Sq;
    return size_t(p.num_splits) * rows * (size_t(p.D) + 1 + size_t(p.C));
}

cudaError_t avar_decode_combine(const DecodeParams& p, cudaStream_t stream) {
    if (p.num_splits > kDecodeMaxSplits) return cudaErrorInvalidValue;
    return p.dtype == DecodeDtype::kBFloat16 ? launch_combine<__nv_bfloat16>(p, stream)
                                             : launch_combine<__half>(p, stream);
}

cudaError_t avar_decode_key_mass(const DecodeParams& p, cudaStream_t stream) {
    // The grid's y dimension holds B * Hk (at most 65535).
    if (p.key_mass == nullptr || p.C < 1 || p.C > kDecodeMaxClasses || p.key_class == nullptr ||
        p.query_class == nullptr || p.Sk_max < 0 || int64_t(p.B) * p.Hk > 65535 || p.Sq < 1 || p.Sq > kDecodeMaxSq ||
        p.Hk <= 0 || p.Hq % p.Hk != 0 || !avar_decode_supported_head_dim(p.D))
        return cudaErrorInvalidValue;
    return p.dtype == DecodeDtype::kBFloat16 ? dispatch_key_mass<__nv_bfloat16>(p, stream)
                                             : dispatch_key_mass<__half>(p, stream);
}

cudaError_t avar_decode_fwd(const DecodeParams& p, cudaStream_t stream) {
    if (p.B <= 0 || p.Hq <= 0 || p.Hk <= 0 || p.Hq % p.Hk != 0 || p.Sq <= 0 || p.Sq > kDecodeMaxSq ||
        p.C < 0 || p.C > kDecodeMaxClasses || p.num_splits < 1 || p.num_splits > kDecodeMaxSplits ||
        p.keys_per_split <= 0 || !avar_decode_supported_head_dim(p.D))
        return cudaErrorInvalidValue;
    if (p.num_splits > 1 && (p.ws_out == nullptr || p.ws_lse == nullptr || (p.C > 0 && p.ws_mass == nullptr)))
        return cudaErrorInvalidValue;
    if (p.key_mass != nullptr &&
        (p.C < 1 || p.key_class == nullptr || p.query_class == nullptr || int64_t(p.B) * p.Hk > 65535))
        return cudaErrorInvalidValue;
    cudaError_t err = p.dtype == DecodeDtype::kBFloat16 ? dispatch_split<__nv_bfloat16>(p, stream)
                                                        : dispatch_split<__half>(p, stream);
    if (err == cudaSuccess && p.num_splits > 1) err = avar_decode_combine(p, stream);
    // Same stream: the key-mass pass reads the final lse the split (one split) or combine kernel wrote.
    if (err == cudaSuccess && p.key_mass != nullptr) err = avar_decode_key_mass(p, stream);
    return err;
}

}  // namespace avar
