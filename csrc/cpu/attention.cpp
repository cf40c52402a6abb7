// Fused attention with per-class attention mass and class-wise score re-weighting (CPU).
//
// Implements the backend contract of docs/backends.md in the packed (varlen) layout:
//   q [Tq, Hq, D], k/v [Tk, Hk, D], cu_seqlens_q/k int32 [N + 1].
//
// Tiles. Both passes walk one grid of [kBlocks.q queries x kBlocks.k keys] tiles per (sequence, head), aligned
// to the sequence start, and compute a tile's scores with the same BLAS call (same shape, operands, leading
// dimension), trimmed to the keys the tile's queries can see by a rule that depends on the tile only. The
// backward therefore recomputes the forward's scores bit for bit, whatever the block sizes: with large logits a
// one-ulp difference in a row's top score would move its P by about |z| * 2^-24.
//
// Classes. Tiles are stored key-major (one row per key, its queries contiguous), so a vector spans queries of one
// key and the key's class is one index per tile row: the per-class sums of P (the masses) are per-(class, query)
// accumulators that the exp pass adds to at that index, rescaled like the softmax denominator; the backward adds
// dmass[i, class(j)] - delta_i from a per-(class, query) table; the re-weighting reads per-(class, query) tables.
// The work is the same for every class layout, contiguous spans or one class drawn per token, and the same as
// without classes (one accumulator). Table gradients (a learned MUL / ABS / ADD) are summed per (query, key class)
// in each tile, then per query class into a per-(sequence, head) float64 accumulator, summed over the sequences
// at the end (deterministic, no atomics), and computed only when asked.
//
// Parallel over (sequence, head, query tile) in the forward and (sequence, head) in the backward, with key
// blocks outer, local dK/dV accumulators and query tiles inner; dk/dv go to per-query-head buffers summed over
// the heads of each kv group at the end.
//
// Non-finite inputs propagate as in the float64 reference: a NaN or +inf score among a row's visible keys makes
// the row's out, mass and lse NaN and its gradients NaN. Only a row with no visible key (or only -inf scores)
// gets out = 0, mass = 0, lse = -inf.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
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

// Column-major C[m x n] = alpha * op(A) op(B) + beta * C (BLAS semantics); trans_a / trans_b: 'N' or 'T'.
inline void blas_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                      const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const int im = (int)m, in = (int)n, ik = (int)k, ila = (int)lda, ilb = (int)ldb, ilc = (int)ldc;
  sgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ila, b, &ilb, &beta, c, &ilc);
}
inline void blas_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
                      const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  const int im = (int)m, in = (int)n, ik = (int)k, ila = (int)lda, ilb = (int)ldb, ilc = (int)ldc;
  dgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ila, b, &ilb, &beta, c, &ilc);
}
using at::vec::Vectorized;

constexpr int64_t kMaxClasses = 8;
constexpr int64_t kAlign = 16;  // a tile row's queries are padded to a multiple of this (>= every vector width)

template <typename T>
constexpr T kInf = std::numeric_limits<T>::infinity();
template <typename T>
constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();

inline int64_t round_down(int64_t x, int64_t m) { return x / m * m; }
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ----------------------------------------------------------------------------------------------
// Tile sizes: 128 queries x 512 keys was the fastest of the square and oblong tiles from 128 to 1024 in both passes
// (2-core AVX-512 x86 machine, S = 2048, D = 128, fp32, single-thread CPU time).
// ----------------------------------------------------------------------------------------------
struct Blocks {
  int64_t q = 128, k = 512;
  std::string error;  // set when the environment asks for something this build does not do
};

// AVAR_CPU_QBLOCK / AVAR_CPU_KBLOCK override the tile for tuning and for tests of the multi-tile paths.
// The former per-pass variables are refused: forward and backward must share one tile grid.
Blocks read_blocks() {
  Blocks b;
  for (const char* old : {"AVAR_CPU_FWD_QBLOCK", "AVAR_CPU_FWD_KBLOCK", "AVAR_CPU_BWD_QBLOCK", "AVAR_CPU_BWD_KBLOCK"}) {
    if (std::getenv(old)) {
      b.error = std::string("avar cpu: ") + old +
                " is no longer read: forward and backward share one tile grid so that the backward recomputes the "
                "forward's scores bit for bit; set AVAR_CPU_QBLOCK / AVAR_CPU_KBLOCK instead";
      return b;
    }
  }
  auto read = [&](const char* name, int64_t& dst) {
    const char* s = std::getenv(name);
    if (!s || !b.error.empty()) return;
    char* end = nullptr;
    const long v = std::strtol(s, &end, 10);
    if (end == s || *end != '\0' || v < 1 || v > 4096) {
      b.error = std::string("avar cpu: ") + name + " must be an integer in [1, 4096], got '" + s + "'";
      return;
    }
    dst = v;
  };
  read("AVAR_CPU_QBLOCK", b.q);
  read("AVAR_CPU_KBLOCK", b.k);
  return b;
}
const Blocks kBlocks = read_blocks();

// ----------------------------------------------------------------------------------------------
// Vector helpers. Row lengths handed to them are multiples of the vector width.
// ----------------------------------------------------------------------------------------------
template <typename T>
inline Vectorized<T> vexp(const Vectorized<T>& x) {
  return x.exp();
}
template <>
inline Vectorized<float> vexp<float>(const Vectorized<float>& x) {
  return x.exp_u20();  // exp(-inf) = 0; NaN in gives a number out: NaN rows are kept NaN by their state
}

template <typename T>
inline void scale_inplace(T* x, int64_t n, T s) {
  using V = Vectorized<T>;
  const V vs(s);
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) (V::loadu(x + i) * vs).store(x + i);
  for (; i < n; ++i) x[i] *= s;
}

template <typename T>
inline void fill(T* x, int64_t from, int64_t to, T value) {
  if (to > from) std::fill(x + from, x + to, value);
}

// ----------------------------------------------------------------------------------------------
// Problem description.
// ----------------------------------------------------------------------------------------------
struct Problem {
  int64_t hq, hk, group, d;
  int64_t num_seqs;
  const int32_t* cu_q;
  const int32_t* cu_k;
  const int32_t* key_class;    // read only when C > 0 (an empty tensor's pointer may be null)
  const int32_t* query_class;  // read only when has_query_class
  bool has_query_class;
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
  inline float tab(const float* t, int64_t h, int a, int b) const { return t ? t[(h * C + a) * C + b] : 0.f; }
};

// ----------------------------------------------------------------------------------------------
// Key-major tiles.
// ----------------------------------------------------------------------------------------------
// A tile holds the scores of queries [i0, i0 + nq) against the keys [j0 + c0, j0 + c1) of the key block at j0,
// key-major: row c (key j0 + c) holds the nq queries contiguously, leading dimension ldt = kBlocks.q rounded up
// to kAlign. A vector thus covers several queries of one key: whatever depends on the key's class (the mass it
// adds to, dmass, the re-weighting) is one scalar index per tile row, the same work for any class layout.
// Rows' online-softmax state (max, per-class sums) are arrays over the queries, updated a vector at a time.
constexpr int64_t kRowVecs = 4;  // query vectors processed together along a key loop (independent chains)

// Keys [c0, c1) of block j0 whose scores a tile computes: what its queries can see. Both passes use this rule,
// so a tile's score product is the same call in the forward and the backward.
struct TileCols {
  int64_t c0, c1;
};
inline TileCols tile_cols(const Problem& P, int64_t j0, int64_t nk, int64_t i0, int64_t i1, int64_t sq, int64_t sk) {
  return {std::max<int64_t>(P.lo(i0, sq, sk) - j0, 0), std::min<int64_t>(P.hi(i1 - 1, sq, sk) - j0 + 1, nk)};
}

// Sets the tile's entries that a query does not see (and the padding queries [nq, nqp)) to `value`: for each key,
// the queries that see it are a range (both window edges are monotone in the query).
template <typename T>
inline void mask_tile(const Problem& P, T* St, int64_t ldt, int64_t j0, int64_t c0, int64_t c1, int64_t off,
                      int64_t i0, int64_t nq, int64_t nqp, T value) {
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t j = j0 + c;
    int64_t r0 = P.wr < 0 ? 0 : std::max<int64_t>(0, j - off - P.wr - i0);
    int64_t r1 = P.wl < 0 ? nq : std::min<int64_t>(nq, j - off + P.wl - i0 + 1);
    T* row = St + c * ldt;
    if (r1 <= r0) r0 = r1 = 0;
    fill(row, 0, r0, value);
    fill(row, r1, nqp, value);
  }
}

// Per-class tables of a tile's queries, key-class-major: t[c * ldt + r] = TABLE[h, class(query r), c].
template <typename T>
struct TileTables {
  std::vector<T> mul, abs_, add;
  bool any[kMaxClasses];  // a nonzero entry for key class c in some query's row
  void fill_rows(const Problem& P, int64_t h, const int32_t* qcls, int64_t nq, int64_t ldt) {
    const int64_t C = P.C;
    mul.assign(C * ldt, T(0));
    abs_.assign(C * ldt, T(0));
    add.assign(C * ldt, T(0));
    for (int64_t c = 0; c < C; ++c) {
      any[c] = false;
      for (int64_t r = 0; r < nq; ++r) {
        mul[c * ldt + r] = P.tab(P.mul, h, qcls[r], (int)c);
        abs_[c * ldt + r] = P.tab(P.abs_, h, qcls[r], (int)c);
        add[c * ldt + r] = P.tab(P.add, h, qcls[r], (int)c);
        any[c] = any[c] || mul[c * ldt + r] != T(0) || abs_[c * ldt + r] != T(0) || add[c * ldt + r] != T(0);
      }
    }
  }
};

// z' = z + z * mul + |z| * abs + add (the reference's order), only the present tables' terms; with g, also
// dz'/dz = 1 + mul + abs * sign(z). Rows of key classes whose entries are all zero are left as they are (g = 1).
template <typename T>
inline void reweight_tile(const Problem& P, const TileTables<T>& tt, const int32_t* kcls, T* St, T* G, int64_t ldt,
                          int64_t c0, int64_t c1, int64_t nqp) {
  using V = Vectorized<T>;
  const bool hm = P.mul, ha = P.abs_, hd = P.add;
  const V one(T(1)), zero(T(0));
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t cls = kcls[c];
    T* z = St + c * ldt;
    T* g = G ? G + c * ldt : nullptr;
    if (!tt.any[cls]) {
      if (g) fill(g, 0, nqp, T(1));
      continue;
    }
    const T* tm = tt.mul.data() + cls * ldt;
    const T* ta = tt.abs_.data() + cls * ldt;
    const T* td = tt.add.data() + cls * ldt;
    for (int64_t r = 0; r < nqp; r += V::size()) {
      const V x = V::loadu(z + r), vm = V::loadu(tm + r), va = V::loadu(ta + r);
      if (g) {
        V d = one + vm;
        if (ha) d = d + va * (V::blendv(zero, one, x > zero) - V::blendv(zero, one, x < zero));
        d.store(g + r);
      }
      V y = x;
      if (hm) y = y + x * vm;
      if (ha) y = y + x.abs() * va;
      if (hd) y = y + V::loadu(td + r);
      y.store(z + r);
    }
  }
}

// mx[r] = max over keys [c0, c1) of St[c, r], NaN-propagating, for queries [0, nqp).
template <typename T>
inline void tile_max(const T* St, int64_t ldt, int64_t c0, int64_t c1, int64_t nqp, T* mx) {
  using V = Vectorized<T>;
  constexpr int64_t VS = V::size();
  for (int64_t rb = 0; rb < nqp; rb += kRowVecs * VS) {
    const int64_t nv = std::min<int64_t>(kRowVecs, (nqp - rb) / VS);
    V m[kRowVecs];
    for (int64_t u = 0; u < kRowVecs; ++u) m[u] = V(-kInf<T>);
    if (nv == kRowVecs) {
      for (int64_t c = c0; c < c1; ++c) {
        const T* z = St + c * ldt + rb;
        for (int64_t u = 0; u < kRowVecs; ++u) m[u] = at::vec::maximum(m[u], V::loadu(z + u * VS));
      }
    } else {
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t u = 0; u < nv; ++u) m[u] = at::vec::maximum(m[u], V::loadu(St + c * ldt + rb + u * VS));
    }
    for (int64_t u = 0; u < nv; ++u) m[u].store(mx + rb + u * VS);
  }
}

// St[c, r] = exp(St[c, r] - sub[r]) for keys [c0, c1); with acc, also acc[class(c) * ldt + r] += that.
template <typename T>
inline void tile_exp(T* St, int64_t ldt, int64_t c0, int64_t c1, int64_t nqp, const T* sub, const int32_t* kcls,
                     T* acc) {
  using V = Vectorized<T>;
  constexpr int64_t VS = V::size();
  for (int64_t rb = 0; rb < nqp; rb += kRowVecs * VS) {
    const int64_t nv = std::min<int64_t>(kRowVecs, (nqp - rb) / VS);
    V s[kRowVecs];
    for (int64_t u = 0; u < nv; ++u) s[u] = V::loadu(sub + rb + u * VS);
    for (int64_t c = c0; c < c1; ++c) {
      T* z = St + c * ldt + rb;
      T* a = acc ? acc + (kcls ? kcls[c] : 0) * ldt + rb : nullptr;
      if (nv == kRowVecs) {
        for (int64_t u = 0; u < kRowVecs; ++u) {
          const V e = vexp<T>(V::loadu(z + u * VS) - s[u]);
          e.store(z + u * VS);
          if (a) (V::loadu(a + u * VS) + e).store(a + u * VS);
        }
      } else {
        for (int64_t u = 0; u < nv; ++u) {
          const V e = vexp<T>(V::loadu(z + u * VS) - s[u]);
          e.store(z + u * VS);
          if (a) (V::loadu(a + u * VS) + e).store(a + u * VS);
        }
      }
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Forward.
// ----------------------------------------------------------------------------------------------
struct FwdTask {
  int32_t n, h;
  int64_t i0, i1;  // local query rows
};

template <typename T>
void forward_kernel(const Problem& P, const T* q, const T* k, const T* v, T* out, T* lse, T* mass, int64_t Tq) {
  using V = Vectorized<T>;
  constexpr int64_t VS = V::size();
  const int64_t QB = kBlocks.q, KB = kBlocks.k, ldt = round_up(QB, kAlign);
  const int64_t D = P.d, Hq = P.hq, Hk = P.hk, C = P.C, slots = std::max<int64_t>(C, 1);
  const int64_t ldq = Hq * D, ldk = Hk * D;
  std::vector<FwdTask> tasks;
  for (int64_t n = 0; n < P.num_seqs; ++n) {
    const int64_t sq = P.cu_q[n + 1] - P.cu_q[n];
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t i0 = 0; i0 < sq; i0 += QB) tasks.push_back({(int32_t)n, (int32_t)h, i0, std::min(i0 + QB, sq)});
  }
  at::parallel_for(0, (int64_t)tasks.size(), 1, [&](int64_t tb, int64_t te) {
    // St: the tile, key-major; O: the rows' output; acc: per class and query, sum of P (class-major, ld ldt).
    std::vector<T> St(KB * ldt), O(QB * D), m(ldt), msub(ldt), mx(ldt), acc(slots * ldt);
    TileTables<T> tt;
    for (int64_t t = tb; t < te; ++t) {
      const FwdTask& tk = tasks[t];
      const int64_t n = tk.n, h = tk.h, hkv = h / P.group;
      const int64_t q0 = P.cu_q[n], k0 = P.cu_k[n];
      const int64_t sq = P.cu_q[n + 1] - q0, sk = P.cu_k[n + 1] - k0, off = sk - sq;
      const int64_t i0 = tk.i0, i1 = tk.i1, nq = i1 - i0, nqp = round_up(nq, VS);
      std::fill(O.begin(), O.begin() + nq * D, T(0));
      std::fill(m.begin(), m.end(), -kInf<T>);
      std::fill(msub.begin(), msub.end(), T(0));
      std::fill(acc.begin(), acc.end(), T(0));
      if (P.has_rw) tt.fill_rows(P, h, P.query_class + q0 + i0, nq, ldt);
      const int64_t kmin = P.lo(i0, sq, sk), kmax = P.hi(i1 - 1, sq, sk);
      const T* qp = q + (q0 + i0) * ldq + h * D;
      for (int64_t j0 = round_down(std::max<int64_t>(kmin, 0), KB); j0 <= kmax && j0 < sk; j0 += KB) {
        const int64_t nk = std::min(KB, sk - j0);
        const TileCols tc = tile_cols(P, j0, nk, i0, i1, sq, sk);
        if (tc.c1 <= tc.c0) continue;
        const int64_t w = tc.c1 - tc.c0;
        const T* kp = k + (k0 + j0 + tc.c0) * ldk + hkv * D;
        const T* vp = v + (k0 + j0 + tc.c0) * ldk + hkv * D;
        const int32_t* kcls = C > 0 ? P.key_class + k0 + j0 : nullptr;
        T* Sc = St.data() + tc.c0 * ldt;
        // St[c0:c1, :nq] (key-major) = scale * K Q^T.
        blas_gemm('T', 'N', nq, w, D, static_cast<T>(P.scale), qp, ldq, kp, ldk, T(0), Sc, ldt);
        if (P.has_rw) reweight_tile<T>(P, tt, kcls, St.data(), nullptr, ldt, tc.c0, tc.c1, nqp);
        mask_tile<T>(P, St.data(), ldt, j0, tc.c0, tc.c1, off, i0, nq, nqp, -kInf<T>);
        tile_max<T>(St.data(), ldt, tc.c0, tc.c1, nqp, mx.data());
        for (int64_t r = 0; r < nq; ++r) {
          const T mold = m[r];
          if (std::isnan(mold)) continue;  // already NaN: out, mass, lse stay NaN
          const T mnew = std::isnan(mx[r]) ? mx[r] : std::max(mold, mx[r]);
          if (!(mnew < kInf<T>)) {  // NaN or +inf score: out, mass and lse are NaN, as in the reference
            m[r] = mnew;
            msub[r] = T(0);
            std::fill(O.begin() + r * D, O.begin() + (r + 1) * D, kNaN<T>);
            for (int64_t c = 0; c < slots; ++c) acc[c * ldt + r] = kNaN<T>;
            continue;
          }
          if (mnew == -kInf<T>) continue;  // nothing seen yet: exp(-inf - 0) = 0
          if (mold != -kInf<T> && mold != mnew) {
            const T alpha = std::exp(mold - mnew);
            scale_inplace<T>(O.data() + r * D, D, alpha);
            for (int64_t c = 0; c < slots; ++c) acc[c * ldt + r] *= alpha;
          }
          m[r] = msub[r] = mnew;
        }
        tile_exp<T>(St.data(), ldt, tc.c0, tc.c1, nqp, msub.data(), kcls, acc.data());
        // O[nq x D] (row-major, ld D) += P V.
        blas_gemm('N', 'T', D, nq, w, T(1), vp, ldk, Sc, ldt, T(1), O.data(), D);
      }
      for (int64_t r = 0; r < nq; ++r) {
        const int64_t gi = q0 + i0 + r;
        T* orow = out + gi * ldq + h * D;
        T* mrow = mass + (h * Tq + gi) * C;
        if (m[r] == -kInf<T>) {  // no visible key
          std::fill(orow, orow + D, T(0));
          lse[h * Tq + gi] = -kInf<T>;
          std::fill(mrow, mrow + C, T(0));
          continue;
        }
        T l = T(0);
        for (int64_t c = 0; c < slots; ++c) l += acc[c * ldt + r];
        const T inv = T(1) / l;
        const T* src = O.data() + r * D;
        for (int64_t d = 0; d < D; ++d) orow[d] = src[d] * inv;
        lse[h * Tq + gi] = m[r] + std::log(l);  // NaN when a score was NaN or +inf (l is NaN then)
        for (int64_t c = 0; c < C; ++c) mrow[c] = acc[c * ldt + r] * inv;
      }
    }
  });
}

// ----------------------------------------------------------------------------------------------
// One tile of probabilities, for the passes that know the rows' final lse (backward, key masses, their delta term).
// ----------------------------------------------------------------------------------------------
// Rows with |lse| >= kBigLse get their normaliser recomputed (row_norm_kernel): lse itself is rounded to the
// dtype, so exp(z' - lse) is off by up to ulp(lse) / 2 relative, the same for the whole row (at lse ~ 1e30 the
// log of the row sum is lost entirely and P = 1 on every top key). Below it that error is under 2^-18 (fp32).
constexpr double kBigLse = 64.0;

template <typename T>
struct ProbScratch {
  std::vector<T> lsub, rscale;
  std::vector<int64_t> nan_rows, nan_c0, nan_c1;  // rows with lse NaN / +inf and the tile columns they see
  bool scaled = false;                             // some row of the tile has rscale != 1
  TileTables<T> tt;
};

// St[c0:c1, :nqp] = exp(z' - lsub), the NaN rows' P, the rows' normaliser corrections (see prob_tile).
template <typename T>
inline void finish_probs(T* St, int64_t ldt, TileCols tc, int64_t nqp, const ProbScratch<T>& ps) {
  using V = Vectorized<T>;
  tile_exp<T>(St, ldt, tc.c0, tc.c1, nqp, ps.lsub.data(), nullptr, nullptr);
  for (size_t u = 0; u < ps.nan_rows.size(); ++u)
    for (int64_t c = tc.c0; c < tc.c1; ++c)
      St[c * ldt + ps.nan_rows[u]] = c >= ps.nan_c0[u] && c < ps.nan_c1[u] ? kNaN<T> : T(0);
  if (ps.scaled)
    for (int64_t c = tc.c0; c < tc.c1; ++c)
      for (int64_t r = 0; r < nqp; r += V::size())
        (V::loadu(St + c * ldt + r) * V::loadu(ps.rscale.data() + r)).store(St + c * ldt + r);
}

// St[c0:c1, :nqp] (key-major) = P = exp(z' - lse) of tile (i0, j0) of the grid: the forward's score product bit
// for bit, then the re-weighting (with G = dz'/dz and Z = the raw scores when those are non-null), the mask, exp.
// P is 0 where masked, on the padding queries and on rows without keys (lse = -inf). A row whose lse is NaN or
// +inf (a NaN or +inf score) has P = NaN on every key it sees, -inf scores included, as the reference's
// exp(z - max) / sum gives. norm_t (or null): per-row factors from row_norm_kernel for rows with |lse| >= kBigLse.
// lse_t, norm_t: of the tile's first query; qcls: query classes of the tile's queries. Returns false, computing
// nothing, when no row has a key. With exp = false it stops before the exponential: St holds the masked z', ps.lsub
// what to subtract, for a caller that fuses exp with what it does next when ps.nan_rows is empty and !ps.scaled.
template <typename T>
bool prob_tile(const Problem& P, int64_t h, const T* qp, const T* kp, int64_t ldq, int64_t ldk, const T* lse_t,
               const T* norm_t, const int32_t* qcls, const int32_t* kcls, T* St, T* G, T* Z, int64_t ldt, int64_t j0,
               TileCols tc, int64_t off, int64_t i0, int64_t nq, int64_t nqp, ProbScratch<T>& ps, bool exp = true) {
  const int64_t w = tc.c1 - tc.c0, D = P.d;
  ps.lsub.resize(nqp);
  ps.rscale.assign(nqp, T(1));
  ps.scaled = false;
  ps.nan_rows.clear();
  ps.nan_c0.clear();
  ps.nan_c1.clear();
  bool any = false;
  for (int64_t r = 0; r < nqp; ++r) {
    const T L = r < nq ? lse_t[r] : -kInf<T>;
    any = any || L != -kInf<T>;
    if (L == -kInf<T>) ps.lsub[r] = kInf<T>;
    else if (L < kInf<T>) ps.lsub[r] = L;
    else {
      ps.lsub[r] = T(0);
      ps.nan_rows.push_back(r);
      // the tile columns query i0 + r sees (mask_tile's rule)
      const int64_t i = i0 + r;
      ps.nan_c0.push_back(P.wl < 0 ? 0 : i + off - P.wl - j0);
      ps.nan_c1.push_back(P.wr < 0 ? w + tc.c0 : i + off + P.wr - j0 + 1);
    }
    if (norm_t && r < nq && norm_t[r] != T(1)) {
      ps.rscale[r] = norm_t[r];
      ps.scaled = true;
    }
  }
  if (!any) return false;
  T* Sc = St + tc.c0 * ldt;
  // The forward's call, bit for bit.
  blas_gemm('T', 'N', nq, w, D, static_cast<T>(P.scale), qp, ldq, kp, ldk, T(0), Sc, ldt);
  if (Z)
    for (int64_t c = tc.c0; c < tc.c1; ++c) std::copy(St + c * ldt, St + c * ldt + nqp, Z + c * ldt);
  if (P.has_rw) {
    ps.tt.fill_rows(P, h, qcls, nq, ldt);
    reweight_tile<T>(P, ps.tt, kcls, St, G, ldt, tc.c0, tc.c1, nqp);
  }
  mask_tile<T>(P, St, ldt, j0, tc.c0, tc.c1, off, i0, nq, nqp, -kInf<T>);
  if (exp) finish_probs<T>(St, ldt, tc, nqp, ps);
  return true;
}

// The query classes of a tile: the classes present, and oh[b * ldt + r] = 1 where query r has class b, else 0
// (also on the padding). A tile row is one key's P over the tile's queries, so per-(key, query class) work is one
// running vector per present class, masked by oh; a tile of one query class (the usual case: a VLM prompt's classes
// are long runs) needs no mask at all. (A BLAS product with C = 4..8 columns was several times slower.)
template <typename T>
struct QueryClasses {
  int64_t n = 0;
  int32_t ids[kMaxClasses];
  std::vector<T> oh;
  void fill(const int32_t* qcls, int64_t nq, int64_t C, int64_t ldt) {
    bool seen[kMaxClasses] = {};
    n = 0;
    for (int64_t r = 0; r < nq; ++r)
      if (!seen[qcls[r]]) {
        seen[qcls[r]] = true;
        ids[n++] = qcls[r];
      }
    if (n < 2) return;
    oh.assign(C * ldt, T(0));
    for (int64_t r = 0; r < nq; ++r) oh[qcls[r] * ldt + r] = T(1);
  }
};

// km[c * C + b] += sum over the tile's queries r of class b of St[c, r], for keys [c0, c1); with sub, of
// exp(St[c, r] - sub[r]) instead (the exponential fused with the sums: one pass over the tile, nothing stored).
template <typename T>
inline void tile_key_class_sums(const T* St, int64_t ldt, int64_t c0, int64_t c1, int64_t nqp,
                                const QueryClasses<T>& qc, int64_t C, T* km, const T* sub = nullptr) {
  using V = Vectorized<T>;
  constexpr int64_t VS = V::size();
  T buf[VS];
  V acc[kMaxClasses];
  for (int64_t c = c0; c < c1; ++c) {
    const T* p = St + c * ldt;
    for (int64_t b = 0; b < qc.n; ++b) acc[b] = V(T(0));
    if (qc.n == 1 && sub) {
      for (int64_t r = 0; r < nqp; r += VS) acc[0] = acc[0] + vexp<T>(V::loadu(p + r) - V::loadu(sub + r));
    } else if (qc.n == 1) {
      for (int64_t r = 0; r < nqp; r += VS) acc[0] = acc[0] + V::loadu(p + r);
    } else {
      for (int64_t r = 0; r < nqp; r += VS) {
        const V x = sub ? vexp<T>(V::loadu(p + r) - V::loadu(sub + r)) : V::loadu(p + r);
        for (int64_t b = 0; b < qc.n; ++b) acc[b] = acc[b] + x * V::loadu(qc.oh.data() + qc.ids[b] * ldt + r);
      }
    }
    for (int64_t b = 0; b < qc.n; ++b) {
      acc[b].store(buf);
      T sum = T(0);
      for (int64_t l = 0; l < VS; ++l) sum += buf[l];
      km[c * C + qc.ids[b]] += sum;
    }
  }
}

// x[r] = d[class(query r)] for r < nqp: one key's per-class values d[C] spread over the tile's queries.
template <typename T>
inline void spread_by_query_class(const T* d, const QueryClasses<T>& qc, int64_t ldt, int64_t nqp, T* x) {
  using V = Vectorized<T>;
  if (qc.n == 1) {
    std::fill(x, x + nqp, d[qc.ids[0]]);
    return;
  }
  for (int64_t r = 0; r < nqp; r += V::size()) {
    V y(T(0));
    for (int64_t b = 0; b < qc.n; ++b) y = y + V::loadu(qc.oh.data() + qc.ids[b] * ldt + r) * V(d[qc.ids[b]]);
    y.store(x + r);
  }
}

// ----------------------------------------------------------------------------------------------
// Key masses (forward, after lse is known): a second pass over the grid in the backward's order.
// ----------------------------------------------------------------------------------------------
// km[h, j, b] = sum over rows i of query class b of P[h, i, j]. Tasks are (sequence, head, key block): each owns
// the key masses of its keys (zeroed here, so keys no row sees and sequences without queries read 0), walks the
// query tiles that see the block and adds each tile row's per-query-class sums: no atomics, no S x S buffer,
// one more Q K^T than the forward.
template <typename T>
void key_mass_kernel(const Problem& P, const T* q, const T* k, const T* lse, const T* norm, T* km, int64_t Tq,
                     int64_t Tk) {
  using V = Vectorized<T>;
  constexpr int64_t VS = V::size();
  const int64_t QB = kBlocks.q, KB = kBlocks.k, ldt = round_up(QB, kAlign);
  const int64_t D = P.d, Hq = P.hq, Hk = P.hk, C = P.C;
  const int64_t ldq = Hq * D, ldk = Hk * D;
  struct KmTask {
    int32_t n, h;
    int64_t j0;
  };
  std::vector<KmTask> tasks;
  for (int64_t n = 0; n < P.num_seqs; ++n) {
    const int64_t sk = P.cu_k[n + 1] - P.cu_k[n];
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t j0 = 0; j0 < sk; j0 += KB) tasks.push_back({(int32_t)n, (int32_t)h, j0});
  }
  at::parallel_for(0, (int64_t)tasks.size(), 1, [&](int64_t tb, int64_t te) {
    std::vector<T> St(KB * ldt);
    ProbScratch<T> ps;
    QueryClasses<T> qcl;
    for (int64_t t = tb; t < te; ++t) {
      const int64_t n = tasks[t].n, h = tasks[t].h, j0 = tasks[t].j0, hkv = h / P.group;
      const int64_t q0 = P.cu_q[n], k0 = P.cu_k[n];
      const int64_t sq = P.cu_q[n + 1] - q0, sk = P.cu_k[n + 1] - k0, off = sk - sq;
      const int64_t nk = std::min(KB, sk - j0);
      T* kmb = km + (h * Tk + k0 + j0) * C;  // [nk, C]: column-major [C x nk], ld C
      std::fill(kmb, kmb + nk * C, T(0));
      if (sq == 0) continue;
      const int32_t* kcls = P.key_class + k0 + j0;
      const int64_t is = P.wr < 0 ? 0 : std::max<int64_t>(0, j0 - off - P.wr);
      const int64_t ie = P.wl < 0 ? sq : std::min<int64_t>(sq, j0 + nk - 1 - off + P.wl + 1);
      for (int64_t i0 = round_down(is, QB); i0 < ie; i0 += QB) {
        const int64_t i1 = std::min(i0 + QB, sq), nq = i1 - i0, nqp = round_up(nq, VS);
        const TileCols tc = tile_cols(P, j0, nk, i0, i1, sq, sk);
        if (tc.c1 <= tc.c0) continue;
        const int32_t* qcls = P.query_class + q0 + i0;
        if (!prob_tile<T>(P, h, q + (q0 + i0) * ldq + h * D, k + (k0 + j0 + tc.c0) * ldk + hkv * D, ldq, ldk,
                          lse + h * Tq + q0 + i0, norm ? norm + h * Tq + q0 + i0 : nullptr, qcls, kcls, St.data(),
                          nullptr, nullptr, ldt, j0, tc, off, i0, nq, nqp, ps, /*exp=*/false))
          continue;
        qcl.fill(qcls, nq, C, ldt);
        if (ps.nan_rows.empty() && !ps.scaled) {  // the usual case: exp fused with the sums
          tile_key_class_sums<T>(St.data(), ldt, tc.c0, tc.c1, nqp, qcl, C, kmb, ps.lsub.data());
        } else {
          finish_probs<T>(St.data(), ldt, tc, nqp, ps);
          tile_key_class_sums<T>(St.data(), ldt, tc.c0, tc.c1, nqp, qcl, C, kmb);
        }
      }
    }
  });
}

// The normaliser correction of rows with a finite |lse| >= kBigLse: norm[h, i] = 1 / sum_j exp(z'_ij - lse_i) over
// the keys row i sees, so that P = exp(z' - lse) * norm sums to 1 as the reference's exp(z - max) / sum does (lse
// is exact to ulp(lse) only; at |z'| ~ 1e30 it has lost the log of the row sum). norm is 1 on every other row, and
// this pass, one more Q K^T, runs only on the query tiles that hold such a row. Tasks: (sequence, head, query tile).
template <typename T>
void row_norm_kernel(const Problem& P, const T* q, const T* k, const T* lse, T* norm) {
  using V = Vectorized<T>;
  constexpr int64_t VS = V::size();
  const int64_t QB = kBlocks.q, KB = kBlocks.k, ldt = round_up(QB, kAlign);
  const int64_t D = P.d, Hq = P.hq, Hk = P.hk;
  const int64_t ldq = Hq * D, ldk = Hk * D;
  const int64_t Tq = P.cu_q[P.num_seqs];
  auto big = [](T L) { return std::abs(L) >= T(kBigLse) && std::abs(L) < kInf<T>; };
  std::vector<FwdTask> tasks;
  for (int64_t n = 0; n < P.num_seqs; ++n) {
    const int64_t q0 = P.cu_q[n], sq = P.cu_q[n + 1] - q0;
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t i0 = 0; i0 < sq; i0 += QB) {
        const int64_t i1 = std::min(i0 + QB, sq);
        const T* L = lse + h * Tq + q0;
        if (std::any_of(L + i0, L + i1, big)) tasks.push_back({(int32_t)n, (int32_t)h, i0, i1});
      }
  }
  at::parallel_for(0, (int64_t)tasks.size(), 1, [&](int64_t tb, int64_t te) {
    std::vector<T> St(KB * ldt), s(ldt);
    ProbScratch<T> ps;
    for (int64_t t = tb; t < te; ++t) {
      const FwdTask& tk = tasks[t];
      const int64_t n = tk.n, h = tk.h, hkv = h / P.group;
      const int64_t q0 = P.cu_q[n], k0 = P.cu_k[n];
      const int64_t sq = P.cu_q[n + 1] - q0, sk = P.cu_k[n + 1] - k0, off = sk - sq;
      const int64_t i0 = tk.i0, i1 = tk.i1, nq = i1 - i0, nqp = round_up(nq, VS);
      std::fill(s.begin(), s.end(), T(0));
      const int32_t* qcls = P.query_class ? P.query_class + q0 + i0 : nullptr;
      const int64_t kmin = P.lo(i0, sq, sk), kmax = P.hi(i1 - 1, sq, sk);
      for (int64_t j0 = round_down(std::max<int64_t>(kmin, 0), KB); j0 <= kmax && j0 < sk; j0 += KB) {
        const int64_t nk = std::min(KB, sk - j0);
        const TileCols tc = tile_cols(P, j0, nk, i0, i1, sq, sk);
        if (tc.c1 <= tc.c0) continue;
        if (!prob_tile<T>(P, h, q + (q0 + i0) * ldq + h * D, k + (k0 + j0 + tc.c0) * ldk + hkv * D, ldq, ldk,
                          lse + h * Tq + q0 + i0, nullptr, qcls, P.C > 0 ? P.key_class + k0 + j0 : nullptr,
                          St.data(), nullptr, nullptr, ldt, j0, tc, off, i0, nq, nqp, ps))
          break;
        for (int64_t c = tc.c0; c < tc.c1; ++c)
          for (int64_t r = 0; r < nqp; r += VS)
            (V::loadu(s.data() + r) + V::loadu(St.data() + c * ldt + r)).store(s.data() + r);
      }
      for (int64_t r = 0; r < nq; ++r)
        if (big(lse[h * Tq + q0 + i0 + r])) norm[h * Tq + q0 + i0 + r] = T(1) / s[r];
    }
  });
}

// norm [Hq, Tq] for row_norm_kernel when some row has a finite |lse| >= kBigLse, else an undefined tensor.
at::Tensor row_norms(const Problem& P, const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse) {
  const auto a = lse.abs();
  if (!(a.ge(kBigLse) & a.lt(std::numeric_limits<double>::infinity())).any().item<bool>()) return at::Tensor();
  at::Tensor norm = at::ones_like(lse);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "avar_cpu_row_norms", [&] {
    row_norm_kernel<scalar_t>(P, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                              norm.data_ptr<scalar_t>());
  });
  return norm;
}

// The key-mass term of the backward's row constant: delta[h, i] += sum_j P_ij dkm[h, j, qclass(i)]. Tasks are
// (sequence, head, query tile), as in the forward; each owns its rows of delta.
template <typename T>
void key_mass_delta_kernel(const Problem& P, const T* q, const T* k, const T* lse, const T* norm, const T* dkm,
                           T* delta, int64_t Tk) {
  using V = Vectorized<T>;
  constexpr int64_t VS = V::size();
  const int64_t QB = kBlocks.q, KB = kBlocks.k, ldt = round_up(QB, kAlign);
  const int64_t D = P.d, Hq = P.hq, Hk = P.hk, C = P.C;
  const int64_t ldq = Hq * D, ldk = Hk * D;
  const int64_t Tq = P.cu_q[P.num_seqs];
  std::vector<FwdTask> tasks;
  for (int64_t n = 0; n < P.num_seqs; ++n) {
    const int64_t sq = P.cu_q[n + 1] - P.cu_q[n];
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t i0 = 0; i0 < sq; i0 += QB) tasks.push_back({(int32_t)n, (int32_t)h, i0, std::min(i0 + QB, sq)});
  }
  at::parallel_for(0, (int64_t)tasks.size(), 1, [&](int64_t tb, int64_t te) {
    std::vector<T> St(KB * ldt), x(ldt), y(ldt);
    ProbScratch<T> ps;
    QueryClasses<T> qcl;
    for (int64_t t = tb; t < te; ++t) {
      const FwdTask& tk = tasks[t];
      const int64_t n = tk.n, h = tk.h, hkv = h / P.group;
      const int64_t q0 = P.cu_q[n], k0 = P.cu_k[n];
      const int64_t sq = P.cu_q[n + 1] - q0, sk = P.cu_k[n + 1] - k0, off = sk - sq;
      const int64_t i0 = tk.i0, i1 = tk.i1, nq = i1 - i0, nqp = round_up(nq, VS);
      if (sk == 0) continue;
      std::fill(y.begin(), y.end(), T(0));
      const int32_t* qcls = P.query_class + q0 + i0;
      qcl.fill(qcls, nq, C, ldt);
      const int64_t kmin = P.lo(i0, sq, sk), kmax = P.hi(i1 - 1, sq, sk);
      for (int64_t j0 = round_down(std::max<int64_t>(kmin, 0), KB); j0 <= kmax && j0 < sk; j0 += KB) {
        const int64_t nk = std::min(KB, sk - j0);
        const TileCols tc = tile_cols(P, j0, nk, i0, i1, sq, sk);
        if (tc.c1 <= tc.c0) continue;
        if (!prob_tile<T>(P, h, q + (q0 + i0) * ldq + h * D, k + (k0 + j0 + tc.c0) * ldk + hkv * D, ldq, ldk,
                          lse + h * Tq + q0 + i0, norm ? norm + h * Tq + q0 + i0 : nullptr, qcls,
                          P.key_class + k0 + j0, St.data(), nullptr, nullptr, ldt, j0,
                          tc, off, i0, nq, nqp, ps))
          break;  // no row of the tile has a key: the same for every key block
        // y[r] += sum over the keys c of P[c, r] dkm[c, class(r)].
        for (int64_t c = tc.c0; c < tc.c1; ++c) {
          spread_by_query_class<T>(dkm + (h * Tk + k0 + j0 + c) * C, qcl, ldt, nqp, x.data());
          const T* p = St.data() + c * ldt;
          for (int64_t r = 0; r < nqp; r += VS)
            (V::loadu(y.data() + r) + V::loadu(p + r) * V::loadu(x.data() + r)).store(y.data() + r);
        }
      }
      for (int64_t r = 0; r < nq; ++r) delta[h * Tq + q0 + i0 + r] += y[r];
    }
  });
}

// ----------------------------------------------------------------------------------------------
// Backward.
// ----------------------------------------------------------------------------------------------
template <typename T>
void backward_kernel(const Problem& P, const T* dout, const T* dmass, const T* dkm, const T* delta, const T* q,
                     const T* k, const T* v, const T* lse, const T* norm, T* dq, T* dk_full, T* dv_full, int64_t Tq,
                     int64_t Tk, const bool* want, double* dtab) {
  // want[0..2]: gradients of MUL, ABS, ADD requested; then dtab [N, 3, Hq, C, C] receives, for task (n, h),
  // the sums over its visible (i, j) of dZ' * z, dZ' * |z| and dZ' by (class(i), class(j)).
  // dkm [Hq, Tk, C] (or null): the key masses' gradient; delta then already holds its term (key_mass_delta_kernel).
  using V = Vectorized<T>;
  constexpr int64_t VS = V::size();
  const int64_t QB = kBlocks.q, KB = kBlocks.k, ldt = round_up(QB, kAlign);
  const int64_t D = P.d, Hq = P.hq, Hk = P.hk, C = P.C, slots = std::max<int64_t>(C, 1);
  const int64_t ldq = Hq * D, ldk = Hk * D;
  const bool has_dm = dmass != nullptr && C > 0;
  const bool wm = want[0], wa = want[1], wd = want[2];
  const bool want_tab = (wm || wa || wd) && C > 0 && P.has_rw;
  const bool want_z = want_tab && (wm || wa);
  std::vector<std::pair<int32_t, int32_t>> tasks;
  for (int64_t n = 0; n < P.num_seqs; ++n)
    for (int64_t h = 0; h < Hq; ++h) tasks.push_back({(int32_t)n, (int32_t)h});
  at::parallel_for(0, (int64_t)tasks.size(), 1, [&](int64_t tb, int64_t te) {
    std::vector<T> St(KB * ldt), dPt(KB * ldt), G, Z;
    if (P.has_rw) G.resize(KB * ldt);
    if (want_z) Z.resize(KB * ldt);  // raw scores, kept only for the MUL / ABS gradients
    std::vector<T> cst(slots * ldt), tsum(want_tab ? 3 * C * ldt : 0), x(dkm ? ldt : 0);
    ProbScratch<T> ps;
    QueryClasses<T> qcl;
    std::vector<double> tacc(want_tab ? 3 * kMaxClasses * kMaxClasses : 0);
    std::vector<T> dK(KB * D), dV(KB * D);
    for (int64_t t = tb; t < te; ++t) {
      const int64_t n = tasks[t].first, h = tasks[t].second, hkv = h / P.group;
      const int64_t q0 = P.cu_q[n], k0 = P.cu_k[n];
      const int64_t sq = P.cu_q[n + 1] - q0, sk = P.cu_k[n + 1] - k0, off = sk - sq;
      if (sq == 0 || sk == 0) continue;
      if (want_tab) std::fill(tacc.begin(), tacc.end(), 0.0);
      const int64_t kmin = P.lo(0, sq, sk), kmax = P.hi(sq - 1, sq, sk);
      for (int64_t j0 = round_down(std::max<int64_t>(kmin, 0), KB); j0 <= kmax && j0 < sk; j0 += KB) {
        const int64_t nk = std::min(KB, sk - j0);
        const int32_t* kcls = C > 0 ? P.key_class + k0 + j0 : nullptr;
        std::fill(dK.begin(), dK.begin() + nk * D, T(0));
        std::fill(dV.begin(), dV.begin() + nk * D, T(0));
        // Query rows that may see a key of the block, widened to the tile grid.
        const int64_t is = P.wr < 0 ? 0 : std::max<int64_t>(0, j0 - off - P.wr);
        const int64_t ie = P.wl < 0 ? sq : std::min<int64_t>(sq, j0 + nk - 1 - off + P.wl + 1);
        for (int64_t i0 = round_down(is, QB); i0 < ie; i0 += QB) {
          const int64_t i1 = std::min(i0 + QB, sq), nq = i1 - i0, nqp = round_up(nq, VS);
          const TileCols tc = tile_cols(P, j0, nk, i0, i1, sq, sk);
          if (tc.c1 <= tc.c0) continue;
          const int64_t w = tc.c1 - tc.c0;
          const T* qp = q + (q0 + i0) * ldq + h * D;
          const T* dop = dout + (q0 + i0) * ldq + h * D;
          const T* kp = k + (k0 + j0 + tc.c0) * ldk + hkv * D;
          const T* vp = v + (k0 + j0 + tc.c0) * ldk + hkv * D;
          T* Sc = St.data() + tc.c0 * ldt;
          T* dPc = dPt.data() + tc.c0 * ldt;
          const int32_t* qcls = P.query_class ? P.query_class + q0 + i0 : nullptr;
          if (!prob_tile<T>(P, h, qp, kp, ldq, ldk, lse + h * Tq + q0 + i0,
                            norm ? norm + h * Tq + q0 + i0 : nullptr, qcls, kcls, St.data(),
                            P.has_rw ? G.data() : nullptr, want_z ? Z.data() : nullptr, ldt, j0, tc, off, i0, nq, nqp,
                            ps))
            continue;
          // dP[c0:c1, :nq] (key-major) = V dO^T.
          blas_gemm('T', 'N', nq, w, D, T(1), dop, ldq, vp, ldk, T(0), dPc, ldt);
          // dV[w x D] += P^T dO.
          blas_gemm('N', 'N', D, w, nq, T(1), dop, ldq, Sc, ldt, T(1), dV.data() + tc.c0 * D, D);
          // dZ' = P (dP + dmass[i, class(j)] - delta_i [+ dkm[j, qclass(i)]]): one constant per (class, query).
          // A non-finite constant (inf or NaN in the row's out, from v) makes the row's dZ' NaN on every key it
          // sees: the softmax's row gradient is then undefined (inf - inf at the keys that caused it), and the
          // reference's autograd spreads that NaN over the row (through its row max).
          for (int64_t c = 0; c < slots; ++c)
            for (int64_t r = 0; r < nqp; ++r) {
              const int64_t gi = q0 + i0 + r;
              const T x = r < nq ? (has_dm ? dmass[(h * Tq + gi) * C + c] : T(0)) - delta[h * Tq + gi] : T(0);
              cst[c * ldt + r] = std::isfinite(x) ? x : kNaN<T>;
            }
          if (dkm) qcl.fill(qcls, nq, C, ldt);
          for (int64_t c = tc.c0; c < tc.c1; ++c) {
            const T* p = St.data() + c * ldt;
            T* ds = dPt.data() + c * ldt;
            const T* cr = cst.data() + (kcls ? kcls[c] : 0) * ldt;
            if (dkm) {  // + dkm[j, qclass(i)]
              spread_by_query_class<T>(dkm + (h * Tk + k0 + j0 + c) * C, qcl, ldt, nqp, x.data());
              for (int64_t r = 0; r < nqp; r += VS)
                (V::loadu(p + r) * (V::loadu(ds + r) + V::loadu(cr + r) + V::loadu(x.data() + r))).store(ds + r);
            } else {
              for (int64_t r = 0; r < nqp; r += VS)
                (V::loadu(p + r) * (V::loadu(ds + r) + V::loadu(cr + r))).store(ds + r);
            }
          }
          mask_tile<T>(P, dPt.data(), ldt, j0, tc.c0, tc.c1, off, i0, nq, nqp, T(0));
          if (want_tab) {  // dZ' summed per (query, key class) before the chain rule through G, then per query class
            std::fill(tsum.begin(), tsum.end(), T(0));
            for (int64_t c = tc.c0; c < tc.c1; ++c) {
              const T* ds = dPt.data() + c * ldt;
              const T* zr = Z.data() + c * ldt;
              T* sm = tsum.data() + kcls[c] * ldt;
              T* sa = sm + C * ldt;
              T* sd = sa + C * ldt;
              for (int64_t r = 0; r < nqp; r += VS) {
                const V x = V::loadu(ds + r);
                if (wm) (V::loadu(sm + r) + x * V::loadu(zr + r)).store(sm + r);
                if (wa) (V::loadu(sa + r) + x * V::loadu(zr + r).abs()).store(sa + r);
                if (wd) (V::loadu(sd + r) + x).store(sd + r);
              }
            }
            for (int64_t r = 0; r < nq; ++r) {
              double* ta = tacc.data() + P.query_class[q0 + i0 + r] * C;
              for (int w3 = 0; w3 < 3; ++w3)
                for (int64_t c = 0; c < C; ++c) ta[w3 * C * C + c] += (double)tsum[(w3 * C + c) * ldt + r];
            }
          }
          if (P.has_rw) {
            for (int64_t c = tc.c0; c < tc.c1; ++c) {
              T* ds = dPt.data() + c * ldt;
              const T* g = G.data() + c * ldt;
              for (int64_t r = 0; r < nqp; r += VS) (V::loadu(ds + r) * V::loadu(g + r)).store(ds + r);
            }
          }
          // dQ[nq x D] (ld ldq, in place in dq) += scale * dS K.
          blas_gemm('N', 'T', D, nq, w, static_cast<T>(P.scale), kp, ldk, dPc, ldt, T(1), dq + (q0 + i0) * ldq + h * D,
                    ldq);
          // dK[w x D] += scale * dS^T Q.
          blas_gemm('N', 'N', D, w, nq, static_cast<T>(P.scale), qp, ldq, dPc, ldt, T(1), dK.data() + tc.c0 * D, D);
        }
        for (int64_t j = 0; j < nk; ++j) {
          std::copy(dK.begin() + j * D, dK.begin() + (j + 1) * D, dk_full + (k0 + j0 + j) * ldq + h * D);
          std::copy(dV.begin() + j * D, dV.begin() + (j + 1) * D, dv_full + (k0 + j0 + j) * ldq + h * D);
        }
      }
      if (want_tab) {
        for (int w3 = 0; w3 < 3; ++w3)
          std::copy(tacc.begin() + w3 * C * C, tacc.begin() + (w3 + 1) * C * C,
                    dtab + ((n * 3 + w3) * Hq + h) * C * C);
      }
    }
  });
}

// ----------------------------------------------------------------------------------------------
// Entry points.
// ----------------------------------------------------------------------------------------------
Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_q, const at::Tensor& cu_k,
                     const c10::optional<at::Tensor>& key_class, const c10::optional<at::Tensor>& query_class,
                     int64_t num_classes, const c10::optional<at::Tensor>& mul,
                     const c10::optional<at::Tensor>& abs_, const c10::optional<at::Tensor>& add, double scale,
                     int64_t wl, int64_t wr) {
  TORCH_CHECK(kBlocks.error.empty(), kBlocks.error);
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "avar cpu: q, k must be [T, H, D]");
  TORCH_CHECK(num_classes >= 0 && num_classes <= kMaxClasses, "avar cpu: num_classes must be in 0..8");
  TORCH_CHECK(cu_q.scalar_type() == at::kInt && cu_k.scalar_type() == at::kInt && cu_q.is_contiguous() &&
                  cu_k.is_contiguous(), "avar cpu: cu_seqlens must be contiguous int32");
  TORCH_CHECK(cu_q.dim() == 1 && cu_q.numel() >= 1 && cu_k.numel() == cu_q.numel(),
              "avar cpu: cu_seqlens_q and cu_seqlens_k must both be [N + 1] with N >= 0");
  Problem P;
  P.hq = q.size(1);
  P.hk = k.size(1);
  TORCH_CHECK(P.hk > 0 && P.hq % P.hk == 0, "avar cpu: Hq must be a multiple of Hk");
  P.group = P.hq / P.hk;
  P.d = q.size(2);
  P.num_seqs = cu_q.numel() - 1;
  P.cu_q = cu_q.data_ptr<int32_t>();
  P.cu_k = cu_k.data_ptr<int32_t>();
  TORCH_CHECK(P.cu_q[P.num_seqs] == q.size(0) && P.cu_k[P.num_seqs] == k.size(0),
              "avar cpu: cu_seqlens_q[-1] / cu_seqlens_k[-1] must equal Tq / Tk");
  P.C = num_classes;
  P.key_class = nullptr;
  P.query_class = nullptr;
  P.has_query_class = false;
  if (num_classes > 0) {
    // An empty tensor's data pointer may be null: presence is has_value(), never a pointer test.
    TORCH_CHECK(key_class.has_value() && key_class->defined() && key_class->scalar_type() == at::kInt &&
                    key_class->is_contiguous() && key_class->numel() == k.size(0),
                "avar cpu: key_class must be a contiguous int32 [Tk] tensor when num_classes > 0");
    P.key_class = key_class->data_ptr<int32_t>();
    if (query_class.has_value() && query_class->defined()) {
      TORCH_CHECK(query_class->scalar_type() == at::kInt && query_class->is_contiguous() &&
                      query_class->numel() == q.size(0), "avar cpu: query_class must be a contiguous int32 [Tq] tensor");
      P.query_class = query_class->data_ptr<int32_t>();
      P.has_query_class = true;
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
  TORCH_CHECK(!P.has_rw || P.has_query_class, "avar cpu: reweight tables need query_class");
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
                                int64_t window_right, at::Tensor out, at::Tensor lse, at::Tensor mass,
                                const c10::optional<at::Tensor>& key_mass) {
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
  const int64_t Tk = kc.size(0);
  const bool want_km = key_mass.has_value() && key_mass->defined();
  if (want_km) {
    TORCH_CHECK(key_mass->sizes() == at::IntArrayRef({P.hq, Tk, num_classes}) &&
                    key_mass->scalar_type() == qc.scalar_type() && key_mass->is_contiguous(),
                "avar cpu: key_mass must be a contiguous [Hq, Tk, C] tensor of q's dtype");
    TORCH_CHECK(num_classes == 0 || P.has_query_class, "avar cpu: key masses need query_class");
  }
  AT_DISPATCH_FLOATING_TYPES(qc.scalar_type(), "avar_cpu_forward", [&] {
    if (Tq > 0)
      forward_kernel<scalar_t>(P, qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(),
                               out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), mass.data_ptr<scalar_t>(), Tq);
  });
  // After lse is known: every key of every sequence is written (0 where no row sees it).
  if (want_km && num_classes > 0 && Tk > 0) {
    const at::Tensor norm = Tq > 0 ? row_norms(P, qc, kc, lse) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(qc.scalar_type(), "avar_cpu_key_mass", [&] {
      key_mass_kernel<scalar_t>(P, qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                                norm.defined() ? norm.data_ptr<scalar_t>() : nullptr, key_mass->data_ptr<scalar_t>(),
                                Tq, Tk);
    });
  }
  if (want_km) return {out, lse, mass, *key_mass};
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
                                 int64_t window_right, bool want_dmul, bool want_dabs, bool want_dadd,
                                 const c10::optional<at::Tensor>& dkey_mass) {
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
  at::Tensor dmc, dkmc;
  if (dmass.has_value() && dmass->defined() && num_classes > 0) dmc = dmass->to(st).contiguous();
  Problem P = make_problem(qc, kc, cu_seqlens_q, cu_seqlens_k, key_class, query_class, num_classes, mul, abs_, add,
                           scale, window_left, window_right);
  const int64_t Tq = qc.size(0), Tk = kc.size(0);
  if (dkey_mass.has_value() && dkey_mass->defined() && num_classes > 0) {
    TORCH_CHECK(dkey_mass->sizes() == at::IntArrayRef({P.hq, Tk, num_classes}),
                "avar cpu: dkey_mass must be [Hq, Tk, C]");
    TORCH_CHECK(P.has_query_class, "avar cpu: dkey_mass needs query_class");
    dkmc = dkey_mass->to(st).contiguous();
    dlc = dlc.clone();  // gets the key-mass term; the caller's delta is left as it was
  }
  auto dq = at::zeros_like(qc);
  auto dk_full = at::zeros({Tk, P.hq, P.d}, qc.options());
  auto dv_full = at::zeros({Tk, P.hq, P.d}, qc.options());
  const bool want[3] = {want_dmul && P.mul != nullptr, want_dabs && P.abs_ != nullptr,
                        want_dadd && P.add != nullptr};
  const bool want_tab = want[0] || want[1] || want[2];
  // Per (sequence, table, head) partial sums, summed over the sequences below: deterministic, no atomics.
  at::Tensor dtab_seq = at::zeros({want_tab ? P.num_seqs : 0, 3, P.hq, P.C, P.C}, qc.options().dtype(at::kDouble));
  if (Tq > 0 && Tk > 0) {
    const at::Tensor norm = row_norms(P, qc, kc, lsec);  // rows with |lse| >= kBigLse, else undefined
    AT_DISPATCH_FLOATING_TYPES(st, "avar_cpu_backward", [&] {
      const scalar_t* dkm = dkmc.defined() ? dkmc.data_ptr<scalar_t>() : nullptr;
      const scalar_t* nrm = norm.defined() ? norm.data_ptr<scalar_t>() : nullptr;
      // delta_i += sum_j P_ij dkm[j, qclass(i)] first: every key tile of a row needs the row's final delta.
      if (dkm)
        key_mass_delta_kernel<scalar_t>(P, qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(),
                                        lsec.data_ptr<scalar_t>(), nrm, dkm, dlc.data_ptr<scalar_t>(), Tk);
      backward_kernel<scalar_t>(P, doc.data_ptr<scalar_t>(), dmc.defined() ? dmc.data_ptr<scalar_t>() : nullptr, dkm,
                                dlc.data_ptr<scalar_t>(), qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(),
                                vc.data_ptr<scalar_t>(), lsec.data_ptr<scalar_t>(), nrm, dq.data_ptr<scalar_t>(),
                                dk_full.data_ptr<scalar_t>(), dv_full.data_ptr<scalar_t>(), Tq, Tk, want,
                                want_tab ? dtab_seq.data_ptr<double>() : nullptr);
    });
  }
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
  m.def("forward", &avar::forward,
        "fused attention forward (packed layout), writes out, lse, mass (and key_mass [Hq, Tk, C] when given); "
        "returns them",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"),
        py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("key_class"), py::arg("query_class"),
        py::arg("num_classes"), py::arg("mul"), py::arg("abs_"), py::arg("add"), py::arg("scale"),
        py::arg("window_left"), py::arg("window_right"), py::arg("out"), py::arg("lse"), py::arg("mass"),
        py::arg("key_mass") = py::none());
  m.def("backward", &avar::backward,
        "fused attention backward (packed layout) -> (dq, dk, dv[, dtables [3, Hq, C, C] when a table gradient is "
        "asked])", py::arg("dout"),
        py::arg("dmass"), py::arg("delta"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"),
        py::arg("max_seqlen_k"), py::arg("key_class"), py::arg("query_class"), py::arg("num_classes"),
        py::arg("mul"), py::arg("abs_"), py::arg("add"), py::arg("scale"), py::arg("window_left"),
        py::arg("window_right"), py::arg("want_dmul") = false, py::arg("want_dabs") = false,
        py::arg("want_dadd") = false, py::arg("dkey_mass") = py::none());
}
