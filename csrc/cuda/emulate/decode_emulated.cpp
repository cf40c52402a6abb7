// The CUDA decode extension built for the CPU: csrc/cuda/decode.cu and the torch binding csrc/cuda_bindings.cpp,
// compiled by the host compiler with -DAVAR_DECODE_EMULATE into one module whose kernels run under the warp
// emulator of simt.h, on CPU tensors. tests/test_decode_emulated.py builds it (torch.utils.cpp_extension.load) and
// checks the kernels against the float64 reference with the same cases as the GPU tests. Not part of the package.
#ifndef AVAR_DECODE_EMULATE
#define AVAR_DECODE_EMULATE 1
#endif
#include "simt.h"

// The CUDA runtime calls of decode.cu and the binding, on an emulated device of kSms SMs with H100's shared memory.
namespace {
constexpr int kSms = 4;
constexpr size_t kSmemPerSm = 233472;    // bytes (228 KB)
constexpr size_t kSmemPerBlock = 232448;  // the opt-in limit per block (227 KB)
constexpr size_t kReservedPerBlock = 1024;
}  // namespace

extern "C" {
cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute attr, int value) {
    if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize && (value < 0 || size_t(value) > kSmemPerBlock))
        return cudaErrorInvalidValue;
    return cudaSuccess;
}
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* blocks, const void*, int threads,
                                                                   size_t smem, unsigned int) {
    if (smem > kSmemPerBlock) {
        *blocks = 0;
        return cudaSuccess;
    }
    const int by_smem = int(kSmemPerSm / (smem + kReservedPerBlock));
    const int by_threads = 2048 / std::max(1, threads);
    *blocks = std::min(by_smem, by_threads);
    return cudaSuccess;
}
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t err) { return err == cudaSuccess ? "no error" : "emulated CUDA error"; }
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
    *value = attr == cudaDevAttrMultiProcessorCount ? kSms : 0;
    return cudaSuccess;
}
}

#include "../decode.cu"
#include "../../cuda_bindings.cpp"
