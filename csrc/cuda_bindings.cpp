// Torch binding of the CUDA decode kernels (csrc/cuda/decode.{h,cu}) -> module avar_kernels._cuda.
// Checks the tensors, allocates the outputs and the fp32 split workspace, plans the key splits from the GPU's
// resident CTA slots (read once per device and kernel, then cached) and launches on the current stream. The
// Python wrapper (avar_kernels/kvcache.py) does the user-facing argument checks.
#include <torch/extension.h>

#if !defined(AVAR_DECODE_EMULATE)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif
#include <cuda_runtime.h>

#include <algorithm>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>

#include "decode.h"

namespace {

void check_vec_layout(const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.stride(-1) == 1, name, ": the last (head) dim must be contiguous");
    for (int i = 0; i < t.dim() - 1; ++i)
        TORCH_CHECK(t.stride(i) % 8 == 0 || t.size(i) == 1, name, ": stride ", i, " (", t.stride(i),
                    ") must be a multiple of 8 elements for 128-bit loads");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, ": data must be 16-byte aligned");
}

void check_int32(const at::Tensor& t, const char* name, const at::Device& dev) {
    TORCH_CHECK(t.scalar_type() == at::kInt, name, ": expected int32, got ", t.scalar_type());
    TORCH_CHECK(t.device() == dev, name, ": expected device ", dev, ", got ", t.device());
    TORCH_CHECK(t.stride(-1) == 1, name, ": the last dim must be contiguous");
}

const float* table_ptr(const std::optional<at::Tensor>& t, const char* name, int64_t hq, int64_t c,
                       const at::Device& dev) {
    if (!t.has_value()) return nullptr;
    TORCH_CHECK(t->scalar_type() == at::kFloat, name, ": expected float32");
    TORCH_CHECK(t->device() == dev, name, ": expected device ", dev);
    TORCH_CHECK(t->is_contiguous(), name, ": expected a contiguous tensor");
    TORCH_CHECK(t->dim() == 3 && t->size(0) == hq && t->size(1) == c && t->size(2) == c, name,
                ": expected shape [", hq, ", ", c, ", ", c, "], got ", t->sizes());
    return t->data_ptr<float>();
}

// CTAs of the split kernel the device holds at once (SMs x CTAs per SM at this row count), for the planner. The
// first call per (device, dtype, head dim, rows per CTA) also raises the kernel's shared-memory limit
// (avar_decode_prepare); later decode steps read the cache instead of querying the driver.
int64_t resident_ctas(const avar::DecodeParams& p, int device) {
    static std::mutex mutex;
    static std::map<std::tuple<int, int, int, int>, int64_t> cache;
    const int rows = std::min((p.Hq / p.Hk) * p.Sq, avar::avar_decode_rows_per_cta(p.D));
    const auto key = std::make_tuple(device, int(p.dtype), p.D, rows);
    const std::lock_guard<std::mutex> lock(mutex);
    const auto hit = cache.find(key);
    if (hit != cache.end()) return hit->second;
    int num_sms = 0, per_sm = 0;
    TORCH_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess,
                "cudaDeviceGetAttribute(multiProcessorCount) failed");
    const cudaError_t err = avar::avar_decode_prepare(p, &per_sm);
    TORCH_CHECK(err == cudaSuccess, "avar decode kernel setup failed: ", cudaGetErrorString(err));
    const int64_t slots = int64_t(num_sms) * std::max(1, per_sm);
    cache.emplace(key, slots);
    return slots;
}

// Outputs are not pre-filled: the kernels write every element. Under the emulator (CPU tensors) they start as NaN,
// so that an element a kernel forgets shows in the tests.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(AVAR_DECODE_EMULATE)
    return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
#else
    return at::empty(sizes, options);
#endif
}

avar::DecodeDtype decode_dtype(at::ScalarType t) {
    return t == at::kBFloat16 ? avar::DecodeDtype::kBFloat16 : avar::DecodeDtype::kFloat16;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> decode_fwd(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& key_class, const std::optional<at::Tensor>& block_table,
    const std::optional<at::Tensor>& query_class, int64_t num_classes, const std::optional<at::Tensor>& mul,
    const std::optional<at::Tensor>& abs_, const std::optional<at::Tensor>& add, double scale, bool causal,
    int64_t num_splits, bool key_mass) {
#if defined(AVAR_DECODE_EMULATE)  // csrc/cuda/emulate: the same kernels on CPU tensors
    TORCH_CHECK(q.is_cpu(), "q: the emulated decode kernels take CPU tensors");
#else
    TORCH_CHECK(q.is_cuda(), "q: expected a CUDA tensor");
#endif
    const at::Device dev = q.device();
    TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
                "q: the CUDA decode kernel supports float16 and bfloat16, got ", q.scalar_type());
    TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
                "q, k_cache, v_cache must share one dtype");
    TORCH_CHECK(k_cache.device() == dev && v_cache.device() == dev, "k_cache, v_cache: expected device ", dev);
    TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4,
                "q, k_cache, v_cache: expected 4-D tensors");
    TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache must have the same shape");
    const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3);
    const int64_t Hk = k_cache.size(2);
    TORCH_CHECK(Sq >= 1 && Sq <= avar::kDecodeMaxSq, "q: Sq must be in [1, ", avar::kDecodeMaxSq, "], got ", Sq);
    TORCH_CHECK(k_cache.size(3) == D, "k_cache: head dim ", k_cache.size(3), " != q's ", D);
    TORCH_CHECK(Hk > 0 && Hq % Hk == 0, "Hq (", Hq, ") must be a multiple of Hk (", Hk, ")");
    TORCH_CHECK(avar::avar_decode_supported_head_dim(int(D)), "head dim ", D, " has no compiled CUDA decode kernel");
    TORCH_CHECK(num_classes >= 0 && num_classes <= avar::kDecodeMaxClasses, "num_classes must be in [0, 8]");
    check_vec_layout(q, "q");
    check_vec_layout(k_cache, "k_cache");
    check_vec_layout(v_cache, "v_cache");
    check_int32(cache_seqlens, "cache_seqlens", dev);
    TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B, "cache_seqlens: expected shape [", B, "]");

#if !defined(AVAR_DECODE_EMULATE)
    const c10::cuda::CUDAGuard guard(dev);
#endif
    avar::DecodeParams p;
    p.dtype = decode_dtype(q.scalar_type());
    p.q = q.data_ptr();
    p.q_batch_stride = q.stride(0);
    p.q_seq_stride = q.stride(1);
    p.q_head_stride = q.stride(2);
    p.k = k_cache.data_ptr();
    p.k_batch_stride = k_cache.stride(0);
    p.k_seq_stride = k_cache.stride(1);
    p.k_head_stride = k_cache.stride(2);
    p.v = v_cache.data_ptr();
    p.v_batch_stride = v_cache.stride(0);
    p.v_seq_stride = v_cache.stride(1);
    p.v_head_stride = v_cache.stride(2);
    int64_t sk_max = k_cache.size(1);
    if (block_table.has_value()) {
        check_int32(*block_table, "block_table", dev);
        TORCH_CHECK(block_table->dim() == 2 && block_table->size(0) == B, "block_table: expected shape [", B,
                    ", max_blocks]");
        const int64_t bs = k_cache.size(1);
        TORCH_CHECK(bs % 16 == 0, "paged k_cache: block size ", bs, " must be a multiple of 16");
        p.block_table = block_table->data_ptr<int32_t>();
        p.block_table_batch_stride = block_table->stride(0);
        p.block_size = int(bs);
        sk_max = block_table->size(1) * bs;
    } else {
        TORCH_CHECK(k_cache.size(0) == B, "k_cache: batch ", k_cache.size(0), " != q's ", B);
    }
    TORCH_CHECK(sk_max < (int64_t(1) << 31), "cache too long");
    p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
    if (key_class.has_value()) {
        TORCH_CHECK(num_classes >= 1, "num_classes must be >= 1 with key_class");
        check_int32(*key_class, "key_class", dev);
        // [B, L] with L >= every cache_seqlens entry (checked by the Python wrapper); read at j < seqlen only.
        TORCH_CHECK(key_class->dim() == 2 && key_class->size(0) == B, "key_class: expected shape [", B,
                    ", Sk], got ", key_class->sizes());
        p.key_class = key_class->data_ptr<int32_t>();
        p.key_class_batch_stride = key_class->stride(0);
        TORCH_CHECK(query_class.has_value(), "query_class is required with key_class");
        check_int32(*query_class, "query_class", dev);
        TORCH_CHECK(query_class->dim() == 2 && query_class->size(0) == B && query_class->size(1) == Sq,
                    "query_class: expected shape [", B, ", ", Sq, "]");
        p.query_class = query_class->data_ptr<int32_t>();
        p.query_class_batch_stride = query_class->stride(0);
    } else {
        TORCH_CHECK(num_classes == 0, "num_classes must be 0 without key_class");
        TORCH_CHECK(!mul.has_value() && !abs_.has_value() && !add.has_value(), "reweight tables need key_class");
        TORCH_CHECK(!key_mass, "key_mass: needs key_class (key masses are summed by query class)");
    }
    p.C = int(num_classes);
    p.mul = table_ptr(mul, "mul", Hq, num_classes, dev);
    p.abs_ = table_ptr(abs_, "abs", Hq, num_classes, dev);
    p.add = table_ptr(add, "add", Hq, num_classes, dev);

    at::Tensor out = empty_output({B, Sq, Hq, D}, q.options());
    at::Tensor lse = empty_output({B, Hq, Sq}, q.options().dtype(at::kFloat));
    at::Tensor mass = empty_output({B, Hq, Sq, num_classes}, q.options().dtype(at::kFloat));
    // Not pre-zeroed: the key-mass kernel writes every element (zeros past a cache's end). Empty [0] when not asked,
    // as the custom op's schema has no optional outputs.
    at::Tensor km = key_mass ? empty_output({B, Hq, sk_max, num_classes}, q.options().dtype(at::kFloat))
                             : at::empty({0}, q.options().dtype(at::kFloat));
    if (key_mass) {
        TORCH_CHECK(B * Hk <= 65535, "key_mass: B * Hk (", B * Hk, ") must be at most 65535");
        p.key_mass = km.data_ptr<float>();
    }
    p.out = out.data_ptr();
    p.out_batch_stride = out.stride(0);
    p.out_seq_stride = out.stride(1);
    p.out_head_stride = out.stride(2);
    p.lse = lse.data_ptr<float>();
    p.mass = num_classes > 0 ? mass.data_ptr<float>() : nullptr;
    p.B = int(B);
    p.Sq = int(Sq);
    p.Hq = int(Hq);
    p.Hk = int(Hk);
    p.D = int(D);
    p.Sk_max = int(sk_max);
    p.scale = float(scale);
    p.causal = causal;
    if (B == 0) return {out, lse, mass, km};

    avar::avar_decode_plan(p, resident_ctas(p, dev.index()), int(num_splits));
    at::Tensor ws;
    const size_t ws_floats = avar::avar_decode_workspace_floats(p);
    if (ws_floats > 0) {
        ws = at::empty({int64_t(ws_floats)}, q.options().dtype(at::kFloat));
        const size_t rows = size_t(p.num_splits) * B * Hq * Sq;
        p.ws_out = ws.data_ptr<float>();
        p.ws_lse = p.ws_out + rows * D;
        p.ws_mass = p.ws_lse + rows;
    }
#if defined(AVAR_DECODE_EMULATE)
    const cudaStream_t stream = nullptr;
#else
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
#endif
    const cudaError_t err = avar::avar_decode_fwd(p, stream);
    TORCH_CHECK(err == cudaSuccess, "avar decode kernel launch failed: ", cudaGetErrorString(err));
    return {out, lse, mass, km};
}

// The plan decode_fwd makes for a shape on a device: (num_splits, keys_per_split, resident CTAs); benchmarks
// print it beside the timings.
std::tuple<int64_t, int64_t, int64_t> decode_plan(int64_t B, int64_t Sq, int64_t Hq, int64_t Hk, int64_t D,
                                                  int64_t sk_max, at::ScalarType dtype, int64_t device) {
    TORCH_CHECK(Hk > 0 && Hq % Hk == 0 && Sq >= 1 && avar::avar_decode_supported_head_dim(int(D)),
                "decode_plan: unsupported shape");
#if !defined(AVAR_DECODE_EMULATE)
    const c10::cuda::CUDAGuard guard(c10::Device(c10::DeviceType::CUDA, c10::DeviceIndex(device)));
#endif
    avar::DecodeParams p;
    p.dtype = decode_dtype(dtype);
    p.B = int(B);
    p.Sq = int(Sq);
    p.Hq = int(Hq);
    p.Hk = int(Hk);
    p.D = int(D);
    p.Sk_max = int(sk_max);
    const int64_t slots = resident_ctas(p, int(device));
    avar::avar_decode_plan(p, slots, 0);
    return {p.num_splits, p.keys_per_split, slots};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "avar-kernels CUDA decode kernels (split-KV attention with per-class mass)";
    m.def("decode_fwd", &decode_fwd,
          "split-KV decode forward -> (out, lse, mass, key_mass [B, Hq, Sk_max, C] with key_mass=True, else [0])",
          pybind11::arg("q"),
          pybind11::arg("k_cache"), pybind11::arg("v_cache"), pybind11::arg("cache_seqlens"),
          pybind11::arg("key_class") = std::nullopt, pybind11::arg("block_table") = std::nullopt,
          pybind11::arg("query_class") = std::nullopt, pybind11::arg("num_classes") = 0,
          pybind11::arg("mul") = std::nullopt, pybind11::arg("abs_") = std::nullopt,
          pybind11::arg("add") = std::nullopt, pybind11::arg("scale") = 1.0, pybind11::arg("causal") = true,
          pybind11::arg("num_splits") = 0, pybind11::arg("key_mass") = false);
    m.def("decode_plan", &decode_plan, "(num_splits, keys_per_split, resident CTAs) decode_fwd would use",
          pybind11::arg("B"), pybind11::arg("Sq"), pybind11::arg("Hq"), pybind11::arg("Hk"), pybind11::arg("D"),
          pybind11::arg("sk_max"), pybind11::arg("dtype"), pybind11::arg("device"));
}
