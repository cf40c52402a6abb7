// A host-side emulator of the CUDA execution model, just enough to run csrc/cuda/decode.cu on a CPU.
//
// decode.cu compiled by a host C++ compiler with -DAVAR_DECODE_EMULATE (see decode_emulated.cpp) runs every CTA of
// a launch in turn, its threads as cooperative fibers (ucontext) on one OS thread: threadIdx / blockIdx, dynamic
// shared memory (filled with 0xFF bytes, a NaN pattern, so that a read before a write shows), __syncthreads,
// __syncwarp, __shfl_xor_sync, and the warp-collective PTX the kernels use (ldmatrix .x4 with and without .trans,
// mma.sync m16n8k16 with fp32 accumulators, cp.async with commit / wait_group). Collective operations take effect
// when every live lane of the warp (every thread of the CTA for a barrier) has arrived, as on the hardware; a
// cp.async copy lands only when its thread waits for its group, so that a read before the wait sees the NaN
// pattern. The fragment layouts follow the PTX ISA ("Matrix fragments for mma.m16n8k16", "ldmatrix").
//
// What it checks: the kernels' indexing, fragment layouts, pipelining order, masking and arithmetic, with fp32
// accumulation. What it cannot: timing, races the hardware would resolve differently from a round-robin schedule,
// and the tensor cores' exact internal rounding (the accumulation here is in double, rounded to fp32 per mma).
#pragma once

#ifndef AVAR_DECODE_EMULATE
#error "simt.h is the host emulation of the CUDA kernels: compile with -DAVAR_DECODE_EMULATE"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace avar_emu {

struct Copy {
    void* dst;
    const void* src;
    int bytes, src_bytes;  // src_bytes < bytes: the rest is zero-filled
};

struct Thread {
    ucontext_t ctx;
    std::vector<char> stack;
    uint3 tid;
    bool done = false;
    std::vector<std::vector<Copy>> groups;  // committed cp.async groups, oldest first
    std::vector<Copy> open;                 // issued, not yet committed
};

// Participants of a barrier: arrivals of the current phase, live members, phase counter.
struct Barrier {
    int arrived = 0, alive = 0;
    unsigned phase = 0;
};

constexpr int kSlotBytes = 64;

struct Warp {
    Barrier bar;
    alignas(16) unsigned char slot[32][kSlotBytes];
};

struct Cta {
    dim3 grid, block;
    uint3 bid;
    std::vector<Thread> threads;
    std::vector<Warp> warps;
    Barrier bar;
    std::vector<unsigned char> smem;
    std::function<void()> body;
    ucontext_t scheduler;
    int current = 0;
    unsigned long long progress = 0;  // barrier phases completed and threads finished
};

inline Cta*& cta() {
    static Cta* c = nullptr;
    return c;
}
inline Thread& self() { return cta()->threads[cta()->current]; }
inline int linear_tid() { return cta()->current; }
inline int lane_id() { return linear_tid() % 32; }
inline Warp& my_warp() { return cta()->warps[linear_tid() / 32]; }

inline void yield() {
    Cta* c = cta();
    swapcontext(&c->threads[c->current].ctx, &c->scheduler);
}

inline void release_if_complete(Barrier& b) {
    if (b.arrived > 0 && b.arrived >= b.alive) {
        b.arrived = 0;
        ++b.phase;
        ++cta()->progress;
    }
}

inline void arrive_and_wait(Barrier& b) {
    const unsigned phase = b.phase;
    ++b.arrived;
    release_if_complete(b);
    while (b.phase == phase) yield();
}

inline void complete_groups(size_t keep) {
    Thread& t = self();
    while (t.groups.size() > keep) {
        for (const Copy& c : t.groups.front()) {
            if (c.src_bytes > 0) std::memcpy(c.dst, c.src, size_t(c.src_bytes));
            if (c.bytes > c.src_bytes) std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, size_t(c.bytes - c.src_bytes));
        }
        t.groups.erase(t.groups.begin());
    }
}

inline void thread_entry() {
    Cta* c = cta();
    c->body();
    Thread& t = c->threads[c->current];
    t.groups.push_back(std::move(t.open));
    complete_groups(0);  // a thread's copies land before it exits
    t.done = true;
    ++c->progress;
    Warp& w = c->warps[c->current / 32];
    --w.bar.alive;
    release_if_complete(w.bar);
    --c->bar.alive;
    release_if_complete(c->bar);
    // returning resumes uc_link (the scheduler)
}

// Runs body once per thread of every CTA of grid, CTAs one after the other.
inline void launch(dim3 grid, dim3 block, size_t smem_bytes, std::function<void()> body) {
    const int nthreads = int(block.x * block.y * block.z);
    if (block.y != 1 || block.z != 1 || nthreads % 32 != 0) {
        std::fprintf(stderr, "avar_emu: only 1-D blocks of whole warps are emulated\n");
        std::abort();
    }
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                Cta c;
                c.grid = grid;
                c.block = block;
                c.bid = make_uint3(bx, by, bz);
                c.body = body;
                c.smem.assign(smem_bytes + 16, 0xFF);
                c.threads.resize(size_t(nthreads));
                c.warps.resize(size_t(nthreads / 32));
                c.bar.alive = nthreads;
                for (Warp& w : c.warps) w.bar.alive = 32;
                Cta* outer = cta();
                cta() = &c;
                for (int i = 0; i < nthreads; ++i) {
                    Thread& t = c.threads[size_t(i)];
                    t.tid = make_uint3(unsigned(i), 0, 0);
                    t.stack.resize(256 * 1024);
                    getcontext(&t.ctx);
                    t.ctx.uc_stack.ss_sp = t.stack.data();
                    t.ctx.uc_stack.ss_size = t.stack.size();
                    t.ctx.uc_link = &c.scheduler;
                    makecontext(&t.ctx, thread_entry, 0);
                }
                // Round-robin until every thread is done; a sweep without progress means every live thread waits
                // at a barrier that can no longer complete.
                for (;;) {
                    bool any = false;
                    const unsigned long long before = c.progress;
                    for (int i = 0; i < nthreads; ++i) {
                        if (c.threads[size_t(i)].done) continue;
                        any = true;
                        c.current = i;
                        swapcontext(&c.scheduler, &c.threads[size_t(i)].ctx);
                    }
                    if (!any) break;
                    if (c.progress == before) {
                        std::fprintf(stderr, "avar_emu: deadlock in CTA (%u, %u, %u): threads wait at barriers that "
                                     "cannot complete\n", bx, by, bz);
                        std::abort();
                    }
                }
                cta() = outer;
            }
}

inline unsigned char* dynamic_smem() {
    // 16-byte aligned, as the hardware's dynamic shared memory
    const uintptr_t p = reinterpret_cast<uintptr_t>(cta()->smem.data());
    return reinterpret_cast<unsigned char*>((p + 15) & ~uintptr_t(15));
}

inline void syncthreads() { arrive_and_wait(cta()->bar); }
inline void syncwarp() { arrive_and_wait(my_warp().bar); }

// Every lane publishes `mine`; fn(lanes' values as bytes, lane) gives this lane's result once all have arrived.
template <typename In, typename Fn> auto warp_collective(const In& mine, Fn fn) {
    static_assert(sizeof(In) <= kSlotBytes, "collective input too large");
    Warp& w = my_warp();
    std::memcpy(w.slot[lane_id()], &mine, sizeof(In));
    arrive_and_wait(w.bar);
    In all[32];
    for (int l = 0; l < 32; ++l) std::memcpy(&all[l], w.slot[l], sizeof(In));
    auto out = fn(all, lane_id());
    arrive_and_wait(w.bar);  // nobody overwrites the slots before every lane has read them
    return out;
}

template <typename V> V shfl_xor(V v, int mask) {
    return warp_collective(v, [mask](const V* all, int lane) { return all[lane ^ mask]; });
}

struct Regs4 {
    uint32_t r[4];
};

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lane 8 m + i gives the address of row i of matrix m; lane l
// receives, per matrix m, the 32-bit pair at row l / 4, elements 2 (l % 4) .. + 1 (non-trans) or the elements at
// rows 2 (l % 4) and 2 (l % 4) + 1 of column l / 4 (trans).
inline void ldmatrix_x4(uint32_t (&r)[4], const void* addr, bool trans) {
    const Regs4 got = warp_collective(addr, [trans](const void* const* all, int lane) {
        Regs4 o;
        for (int m = 0; m < 4; ++m) {
            if (!trans) {
                std::memcpy(&o.r[m], static_cast<const char*>(all[8 * m + lane / 4]) + 4 * (lane % 4), 4);
            } else {
                uint16_t lo, hi;
                std::memcpy(&lo, static_cast<const char*>(all[8 * m + 2 * (lane % 4)]) + 2 * (lane / 4), 2);
                std::memcpy(&hi, static_cast<const char*>(all[8 * m + 2 * (lane % 4) + 1]) + 2 * (lane / 4), 2);
                o.r[m] = uint32_t(lo) | (uint32_t(hi) << 16);
            }
        }
        return o;
    });
    for (int m = 0; m < 4; ++m) r[m] = got.r[m];
}

template <typename T> float half_bits_to_float(uint16_t bits) {
    T h;
    std::memcpy(&h, &bits, 2);
    if constexpr (std::is_same<T, __half>::value) return __half2float(h);
    else return __bfloat162float(h);
}

struct MmaIn {
    uint32_t a[4], b[2];
};

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: D = A B + C with A 16x16 (row), B 16x8 (col), fp32 C / D.
// Fragments (g = lane / 4, t = lane % 4): A reg 0 (g, 2t..2t+1), 1 (g+8, 2t..), 2 (g, 2t+8..), 3 (g+8, 2t+8..);
// B reg 0 (k = 2t..2t+1, n = g), 1 (k = 2t+8.., n = g); C/D c0,c1 (g, 2t..2t+1), c2,c3 (g+8, 2t..2t+1).
template <typename T> void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    MmaIn in;
    for (int i = 0; i < 4; ++i) in.a[i] = a[i];
    for (int i = 0; i < 2; ++i) in.b[i] = b[i];
    struct Out {
        float v[4];
    };
    const float c[4] = {d[0], d[1], d[2], d[3]};
    const Out out = warp_collective(in, [&c](const MmaIn* all, int lane) {
        auto elem = [](uint32_t reg, int hi) { return half_bits_to_float<T>(uint16_t(hi ? reg >> 16 : reg & 0xFFFF)); };
        auto A = [&](int row, int k) {  // A[row][k]
            const int owner = (row % 8) * 4 + (k % 8) / 2;
            const int reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
            return elem(all[owner].a[reg], k % 2);
        };
        auto B = [&](int k, int n) {  // B[k][n]
            const int owner = n * 4 + (k % 8) / 2;
            return elem(all[owner].b[k >= 8 ? 1 : 0], k % 2);
        };
        Out o;
        const int g = lane / 4, t = lane % 4;
        for (int e = 0; e < 4; ++e) {
            const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e % 2);
            double acc = 0.0;
            for (int k = 0; k < 16; ++k) acc += double(A(row, k)) * double(B(k, col));
            o.v[e] = float(acc + double(c[e]));
        }
        return o;
    });
    for (int e = 0; e < 4; ++e) d[e] = out.v[e];
}

inline void cp_async(void* dst, const void* src, int bytes, bool pred) {
    self().open.push_back(Copy{dst, src, bytes, pred ? bytes : 0});
}
inline void cp_async_commit() {
    Thread& t = self();
    t.groups.push_back(std::move(t.open));
    t.open.clear();
}
inline void cp_async_wait(int keep) { complete_groups(size_t(keep)); }

}  // namespace avar_emu

// The CUDA built-ins the kernels use, for the host compiler.
#define threadIdx (::avar_emu::self().tid)
#define blockIdx (::avar_emu::cta()->bid)
#define blockDim (::avar_emu::cta()->block)
#define gridDim (::avar_emu::cta()->grid)
inline void __syncthreads() { ::avar_emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::avar_emu::syncwarp(); }
inline float __shfl_xor_sync(unsigned, float v, int mask) { return ::avar_emu::shfl_xor(v, mask); }
inline int __shfl_xor_sync(unsigned, int v, int mask) { return ::avar_emu::shfl_xor(v, mask); }
inline int __any_sync(unsigned, int pred) {
    return ::avar_emu::warp_collective(pred, [](const int* all, int) {
        int any = 0;
        for (int l = 0; l < 32; ++l) any |= all[l] != 0;
        return any;
    });
}
inline float __expf(float x) { return std::exp(x); }
using std::max;
using std::min;

// cuda_runtime.h offers its kernel-pointer overload of cudaFuncSetAttribute to nvcc only.
template <typename Kernel> cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attr, int value) {
    return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
