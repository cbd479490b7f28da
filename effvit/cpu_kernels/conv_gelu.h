// The 3x3 depthwise conv and exact GELU at one pixel, vectorised over channels, GELU's math
// (erf, exp, the normal CDF), and a row of their gradients: shared by the depthwise-conv
// kernels and the fused ConvFFN.
// A conv reads three rows of its input map, given as pointers (nullptr above or below the
// map), so a caller can keep the rows it needs in a ring of its own.
#ifndef EFFVIT_CPU_KERNELS_CONV_GELU_H_
#define EFFVIT_CPU_KERNELS_CONV_GELU_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace effvit {

// 1 / q: a vector division is slow (a fifth of the forward's time on Zen 4); with AVX-512 the
// 14-bit estimate plus one Newton step (relative error ~1e-7) instead.
template <typename V>
inline V Reciprocal(V q) {
#if defined(__AVX512F__)
  if constexpr (!std::is_same_v<V, float>) {
    V r;
    const __m512 e = _mm512_rcp14_ps(Load<__m512>(reinterpret_cast<const float*>(&q)));
    std::memcpy(&r, &e, sizeof r);
    return r * (2.f - q * r);
  }
#endif
  return 1.f / q;
}

// erf as x * P(x^2) / Q(x^2) on [-4, 4] (|error| < 5e-7; erf(4) rounds to 1 in float32).
template <typename V>
inline V Erf(V x) {
  x = x < -4.f ? V{} - 4.f : x;
  x = x > 4.f ? V{} + 4.f : x;
  const V x2 = x * x;
  V p = V{} - 2.72614225801306e-10f;
  for (float a : {2.77068142495902e-08f, -2.10102402082508e-06f, -5.69250639462346e-05f,
                  -7.34990630326855e-04f, -2.95459980854025e-03f, -1.60960333262415e-02f})
    p = p * x2 + a;
  V q = V{} - 1.45660718464996e-05f;
  for (float b : {-2.13374055278905e-04f, -1.68282697438203e-03f, -7.37332916720468e-03f,
                  -1.42647390514189e-02f})
    q = q * x2 + b;
  return x * p * Reciprocal<V>(q);
}

// exp(x) for x <= 0 (|relative error| < 2e-7): 2^n * e^r with r = x - n ln2, |r| <= ln2 / 2.
template <typename V>
inline V ExpNonPositive(V x) {
  if constexpr (std::is_same_v<V, float>) {
    return std::exp(x);
  } else {
    typedef int32_t IVec16 __attribute__((vector_size(64), aligned(4)));
    x = x < -87.f ? V{} - 87.f : x;   // 2^n stays a normal float
    const V shifter = V{} + 12582912.f;   // 1.5 * 2^23: adding it rounds to an integer
    const V n = (x * 1.44269504088896341f + shifter) - shifter;
    const V r = (x - n * 0.693359375f) + n * 2.12194440e-4f;   // ln2 in two parts
    V p = V{} + 1.f / 720;
    for (float a : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = p * r + a;
    const IVec16 bits = (__builtin_convertvector(n, IVec16) + 127) << 23;
    V scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
  }
}

// h = h0 + conv at column s of the row whose neighbourhood is rows[0..2] (rows y - 1, y, y + 1;
// nullptr outside the map), w pixels of c channels each, lanes of V from c0. kv: the 9 taps;
// h0: bias + in_bias * sum of the taps, kb: in_bias * each tap, taken back where a tap falls
// outside the map, whose padding is zero.
template <typename V>
inline V ConvAt(const float* const rows[3], int64_t w, int64_t c, const V kv[9], const V kb[9],
                V h0, int64_t s, int64_t c0) {
  V h = h0;
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) {
      const int64_t sx = s + j - 1;
      if (rows[i] != nullptr && sx >= 0 && sx < w)
        h += Load<V>(rows[i] + sx * c + c0) * kv[i * 3 + j];
      else
        h -= kb[i * 3 + j];
    }
  }
  return h;
}

// ConvAt for a pixel whose 9 taps all fall inside the map: no bounds checks (~8% of the
// forward's time).
template <typename V>
inline V ConvInside(const float* const rows[3], int64_t c, const V kv[9], V h0, int64_t s,
                    int64_t c0) {
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) h0 += Load<V>(rows[i] + (s + j - 1) * c + c0) * kv[i * 3 + j];
  return h0;
}

// Phi(h), the standard normal CDF: GELU(h) = h * Phi(h).
template <typename V>
inline V Cdf(V h) {
  return 0.5f * (1.f + Erf<V>(h * 0.70710678118654752f));
}

// The row of y = gelu(h) whose input neighbourhood is rows[0..2] (w pixels, c channels) into
// out_row; in_bias is fc1's bias (added to x inside the map; zeros without one) and h0 = bias +
// in_bias * (sum of the taps) per channel. Pixel by pixel, every channel of a pixel before the
// next: rows are often whole pages long (56 x 256 floats) and XLA places x and y at the same
// offset within a page, so sweeping one channel block along the row (as the gradient does into
// its ring) loaded x right behind stores to y at the same page offset, which the CPU must check
// against each other (4K aliasing). pvt_v2_b0's ConvFFN alone (32 x 56 x 56, 256 hidden): 43 ->
// 39 and 46 -> 38 ms; pvt_v2_b2's forward at batch 8: 468 -> 438 and 485 -> 462 ms
// (alternating processes). Unaliased, the two orders are even.
inline void GeluForwardRow(const float* const rows[3], int64_t w, int64_t c,
                           const float* __restrict k, const float* __restrict h0,
                           const float* __restrict in_bias, float* __restrict out_row) {
  const bool rows_inside = rows[0] != nullptr && rows[2] != nullptr;
  for (int64_t s = 0; s < w; ++s) {
    const bool inside = rows_inside && s >= 1 && s + 1 < w;
    ForChannelBlocks(c, [&](auto lane, int64_t c0) {
      using V = decltype(lane);
      V kv[9], kb[9];
      for (int t = 0; t < 9; ++t) kv[t] = Load<V>(k + t * c + c0);
      V h;
      if (inside) {
        h = ConvInside<V>(rows, c, kv, Load<V>(h0 + c0), s, c0);
      } else {
        const V ib = Load<V>(in_bias + c0);
        for (int t = 0; t < 9; ++t) kb[t] = ib * kv[t];
        h = ConvAt<V>(rows, w, c, kv, kb, Load<V>(h0 + c0), s, c0);
      }
      Store<V>(out_row + s * c + c0, h * Cdf<V>(h));
    });
  }
}

// dx of one row of the conv's gradient and that row's terms of dk (added to acc, 9 x c; with
// kBias also db, acc's row 9), for the lanes of V (16 channels, or 1 for the channel tail)
// from channel c0: xr[0..2] are the conv input's rows around it, g[0..2] the output
// gradient's (nullptr outside the map), w pixels of c channels each (the equations are in
// depthwise_conv3x3.cc).
template <typename V, bool kBias>
void ConvGradRowBlock(int64_t w, int64_t c, const float* const xr[3], const float* const g[3],
                      const float* __restrict k, float* __restrict dx_row,
                      float* __restrict acc, int64_t c0) {
  V kv[9], sum[9];
  for (int t = 0; t < 9; ++t) {
    kv[t] = Load<V>(k + t * c + c0);
    sum[t] = Load<V>(acc + t * c + c0);
  }
  V db{};
  const bool rows_inside = xr[0] != nullptr && xr[2] != nullptr;
  for (int64_t s = 0; s < w; ++s) {
    const V go = Load<V>(g[1] + s * c + c0);
    V d{};
    if (rows_inside && s >= 1 && s + 1 < w) {   // all taps inside the map: no bounds checks
      for (int i = 0; i < 3; ++i) {
        const float* gs = g[2 - i] + (s + 1) * c + c0;   // row y - i + 1, column s + 1
        const float* xs = xr[i] + (s - 1) * c + c0;      // row y + i - 1, column s - 1
        for (int j = 0; j < 3; ++j) {
          d += Load<V>(gs - j * c) * kv[i * 3 + j];
          sum[i * 3 + j] += go * Load<V>(xs + j * c);
        }
      }
    } else {
      for (int i = 0; i < 3; ++i) {
        const float *gr = g[2 - i], *xrow = xr[i];
        for (int j = 0; j < 3; ++j) {
          const int64_t sg = s - j + 1, sx = s + j - 1;
          if (gr != nullptr && sg >= 0 && sg < w) d += Load<V>(gr + sg * c + c0) * kv[i * 3 + j];
          if (xrow != nullptr && sx >= 0 && sx < w)
            sum[i * 3 + j] += go * Load<V>(xrow + sx * c + c0);
        }
      }
    }
    if (kBias) db += go;
    Store<V>(dx_row + s * c + c0, d);
  }
  for (int t = 0; t < 9; ++t) Store<V>(acc + t * c + c0, sum[t]);
  if (kBias) Store<V>(acc + 9 * c + c0, Load<V>(acc + 9 * c + c0) + db);
}

// One row of g = gy * gelu'(h), h = bias + conv of the rows xr[0..2] (nullptr outside the
// map), into out_row (which may be gy_row itself), channels [c0, c0 + lanes); with u_row also
// u = gelu(h) there.
template <typename V>
void GeluGradRowBlock(int64_t w, int64_t c, const float* const xr[3], const float* __restrict k,
                      const float* __restrict bias, const float* gy_row, float* out_row,
                      float* __restrict u_row, int64_t c0) {
  V kv[9], kb[9];
  for (int t = 0; t < 9; ++t) {
    kv[t] = Load<V>(k + t * c + c0);
    kb[t] = V{};
  }
  const V h0 = Load<V>(bias + c0);
  const bool rows_inside = xr[0] != nullptr && xr[2] != nullptr;
  for (int64_t s = 0; s < w; ++s) {
    const V h = rows_inside && s >= 1 && s + 1 < w ? ConvInside<V>(xr, c, kv, h0, s, c0)
                                                   : ConvAt<V>(xr, w, c, kv, kb, h0, s, c0);
    const V pdf = ExpNonPositive<V>(-0.5f * h * h) * 0.39894228040143268f;
    const V cdf = Cdf<V>(h);
    Store<V>(out_row + s * c + c0, Load<V>(gy_row + s * c + c0) * (cdf + h * pdf));
    if (u_row != nullptr) Store<V>(u_row + s * c + c0, h * cdf);
  }
}

// How the fused ConvFFN's forward and gradient split a batch of height x width maps. Rows go
// in groups of at least kGroupPixels pixels (one row at 56 wide, all 7 rows at 7): each group
// of h is one matmul, and so is each of y, whose rows are too short alone to keep the tiles
// busy and read the weights once per row. At least 8 tasks for the threads to balance, in
// bands of whole groups of an image.
struct RowGroups {
  static constexpr int64_t kGroupPixels = 64;
  int64_t group, groups, bands;
  RowGroups(int64_t batch, int64_t height, int64_t width)
      : group(std::clamp<int64_t>(kGroupPixels / width, 1, height)),
        groups((height + group - 1) / group),
        bands(std::clamp<int64_t>((8 + batch - 1) / batch, 1, groups)) {}
};

}  // namespace effvit

#endif  // EFFVIT_CPU_KERNELS_CONV_GELU_H_
