// Split-KV decode kernel ("flash-decoding") with per-class attention mass and class-wise re-weighting.
// See decode.h for the interface. Design:
//   * grid (B * Hk, num_splits, row_chunks): one CTA holds every query row of one kv head (GQA group x Sq,
//     up to kRows rows; larger groups are cut into row chunks) for one split of the keys, so each K/V element
//     of the split is read once (per row chunk); up to 8 rows (decode) take an instantiation sized for 8;
//   * K/V tiles of kTileN keys are streamed into shared memory with 16-byte cp.async (zero-filled past the
//     end), double buffered;
//   * S = Q K^T on the CUDA cores in fp32 (q pre-scaled, kept in shared memory as fp32), then the class-wise
//     re-weighting, the mask (length, bottom-right causal), an online softmax per row (one warp per row);
//   * O += P V with one extra 8-wide "column chunk" holding the one-hot key classes, so that the per-class
//     masses (and their sum, the softmax denominator) ride on the same accumulation and rescaling;
//   * each split writes normalized (out, lse, mass) to an fp32 workspace; the combine kernel merges the splits
//     with weights exp(lse_split - lse_total). With one split the CTA writes the final outputs itself.
//   * key masses (optional): a second kernel over the cache after the final lse is known, recomputing the scores
//     with the forward's score_tile and summing P per key and query class (decode_key_mass_kernel).
#include "decode.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

// Config members unused by some head dims (and all but one with AVAR_DECODE_ONLY_HDIM) are not an issue.
#pragma nv_diag_suppress 177

namespace avar {
namespace {

constexpr int kThreads = 256;
constexpr int kStages = 2;
constexpr int kCombineRowsPerBlock = 4;

// Query rows per CTA: a GQA group of at most kSmallRows rows (decode, Sq = 1, groups of up to 8 heads) takes an
// instantiation sized for it, so the score and P V loops carry 2 row slots per thread instead of 16 mostly idle ones;
// larger row counts take kMaxRows rows per CTA (and row chunks beyond).
constexpr int kSmallRows = 8;
template <int D> constexpr int max_rows() { return D >= 256 ? 32 : 64; }

template <int D, int ROWS = max_rows<D>()> struct DecodeConfig {
    static constexpr int kTileN = D >= 256 ? 32 : 64;   // keys per tile
    static constexpr int kRows = ROWS;                  // query rows per CTA (max)
    static constexpr int kKStride = D + 8;               // halves per smem K/V row (pad: no bank conflicts)
    static constexpr int kChunks = D / 8;                // 16-byte chunks per row
    static constexpr int kChunksX = kChunks + 1;         // + the one-hot class chunk
    static constexpr int kQkGroups = kThreads / kTileN;  // row groups in S = Q K^T
    static constexpr int kQkRowsPerThread = kRows / kQkGroups;
    static constexpr int kPvGroups = kThreads / kChunksX;  // row groups in O += P V
    static constexpr int kPvRowsPerThread = (kRows + kPvGroups - 1) / kPvGroups;
    static_assert(D % 8 == 0, "head dim must be a multiple of 8");
    static_assert(kRows % kQkGroups == 0, "rows must split evenly over the QK row groups");
    static_assert(kTileN % 32 == 0, "tile must be a multiple of the warp size");
};

template <typename T> struct Vec2;
template <> struct Vec2<__half> { using type = __half2; };
template <> struct Vec2<__nv_bfloat16> { using type = __nv_bfloat162; };

__device__ __forceinline__ float2 to_float2(__half2 v) { return __half22float2(v); }
__device__ __forceinline__ float2 to_float2(__nv_bfloat162 v) { return __bfloat1622float2(v); }
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

// 8 elements (16 bytes, one 128-bit load) -> 8 floats.
template <typename T> __device__ __forceinline__ void load8(const T* ptr, float* f) {
    const uint4 u = *reinterpret_cast<const uint4*>(ptr);
    const typename Vec2<T>::type* h = reinterpret_cast<const typename Vec2<T>::type*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 x = to_float2(h[i]);
        f[2 * i] = x.x;
        f[2 * i + 1] = x.y;
    }
}

template <typename T> __device__ __forceinline__ void store8(T* ptr, const float* f) {
    uint4 u;
    typename Vec2<T>::type* h = reinterpret_cast<typename Vec2<T>::type*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = from_float2<T>(f[2 * i], f[2 * i + 1]);
    *reinterpret_cast<uint4*>(ptr) = u;
}

// 16-byte async copy global -> shared; src_bytes = 0 zero-fills the destination without reading.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    const int n = pred ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

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

// ---- Pieces shared by the split (forward) kernel and the key-mass kernel: both must see the same z', so the row
// loads, the tile loads and the score computation exist once.

// The rows r < Rc of a CTA are rows row0 + r of its kv head's group; row -> (query head hg, query qi) = divmod(row,
// Sq). Loads q pre-scaled to fp32 into Qs [Rc, D] and each row's re-weight coefficients over the key classes into
// mul_s / abs_s / add_s [Rc, kDecodeMaxClasses] (zeros without tables).
template <typename T, int D>
__device__ __forceinline__ void load_query_rows(const DecodeParams& p, int b, int kvh, int row0, int Rc, float* Qs,
                                                float* mul_s, float* abs_s, float* add_s) {
    constexpr int DC = D / 8;
    const int tid = threadIdx.x, Sq = p.Sq, C = p.C, group = p.Hq / p.Hk;
    const bool has_rw = p.mul != nullptr || p.abs_ != nullptr || p.add != nullptr;
    const T* __restrict__ qg = static_cast<const T*>(p.q);
    for (int idx = tid; idx < Rc * DC; idx += kThreads) {
        const int r = idx / DC, c = idx % DC;
        const int gr = row0 + r, hg = gr / Sq, qi = gr % Sq, h = kvh * group + hg;
        float f[8];
        load8(qg + b * p.q_batch_stride + qi * p.q_seq_stride + h * p.q_head_stride + c * 8, f);
#pragma unroll
        for (int e = 0; e < 8; ++e) Qs[r * D + c * 8 + e] = f[e] * p.scale;
    }
    for (int idx = tid; idx < Rc * kDecodeMaxClasses; idx += kThreads) {
        const int r = idx / kDecodeMaxClasses, c = idx % kDecodeMaxClasses;
        const int gr = row0 + r, hg = gr / Sq, qi = gr % Sq, h = kvh * group + hg;
        float mu = 0.f, ab = 0.f, ad = 0.f;
        if (has_rw && c < C) {
            const int a = p.query_class != nullptr ? p.query_class[b * p.query_class_batch_stride + qi] : 0;
            const int64_t t = (int64_t(h) * C + a) * C + c;
            if (p.mul) mu = p.mul[t];
            if (p.abs_) ab = p.abs_[t];
            if (p.add) ad = p.add[t];
        }
        mul_s[idx] = mu;
        abs_s[idx] = ab;
        add_s[idx] = ad;
    }
}

// Issues the cp.async copies of the K tile (and of the V tile when vd != nullptr) of keys j0 .. j0 + TN - 1 of kv
// head kvh of sequence b, paged through block_table or not, zero-filling keys >= kend, and stores the keys' classes
// in kcls (0 without classes or past kend). The caller commits and waits.
template <typename T, int D>
__device__ __forceinline__ void load_kv_tile(const DecodeParams& p, int b, int kvh, int j0, int kend, T* kd, T* vd,
                                             int* kcls) {
    using Cfg = DecodeConfig<D>;
    constexpr int TN = Cfg::kTileN;
    constexpr int KST = Cfg::kKStride;
    constexpr int DC = Cfg::kChunks;
    const int tid = threadIdx.x;
    const T* __restrict__ kg = static_cast<const T*>(p.k);
    const T* __restrict__ vg = static_cast<const T*>(p.v);
    for (int idx = tid; idx < TN * DC; idx += kThreads) {
        const int n = idx / DC, c = idx % DC;
        const int j = j0 + n;
        const bool ok = j < kend;
        const T* kp = kg;
        const T* vp = vg;
        if (ok) {
            int64_t page, row;
            if (p.block_table != nullptr) {
                page = p.block_table[b * p.block_table_batch_stride + j / p.block_size];
                row = j % p.block_size;
            } else {
                page = b;
                row = j;
            }
            kp = kg + page * p.k_batch_stride + row * p.k_seq_stride + int64_t(kvh) * p.k_head_stride + c * 8;
            vp = vg + page * p.v_batch_stride + row * p.v_seq_stride + int64_t(kvh) * p.v_head_stride + c * 8;
        }
        cp_async16(kd + n * KST + c * 8, kp, ok);
        if (vd != nullptr) cp_async16(vd + n * KST + c * 8, vp, ok);
    }
    for (int n = tid; n < TN; n += kThreads) {
        const int j = j0 + n;
        kcls[n] = (p.key_class != nullptr && j < kend) ? p.key_class[b * p.key_class_batch_stride + j] : 0;
    }
}

// Ss[r, n] = z' of row row0 + r and key j0 + n, for the Rc rows in Qs and the TN keys of the K tile ktile (shared
// memory): (scale q) . k in fp32, the class-wise re-weighting, then -inf where the key is >= kend or hidden by the
// bottom-right causal mask (query qi sees key j iff j <= qi + causal_off). Thread = (key n, row group).
template <typename T, int D, int ROWS = max_rows<D>()>
__device__ __forceinline__ void score_tile(const T* ktile, const int* kcls, const float* Qs, const float* mul_s,
                                           const float* abs_s, const float* add_s, bool has_rw, bool causal,
                                           int causal_off, int Sq, int row0, int Rc, int j0, int kend, float* Ss) {
    using Cfg = DecodeConfig<D, ROWS>;
    constexpr int TN = Cfg::kTileN;
    constexpr int KST = Cfg::kKStride;
    constexpr int DC = Cfg::kChunks;
    constexpr int SST = TN + 1;
    const int qk_n = threadIdx.x % TN, qk_g = threadIdx.x / TN;
    const T* krow = ktile + qk_n * KST;
    float acc[Cfg::kQkRowsPerThread];
#pragma unroll
    for (int i = 0; i < Cfg::kQkRowsPerThread; ++i) acc[i] = 0.f;
#pragma unroll 4
    for (int c = 0; c < DC; ++c) {
        float kf[8];
        load8(krow + c * 8, kf);
#pragma unroll
        for (int i = 0; i < Cfg::kQkRowsPerThread; ++i) {
            const int r = qk_g + i * Cfg::kQkGroups;
            if (r < Rc) {
                const float4 q0 = *reinterpret_cast<const float4*>(Qs + r * D + c * 8);
                const float4 q1 = *reinterpret_cast<const float4*>(Qs + r * D + c * 8 + 4);
                acc[i] += q0.x * kf[0] + q0.y * kf[1] + q0.z * kf[2] + q0.w * kf[3] + q1.x * kf[4] +
                          q1.y * kf[5] + q1.z * kf[6] + q1.w * kf[7];
            }
        }
    }
    const int j = j0 + qk_n;
    const int kc = kcls[qk_n];
#pragma unroll
    for (int i = 0; i < Cfg::kQkRowsPerThread; ++i) {
        const int r = qk_g + i * Cfg::kQkGroups;
        if (r < Rc) {
            float s = acc[i];
            if (has_rw) {
                const int w = r * kDecodeMaxClasses + kc;
                s = s + s * mul_s[w] + abs_s[w] * fabsf(s) + add_s[w];
            }
            const int qi = (row0 + r) % Sq;
            const bool visible = j < kend && (!causal || j <= qi + causal_off);
            Ss[r * SST + qk_n] = visible ? s : -INFINITY;
        }
    }
}

template <typename T, int D> size_t split_smem_bytes(int rows_cap) {
    using Cfg = DecodeConfig<D>;
    size_t bytes = 2ull * kStages * Cfg::kTileN * Cfg::kKStride * sizeof(T);  // K, V tiles
    bytes += size_t(rows_cap) * D * sizeof(float);                           // Q (fp32, pre-scaled)
    bytes += size_t(rows_cap) * (Cfg::kTileN + 1) * sizeof(float);           // S / P
    bytes += size_t(kStages) * Cfg::kTileN * sizeof(int);                    // key classes
    bytes += size_t(rows_cap) * kDecodeMaxClasses * 3 * sizeof(float);      // per-row reweight coefficients
    bytes += size_t(rows_cap) * 3 * sizeof(float);                           // m, alpha, l
    return bytes;
}

template <typename T, int D, int ROWS>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(const DecodeParams p, const int rows_cap) {
    using Cfg = DecodeConfig<D, ROWS>;
    constexpr int TN = Cfg::kTileN;
    constexpr int KST = Cfg::kKStride;
    constexpr int DC = Cfg::kChunks;
    constexpr int SST = TN + 1;

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* Ks = reinterpret_cast<T*>(smem_raw);
    T* Vs = Ks + kStages * TN * KST;
    float* Qs = reinterpret_cast<float*>(Vs + kStages * TN * KST);
    float* Ss = Qs + rows_cap * D;
    int* kcls_s = reinterpret_cast<int*>(Ss + rows_cap * SST);
    float* mul_s = reinterpret_cast<float*>(kcls_s + kStages * TN);
    float* abs_s = mul_s + rows_cap * kDecodeMaxClasses;
    float* add_s = abs_s + rows_cap * kDecodeMaxClasses;
    float* m_s = add_s + rows_cap * kDecodeMaxClasses;
    float* alpha_s = m_s + rows_cap;
    float* l_s = alpha_s + rows_cap;

    const int tid = threadIdx.x;
    const int b = blockIdx.x / p.Hk;
    const int kvh = blockIdx.x % p.Hk;
    const int split = blockIdx.y;
    const int group = p.Hq / p.Hk;
    const int R = group * p.Sq;
    const int row0 = blockIdx.z * Cfg::kRows;
    const int Rc = min(R - row0, Cfg::kRows);  // rows held by this CTA (<= rows_cap)
    const int Sq = p.Sq;
    const int C = p.C;
    const int seqlen = p.cache_seqlens[b];
    const int kbeg = split * p.keys_per_split;
    const int kend = min(kbeg + p.keys_per_split, seqlen);
    const int ntiles = kend > kbeg ? (kend - kbeg + TN - 1) / TN : 0;
    const bool has_rw = p.mul != nullptr || p.abs_ != nullptr || p.add != nullptr;
    const int causal_off = seqlen - Sq;  // query i sees key j iff j <= i + causal_off

    // ---- Q (pre-scaled fp32), per-row reweight coefficients, running max.
    load_query_rows<T, D>(p, b, kvh, row0, Rc, Qs, mul_s, abs_s, add_s);
    for (int r = tid; r < rows_cap; r += kThreads) {
        m_s[r] = -INFINITY;
        alpha_s[r] = 1.f;
        l_s[r] = 0.f;
    }

    // ---- K/V tile loader (paged or not), zero-filling keys past kend.
    auto load_tile = [&](int t, int stage) {
        load_kv_tile<T, D>(p, b, kvh, kbeg + t * TN, kend, Ks + stage * TN * KST, Vs + stage * TN * KST,
                           kcls_s + stage * TN);
    };

    // Thread roles (S = Q K^T: score_tile).
    // O += P V: thread = (column chunk pv_c, group pv_g). With few rows (decode: Sq = 1, a small GQA group) the
    // groups are split further over the keys of a tile (pv_ks sub-splits, key n handled by sub n % pv_ks); the
    // sub-split partial sums share every rescaling and are added once after the key loop.
    const int pv_c = tid % Cfg::kChunksX, pv_g = tid / Cfg::kChunksX;
    const int pv_ks = Rc >= Cfg::kPvGroups ? 1 : Cfg::kPvGroups / Rc;
    const int pv_rgs = Cfg::kPvGroups / pv_ks;  // row groups (>= Rc when pv_ks > 1)
    const bool pv_active = pv_g < pv_rgs * pv_ks;
    const int pv_rg = pv_g % pv_rgs, pv_sub = pv_g / pv_rgs;
    const int warp = tid / 32, lane = tid % 32;

    float o[Cfg::kPvRowsPerThread][8];
#pragma unroll
    for (int i = 0; i < Cfg::kPvRowsPerThread; ++i)
#pragma unroll
        for (int e = 0; e < 8; ++e) o[i][e] = 0.f;

    if (ntiles > 0) {
        load_tile(0, 0);
        cp_async_commit();
    }
    for (int t = 0; t < ntiles; ++t) {
        const int stage = t & 1;
        if (t + 1 < ntiles) {
            load_tile(t + 1, stage ^ 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        // ---- S = (scale q) k^T, re-weighted and masked.
        score_tile<T, D, ROWS>(Ks + stage * TN * KST, kcls_s + stage * TN, Qs, mul_s, abs_s, add_s, has_rw, p.causal,
                         causal_off, Sq, row0, Rc, kbeg + t * TN, kend, Ss);
        __syncthreads();

        // ---- online softmax: one warp per row.
        for (int r = warp; r < Rc; r += kThreads / 32) {
            float* srow = Ss + r * SST;
            float sv[TN / 32];
            float mx = -INFINITY;
#pragma unroll
            for (int i = 0; i < TN / 32; ++i) {
                sv[i] = srow[lane + 32 * i];
                mx = fmaxf(mx, sv[i]);
            }
            mx = warp_max(mx);
            const float m_old = m_s[r];
            const float m_new = fmaxf(m_old, mx);
            float alpha = 1.f;
            if (m_new == -INFINITY) {
#pragma unroll
                for (int i = 0; i < TN / 32; ++i) srow[lane + 32 * i] = 0.f;
            } else {
                alpha = __expf(m_old - m_new);
#pragma unroll
                for (int i = 0; i < TN / 32; ++i) srow[lane + 32 * i] = __expf(sv[i] - m_new);
            }
            __syncwarp();
            if (lane == 0) {
                m_s[r] = m_new;
                alpha_s[r] = alpha;
            }
        }
        __syncthreads();

        // ---- O = alpha O + P V; the class chunk accumulates P over one-hot key classes (masses, row sum).
        if (pv_active) {
#pragma unroll
            for (int i = 0; i < Cfg::kPvRowsPerThread; ++i) {
                const int r = pv_rg + i * pv_rgs;
                if (r < Rc) {
                    const float a = alpha_s[r];
#pragma unroll
                    for (int e = 0; e < 8; ++e) o[i][e] *= a;
                }
            }
            const T* vcol = Vs + stage * TN * KST + pv_c * 8;
            const int* kcs = kcls_s + stage * TN;
#pragma unroll 2
            for (int n = pv_sub; n < TN; n += pv_ks) {
                float vf[8];
                if (pv_c < DC) {
                    load8(vcol + n * KST, vf);
                } else {
                    const int kc = kcs[n];
#pragma unroll
                    for (int e = 0; e < 8; ++e) vf[e] = kc == e ? 1.f : 0.f;
                }
#pragma unroll
                for (int i = 0; i < Cfg::kPvRowsPerThread; ++i) {
                    const int r = pv_rg + i * pv_rgs;
                    if (r < Rc) {
                        const float pr = Ss[r * SST + n];
#pragma unroll
                        for (int e = 0; e < 8; ++e) o[i][e] += pr * vf[e];
                    }
                }
            }
        }
        __syncthreads();
    }

    // ---- add the key sub-split partial sums (pv_ks > 1 implies one row per thread, i = 0); the K/V tiles are free.
    if (pv_ks > 1) {
        constexpr int W = Cfg::kChunksX * 8;
        float* red = reinterpret_cast<float*>(smem_raw);
        if (pv_active && pv_sub > 0 && pv_rg < Rc) {
            float* dst = red + ((pv_sub - 1) * Rc + pv_rg) * W + pv_c * 8;
#pragma unroll
            for (int e = 0; e < 8; ++e) dst[e] = o[0][e];
        }
        __syncthreads();
        if (pv_active && pv_sub == 0 && pv_rg < Rc) {
            for (int sub = 1; sub < pv_ks; ++sub) {
                const float* src = red + ((sub - 1) * Rc + pv_rg) * W + pv_c * 8;
#pragma unroll
                for (int e = 0; e < 8; ++e) o[0][e] += src[e];
            }
        }
    }
    const bool writer = pv_active && pv_sub == 0;

    // ---- finalize: l = sum of the class columns; write normalized out, lse, mass.
    if (writer && pv_c == DC) {
#pragma unroll
        for (int i = 0; i < Cfg::kPvRowsPerThread; ++i) {
            const int r = pv_rg + i * pv_rgs;
            if (r < Rc) {
                float l = 0.f;
#pragma unroll
                for (int e = 0; e < 8; ++e) l += o[i][e];
                l_s[r] = l;
            }
        }
    }
    __syncthreads();
    if (!writer) return;
    const int64_t rows_total = int64_t(p.B) * p.Hq * Sq;
#pragma unroll
    for (int i = 0; i < Cfg::kPvRowsPerThread; ++i) {
        const int r = pv_rg + i * pv_rgs;
        if (r >= Rc) continue;
        const int gr = row0 + r, hg = gr / Sq, qi = gr % Sq, h = kvh * group + hg;
        const float l = l_s[r];
        const float inv = l > 0.f ? 1.f / l : 0.f;
        const float lse_v = l > 0.f ? m_s[r] + logf(l) : -INFINITY;
        const int64_t row_id = (int64_t(b) * p.Hq + h) * Sq + qi;
        float vals[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) vals[e] = o[i][e] * inv;
        if (p.num_splits == 1) {
            if (pv_c < DC) {
                T* dst = static_cast<T*>(p.out) + b * p.out_batch_stride + qi * p.out_seq_stride +
                         h * p.out_head_stride + pv_c * 8;
                store8(dst, vals);
            } else {
                p.lse[row_id] = lse_v;
#pragma unroll
                for (int e = 0; e < kDecodeMaxClasses; ++e)
                    if (e < C) p.mass[row_id * C + e] = vals[e];
            }
        } else {
            const int64_t wrow = int64_t(split) * rows_total + row_id;
            if (pv_c < DC) {
                float4* dst = reinterpret_cast<float4*>(p.ws_out + wrow * D + pv_c * 8);
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
template <typename T>
__global__ void __launch_bounds__(32 * kCombineRowsPerBlock) decode_combine_kernel(const DecodeParams p) {
    __shared__ float wsh[kCombineRowsPerBlock][kDecodeMaxSplits];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
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
        wsh[warp][s] = w;
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
            const float w = wsh[warp][s];
            if (w != 0.f) acc += w * p.ws_out[(s * rows_total + row) * p.D + d];
        }
        out[d] = from_float<T>(acc * inv);
    }
    for (int c = lane; c < p.C; c += 32) {
        float acc = 0.f;
        for (int s = 0; s < S; ++s) {
            const float w = wsh[warp][s];
            if (w != 0.f) acc += w * p.ws_mass[(s * rows_total + row) * p.C + c];
        }
        p.mass[row * p.C + c] = acc * inv;
    }
    if (lane == 0) p.lse[row] = (sum > 0.f && mx != -INFINITY) ? mx + logf(sum) : -INFINITY;
}

// ---- Key masses: key_mass[b, h, j, c] = sum over the new rows i of query class c of P[b, h, i, j].
// A row's normaliser is its final lse, known only after every split and the combine, so this is a second kernel:
// grid (key block of kTileN keys, B * Hk). A CTA loads its K tile once (no V), then walks the kv head's GQA group in
// chunks of whole query heads (a head's Sq rows are summed together, so a chunk never splits a head), recomputes
// the chunk's scores with score_tile (the forward's z', bit for bit the same code), and sums P = exp(z' - lse) per
// key and query class (P = 0 for masked keys and for rows that see no key, lse = -inf). Each key belongs to one CTA:
// no atomics, and blocks past a cache's end write their zeros (the output is not pre-zeroed).

template <typename T, int D> size_t key_mass_smem_bytes(int rows_cap) {
    using Cfg = DecodeConfig<D>;
    size_t bytes = size_t(Cfg::kTileN) * Cfg::kKStride * sizeof(T);       // K tile
    bytes += size_t(rows_cap) * D * sizeof(float);                      // Q (fp32, pre-scaled)
    bytes += size_t(rows_cap) * (Cfg::kTileN + 1) * sizeof(float);      // S
    bytes += size_t(Cfg::kTileN) * sizeof(int);                         // key classes
    bytes += size_t(rows_cap) * kDecodeMaxClasses * 3 * sizeof(float);  // per-row reweight coefficients
    bytes += size_t(rows_cap) * sizeof(float);                          // lse
    bytes += size_t(kDecodeMaxSq) * sizeof(int);                        // query classes
    return bytes;
}

// Query heads per chunk of the key-mass CTA: as many whole heads as fit the kernel's row capacity (kRows >= 32 >=
// 2 * kDecodeMaxSq, so at least two unless the group is one head).
template <int D> int key_mass_heads_per_chunk(const DecodeParams& p) {
    return std::max(1, std::min(p.Hq / p.Hk, DecodeConfig<D>::kRows / std::max(1, p.Sq)));
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) decode_key_mass_kernel(const DecodeParams p, const int heads_per_chunk) {
    using Cfg = DecodeConfig<D>;
    constexpr int TN = Cfg::kTileN;
    constexpr int KST = Cfg::kKStride;
    constexpr int SST = TN + 1;
    const int Sq = p.Sq, C = p.C, group = p.Hq / p.Hk;
    const int rows_cap = heads_per_chunk * Sq;

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* Ks = reinterpret_cast<T*>(smem_raw);
    float* Qs = reinterpret_cast<float*>(Ks + TN * KST);
    float* Ss = Qs + rows_cap * D;
    int* kcls_s = reinterpret_cast<int*>(Ss + rows_cap * SST);
    float* mul_s = reinterpret_cast<float*>(kcls_s + TN);
    float* abs_s = mul_s + rows_cap * kDecodeMaxClasses;
    float* add_s = abs_s + rows_cap * kDecodeMaxClasses;
    float* lse_s = add_s + rows_cap * kDecodeMaxClasses;
    int* qcls_s = reinterpret_cast<int*>(lse_s + rows_cap);

    const int tid = threadIdx.x;
    const int j0 = blockIdx.x * TN;
    const int b = blockIdx.y / p.Hk;
    const int kvh = blockIdx.y % p.Hk;
    const int seqlen = p.cache_seqlens[b];
    const int nkeys = min(TN, p.Sk_max - j0);  // this block's keys inside the output
    // key_mass[b, h, j0 .. j0 + nkeys - 1, :] is nkeys * C contiguous floats per query head h.
    auto km_block = [&](int hg) {
        return p.key_mass + ((int64_t(b) * p.Hq + int64_t(kvh) * group + hg) * p.Sk_max + j0) * C;
    };
    if (j0 >= seqlen) {  // no row sees these keys
        for (int hg = 0; hg < group; ++hg) {
            float* dst = km_block(hg);
            for (int idx = tid; idx < nkeys * C; idx += kThreads) dst[idx] = 0.f;
        }
        return;
    }

    load_kv_tile<T, D>(p, b, kvh, j0, seqlen, Ks, nullptr, kcls_s);
    cp_async_commit();
    for (int qi = tid; qi < Sq; qi += kThreads) qcls_s[qi] = p.query_class[b * p.query_class_batch_stride + qi];
    const bool has_rw = p.mul != nullptr || p.abs_ != nullptr || p.add != nullptr;
    const int causal_off = seqlen - Sq;

    for (int h0 = 0; h0 < group; h0 += heads_per_chunk) {
        const int nh = min(heads_per_chunk, group - h0);
        const int row0 = h0 * Sq, Rc = nh * Sq;
        if (h0 > 0) __syncthreads();  // the previous chunk's sums have read Ss and lse_s
        load_query_rows<T, D>(p, b, kvh, row0, Rc, Qs, mul_s, abs_s, add_s);
        for (int r = tid; r < Rc; r += kThreads) {
            const int gr = row0 + r, h = kvh * group + gr / Sq, qi = gr % Sq;
            lse_s[r] = p.lse[(int64_t(b) * p.Hq + h) * Sq + qi];
        }
        cp_async_wait<0>();
        __syncthreads();
        score_tile<T, D>(Ks, kcls_s, Qs, mul_s, abs_s, add_s, has_rw, p.causal, causal_off, Sq, row0, Rc, j0, seqlen,
                         Ss);
        __syncthreads();
        // Thread = (head, key, class) of the chunk; consecutive threads write consecutive floats. Each (row, key)
        // P is formed once, by the thread of the row's class; keys >= seqlen have S = -inf and get 0.
        for (int idx = tid; idx < nh * nkeys * C; idx += kThreads) {
            const int hl = idx / (nkeys * C), rem = idx % (nkeys * C), n = rem / C, c = rem % C;
            float acc = 0.f;
            for (int qi = 0; qi < Sq; ++qi) {
                if (qcls_s[qi] != c) continue;
                const int r = hl * Sq + qi;
                const float s = Ss[r * SST + n], lse = lse_s[r];
                // NaN in s or lse propagates (as in plain attention); masked keys and empty rows add nothing.
                if (s != -INFINITY && lse != -INFINITY) acc += __expf(s - lse);
            }
            km_block(h0 + hl)[rem] = acc;
        }
    }
}

// The split kernel's instantiation for p: kSmallRows rows per CTA when the kv head's rows fit, else max_rows<D>().
template <int D> int rows_bucket(const DecodeParams& p) {
    return (p.Hq / p.Hk) * p.Sq <= kSmallRows ? kSmallRows : max_rows<D>();
}

template <int D> int row_chunks(const DecodeParams& p) {
    const int R = (p.Hq / p.Hk) * p.Sq;
    return (R + rows_bucket<D>(p) - 1) / rows_bucket<D>(p);
}

template <int D> int rows_cap(const DecodeParams& p) {
    return std::min((p.Hq / p.Hk) * p.Sq, rows_bucket<D>(p));
}

// The split kernel's instantiation for p's row count (rows_bucket).
template <typename T, int D> auto split_kernel(const DecodeParams& p) {
    return rows_bucket<D>(p) == kSmallRows ? decode_split_kernel<T, D, kSmallRows>
                                           : decode_split_kernel<T, D, max_rows<D>()>;
}

// The shared-memory limit is raised once (avar_decode_prepare), not per launch: cudaFuncSetAttribute costs a
// driver call on every decode step otherwise.
// The split kernel's shared-memory limit, and the largest shared-memory carveout: its K/V tiles come through
// cp.async.cg (not L1), and the 8-row instantiation (about 76 KB at D=128, 56 registers) fits 3 CTAs per SM there.
template <typename Kernel> cudaError_t prepare_smem(Kernel kernel, size_t bytes) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
    if (err != cudaSuccess) return err;
    return cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
}

template <typename T, int D> cudaError_t prepare_split(const DecodeParams& p, int* ctas_per_sm) {
    constexpr int kMax = max_rows<D>();
    cudaError_t err = prepare_smem(decode_split_kernel<T, D, kMax>, split_smem_bytes<T, D>(kMax));
    if (err != cudaSuccess) return err;
    err = prepare_smem(decode_split_kernel<T, D, kSmallRows>, split_smem_bytes<T, D>(kSmallRows));
    if (err != cudaSuccess) return err;
    // The key-mass kernel of the same (dtype, head dim) needs up to ~72 KB too (kRows rows of fp32 Q and S).
    err = cudaFuncSetAttribute(decode_key_mass_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               int(key_mass_smem_bytes<T, D>(DecodeConfig<D>::kRows)));
    if (err != cudaSuccess) return err;
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(ctas_per_sm, split_kernel<T, D>(p), kThreads,
                                                         split_smem_bytes<T, D>(rows_cap<D>(p)));
}

template <typename T, int D> cudaError_t launch_split(const DecodeParams& p, cudaStream_t stream) {
    const int rc = rows_cap<D>(p);
    const dim3 grid(unsigned(p.B * p.Hk), unsigned(p.num_splits), unsigned(row_chunks<D>(p)));
    split_kernel<T, D>(p)<<<grid, kThreads, split_smem_bytes<T, D>(rc), stream>>>(p, rc);
    return cudaGetLastError();
}

template <typename T, int D> cudaError_t launch_key_mass(const DecodeParams& p, cudaStream_t stream) {
    const int64_t blocks = (int64_t(p.Sk_max) + DecodeConfig<D>::kTileN - 1) / DecodeConfig<D>::kTileN;
    if (blocks == 0) return cudaSuccess;
    const int hpc = key_mass_heads_per_chunk<D>(p);
    const dim3 grid(unsigned(blocks), unsigned(p.B * p.Hk));
    decode_key_mass_kernel<T, D><<<grid, kThreads, key_mass_smem_bytes<T, D>(hpc * p.Sq), stream>>>(p, hpc);
    return cudaGetLastError();
}

template <typename T> cudaError_t launch_combine(const DecodeParams& p, cudaStream_t stream) {
    const int64_t rows = int64_t(p.B) * p.Hq * p.Sq;
    const unsigned blocks = unsigned((rows + kCombineRowsPerBlock - 1) / kCombineRowsPerBlock);
    decode_combine_kernel<T><<<blocks, 32 * kCombineRowsPerBlock, 0, stream>>>(p);
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

int rows_per_cta_impl(int D) {
    switch (D) {
        case 64: return DecodeConfig<64>::kRows;
        case 80: return DecodeConfig<80>::kRows;
        case 96: return DecodeConfig<96>::kRows;
        case 128: return DecodeConfig<128>::kRows;
        case 256: return DecodeConfig<256>::kRows;
        default: return 0;
    }
}

int tile_n_impl(int D) {
    switch (D) {
        case 64: return DecodeConfig<64>::kTileN;
        case 80: return DecodeConfig<80>::kTileN;
        case 96: return DecodeConfig<96>::kTileN;
        case 128: return DecodeConfig<128>::kTileN;
        case 256: return DecodeConfig<256>::kTileN;
        default: return 64;
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

int avar_decode_rows_per_cta(int D) { return rows_per_cta_impl(D); }

void avar_decode_plan(DecodeParams& p, int64_t resident_ctas, int forced_splits) {
    const int rows = std::max(1, rows_per_cta_impl(p.D));
    const int R = (p.Hq / std::max(1, p.Hk)) * p.Sq;
    const int64_t base_ctas = int64_t(p.B) * p.Hk * ((R + rows - 1) / rows);
    const DecodeSplitPlan plan = avar_decode_split_plan(base_ctas, resident_ctas, p.Sk_max, tile_n_impl(p.D),
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
