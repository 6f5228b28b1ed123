// The cpu backend's float32 GEMM for expert segments (AVX-512), built and loaded by `native.py`.
//
//   C[i, 0:N] = epilogue(sum_k A[i, k] * W[n, k]),  i < M
//
// W [N, K] is packed once into panels of 64 output columns, P[p][k][0:64] = W[64p + j, k],
// zero-padded to whole panels. A 6-row x 64-column register tile (24 accumulators) runs over a
// K chunk of at most 768 while that panel chunk and the rows of A stay in L2. Rows of A and C
// are reached through optional row-index arrays: an MoE layer's dispatch gather and top-1 combine
// scatter cost nothing extra. The epilogue adds a bias, applies relu, scales each row.
//
// Why not oneDNN: an expert sees few rows (2048 tokens over 32 experts: 64), so a GEMM reads each
// weight from memory once and uses it 64 times; oneDNN stalls on memory at every new panel and
// runs such shapes at about 0.85 of its speed on 2048 rows. Here, while a panel chunk is being
// multiplied, each row tile prefetches its share of the next one (then of `next`, the weight the
// caller multiplies next), so the stream from memory overlaps the arithmetic.

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include <atomic>

namespace {

constexpr int NR = 64;   // columns per panel: four 16-float vectors
constexpr int MR = 6;    // rows per register tile (at most; rows are split into tiles of MR or MR - 1)
constexpr int KC = 768;  // K chunk
constexpr int MC = 512;  // most rows per pass over the panels (M is split evenly into passes)

struct Tile {
  const float* a[MR];  // row pointers of A at the chunk's first k
  float* c[MR];        // row pointers of C at the panel's first column
  const float* scale;  // the tile's row scales, or null
};

template <int R>
void tile(const Tile& t, int kc, const float* __restrict b, bool accumulate, bool last, const __mmask16* mask,
          const float* bias, bool relu, const float* pf) {
  __m512 acc[R][4];
  const float* a[R];
  for (int r = 0; r < R; ++r) a[r] = t.a[r];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j)
      acc[r][j] = accumulate ? _mm512_maskz_loadu_ps(mask[j], t.c[r] + 16 * j) : _mm512_setzero_ps();
  int k = 0;
  for (; k + 1 < kc; k += 2) {
    _mm_prefetch(reinterpret_cast<const char*>(pf + k * 8), _MM_HINT_T0);  // one line per two k steps
#pragma GCC unroll 2
    for (int u = 0; u < 2; ++u) {
      const float* bk = b + (k + u) * NR;
      const __m512 b0 = _mm512_load_ps(bk), b1 = _mm512_load_ps(bk + 16);
      const __m512 b2 = _mm512_load_ps(bk + 32), b3 = _mm512_load_ps(bk + 48);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512 av = _mm512_set1_ps(a[r][k + u]);
        acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
        acc[r][2] = _mm512_fmadd_ps(av, b2, acc[r][2]);
        acc[r][3] = _mm512_fmadd_ps(av, b3, acc[r][3]);
      }
    }
  }
  if (k < kc) {
    const float* bk = b + k * NR;
    const __m512 b0 = _mm512_load_ps(bk), b1 = _mm512_load_ps(bk + 16);
    const __m512 b2 = _mm512_load_ps(bk + 32), b3 = _mm512_load_ps(bk + 48);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a[r][k]);
      acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(av, b2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(av, b3, acc[r][3]);
    }
  }
  if (last) {
    if (bias)
      for (int j = 0; j < 4; ++j) {
        const __m512 bv = _mm512_maskz_loadu_ps(mask[j], bias + 16 * j);
        for (int r = 0; r < R; ++r) acc[r][j] = _mm512_add_ps(acc[r][j], bv);
      }
    if (relu)
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_max_ps(acc[r][j], _mm512_setzero_ps());
    if (t.scale)
      for (int r = 0; r < R; ++r) {
        const __m512 s = _mm512_set1_ps(t.scale[r]);
        for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_mul_ps(acc[r][j], s);
      }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) _mm512_mask_storeu_ps(t.c[r] + 16 * j, mask[j], acc[r][j]);
}

using TileFn = void (*)(const Tile&, int, const float*, bool, bool, const __mmask16*, const float*, bool, const float*);
constexpr TileFn TILES[MR + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>};

}  // namespace

extern "C" {

// Bumped whenever the signature below changes; `native.py` checks it.
int sparsify_moe_gemm_abi() { return 2; }

// A: row i at A + (a_rows ? a_rows[i] : i) * lda, K floats. P: the first panel of W's packing to
// use, at the first k to use; consecutive panels `panel_stride` floats apart (0: K * 64). C: row
// i at C + (c_rows ? c_rows[i] : i) * ldc, N floats written. bias [N], scale [M]: or null.
// next: what the caller multiplies next (prefetched at the end; null: nothing).
void sparsify_moe_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const int64_t* a_rows,
                       const float* P, int64_t panel_stride, float* C, int64_t ldc, const int64_t* c_rows,
                       const float* bias, int relu, const float* scale, const float* next) {
  if (M <= 0 || N <= 0) return;
  if (panel_stride == 0) panel_stride = K * NR;
  const int64_t panels = (N + NR - 1) / NR;
  const int64_t chunks = K > 0 ? (K + KC - 1) / KC : 1;
  const float* arow[MC];
  float* crow[MC];
  const int64_t passes = (M + MC - 1) / MC;
  for (int64_t pass = 0; pass < passes; ++pass) {
    const int64_t m0 = M * pass / passes;
    const int rows = static_cast<int>(M * (pass + 1) / passes - m0);
    for (int r = 0; r < rows; ++r) {
      const int64_t i = m0 + r;
      arow[r] = A + (a_rows ? a_rows[i] : i) * lda;
      crow[r] = C + (c_rows ? c_rows[i] : i) * ldc;
    }
    const int tiles = (rows + MR - 1) / MR;
    for (int64_t kb = 0; kb < chunks; ++kb) {
      const int64_t k0 = K * kb / chunks, k1 = K * (kb + 1) / chunks;
      const int kc = static_cast<int>(k1 - k0);
      const bool last = kb == chunks - 1;
      for (int64_t p = 0; p < panels; ++p) {
        const float* b = P + p * panel_stride + k0 * NR;
        // prefetched meanwhile: this chunk of the next panel, else the next chunk's first
        // panel, else the next pass's (more rows), else `next`
        const float* nx = p + 1 < panels ? b + panel_stride
                          : !last        ? P + k1 * NR
                          : pass + 1 < passes ? P
                          : next         ? next
                                         : b;
        const int64_t span = static_cast<int64_t>(kc) * NR;
        const int64_t valid = N - p * NR;
        __mmask16 mask[4];
        for (int j = 0; j < 4; ++j) {
          const int64_t v = valid - 16 * j;
          mask[j] = v >= 16 ? static_cast<__mmask16>(0xFFFF) : v <= 0 ? 0 : static_cast<__mmask16>((1u << v) - 1);
        }
        for (int i = 0; i < tiles; ++i) {
          const int r0 = rows * i / tiles, r1 = rows * (i + 1) / tiles;
          Tile t;
          for (int r = r0; r < r1; ++r) {
            t.a[r - r0] = arow[r] + k0;
            t.c[r - r0] = crow[r] + p * NR;
          }
          t.scale = scale ? scale + m0 + r0 : nullptr;
          // tile i prefetches lines [i, i + 1) * kc / 2 of the next panel chunk (past its end: from the start)
          const int64_t off = static_cast<int64_t>(i) * (kc / 2) * 16;
          TILES[r1 - r0](t, kc, b, kb > 0, last, mask, bias ? bias + p * NR : nullptr, relu != 0,
                         nx + (off < span ? off : 0));
        }
      }
    }
  }
}

// fn(q) for every q < n, handed out one at a time to `threads` threads of the caller's OpenMP
// team: the threads torch's own parallel regions run on, which after the caller's last op are
// still spinning, waiting for work. A separate thread pool would compete with them for the cores
// for the milliseconds they spin; this gives them the work. Serial inside a parallel region.
// `fn` is a Python callback: the four CPython functions passed in make each worker thread a
// Python thread once for the whole loop (not once per call), with the GIL released.
typedef int (*GilEnsure)();
typedef void (*GilRelease)(int);
typedef void* (*SaveThread)();
typedef void (*RestoreThread)(void*);

void sparsify_parallel_for(int64_t n, int threads, void (*fn)(int64_t), GilEnsure ensure, GilRelease release,
                           SaveThread save, RestoreThread restore) {
  if (threads <= 1 || n <= 1 || omp_in_parallel()) {
    for (int64_t q = 0; q < n; ++q) fn(q);
    return;
  }
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(threads)
  {
    const bool worker = omp_get_thread_num() != 0;  // thread 0 is the caller, a Python thread already
    int gil = 0;
    void* state = nullptr;
    if (worker) {
      gil = ensure();
      state = save();
    }
    for (int64_t q; (q = next.fetch_add(1, std::memory_order_relaxed)) < n;) fn(q);
    if (worker) {
      restore(state);
      release(gil);
    }
  }
}

// dst row rows[i] += src row i (N floats each), i < M: the last of an expert's column parts adds
// the others' outputs into the rows the first one wrote.
void sparsify_add_rows(int64_t M, int64_t N, const float* src, int64_t lds, float* dst, int64_t ldd,
                       const int64_t* rows) {
  for (int64_t i = 0; i < M; ++i) {
    const float* s = src + i * lds;
    float* d = dst + (rows ? rows[i] : i) * ldd;
    int64_t n = 0;
    for (; n + 16 <= N; n += 16) _mm512_storeu_ps(d + n, _mm512_add_ps(_mm512_loadu_ps(d + n), _mm512_loadu_ps(s + n)));
    if (n < N) {
      const __mmask16 m = static_cast<__mmask16>((1u << (N - n)) - 1);
      _mm512_mask_storeu_ps(d + n, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, d + n), _mm512_maskz_loadu_ps(m, s + n)));
    }
  }
}

}  // extern "C"
