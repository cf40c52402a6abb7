// Fused attention with per-class attention mass and class-wise score re-weighting (CPU).
//
// Implements the backend contract of docs/backends.md in the packed (varlen) layout:
//   q [Tq, Hq, D], k/v [Tk, Hk, D], cu_seqlens_q/k int32 [N + 1].
// Forward: online softmax over key blocks (FlashAttention-2 style), block products through
// at::native::cpublas::gemm reading q/k/v rows in place (leading dimension H * D), row max / exp / sums
// with at::vec::Vectorized. The per-class masses are per-row accumulators rescaled exactly like the
// softmax denominator; they are taken as sums of P over runs of equal key class in each key block, so
// the row sum is the sum of the run sums and the masses cost almost nothing.
// Backward: P recomputed from lse per (q block, k block); parallel over (sequence, query head); key
// blocks outer with local dK/dV accumulators, query blocks inner; dk/dv go to per-query-head buffers
// that are summed over the heads of each kv group at the end (deterministic, no atomics).
// Optional table gradients (a learned MUL / ABS / ADD, SPEC 3): dZ' is reduced per (query row class, key
// class run) inside each block into a per-task [3, C, C] float64 accumulator, written per (sequence, head)
// and summed over the sequences at the end (deterministic, no atomics); nothing of it runs unless asked.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

// Fortran BLAS, exported by libtorch_cpu (MKL or OpenBLAS). at::native::cpublas::gemm would be the
// natural entry point, but its float/double overloads are not exported from libtorch_cpu.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

namespace avar {
namespace {

enum class TransposeType { NoTranspose, Transpose };

// Column-major C[m x n] = alpha * op(A) op(B) + beta * C (BLAS semantics).
inline void blas_gemm(TransposeType ta, TransposeType tb, int64_t m, int64_t n, int64_t k, float alpha,
                      const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const char cta = ta == TransposeType::Transpose ? 'T' : 'N', ctb = tb == TransposeType::Transpose ? 'T' : 'N';
  const int im = (int)m, in = (int)n, ik = (int)k, ila = (int)lda, ilb = (int)ldb, ilc = (int)ldc;
  sgemm_(&cta, &ctb, &im, &in, &ik, &alpha, a, &ila, b, &ilb, &beta, c, &ilc);
}
inline void blas_gemm(TransposeType ta, TransposeType tb, int64_t m, int64_t n, int64_t k, double alpha,
                      const double* a, int64_t lda, const double* b, int64_t ldb, double beta, double* c,
                      int64_t ldc) {
  const char cta = ta == TransposeType::Transpose ? 'T' : 'N', ctb = tb == TransposeType::Transpose ? 'T' : 'N';
  const int im = (int)m, in = (int)n, ik = (int)k, ila = (int)lda, ilb = (int)ldb, ilc = (int)ldc;
  dgemm_(&cta, &ctb, &im, &in, &ik, &alpha, a, &ila, b, &ilb, &beta, c, &ilc);
}
using at::vec::Vectorized;

constexpr int64_t kMaxClasses = 8;

// ----------------------------------------------------------------------------------------------
// Block sizes (measured on a 2-core AVX2 machine, D = 128, fp32).
// ----------------------------------------------------------------------------------------------
// Overridable for tuning with AVAR_CPU_{FWD,BWD}_{Q,K}BLOCK.
inline int64_t env_or(const char* name, int64_t dflt) {
  const char* s = std::getenv(name);
  if (!s) return dflt;
  const long v = std::strtol(s, nullptr, 10);
  return v > 0 ? v : dflt;
}
const int64_t kFwdQBlock = env_or("AVAR_CPU_FWD_QBLOCK", 256);
const int64_t kFwdKBlock = env_or("AVAR_CPU_FWD_KBLOCK", 512);
const int64_t kBwdQBlock = env_or("AVAR_CPU_BWD_QBLOCK", 128);
const int64_t kBwdKBlock = env_or("AVAR_CPU_BWD_KBLOCK", 128);

// ----------------------------------------------------------------------------------------------
// Vectorized helpers.
// ----------------------------------------------------------------------------------------------
template <typename T>
inline Vectorized<T> vexp(const Vectorized<T>& x) {
  return x.exp();
}
template <>
inline Vectorized<float> vexp<float>(const Vectorized<float>& x) {
  return x.exp_u20();
}

template <typename T>
inline T row_max(const T* x, int64_t n) {
  using V = Vectorized<T>;
  T r = -std::numeric_limits<T>::infinity();
  int64_t i = 0;
  if (n >= V::size()) {
    V m = V::loadu(x);
    for (i = V::size(); i + V::size() <= n; i += V::size()) m = at::vec::maximum(m, V::loadu(x + i));
    alignas(64) T buf[V::size()];
    m.store(buf);
    for (int64_t t = 0; t < V::size(); ++t) r = std::max(r, buf[t]);
  }
  for (; i < n; ++i) r = std::max(r, x[i]);
  return r;
}

// x[i] = exp(x[i] - m) in place; returns the sum.
template <typename T>
inline T exp_sum(T* x, int64_t n, T m) {
  using V = Vectorized<T>;
  const V vm(m);
  V acc(T(0));
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) {
    V e = vexp<T>(V::loadu(x + i) - vm);
    e.store(x + i);
    acc = acc + e;
  }
  T r = T(0);
  if (i > 0) {
    alignas(64) T buf[V::size()];
    acc.store(buf);
    for (int64_t t = 0; t < V::size(); ++t) r += buf[t];
  }
  for (; i < n; ++i) {
    T e = std::exp(x[i] - m);
    x[i] = e;
    r += e;
  }
  return r;
}

// x[i] = exp(x[i] - m) in place (m finite).
template <typename T>
inline void exp_sub(T* x, int64_t n, T m) {
  using V = Vectorized<T>;
  const V vm(m);
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) vexp<T>(V::loadu(x + i) - vm).store(x + i);
  for (; i < n; ++i) x[i] = std::exp(x[i] - m);
}

template <typename T>
inline void scale_inplace(T* x, int64_t n, T s) {
  using V = Vectorized<T>;
  const V vs(s);
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) (V::loadu(x + i) * vs).store(x + i);
  for (; i < n; ++i) x[i] *= s;
}

// z' = z * (1 + mu) + ab * |z| + ad over [0, n).
template <typename T>
inline void reweight(T* z, int64_t n, T mu1, T ab, T ad) {
  using V = Vectorized<T>;
  const V vmu(mu1), vab(ab), vad(ad);
  int64_t i = 0;
  if (ab != T(0)) {
    for (; i + V::size() <= n; i += V::size()) {
      V x = V::loadu(z + i);
      (x * vmu + x.abs() * vab + vad).store(z + i);
    }
    for (; i < n; ++i) z[i] = z[i] * mu1 + ab * std::abs(z[i]) + ad;
  } else {
    for (; i + V::size() <= n; i += V::size()) (V::loadu(z + i) * vmu + vad).store(z + i);
    for (; i < n; ++i) z[i] = z[i] * mu1 + ad;
  }
}

// g = (1 + mu) + ab * sign(z), then z' = z * (1 + mu) + ab * |z| + ad, over [0, n).
template <typename T>
inline void reweight_grad(T* z, T* g, int64_t n, T mu1, T ab, T ad) {
  for (int64_t i = 0; i < n; ++i) {
    const T x = z[i];
    const T sg = x > T(0) ? T(1) : (x < T(0) ? T(-1) : T(0));
    g[i] = mu1 + ab * sg;
    z[i] = x * mu1 + ab * std::abs(x) + ad;
  }
}

// ds[i] = p[i] * (dp[i] + c) over [0, n), in place in dp.
template <typename T>
inline void ds_run(const T* p, T* dp, int64_t n, T c) {
  using V = Vectorized<T>;
  const V vc(c);
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) (V::loadu(p + i) * (V::loadu(dp + i) + vc)).store(dp + i);
  for (; i < n; ++i) dp[i] = p[i] * (dp[i] + c);
}

// Sums over [0, n) of ds (-> s[2], dADD), ds * z (-> s[0], dMUL) and ds * |z| (-> s[1], dABS), each only
// when asked; z is the raw scaled score (needed only for the first two).
template <typename T>
inline void table_sums(const T* ds, const T* z, int64_t n, bool wm, bool wa, bool wd, T* s) {
  using V = Vectorized<T>;
  V vm(T(0)), va(T(0)), vd(T(0));
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) {
    const V x = V::loadu(ds + i);
    if (wd) vd = vd + x;
    if (wm || wa) {
      const V zz = V::loadu(z + i);
      if (wm) vm = vm + x * zz;
      if (wa) va = va + x * zz.abs();
    }
  }
  alignas(64) T bm[V::size()], ba[V::size()], bd[V::size()];
  vm.store(bm);
  va.store(ba);
  vd.store(bd);
  T rm = T(0), ra = T(0), rd = T(0);
  for (int64_t t = 0; t < V::size(); ++t) {
    rm += bm[t];
    ra += ba[t];
    rd += bd[t];
  }
  for (; i < n; ++i) {
    if (wd) rd += ds[i];
    if (wm) rm += ds[i] * z[i];
    if (wa) ra += ds[i] * std::abs(z[i]);
  }
  s[0] = rm;
  s[1] = ra;
  s[2] = rd;
}

template <typename T>
inline void mul_inplace(T* x, const T* g, int64_t n) {
  using V = Vectorized<T>;
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) (V::loadu(x + i) * V::loadu(g + i)).store(x + i);
  for (; i < n; ++i) x[i] *= g[i];
}

// ----------------------------------------------------------------------------------------------
// Shared problem description.
// ----------------------------------------------------------------------------------------------
struct Run {
  int64_t start, end;  // local to the key block
  int cls;             // -1 when there are no classes
};

struct Problem {
  int64_t hq, hk, group, d;
  int64_t num_seqs;
  const int32_t* cu_q;
  const int32_t* cu_k;
  const int32_t* key_class;    // may be null
  const int32_t* query_class;  // may be null
  int64_t C;
  const float* mul;
  const float* abs_;
  const float* add;
  bool has_rw;
  double scale;
  int64_t wl, wr;

  // Visible key range [lo, hi] (inclusive) of local query row i in a sequence (sq, sk).
  inline int64_t lo(int64_t i, int64_t sq, int64_t sk) const {
    return wl < 0 ? 0 : std::max<int64_t>(0, i + sk - sq - wl);
  }
  inline int64_t hi(int64_t i, int64_t sq, int64_t sk) const {
    return wr < 0 ? sk - 1 : std::min<int64_t>(sk - 1, i + sk - sq + wr);
  }
  inline float tab(const float* t, int64_t h, int a, int b) const {
    return t ? t[(h * C + a) * C + b] : 0.f;
  }
};

// Runs of equal key class in keys [k0, k1) of the packed key array (global indices).
inline void build_runs(const Problem& P, int64_t k0, int64_t k1, std::vector<Run>& runs) {
  runs.clear();
  if (!P.key_class) {
    runs.push_back({0, k1 - k0, -1});
    return;
  }
  int64_t s = k0;
  int cur = P.key_class[k0];
  for (int64_t j = k0 + 1; j < k1; ++j) {
    const int c = P.key_class[j];
    if (c != cur) {
      runs.push_back({s - k0, j - k0, cur});
      s = j;
      cur = c;
    }
  }
  runs.push_back({s - k0, k1 - k0, cur});
}

// ----------------------------------------------------------------------------------------------
// Forward.
// ----------------------------------------------------------------------------------------------
struct FwdTask {
  int32_t n, h;
  int64_t i0, i1;  // local query rows
};

template <typename T>
void forward_kernel(const Problem& P, const T* q, const T* k, const T* v, T* out, T* lse, T* mass,
                    int64_t Tq) {
  const int64_t D = P.d, Hq = P.hq, Hk = P.hk, C = P.C;
  const int64_t ldq = Hq * D, ldk = Hk * D;
  std::vector<FwdTask> tasks;
  for (int64_t n = 0; n < P.num_seqs; ++n) {
    const int64_t sq = P.cu_q[n + 1] - P.cu_q[n];
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t i0 = 0; i0 < sq; i0 += kFwdQBlock)
        tasks.push_back({(int32_t)n, (int32_t)h, i0, std::min(i0 + kFwdQBlock, sq)});
  }
  // Longest tasks first helps the static split a little less than a dynamic one; parallel_for splits
  // evenly by count, so interleave: nothing more to do here.
  at::parallel_for(0, (int64_t)tasks.size(), 1, [&](int64_t tb, int64_t te) {
    std::vector<T> S(kFwdQBlock * kFwdKBlock);
    std::vector<T> O(kFwdQBlock * D);
    std::vector<T> m(kFwdQBlock), l(kFwdQBlock), acc(kFwdQBlock * kMaxClasses);
    std::vector<Run> runs;
    runs.reserve(64);
    for (int64_t t = tb; t < te; ++t) {
      const FwdTask& tk = tasks[t];
      const int64_t n = tk.n, h = tk.h, hkv = h / P.group;
      const int64_t q0 = P.cu_q[n], k0g = P.cu_k[n];
      const int64_t sq = P.cu_q[n + 1] - q0, sk = P.cu_k[n + 1] - k0g;
      const int64_t i0 = tk.i0, i1 = tk.i1, nq = i1 - i0;
      std::fill(O.begin(), O.begin() + nq * D, T(0));
      std::fill(m.begin(), m.begin() + nq, -std::numeric_limits<T>::infinity());
      std::fill(l.begin(), l.begin() + nq, T(0));
      if (C > 0) std::fill(acc.begin(), acc.begin() + nq * C, T(0));
      const int64_t kmin = P.lo(i0, sq, sk), kmax = P.hi(i1 - 1, sq, sk);
      const T* qp = q + (q0 + i0) * ldq + h * D;
      for (int64_t j0 = kmin; j0 <= kmax && sk > 0; j0 += kFwdKBlock) {
        const int64_t j1 = std::min(j0 + kFwdKBlock, kmax + 1), nk = j1 - j0;
        const T* kp = k + (k0g + j0) * ldk + hkv * D;
        const T* vp = v + (k0g + j0) * ldk + hkv * D;
        // S[nq x nk] (row-major, ld nk) = scale * Q K^T.
        blas_gemm(TransposeType::Transpose, TransposeType::NoTranspose, nk, nq, D,
                                  static_cast<T>(P.scale), kp, ldk, qp, ldq, T(0), S.data(), nk);
        build_runs(P, k0g + j0, k0g + j1, runs);
        for (int64_t r = 0; r < nq; ++r) {
          const int64_t i = i0 + r;
          T* z = S.data() + r * nk;
          const int64_t a = std::max<int64_t>(P.lo(i, sq, sk) - j0, 0);
          const int64_t b = std::min<int64_t>(P.hi(i, sq, sk) - j0 + 1, nk);
          if (a >= b) {
            std::fill(z, z + nk, T(0));
            continue;
          }
          const int qa = P.query_class ? P.query_class[q0 + i] : 0;
          if (P.has_rw) {
            for (const Run& ru : runs) {
              const int64_t s = std::max(ru.start, a), e = std::min(ru.end, b);
              if (s >= e) continue;
              const T mu1 = T(1) + P.tab(P.mul, h, qa, ru.cls);
              const T ab = P.tab(P.abs_, h, qa, ru.cls);
              const T ad = P.tab(P.add, h, qa, ru.cls);
              if (mu1 == T(1) && ab == T(0) && ad == T(0)) continue;
              reweight<T>(z + s, e - s, mu1, ab, ad);
            }
          }
          const T mx = row_max<T>(z + a, b - a);
          const T mold = m[r];
          const T mnew = std::max(mold, mx);
          if (mnew == -std::numeric_limits<T>::infinity()) {
            std::fill(z, z + nk, T(0));
            continue;
          }
          const T alpha = mold == -std::numeric_limits<T>::infinity() ? T(0) : std::exp(mold - mnew);
          m[r] = mnew;
          if (a > 0) std::fill(z, z + a, T(0));
          if (b < nk) std::fill(z + b, z + nk, T(0));
          T* accr = acc.data() + r * C;
          if (alpha != T(1)) {
            for (int64_t c = 0; c < C; ++c) accr[c] *= alpha;
            if (alpha == T(0)) std::fill(O.begin() + r * D, O.begin() + (r + 1) * D, T(0));
            else scale_inplace<T>(O.data() + r * D, D, alpha);
          }
          T rowsum = T(0);
          for (const Run& ru : runs) {
            const int64_t s = std::max(ru.start, a), e = std::min(ru.end, b);
            if (s >= e) continue;
            const T rs = exp_sum<T>(z + s, e - s, mnew);
            rowsum += rs;
            if (ru.cls >= 0) accr[ru.cls] += rs;
          }
          l[r] = l[r] * alpha + rowsum;
        }
        // O[nq x D] (row-major, ld D) += P V.
        blas_gemm(TransposeType::NoTranspose, TransposeType::NoTranspose, D, nq, nk, T(1),
                                  vp, ldk, S.data(), nk, T(1), O.data(), D);
      }
      for (int64_t r = 0; r < nq; ++r) {
        const int64_t gi = q0 + i0 + r;
        T* orow = out + gi * ldq + h * D;
        T* lrow = lse + h * Tq + gi;
        T* mrow = mass + (h * Tq + gi) * C;
        if (l[r] > T(0)) {
          const T inv = T(1) / l[r];
          const T* src = O.data() + r * D;
          for (int64_t d = 0; d < D; ++d) orow[d] = src[d] * inv;
          *lrow = m[r] + std::log(l[r]);
          for (int64_t c = 0; c < C; ++c) mrow[c] = acc[r * C + c] * inv;
        } else {
          std::fill(orow, orow + D, T(0));
          *lrow = -std::numeric_limits<T>::infinity();
          for (int64_t c = 0; c < C; ++c) mrow[c] = T(0);
        }
      }
    }
  });
}

// ----------------------------------------------------------------------------------------------
// Backward.
// ----------------------------------------------------------------------------------------------
template <typename T>
void backward_kernel(const Problem& P, const T* dout, const T* dmass, const T* delta, const T* q, const T* k,
                     const T* v, const T* lse, T* dq, T* dk_full, T* dv_full, int64_t Tq, const bool* want,
                     double* dtab) {
  // want[0..2]: gradients of MUL, ABS, ADD requested; then dtab [N, 3, Hq, C, C] receives, for task (n, h),
  // the sums over its visible (i, j) of dZ' * z, dZ' * |z| and dZ' by (class(i), class(j)).
  const int64_t D = P.d, Hq = P.hq, Hk = P.hk, C = P.C;
  const int64_t ldq = Hq * D, ldk = Hk * D;
  const bool has_dm = dmass != nullptr && C > 0;
  const bool wm = want[0], wa = want[1], wd = want[2];
  const bool want_tab = (wm || wa || wd) && C > 0 && P.has_rw;
  const bool want_z = want_tab && (wm || wa);
  std::vector<std::pair<int32_t, int32_t>> tasks;
  for (int64_t n = 0; n < P.num_seqs; ++n)
    for (int64_t h = 0; h < Hq; ++h) tasks.push_back({(int32_t)n, (int32_t)h});
  at::parallel_for(0, (int64_t)tasks.size(), 1, [&](int64_t tb, int64_t te) {
    std::vector<T> S(kBwdQBlock * kBwdKBlock), dP(kBwdQBlock * kBwdKBlock), G;
    if (P.has_rw) G.resize(kBwdQBlock * kBwdKBlock);
    std::vector<T> Z;  // raw scores, kept only for the MUL / ABS gradients
    if (want_z) Z.resize(kBwdQBlock * kBwdKBlock);
    std::vector<double> tacc(want_tab ? 3 * kMaxClasses * kMaxClasses : 0);
    std::vector<int> rq(kBwdQBlock);
    std::vector<T> dK(kBwdKBlock * D), dV(kBwdKBlock * D);
    std::vector<int64_t> ra(kBwdQBlock), rb(kBwdQBlock);
    std::vector<Run> runs;
    runs.reserve(64);
    for (int64_t t = tb; t < te; ++t) {
      const int64_t n = tasks[t].first, h = tasks[t].second, hkv = h / P.group;
      const int64_t q0 = P.cu_q[n], k0g = P.cu_k[n];
      const int64_t sq = P.cu_q[n + 1] - q0, sk = P.cu_k[n + 1] - k0g;
      if (sq == 0 || sk == 0) continue;
      if (want_tab) std::fill(tacc.begin(), tacc.end(), 0.0);
      const int64_t off = sk - sq;
      const int64_t kmin = P.lo(0, sq, sk), kmax = P.hi(sq - 1, sq, sk);
      for (int64_t j0 = kmin; j0 <= kmax; j0 += kBwdKBlock) {
        const int64_t j1 = std::min(j0 + kBwdKBlock, kmax + 1), nk = j1 - j0;
        const T* kp = k + (k0g + j0) * ldk + hkv * D;
        const T* vp = v + (k0g + j0) * ldk + hkv * D;
        std::fill(dK.begin(), dK.begin() + nk * D, T(0));
        std::fill(dV.begin(), dV.begin() + nk * D, T(0));
        build_runs(P, k0g + j0, k0g + j1, runs);
        const int64_t is = P.wr < 0 ? 0 : std::max<int64_t>(0, j0 - off - P.wr);
        const int64_t ie = P.wl < 0 ? sq : std::min<int64_t>(sq, j1 - 1 - off + P.wl + 1);
        bool touched = false;
        for (int64_t i0 = is; i0 < ie; i0 += kBwdQBlock) {
          const int64_t i1 = std::min(i0 + kBwdQBlock, ie), nq = i1 - i0;
          const T* qp = q + (q0 + i0) * ldq + h * D;
          const T* dop = dout + (q0 + i0) * ldq + h * D;
          blas_gemm(TransposeType::Transpose, TransposeType::NoTranspose, nk, nq, D,
                                    static_cast<T>(P.scale), kp, ldk, qp, ldq, T(0), S.data(), nk);
          bool any = false;
          for (int64_t r = 0; r < nq; ++r) {
            const int64_t i = i0 + r, gi = q0 + i;
            T* z = S.data() + r * nk;
            const T L = lse[h * Tq + gi];
            int64_t a = std::max<int64_t>(P.lo(i, sq, sk) - j0, 0);
            int64_t b = std::min<int64_t>(P.hi(i, sq, sk) - j0 + 1, nk);
            if (a >= b || L == -std::numeric_limits<T>::infinity()) {
              std::fill(z, z + nk, T(0));
              ra[r] = 0;
              rb[r] = 0;
              continue;
            }
            any = true;
            ra[r] = a;
            rb[r] = b;
            const int qa = P.query_class ? P.query_class[gi] : 0;
            rq[r] = qa;
            if (want_z) std::copy(z + a, z + b, Z.data() + r * nk + a);
            if (P.has_rw) {
              T* g = G.data() + r * nk;
              for (const Run& ru : runs) {
                const int64_t s = std::max(ru.start, a), e = std::min(ru.end, b);
                if (s >= e) continue;
                const T mu1 = T(1) + P.tab(P.mul, h, qa, ru.cls);
                const T ab = P.tab(P.abs_, h, qa, ru.cls);
                const T ad = P.tab(P.add, h, qa, ru.cls);
                if (ab != T(0)) {
                  reweight_grad<T>(z + s, g + s, e - s, mu1, ab, ad);
                } else {
                  std::fill(g + s, g + e, mu1);
                  if (mu1 != T(1) || ad != T(0)) reweight<T>(z + s, e - s, mu1, T(0), ad);
                }
              }
            }
            if (a > 0) std::fill(z, z + a, T(0));
            if (b < nk) std::fill(z + b, z + nk, T(0));
            exp_sub<T>(z + a, b - a, L);
          }
          if (!any) continue;
          touched = true;
          // dP[nq x nk] = dO V^T.
          blas_gemm(TransposeType::Transpose, TransposeType::NoTranspose, nk, nq, D, T(1), vp,
                                    ldk, dop, ldq, T(0), dP.data(), nk);
          // dV[nk x D] += P^T dO.
          blas_gemm(TransposeType::NoTranspose, TransposeType::Transpose, D, nk, nq, T(1), dop,
                                    ldq, S.data(), nk, T(1), dV.data(), D);
          for (int64_t r = 0; r < nq; ++r) {
            const int64_t gi = q0 + i0 + r;
            T* p = S.data() + r * nk;
            T* ds = dP.data() + r * nk;
            const int64_t a = ra[r], b = rb[r];
            if (a >= b) {
              std::fill(ds, ds + nk, T(0));
              continue;
            }
            const T dl = delta[h * Tq + gi];
            if (a > 0) std::fill(ds, ds + a, T(0));
            if (b < nk) std::fill(ds + b, ds + nk, T(0));
            if (has_dm) {
              const T* dmr = dmass + (h * Tq + gi) * C;
              for (const Run& ru : runs) {
                const int64_t s = std::max(ru.start, a), e = std::min(ru.end, b);
                if (s >= e) continue;
                ds_run<T>(p + s, ds + s, e - s, dmr[ru.cls] - dl);
              }
            } else {
              ds_run<T>(p + a, ds + a, b - a, -dl);
            }
            if (want_tab) {  // dZ' reduced per (row class, key run class) before the chain rule through G
              double* ta = tacc.data() + rq[r] * C;
              const T* zr = want_z ? Z.data() + r * nk : nullptr;
              for (const Run& ru : runs) {
                const int64_t s = std::max(ru.start, a), e = std::min(ru.end, b);
                if (s >= e) continue;
                T sums[3];
                table_sums<T>(ds + s, zr ? zr + s : nullptr, e - s, wm, wa, wd, sums);
                for (int w = 0; w < 3; ++w) ta[w * C * C + ru.cls] += (double)sums[w];
              }
            }
            if (P.has_rw) mul_inplace<T>(ds + a, G.data() + r * nk + a, b - a);
          }
          // dQ[nq x D] (ld ldq, in place in dq) += scale * dS K.
          blas_gemm(TransposeType::NoTranspose, TransposeType::NoTranspose, D, nq, nk,
                                    static_cast<T>(P.scale), kp, ldk, dP.data(), nk, T(1),
                                    dq + (q0 + i0) * ldq + h * D, ldq);
          // dK[nk x D] += scale * dS^T Q.
          blas_gemm(TransposeType::NoTranspose, TransposeType::Transpose, D, nk, nq,
                                    static_cast<T>(P.scale), qp, ldq, dP.data(), nk, T(1), dK.data(), D);
        }
        (void)touched;
        for (int64_t j = 0; j < nk; ++j) {
          T* dkr = dk_full + (k0g + j0 + j) * ldq + h * D;
          T* dvr = dv_full + (k0g + j0 + j) * ldq + h * D;
          std::copy(dK.begin() + j * D, dK.begin() + (j + 1) * D, dkr);
          std::copy(dV.begin() + j * D, dV.begin() + (j + 1) * D, dvr);
        }
      }
      if (want_tab) {
        for (int w = 0; w < 3; ++w)
          std::copy(tacc.begin() + w * C * C, tacc.begin() + (w + 1) * C * C,
                    dtab + ((n * 3 + w) * Hq + h) * C * C);
      }
    }
  });
}

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_q, const at::Tensor& cu_k,
                     const c10::optional<at::Tensor>& key_class, const c10::optional<at::Tensor>& query_class,
                     int64_t num_classes, const c10::optional<at::Tensor>& mul,
                     const c10::optional<at::Tensor>& abs_, const c10::optional<at::Tensor>& add, double scale,
                     int64_t wl, int64_t wr) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "avar cpu: q, k must be [T, H, D]");
  TORCH_CHECK(num_classes >= 0 && num_classes <= kMaxClasses, "avar cpu: num_classes must be in 0..8");
  TORCH_CHECK(cu_q.scalar_type() == at::kInt && cu_k.scalar_type() == at::kInt, "cu_seqlens must be int32");
  Problem P;
  P.hq = q.size(1);
  P.hk = k.size(1);
  TORCH_CHECK(P.hq % P.hk == 0, "avar cpu: Hq must be a multiple of Hk");
  P.group = P.hq / P.hk;
  P.d = q.size(2);
  P.num_seqs = cu_q.numel() - 1;
  P.cu_q = cu_q.data_ptr<int32_t>();
  P.cu_k = cu_k.data_ptr<int32_t>();
  P.C = num_classes;
  P.key_class = nullptr;
  P.query_class = nullptr;
  if (num_classes > 0) {
    TORCH_CHECK(key_class.has_value() && key_class->scalar_type() == at::kInt && key_class->is_contiguous(),
                "avar cpu: key_class must be a contiguous int32 tensor when num_classes > 0");
    P.key_class = key_class->data_ptr<int32_t>();
    if (query_class.has_value() && query_class->defined()) {
      TORCH_CHECK(query_class->scalar_type() == at::kInt && query_class->is_contiguous(),
                  "avar cpu: query_class must be contiguous int32");
      P.query_class = query_class->data_ptr<int32_t>();
    }
  }
  auto tab = [&](const c10::optional<at::Tensor>& t) -> const float* {
    if (!t.has_value() || !t->defined()) return nullptr;
    TORCH_CHECK(num_classes > 0, "avar cpu: reweight tables need classes");
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == P.hq * num_classes * num_classes,
                "avar cpu: reweight tables must be contiguous float32 [Hq, C, C]");
    return t->data_ptr<float>();
  };
  P.mul = tab(mul);
  P.abs_ = tab(abs_);
  P.add = tab(add);
  P.has_rw = P.mul || P.abs_ || P.add;
  TORCH_CHECK(!P.has_rw || P.query_class, "avar cpu: reweight tables need query_class");
  P.scale = scale;
  P.wl = wl;
  P.wr = wr;
  return P;
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                int64_t max_seqlen_k, const c10::optional<at::Tensor>& key_class,
                                const c10::optional<at::Tensor>& query_class, int64_t num_classes,
                                const c10::optional<at::Tensor>& mul, const c10::optional<at::Tensor>& abs_,
                                const c10::optional<at::Tensor>& add, double scale, int64_t window_left,
                                int64_t window_right, at::Tensor out, at::Tensor lse, at::Tensor mass) {
  // The outputs are allocated by the caller (torch.empty in Python), so tests can poison them with NaN
  // and catch any element the kernel forgets to write.
  (void)max_seqlen_q;
  (void)max_seqlen_k;
  TORCH_CHECK(q.device().is_cpu(), "avar cpu: tensors must be on the CPU");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "avar cpu kernel: q must be float32 or float64 (the Python wrapper converts fp16/bf16)");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "avar cpu: dtype mismatch");
  auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  Problem P = make_problem(qc, kc, cu_seqlens_q, cu_seqlens_k, key_class, query_class, num_classes, mul, abs_, add,
                           scale, window_left, window_right);
  const int64_t Tq = qc.size(0);
  TORCH_CHECK(out.sizes() == qc.sizes() && out.scalar_type() == qc.scalar_type() && out.is_contiguous(),
              "avar cpu: out must be a contiguous tensor like q");
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({P.hq, Tq}) && lse.scalar_type() == qc.scalar_type() &&
                  lse.is_contiguous(), "avar cpu: lse must be a contiguous [Hq, Tq] tensor of q's dtype");
  TORCH_CHECK(mass.sizes() == at::IntArrayRef({P.hq, Tq, num_classes}) && mass.scalar_type() == qc.scalar_type() &&
                  mass.is_contiguous(), "avar cpu: mass must be a contiguous [Hq, Tq, C] tensor of q's dtype");
  AT_DISPATCH_FLOATING_TYPES(qc.scalar_type(), "avar_cpu_forward", [&] {
    forward_kernel<scalar_t>(P, qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(),
                             out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), mass.data_ptr<scalar_t>(), Tq);
  });
  return {out, lse, mass};
}

std::vector<at::Tensor> backward(const at::Tensor& dout, const c10::optional<at::Tensor>& dmass,
                                 const at::Tensor& delta, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                 const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                 int64_t max_seqlen_k, const c10::optional<at::Tensor>& key_class,
                                 const c10::optional<at::Tensor>& query_class, int64_t num_classes,
                                 const c10::optional<at::Tensor>& mul, const c10::optional<at::Tensor>& abs_,
                                 const c10::optional<at::Tensor>& add, double scale, int64_t window_left,
                                 int64_t window_right, bool want_dmul, bool want_dabs, bool want_dadd) {
  (void)max_seqlen_q;
  (void)max_seqlen_k;
  (void)out;
  TORCH_CHECK(q.device().is_cpu(), "avar cpu: tensors must be on the CPU");
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble,
              "avar cpu kernel: q must be float32 or float64 (the Python wrapper converts fp16/bf16)");
  auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  auto doc = dout.to(st).contiguous();
  auto lsec = lse.to(st).contiguous();
  auto dlc = delta.to(st).contiguous();
  at::Tensor dmc;
  if (dmass.has_value() && dmass->defined() && num_classes > 0) dmc = dmass->to(st).contiguous();
  Problem P = make_problem(qc, kc, cu_seqlens_q, cu_seqlens_k, key_class, query_class, num_classes, mul, abs_, add,
                           scale, window_left, window_right);
  const int64_t Tq = qc.size(0), Tk = kc.size(0);
  auto dq = at::zeros_like(qc);
  auto dk_full = at::zeros({Tk, P.hq, P.d}, qc.options());
  auto dv_full = at::zeros({Tk, P.hq, P.d}, qc.options());
  const bool want[3] = {want_dmul && P.mul != nullptr, want_dabs && P.abs_ != nullptr,
                        want_dadd && P.add != nullptr};
  const bool want_tab = want[0] || want[1] || want[2];
  // Per (sequence, table, head) partial sums, summed over the sequences below: deterministic, no atomics.
  at::Tensor dtab_seq = at::zeros({want_tab ? P.num_seqs : 0, 3, P.hq, P.C, P.C}, qc.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(st, "avar_cpu_backward", [&] {
    backward_kernel<scalar_t>(P, doc.data_ptr<scalar_t>(), dmc.defined() ? dmc.data_ptr<scalar_t>() : nullptr,
                              dlc.data_ptr<scalar_t>(), qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(),
                              vc.data_ptr<scalar_t>(), lsec.data_ptr<scalar_t>(), dq.data_ptr<scalar_t>(),
                              dk_full.data_ptr<scalar_t>(), dv_full.data_ptr<scalar_t>(), Tq, want,
                              want_tab ? dtab_seq.data_ptr<double>() : nullptr);
  });
  at::Tensor dk, dv;
  if (P.group == 1) {
    dk = dk_full;
    dv = dv_full;
  } else {
    dk = dk_full.view({Tk, P.hk, P.group, P.d}).sum(2);
    dv = dv_full.view({Tk, P.hk, P.group, P.d}).sum(2);
  }
  if (!want_tab) return {dq, dk, dv};
  return {dq, dk, dv, dtab_seq.sum(0)};  // [3, Hq, C, C] float64: d MUL, d ABS, d ADD (zeros where not asked)
}

}  // namespace
}  // namespace avar

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "avar-kernels CPU backend: fused attention with per-class attention mass and re-weighting";
  m.def("forward", &avar::forward, "fused attention forward (packed layout), writes out, lse, mass; returns them",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"),
        py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("key_class"), py::arg("query_class"),
        py::arg("num_classes"), py::arg("mul"), py::arg("abs_"), py::arg("add"), py::arg("scale"),
        py::arg("window_left"), py::arg("window_right"), py::arg("out"), py::arg("lse"), py::arg("mass"));
  m.def("backward", &avar::backward,
        "fused attention backward (packed layout) -> (dq, dk, dv[, dtables [3, Hq, C, C] when a table gradient is "
        "asked])", py::arg("dout"),
        py::arg("dmass"), py::arg("delta"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"),
        py::arg("max_seqlen_k"), py::arg("key_class"), py::arg("query_class"), py::arg("num_classes"),
        py::arg("mul"), py::arg("abs_"), py::arg("add"), py::arg("scale"), py::arg("window_left"),
        py::arg("window_right"), py::arg("want_dmul") = false, py::arg("want_dabs") = false,
        py::arg("want_dadd") = false);
}
