// CPU kernels for sparse weights: block-sparse and CSR SpMM (y = x @ W^T) and SDDMM (the weight gradient at
// W's nonzeros), in float32 and float64, parallelised with OpenMP so that no two threads write the same output;
// and the SwiGLU backward in place (float32, float64, bfloat16), which needs no temporaries.
// Plain C ABI for ctypes (native.py): raw pointers, int64 sizes. Dense operands are contiguous row-major
// [tokens, features]; block values may have any strides. Each function returns 0, or 1 if an index is out of
// range (checked before anything is written).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

using i64 = int64_t;

template <typename T>
static std::unique_ptr<T[]> scratch(i64 n) {  // uninitialised: a std::vector would zero it on one thread first
  return std::unique_ptr<T[]>(new T[n]);
}

// Micro-kernels use GCC vector extensions (native SIMD width) so accumulators stay in registers; plain loops were
// vectorised along the wrong axis (gathers) or kept their accumulators on the stack. A tile of accumulators takes
// half the vector registers (16 zmm with AVX-512, 8 ymm with AVX2), leaving the rest for streamed operands.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64, kAccBytes = 16 * 64;
#else
constexpr int kVecBytes = 32, kAccBytes = 8 * 32;
#endif

template <typename S>
struct Simd {
  typedef S vec __attribute__((vector_size(kVecBytes)));
  static constexpr int lanes = kVecBytes / sizeof(S);
  static vec load(const S* p) {
    vec v;
    __builtin_memcpy(&v, p, sizeof v);  // unaligned load
    return v;
  }
  static void store(S* p, vec v) { __builtin_memcpy(p, &v, sizeof v); }
  static vec splat(S s) { return vec{} + s; }
};

// Lane m of the result = the sum of the lanes of p[m], for p[0..lanes): a tree of two-vector shuffles and adds,
// log2(lanes) levels, instead of one horizontal sum per vector.
template <typename S, int H = 1>
static inline typename Simd<S>::vec sum_lanes(typename Simd<S>::vec* p) {
  using V = Simd<S>;
  constexpr int L = V::lanes;
  if constexpr (H == L) {
    return p[0];
  } else {
    typedef std::conditional_t<sizeof(S) == 4, int32_t, int64_t> I;
    typedef I ivec __attribute__((vector_size(kVecBytes)));
    ivec lo, hi;  // within each 2H lanes: H lanes of the first vector then H of the second, at offsets 0 and H
    for (int j = 0; j < L; j++) {
      lo[j] = (j % (2 * H) < H ? 0 : L) + j - j % (2 * H) + j % H;
      hi[j] = lo[j] + H;
    }
#pragma GCC unroll 16
    for (int i = 0; i < L / (2 * H); i++)
      p[i] = __builtin_shuffle(p[2 * i], p[2 * i + 1], lo) + __builtin_shuffle(p[2 * i], p[2 * i + 1], hi);
    return sum_lanes<S, 2 * H>(p);
  }
}

static bool out_of_range(const i64* idx, i64 n, i64 limit) {
  bool bad = false;
  for (i64 k = 0; k < n; k++) bad |= static_cast<uint64_t>(idx[k]) >= static_cast<uint64_t>(limit);
  return bad;
}

static bool bad_csr(const i64* crow, i64 rows, const i64* col, i64 nnz, i64 cols) {
  bool bad = crow[0] != 0 || crow[rows] != nnz;
  for (i64 r = 0; r < rows; r++) bad |= crow[r + 1] < crow[r];
  return bad || out_of_range(col, nnz, cols);
}

// ---------------------------------------------------------------------------------------------------------------
// Block-sparse SpMM: y[:, dst[k]*b:+b] += x[:, src[k]*b:+b] @ V[k]^T. The blocks are first grouped by dst and
// repacked as V^T (vt[q][j][i] = V[k_q][i][j]); one task = (token tile, block-row d of y) then keeps a T x B tile of
// y in registers across all blocks of row d, so y is written once and every inner-loop load is a broadcast or
// contiguous.

// y[t, i] = sum_q sum_j x[t, off[q] + j] * vt[q][j][i] for T tokens (B fixed at compile time, a multiple of lanes).
template <typename S, int B, int T>
static inline void spmm_micro(const S* x, i64 ldx, const S* vt, const i64* off, i64 nb, S* y, i64 ldy) {
  using V = Simd<S>;
  constexpr int NV = B / V::lanes;
  typename V::vec acc[T][NV] = {};
  for (i64 q = 0; q < nb; q++) {
    const S* xq = x + off[q];
    for (int j = 0; j < B; j++) {
      typename V::vec w[NV];
#pragma GCC unroll 8
      for (int n = 0; n < NV; n++) w[n] = V::load(vt + (q * B + j) * B + n * V::lanes);
#pragma GCC unroll 16
      for (int t = 0; t < T; t++) {
        const typename V::vec xv = V::splat(xq[t * ldx + j]);
#pragma GCC unroll 8
        for (int n = 0; n < NV; n++) acc[t][n] += xv * w[n];
      }
    }
  }
#pragma GCC unroll 16
  for (int t = 0; t < T; t++)
#pragma GCC unroll 8
    for (int n = 0; n < NV; n++) V::store(y + t * ldy + n * V::lanes, acc[t][n]);
}

// The same for any block size b, one token at a time, accumulating in y.
template <typename S>
static void spmm_any(const S* x, i64 ldx, const S* vt, const i64* off, i64 nb, i64 b, S* y, i64 nt, i64 ldy) {
  for (i64 t = 0; t < nt; t++) {
    S* yt = y + t * ldy;
    std::fill(yt, yt + b, S(0));
    for (i64 q = 0; q < nb; q++)
      for (i64 j = 0; j < b; j++) {
        const S xv = x[t * ldx + off[q] + j];
        const S* v = vt + (q * b + j) * b;
#pragma omp simd
        for (i64 i = 0; i < b; i++) yt[i] += xv * v[i];
      }
  }
}

template <typename S, int B>  // B = 0: block size known only at run time
static void block_spmm(const S* x, i64 n, i64 n_src, const S* values, i64 vs0, i64 vs1, i64 vs2, const i64* dst,
                       const i64* src, i64 nnzb, i64 b, S* y, i64 n_dst, int nthreads) {
  // Tokens per micro-kernel: at most 8, as rows of x a power-of-two stride apart fall in one (8-way) L1 set.
  constexpr int T = B ? std::max<int>(1, std::min<int>(8, kAccBytes / int(B * sizeof(S)))) : 1;
  constexpr i64 kTile = 64;  // tokens per task (32 to 256 measured alike)
  const i64 rows = n_dst / b;
  // Counting sort of the blocks by dst (stable, so each row adds its blocks in the caller's order).
  std::vector<i64> start(rows + 1, 0), order(nnzb);
  for (i64 k = 0; k < nnzb; k++) start[dst[k] + 1]++;
  for (i64 d = 0; d < rows; d++) start[d + 1] += start[d];
  {
    std::vector<i64> next(start.begin(), start.end() - 1);
    for (i64 k = 0; k < nnzb; k++) order[next[dst[k]]++] = k;
  }
  // Blocks in that order as V^T (vt[p][j][i] = V[order[p]][i][j]), and the x column where each starts.
  auto vt = scratch<S>(nnzb * b * b);
  auto off = scratch<i64>(nnzb);
  const i64 tiles = (n + kTile - 1) / kTile;
#pragma omp parallel num_threads(nthreads)
  {
#pragma omp for schedule(static)
    for (i64 p = 0; p < nnzb; p++) {
      const i64 k = order[p];
      off[p] = src[k] * b;
      for (i64 j = 0; j < b; j++)
        for (i64 i = 0; i < b; i++) vt[(p * b + j) * b + i] = values[k * vs0 + i * vs1 + j * vs2];
    }
    // One task per (tile of tokens, block-row d of y); tiles outermost so a tile of x is reused from cache by
    // every row.
#pragma omp for collapse(2) schedule(dynamic)
    for (i64 tile = 0; tile < tiles; tile++)
      for (i64 d = 0; d < rows; d++) {
        const S* vd = vt.get() + start[d] * b * b;
        const i64* od = off.get() + start[d];
        const i64 nb = start[d + 1] - start[d], t1 = std::min<i64>(n, (tile + 1) * kTile);
        S* yd = y + d * b;
        i64 t = tile * kTile;
        if constexpr (B > 0) {
          for (; t + T <= t1; t += T) spmm_micro<S, B, T>(x + t * n_src, n_src, vd, od, nb, yd + t * n_dst, n_dst);
          for (; t < t1; t++) spmm_micro<S, B, 1>(x + t * n_src, n_src, vd, od, nb, yd + t * n_dst, n_dst);
        } else {
          spmm_any(x + t * n_src, n_src, vd, od, nb, b, yd + t * n_dst, t1 - t, n_dst);
        }
      }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Block-sparse SDDMM: out[k] = g[:, rows[k]*b:+b]^T @ x[:, cols[k]*b:+b], one task per block. A register tile of
// I rows x B columns of out[k] accumulates outer products over the tokens: per token, B contiguous x values and I
// broadcast g values.

template <typename S, int B>
static void sddmm_block(const S* g, i64 ldg, const S* x, i64 ldx, i64 n, S* out, bool add) {
  using V = Simd<S>;
  constexpr int NV = B / V::lanes, I = std::max<int>(1, std::min<int>(B, kAccBytes / int(B * sizeof(S))));
  for (int i0 = 0; i0 < B; i0 += I) {
    typename V::vec acc[I][NV] = {};
    if (add)
#pragma GCC unroll 16
      for (int i = 0; i < I; i++)
#pragma GCC unroll 8
        for (int m = 0; m < NV; m++) acc[i][m] = V::load(out + (i0 + i) * B + m * V::lanes);
    for (i64 t = 0; t < n; t++) {
      const S* gt = g + t * ldg + i0;
      typename V::vec xv[NV];
#pragma GCC unroll 8
      for (int m = 0; m < NV; m++) xv[m] = V::load(x + t * ldx + m * V::lanes);
#pragma GCC unroll 16
      for (int i = 0; i < I; i++) {
        const typename V::vec gv = V::splat(gt[i]);
#pragma GCC unroll 8
        for (int m = 0; m < NV; m++) acc[i][m] += gv * xv[m];
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < I; i++)
#pragma GCC unroll 8
      for (int m = 0; m < NV; m++) V::store(out + (i0 + i) * B + m * V::lanes, acc[i][m]);
  }
}

template <typename S>
static void sddmm_block_any(const S* g, i64 ldg, const S* x, i64 ldx, i64 n, i64 b, S* out, bool add) {
  if (!add) std::fill(out, out + b * b, S(0));
  for (i64 t = 0; t < n; t++)
    for (i64 i = 0; i < b; i++) {
      const S gv = g[t * ldg + i];
#pragma omp simd
      for (i64 j = 0; j < b; j++) out[i * b + j] += gv * x[t * ldx + j];
    }
}

template <typename S, int B>
static void block_sddmm(const S* g, const S* x, i64 n, i64 n_out, i64 n_in, const i64* rows, const i64* cols,
                        i64 nnzb, i64 b, S* out, int nthreads) {
  // Chunks of tokens outermost: a chunk of g and x is reused from cache by all blocks.
  constexpr i64 kChunk = 256;
#pragma omp parallel num_threads(nthreads)
  for (i64 t0 = 0; t0 < std::max<i64>(n, 1); t0 += kChunk) {  // n = 0 still zeroes out
    const i64 nt = std::min(kChunk, n - t0);
#pragma omp for schedule(dynamic)
    for (i64 k = 0; k < nnzb; k++) {
      const S* gk = g + t0 * n_out + rows[k] * b;
      const S* xk = x + t0 * n_in + cols[k] * b;
      if constexpr (B > 0)
        sddmm_block<S, B>(gk, n_out, xk, n_in, nt, out + k * b * b, t0 > 0);
      else
        sddmm_block_any<S>(gk, n_out, xk, n_in, nt, b, out + k * b * b, t0 > 0);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// CSR kernels. Unstructured columns make row-major access a gather, so the team transposes a tile of W tokens to
// feature-major (xt[f][w]); a nonzero then reads one contiguous W-vector, and the tile (features x W) stays in L2
// while all rows use it. Tiles are processed one after another, the rows of each split among the threads.

template <typename S>
constexpr int kTileW = 256 / sizeof(S);  // tokens per tile: four cache lines per feature (measured > two or eight)

// xt[f][w] = a[w][f] for w < nt (a has row stride lda), zero for nt <= w < W. Work-shared: call from a team.
template <typename S, int W>
static void transpose_tile(const S* a, i64 lda, i64 nt, i64 features, S* xt) {
#pragma omp for schedule(static) nowait
  for (i64 f0 = 0; f0 < features; f0 += 64) {
    const i64 f1 = std::min(features, f0 + 64);
    for (i64 w = 0; w < W; w++)
      for (i64 f = f0; f < f1; f++) xt[f * W + w] = w < nt ? a[w * lda + f] : S(0);
  }
}

template <typename S>
static void csr_spmm(const S* x, i64 n, i64 n_in, const i64* crow, const i64* col, const S* val, S* y, i64 n_out,
                     int nthreads) {
  using V = Simd<S>;
  constexpr int W = kTileW<S>, NW = W / V::lanes;
  constexpr i64 R = 16;  // rows per chunk: a chunk's W x R outputs are written to y as W runs of R values
  auto xt = scratch<S>(n_in * W);
#pragma omp parallel num_threads(nthreads)
  for (i64 t0 = 0; t0 < n; t0 += W) {
    const i64 nt = std::min<i64>(W, n - t0);
    transpose_tile<S, W>(x + t0 * n_in, n_in, nt, n_in, xt.get());
#pragma omp barrier
#pragma omp for schedule(dynamic, 4)
    for (i64 o0 = 0; o0 < n_out; o0 += R) {
      const i64 o1 = std::min(n_out, o0 + R);
      S buf[R][W];
      for (i64 o = o0; o < o1; o++) {
        typename V::vec acc[2][NW] = {};  // two sets: independent FMA chains for even and odd nonzeros
        i64 k = crow[o];
        for (; k + 1 < crow[o + 1]; k += 2)
#pragma GCC unroll 2
          for (int h = 0; h < 2; h++) {
            const S* p = xt.get() + col[k + h] * W;
            const typename V::vec v = V::splat(val[k + h]);
#pragma GCC unroll 8
            for (int m = 0; m < NW; m++) acc[h][m] += v * V::load(p + m * V::lanes);
          }
        if (k < crow[o + 1]) {
          const S* p = xt.get() + col[k] * W;
#pragma GCC unroll 8
          for (int m = 0; m < NW; m++) acc[0][m] += V::splat(val[k]) * V::load(p + m * V::lanes);
        }
#pragma GCC unroll 8
        for (int m = 0; m < NW; m++) V::store(buf[o - o0] + m * V::lanes, acc[0][m] + acc[1][m]);
      }
      for (i64 w = 0; w < nt; w++)
        for (i64 o = o0; o < o1; o++) y[(t0 + w) * n_out + o] = buf[o - o0][w];
    }  // implicit barrier: the next tile overwrites xt
  }
}

// vals[k] = sum_t g[t, row(k)] * x[t, col[k]]; vals must be zero on entry (each tile adds its tokens' part).
template <typename S>
static void csr_sddmm(const S* g, const S* x, i64 n, i64 n_out, i64 n_in, const i64* crow, const i64* col,
                      S* vals, int nthreads) {
  using V = Simd<S>;
  constexpr int W = kTileW<S>, NW = W / V::lanes, L = V::lanes;
  auto gt = scratch<S>(n_out * W), xt = scratch<S>(n_in * W);
#pragma omp parallel num_threads(nthreads)
  for (i64 t0 = 0; t0 < n; t0 += W) {
    const i64 nt = std::min<i64>(W, n - t0);
    transpose_tile<S, W>(g + t0 * n_out, n_out, nt, n_out, gt.get());
    transpose_tile<S, W>(x + t0 * n_in, n_in, nt, n_in, xt.get());
#pragma omp barrier
#pragma omp for schedule(dynamic, 16)
    for (i64 o = 0; o < n_out; o++) {
      typename V::vec go[NW], part[L];
#pragma GCC unroll 8
      for (int m = 0; m < NW; m++) go[m] = V::load(gt.get() + o * W + m * L);
      auto dot = [&](i64 k) {  // the tile's W products of nonzero k, as a vector to be summed
        const S* p = xt.get() + col[k] * W;
        typename V::vec s = go[0] * V::load(p);
#pragma GCC unroll 8
        for (int m = 1; m < NW; m++) s += go[m] * V::load(p + m * L);
        return s;
      };
      i64 k = crow[o];
      for (; k + L <= crow[o + 1]; k += L) {  // L nonzeros at a time, summed by one shuffle tree
#pragma GCC unroll 16
        for (int m = 0; m < L; m++) part[m] = dot(k + m);
        V::store(vals + k, V::load(vals + k) + sum_lanes<S>(part));
      }
      for (; k < crow[o + 1]; k++) {
        const typename V::vec s = dot(k);
        for (int m = 0; m < L; m++) vals[k] += s[m];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// C ABI. Block sizes 16, 32 and 64 get compile-time micro-kernels; others take the generic loops.

template <typename S>
static int block_spmm_any(const S* x, i64 n, i64 n_src, const S* values, i64 vs0, i64 vs1, i64 vs2, const i64* dst,
                          const i64* src, i64 nnzb, i64 b, S* y, i64 n_dst, int nthreads) {
  if (out_of_range(dst, nnzb, n_dst / b) || out_of_range(src, nnzb, n_src / b)) return 1;
  switch (b) {
    case 16: block_spmm<S, 16>(x, n, n_src, values, vs0, vs1, vs2, dst, src, nnzb, b, y, n_dst, nthreads); break;
    case 32: block_spmm<S, 32>(x, n, n_src, values, vs0, vs1, vs2, dst, src, nnzb, b, y, n_dst, nthreads); break;
    case 64: block_spmm<S, 64>(x, n, n_src, values, vs0, vs1, vs2, dst, src, nnzb, b, y, n_dst, nthreads); break;
    default: block_spmm<S, 0>(x, n, n_src, values, vs0, vs1, vs2, dst, src, nnzb, b, y, n_dst, nthreads);
  }
  return 0;
}

template <typename S>
static int block_sddmm_any(const S* g, const S* x, i64 n, i64 n_out, i64 n_in, const i64* rows, const i64* cols,
                           i64 nnzb, i64 b, S* out, int nthreads) {
  if (out_of_range(rows, nnzb, n_out / b) || out_of_range(cols, nnzb, n_in / b)) return 1;
  switch (b) {
    case 16: block_sddmm<S, 16>(g, x, n, n_out, n_in, rows, cols, nnzb, b, out, nthreads); break;
    case 32: block_sddmm<S, 32>(g, x, n, n_out, n_in, rows, cols, nnzb, b, out, nthreads); break;
    case 64: block_sddmm<S, 64>(g, x, n, n_out, n_in, rows, cols, nnzb, b, out, nthreads); break;
    default: block_sddmm<S, 0>(g, x, n, n_out, n_in, rows, cols, nnzb, b, out, nthreads);
  }
  return 0;
}

#define SPARSECC_EXPORT(S, sfx)                                                                                      \
  extern "C" int sparsecc_block_spmm_##sfx(const S* x, i64 n, i64 n_src, const S* values, i64 vs0, i64 vs1,          \
                                            i64 vs2, const i64* dst, const i64* src, i64 nnzb, i64 b, S* y,          \
                                            i64 n_dst, int nthreads) {                                               \
    return block_spmm_any<S>(x, n, n_src, values, vs0, vs1, vs2, dst, src, nnzb, b, y, n_dst, nthreads);             \
  }                                                                                                                  \
  extern "C" int sparsecc_block_sddmm_##sfx(const S* g, const S* x, i64 n, i64 n_out, i64 n_in, const i64* rows,     \
                                             const i64* cols, i64 nnzb, i64 b, S* out, int nthreads) {               \
    return block_sddmm_any<S>(g, x, n, n_out, n_in, rows, cols, nnzb, b, out, nthreads);                             \
  }                                                                                                                  \
  extern "C" int sparsecc_csr_spmm_##sfx(const S* x, i64 n, i64 n_in, const i64* crow, const i64* col, i64 nnz,      \
                                          const S* val, S* y, i64 n_out, int nthreads) {                             \
    if (bad_csr(crow, n_out, col, nnz, n_in)) return 1;                                                              \
    csr_spmm<S>(x, n, n_in, crow, col, val, y, n_out, nthreads);                                                     \
    return 0;                                                                                                        \
  }                                                                                                                  \
  extern "C" int sparsecc_csr_sddmm_##sfx(const S* g, const S* x, i64 n, i64 n_out, i64 n_in, const i64* crow,       \
                                           const i64* col, i64 nnz, S* vals, int nthreads) {                         \
    if (bad_csr(crow, n_out, col, nnz, n_in)) return 1;                                                              \
    csr_sddmm<S>(g, x, n, n_out, n_in, crow, col, vals, nthreads);                                                   \
    return 0;                                                                                                        \
  }

SPARSECC_EXPORT(float, f32)
SPARSECC_EXPORT(double, f64)

// ---------------------------------------------------------------------------------------------------------------
// The SwiGLU backward in place (ops/swiglu.py), over n contiguous elements: which 0: out (up) <- g * up * silu'(gate);
// which 1: out (g itself) <- g * silu(gate). float math (double for double) rounded once; bfloat16 is stored as the
// upper half of a float and rounded to nearest even, as torch rounds it.

static inline float widen(float v) { return v; }
static inline double widen(double v) { return v; }
static inline float widen(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
static inline void store(float* p, float v) { *p = v; }
static inline void store(double* p, double v) { *p = v; }
static inline void store(uint16_t* p, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  *p = (u & 0x7fffffffu) > 0x7f800000u ? uint16_t((u >> 16) | 0x40u)          // NaN stays a (quiet) NaN
                                       : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

template <typename S>
static void swiglu_backward(S* out, const S* g, const S* gate, i64 n, int which, int nthreads) {
  using C = decltype(widen(S()));
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (i64 i = 0; i < n; ++i) {
    const C z = widen(gate[i]), o = widen(out[i]);
    const C s = C(1) / (C(1) + std::exp(-z));
    store(out + i, which == 0 ? widen(g[i]) * o * (s * (C(1) + z * (C(1) - s))) : o * (z * s));
  }
}

#define SPARSECC_EXPORT_POINTWISE(S, sfx)                                                                            \
  extern "C" int sparsecc_swiglu_backward_##sfx(S* out, const S* g, const S* gate, i64 n, int which, int nthreads) { \
    swiglu_backward<S>(out, g, gate, n, which, nthreads);                                                            \
    return 0;                                                                                                        \
  }

SPARSECC_EXPORT_POINTWISE(float, f32)
SPARSECC_EXPORT_POINTWISE(double, f64)
SPARSECC_EXPORT_POINTWISE(uint16_t, bf16)
