// Register-tiled float32 matmuls on small row-major blocks, shared by the dense-gradient kernels
// (out += x^T g over many rows) and the fused ConvFFN (out = bias + a b, one image row at a
// time): the left operand is read through an accessor, so both run the same tiles.
//
//   out[i, f] = init[i, f] + sum_{p < depth} a(p, i) b[p, f]
//
// A tile keeps MR x NV vectors of 16 outputs in registers (24: enough to hide the FMA latency)
// and, per p, loads NV vectors of b's row p and broadcasts MR scalars of a.
#ifndef EFFVIT_CPU_KERNELS_MATMUL_TILES_H_
#define EFFVIT_CPU_KERNELS_MATMUL_TILES_H_

#include <algorithm>
#include <cstdint>

#include "common.h"

namespace effvit {

// a(p, i) = x[p, i] of a row-major x with row stride ld: the left operand transposed, as in
// the dense gradient x^T g, which contracts x's rows.
struct Transposed {
  const float* x;
  int64_t ld;
  float operator()(int64_t p, int i) const { return x[p * ld + i]; }
  Transposed From(int64_t i) const { return {x + i, ld}; }
};

// a(p, i) = a[i, p] of a row-major a with row stride ld: the plain product a b.
struct Plain {
  const float* a;
  int64_t ld;
  float operator()(int64_t p, int i) const { return a[i * ld + p]; }
  Plain From(int64_t i) const { return {a + i * ld, ld}; }
};

// out[i, 16 j + l] = init[i ldi + 16 j + l] + sum_p a(p, i) b[p ldb + 16 j + l], i < MR, j < NV.
template <int MR, int NV, typename A>
__attribute__((optimize("fp-contract=fast")))
void Tile(A a, const float* b, int64_t ldb, int64_t depth, const float* init, int64_t ldi,
          float* out, int64_t ldo) {
  Vec16 acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = Load<Vec16>(init + i * ldi + 16 * j);
  for (int64_t p = 0; p < depth; ++p) {
    const float* br = b + p * ldb;
    Vec16 bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = Load<Vec16>(br + 16 * j);
    for (int i = 0; i < MR; ++i) {
      const float av = a(p, i);
      for (int j = 0; j < NV; ++j) acc[i][j] += av * bv[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) Store<Vec16>(out + i * ldo + 16 * j, acc[i][j]);
}

// Tile<m, NV> for m = mr <= MR, picked at run time (the last tile of a block has fewer rows).
template <int MR, int NV, typename A>
void TileRows(int64_t mr, A a, const float* b, int64_t ldb, int64_t depth, const float* init,
              int64_t ldi, float* out, int64_t ldo) {
  if constexpr (MR > 1)
    if (mr < MR) return TileRows<MR - 1, NV>(mr, a, b, ldb, depth, init, ldi, out, ldo);
  Tile<MR, NV>(a, b, ldb, depth, init, ldi, out, ldo);
}

// Columns [f0, f0 + 16 NV) of out (rows i < m, n columns, as b and init), in tiles of
// 24 / NV rows.
template <int NV, typename A>
void Columns(A a, const float* b, int64_t n, int64_t f0, int64_t depth, int64_t m,
             const float* init, int64_t ldi, float* out) {
  constexpr int MR = 24 / NV;
  for (int64_t i = 0; i < m; i += MR)
    TileRows<MR, NV>(std::min<int64_t>(MR, m - i), a.From(i), b + f0, n, depth,
                     init + i * ldi + f0, ldi, out + i * n + f0, n);
}

// out[i, f] = init[i ldi + f] + sum_{p < depth} a(p, i) b[p n + f] for i < m, f < n; out and
// b have n columns, init's rows are ldi apart (ldi = 0: one row for every i, a bias).
template <typename A>
void MatmulTiles(A a, const float* b, int64_t n, int64_t depth, int64_t m, const float* init,
                 int64_t ldi, float* out) {
  int64_t f = 0;
  for (; f + 64 <= n; f += 64) Columns<4>(a, b, n, f, depth, m, init, ldi, out);
  for (; f + 32 <= n; f += 32) Columns<2>(a, b, n, f, depth, m, init, ldi, out);
  for (; f + 16 <= n; f += 16) Columns<1>(a, b, n, f, depth, m, init, ldi, out);
  for (; f < n; ++f)   // n not a multiple of 16 (a classifier's 1000 classes)
    for (int64_t i = 0; i < m; ++i) {
      float s = init[i * ldi + f];
      for (int64_t p = 0; p < depth; ++p) s += a(p, i) * b[p * n + f];
      out[i * n + f] = s;
    }
}

}  // namespace effvit

#endif  // EFFVIT_CPU_KERNELS_MATMUL_TILES_H_
