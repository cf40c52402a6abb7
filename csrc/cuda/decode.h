// Split-KV ("flash-decoding") attention with per-class attention mass and class-wise score re-weighting.
//
// Plain C++/CUDA interface: no torch headers. The torch binding (csrc/cuda_bindings.cpp) checks the tensors,
// allocates outputs and the fp32 workspace, and calls avar_decode_fwd on the current stream.
//
// Shapes (element strides, the last dim of q/k/v/out is contiguous):
//   q          [B, Sq, Hq, D]   fp16 / bf16, Sq in 1..16
//   k/v cache  [B, Sk_max, Hk, D]                    (block_table == nullptr)
//              [num_blocks, block_size, Hk, D]       (paged: block_table int32 [B, max_blocks])
//   cache_seqlens int32 [B]: valid keys per sequence (the new rows' keys included)
//   key_class  int32 [B, Sk_max] (logical key positions) or nullptr; query_class int32 [B, Sq]
//   mul/abs/add float32 [Hq, C, C] contiguous or nullptr
//   out [B, Sq, Hq, D] (q's dtype), lse float32 [B, Hq, Sq] contiguous, mass float32 [B, Hq, Sq, C] contiguous,
//   key_mass float32 [B, Hq, Sk_max, C] contiguous (optional)
// Causal masking is bottom-right aligned: query i of Sq sees key j iff j <= i + seqlen - Sq.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

namespace avar {

enum class DecodeDtype : int { kFloat16 = 0, kBFloat16 = 1 };

struct DecodeParams {
    DecodeDtype dtype = DecodeDtype::kFloat16;

    const void* q = nullptr;
    int64_t q_batch_stride = 0, q_seq_stride = 0, q_head_stride = 0;

    const void* k = nullptr;
    const void* v = nullptr;
    // Non-paged: batch stride. Paged: stride between blocks (pages).
    int64_t k_batch_stride = 0, k_seq_stride = 0, k_head_stride = 0;
    int64_t v_batch_stride = 0, v_seq_stride = 0, v_head_stride = 0;

    const int32_t* block_table = nullptr;  // [B, max_blocks] or nullptr (not paged)
    int64_t block_table_batch_stride = 0;
    int block_size = 0;                    // tokens per page (multiple of 16) when paged

    const int32_t* cache_seqlens = nullptr;  // [B]

    const int32_t* key_class = nullptr;  // [B, Sk_max] or nullptr (then C must be 0)
    int64_t key_class_batch_stride = 0;
    const int32_t* query_class = nullptr;  // [B, Sq], needed when a reweight table is given
    int64_t query_class_batch_stride = 0;

    const float* mul = nullptr;  // [Hq, C, C] or nullptr
    const float* abs_ = nullptr;
    const float* add = nullptr;

    void* out = nullptr;
    int64_t out_batch_stride = 0, out_seq_stride = 0, out_head_stride = 0;
    float* lse = nullptr;   // [B, Hq, Sq]
    float* mass = nullptr;  // [B, Hq, Sq, C] (unused when C == 0)
    // [B, Hq, Sk_max, C] contiguous, or nullptr: the new rows' attention on every cache position summed by query
    // class, 0 past cache_seqlens (every element is written). Needs C >= 1, key_class and query_class.
    float* key_mass = nullptr;

    // fp32 workspace, needed when num_splits > 1 (see avar_decode_workspace_floats):
    // ws_out [num_splits, B, Hq, Sq, D], ws_lse [num_splits, B, Hq, Sq], ws_mass [num_splits, B, Hq, Sq, C].
    float* ws_out = nullptr;
    float* ws_lse = nullptr;
    float* ws_mass = nullptr;

    int B = 0, Sq = 0, Hq = 0, Hk = 0, D = 0, C = 0, Sk_max = 0;
    float scale = 1.f;
    bool causal = true;

    int num_splits = 1;       // key splits (CTAs along the keys per sequence and kv head)
    int keys_per_split = 0;   // multiple of the key tile; num_splits * keys_per_split >= Sk_max
};

constexpr int kDecodeMaxClasses = 8;
constexpr int kDecodeMaxSq = 16;

// True for the head dims with a compiled kernel: 64, 80, 96, 128, 256.
bool avar_decode_supported_head_dim(int head_dim);

// Query rows (GQA group x Sq) one CTA holds: one 16-row tile of the tensor-core products; a kv head with more rows
// takes several row tiles (grid z), each reading the split's keys.
int avar_decode_rows_per_cta(int head_dim);

constexpr int kDecodeMaxSplits = 128;
constexpr int kDecodeMinKeysPerSplit = 256;

struct DecodeSplitPlan {
    int num_splits;
    int keys_per_split;
};

// The split planner, a pure function (host only; unit-tested by csrc/cuda/decode_plan_test.cpp).
//   base_ctas      CTAs of one split: B * Hk * row tiles
//   resident_ctas  CTAs the GPU holds at once: SMs * CTAs per SM of the split kernel (occupancy)
//   sk_max, tile_n the longest cache and the kernel's key tile
// splits = floor(resident / base): the split grid fills one wave and no more (a second, partial wave costs about
// as long as the first, as the flash-decoding heuristics note), at least kDecodeMinKeysPerSplit keys per split,
// at most kDecodeMaxSplits. forced_splits > 0 forces a count (tests). keys_per_split is a multiple of tile_n, and
// the count is then trimmed so that no split is empty.
inline DecodeSplitPlan avar_decode_split_plan(int64_t base_ctas, int64_t resident_ctas, int sk_max, int tile_n,
                                              int forced_splits = 0) {
    int64_t splits;
    if (forced_splits > 0) {
        splits = forced_splits;
    } else {
        const int64_t base = base_ctas > 0 ? base_ctas : 1;
        const int64_t by_wave = resident_ctas / base;
        const int64_t by_len = sk_max / kDecodeMinKeysPerSplit;
        splits = by_wave < by_len ? by_wave : by_len;
    }
    splits = splits < 1 ? 1 : (splits > kDecodeMaxSplits ? kDecodeMaxSplits : splits);
    int64_t kps = (int64_t(sk_max) + splits - 1) / splits;
    kps = (kps + tile_n - 1) / tile_n * tile_n;
    if (kps < tile_n) kps = tile_n;
    splits = (int64_t(sk_max) + kps - 1) / kps;
    return {int(splits < 1 ? 1 : splits), int(kps)};
}

// Writes num_splits and keys_per_split into params (avar_decode_split_plan for its shape and head dim).
void avar_decode_plan(DecodeParams& params, int64_t resident_ctas, int forced_splits = 0);

// Once per (device, dtype, head dim) before the first avar_decode_fwd on that device: raises the split kernel's
// dynamic shared-memory limit to its largest need, and writes how many of its CTAs fit on one SM for the row
// count params implies (the planner's resident_ctas is that times the SM count). The binding caches both.
cudaError_t avar_decode_prepare(const DecodeParams& params, int* ctas_per_sm);

// Floats of workspace the plan in params needs (0 when num_splits == 1).
size_t avar_decode_workspace_floats(const DecodeParams& params);

// Launches the split kernel, when num_splits > 1 the combine kernel, and with params.key_mass the key-mass kernel
// (avar_decode_prepare must have run on this device for params' dtype and head dim). Returns the launch error.
cudaError_t avar_decode_fwd(const DecodeParams& params, cudaStream_t stream);

// The combine kernel alone (ws_* -> out, lse, mass); avar_decode_fwd calls it.
cudaError_t avar_decode_combine(const DecodeParams& params, cudaStream_t stream);

// The key-mass kernel alone (reads q, k_cache, the classes, tables and the final lse -> key_mass); avar_decode_fwd
// calls it after the forward when params.key_mass is set.
cudaError_t avar_decode_key_mass(const DecodeParams& params, cudaStream_t stream);

}  // namespace avar
