// A 3x3, stride-1, zero-padded depthwise conv of an NHWC float32 map: PVTv2's ConvFFN.
//
// Forward, fused with the bias and the exact GELU that follow it in the ConvFFN (and, in
// inference, the bias of the fc1 before it, in_bias, added to x inside the zero padding):
//   h[b, r, s, c] = bias[c] + sum_{i,j in 0..2} x'[b, r + i - 1, s + j - 1, c] * k[i, j, c]
//   x' = x + in_bias inside the map, 0 outside
//   y = h / 2 * (1 + erf(h / sqrt(2)))
// Gradient of the conv alone, given g = dL/dh:
//   dx[b, r, s, c] = sum_{i,j} g[b, r - i + 1, s - j + 1, c] * k[i, j, c]
//   dk[i, j, c]    = sum_{b,r,s} g[b, r, s, c] * x[b, r + i - 1, s + j - 1, c]
// (terms outside the map are zero). Gradient of the fused op, given gy = dL/dy: h again, then
//   g = gy * gelu'(h),  gelu'(h) = (1 + erf(h / sqrt(2))) / 2 + h * exp(-h^2 / 2) / sqrt(2 pi)
//   db[c] = sum_{b,r,s} g[b, r, s, c], and dx, dk from g as above.
// XLA:CPU pads x in a pass of its own before the forward, computes dk as nine reductions,
// each a full pass over x and g, and dx as a tenth pass; under the fused op's gradient it
// also recomputes h and writes g in passes of their own. Here the forward reads x once and
// writes y; the gradient reads x and g (or gy) once and writes dx, keeping g's rows in cache.
//
// Work: one image row at a time; the gradients go 16 channels at a time along the row, the 9
// taps of k (and of dk's running sums) in vector registers; the forward goes pixel by pixel
// (see GeluForwardRow). Rows are split into a fixed number of chunks
// shared by the XLA intra-op threads; each chunk sums into its own dk (and db) partial and the
// partials are added in chunk order, so results do not depend on the thread count or
// scheduling.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

using namespace effvit;

struct Map {
  int64_t b, h, w, c;
};

// dx of image row `y` and that row's terms of dk (added to acc, 9 x C; with kBias also db,
// acc's row 9), for the lanes of V (16 channels, or 1 for the channel tail) from channel c0.
// xb: this image of x; g[0], g[1], g[2]: rows y - 1, y, y + 1 of g (nullptr outside the map).
template <typename V, bool kBias>
void RowBlock(const Map& m, const float* __restrict xb, const float* const g[3],
              const float* __restrict k, float* __restrict dx_row, float* __restrict acc,
              int64_t y, int64_t c0) {
  const int64_t c = m.c, w = m.w;
  V kv[9], sum[9];
  for (int t = 0; t < 9; ++t) {
    kv[t] = Load<V>(k + t * c + c0);
    sum[t] = Load<V>(acc + t * c + c0);
  }
  V db{};
  for (int64_t s = 0; s < w; ++s) {
    const V go = Load<V>(g[1] + s * c + c0);
    V d{};
    for (int i = 0; i < 3; ++i) {
      const float* gr = g[2 - i];   // row y - i + 1
      const int64_t rx = y + i - 1;
      for (int j = 0; j < 3; ++j) {
        const int64_t sg = s - j + 1, sx = s + j - 1;
        if (gr != nullptr && sg >= 0 && sg < w) d += Load<V>(gr + sg * c + c0) * kv[i * 3 + j];
        if (rx >= 0 && rx < m.h && sx >= 0 && sx < w)
          sum[i * 3 + j] += go * Load<V>(xb + (rx * w + sx) * c + c0);
      }
    }
    if (kBias) db += go;
    Store<V>(dx_row + s * c + c0, d);
  }
  for (int t = 0; t < 9; ++t) Store<V>(acc + t * c + c0, sum[t]);
  if (kBias) Store<V>(acc + 9 * c + c0, Load<V>(acc + 9 * c + c0) + db);
}

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

// h = bias + conv(x + in_bias) at image row y, column s, lanes of V from c0 (kv: the 9 taps;
// h0: bias + in_bias * sum of the taps, kb: in_bias * each tap, taken back where a tap falls
// outside the map, whose padding is zero).
template <typename V>
inline V ConvAt(const Map& m, const float* __restrict xb, const V kv[9], const V kb[9], V h0,
                int64_t y, int64_t s, int64_t c0) {
  V h = h0;
  for (int i = 0; i < 3; ++i) {
    const int64_t r = y + i - 1;
    for (int j = 0; j < 3; ++j) {
      const int64_t sx = s + j - 1;
      if (r >= 0 && r < m.h && sx >= 0 && sx < m.w)
        h += Load<V>(xb + (r * m.w + sx) * m.c + c0) * kv[i * 3 + j];
      else
        h -= kb[i * 3 + j];
    }
  }
  return h;
}

// ConvAt for a pixel whose 9 taps all fall inside the map: no bounds checks (~8% of the
// forward's time).
template <typename V>
inline V ConvInside(const Map& m, const float* __restrict xb, const V kv[9], V h0, int64_t y,
                    int64_t s, int64_t c0) {
  const float* p = xb + ((y - 1) * m.w + s - 1) * m.c + c0;
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) h0 += Load<V>(p + (i * m.w + j) * m.c) * kv[i * 3 + j];
  return h0;
}

// Phi(h), the standard normal CDF: GELU(h) = h * Phi(h).
template <typename V>
inline V Cdf(V h) {
  return 0.5f * (1.f + Erf<V>(h * 0.70710678118654752f));
}

// Image row y of g = gy * gelu'(h) (gy_row the row of gy) into out_row (the gradient's ring),
// channels [c0, c0 + lanes): one channel block along the row, its taps in registers.
template <typename V>
void GeluGradRowBlock(const Map& m, const float* __restrict xb, const float* __restrict k,
                      const float* __restrict bias, const float* __restrict gy_row,
                      float* __restrict out_row, int64_t y, int64_t c0) {
  const int64_t c = m.c;
  V kv[9], kb[9];
  for (int t = 0; t < 9; ++t) {
    kv[t] = Load<V>(k + t * c + c0);
    kb[t] = V{};
  }
  const V h0 = Load<V>(bias + c0);
  const bool row_inside = y >= 1 && y + 1 < m.h;
  for (int64_t s = 0; s < m.w; ++s) {
    const V h = row_inside && s >= 1 && s + 1 < m.w ? ConvInside<V>(m, xb, kv, h0, y, s, c0)
                                                    : ConvAt<V>(m, xb, kv, kb, h0, y, s, c0);
    const V pdf = ExpNonPositive<V>(-0.5f * h * h) * 0.39894228040143268f;
    Store<V>(out_row + s * c + c0, Load<V>(gy_row + s * c + c0) * (Cdf<V>(h) + h * pdf));
  }
}

// Image row y of y = gelu(h) into out_row; in_bias is fc1's bias (added to x inside the map;
// zeros without one) and h0 = bias + in_bias * (sum of the taps) per channel. Pixel by pixel,
// every channel of a pixel before the next: rows are often whole pages long (56 x 256 floats) and
// XLA places x and y at the same offset within a page, so sweeping one channel block along
// the row (as the gradient does into its ring) loaded x right behind stores to y at the same
// page offset, which the CPU must check against each other (4K aliasing). pvt_v2_b0's ConvFFN
// alone (32 x 56 x 56, 256 hidden): 43 -> 39 and 46 -> 38 ms; pvt_v2_b2's forward at batch 8:
// 468 -> 438 and 485 -> 462 ms (alternating processes). Unaliased, the two orders are even.
void GeluForwardRow(const Map& m, const float* __restrict xb, const float* __restrict k,
                    const float* __restrict h0, const float* __restrict in_bias,
                    float* __restrict out_row, int64_t y) {
  const int64_t c = m.c;
  const bool row_inside = y >= 1 && y + 1 < m.h;
  for (int64_t s = 0; s < m.w; ++s) {
    const bool inside = row_inside && s >= 1 && s + 1 < m.w;
    ForChannelBlocks(c, [&](auto lane, int64_t c0) {
      using V = decltype(lane);
      V kv[9], kb[9];
      for (int t = 0; t < 9; ++t) kv[t] = Load<V>(k + t * c + c0);
      V h;
      if (inside) {
        h = ConvInside<V>(m, xb, kv, Load<V>(h0 + c0), y, s, c0);
      } else {
        const V ib = Load<V>(in_bias + c0);
        for (int t = 0; t < 9; ++t) kb[t] = ib * kv[t];
        h = ConvAt<V>(m, xb, kv, kb, Load<V>(h0 + c0), y, s, c0);
      }
      Store<V>(out_row + s * c + c0, h * Cdf<V>(h));
    });
  }
}


bool IsMap(ffi::Span<const int64_t> d) { return d.size() == 4; }

bool IsKernel(ffi::Span<const int64_t> k, int64_t c) {
  return k.size() == 3 && k[0] == 3 && k[1] == 3 && k[2] == c;
}


}  // namespace

static ffi::Error DepthwiseConv3x3BiasGelu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                           ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> bias,
                                           ffi::Buffer<ffi::F32> in_bias,
                                           ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  if (!IsMap(xd) || !IsKernel(k.dimensions(), xd[3]) || !IsVector(bias.dimensions(), xd[3])
      || !IsVector(in_bias.dimensions(), xd[3]))
    return ffi::Error::InvalidArgument(
        "effvit depthwise_conv3x3 forward: expected x (B, H, W, C), kernel (3, 3, C), bias and "
        "in_bias (C,)");
  const Map m{xd[0], xd[1], xd[2], xd[3]};
  const int64_t rows = m.b * m.h, image = m.h * m.w * m.c;
  const float *xp = x.typed_data(), *kp = k.typed_data(), *bp = bias.typed_data();
  const float* ip = in_bias.typed_data();
  float* yp = y->typed_data();
  std::vector<float> start(bp, bp + m.c);   // h0 = bias + in_bias * (sum of the taps)
  for (int t = 0; t < 9; ++t)
    for (int64_t ch = 0; ch < m.c; ++ch) start[ch] += ip[ch] * kp[t * m.c + ch];
  const float* h0 = start.data();
  ParallelFor(pool, rows, [=](int64_t row) {
    GeluForwardRow(m, xp + row / m.h * image, kp, h0, ip, yp + row * m.w * m.c, row % m.h);
  });
  return ffi::Error::Success();
}

static ffi::Error DepthwiseConv3x3Bwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                      ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> g,
                                      ffi::ResultBuffer<ffi::F32> dx,
                                      ffi::ResultBuffer<ffi::F32> dk) {
  const auto xd = x.dimensions(), gd = g.dimensions();
  if (!IsMap(xd) || !IsKernel(k.dimensions(), xd[3]) || !IsMap(gd) ||
      !std::equal(xd.begin(), xd.end(), gd.begin()))
    return ffi::Error::InvalidArgument(
        "effvit depthwise_conv3x3 gradient: expected x and g (B, H, W, C), kernel (3, 3, C)");
  const Map m{xd[0], xd[1], xd[2], xd[3]};
  const int64_t rows = m.b * m.h, taps = 9 * m.c, image = m.h * m.w * m.c, row_size = m.w * m.c;
  const float *xp = x.typed_data(), *kp = k.typed_data(), *gp = g.typed_data();
  float* dxp = dx->typed_data();
  SumOverRowChunks(pool, rows, taps, dk->typed_data(), [=](int64_t begin, int64_t end,
                                                           float* acc) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t y = row % m.h;
      const float* gr[3] = {y > 0 ? gp + (row - 1) * row_size : nullptr, gp + row * row_size,
                            y + 1 < m.h ? gp + (row + 1) * row_size : nullptr};
      ForChannelBlocks(m.c, [&](auto lane, int64_t c0) {
        RowBlock<decltype(lane), false>(m, xp + row / m.h * image, gr, kp,
                                        dxp + row * row_size, acc, y, c0);
      });
    }
  });
  return ffi::Error::Success();
}

static ffi::Error DepthwiseConv3x3BiasGeluBwd(
    ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
    ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> gy, ffi::ResultBuffer<ffi::F32> dx,
    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> db) {
  const auto xd = x.dimensions(), gd = gy.dimensions();
  if (!IsMap(xd) || !IsKernel(k.dimensions(), xd[3]) || !IsVector(bias.dimensions(), xd[3]) ||
      !IsMap(gd) || !std::equal(xd.begin(), xd.end(), gd.begin()))
    return ffi::Error::InvalidArgument(
        "effvit depthwise_conv3x3 bias-GELU gradient: expected x and gy (B, H, W, C), kernel "
        "(3, 3, C), bias (C,)");
  const Map m{xd[0], xd[1], xd[2], xd[3]};
  const int64_t rows = m.b * m.h, sums = 10 * m.c, image = m.h * m.w * m.c, row_size = m.w * m.c;
  const float *xp = x.typed_data(), *kp = k.typed_data(), *bp = bias.typed_data();
  const float* gyp = gy.typed_data();
  float* dxp = dx->typed_data();
  std::vector<float> total(sums);   // dk (9 x C), then db
  SumOverRowChunks(pool, rows, sums, total.data(), [=](int64_t begin, int64_t end, float* acc) {
    // g's rows, computed once each (the rows next to a chunk twice): row r in slot r % 3.
    std::vector<float> ring(3 * row_size);
    auto slot = [&](int64_t r) { return ring.data() + r % 3 * row_size; };
    int64_t ready = -1;   // rows below this one are in the ring, as far back as row - 1
    for (int64_t row = begin; row < end; ++row) {
      const int64_t y = row % m.h;
      const int64_t first = y > 0 ? row - 1 : row, last = y + 1 < m.h ? row + 1 : row;
      for (int64_t r = std::max(first, ready); r <= last; ++r) {
        ForChannelBlocks(m.c, [&](auto lane, int64_t c0) {
          GeluGradRowBlock<decltype(lane)>(m, xp + r / m.h * image, kp, bp, gyp + r * row_size,
                                           slot(r), r % m.h, c0);
        });
      }
      ready = last + 1;
      const float* gr[3] = {y > 0 ? slot(row - 1) : nullptr, slot(row),
                            y + 1 < m.h ? slot(row + 1) : nullptr};
      ForChannelBlocks(m.c, [&](auto lane, int64_t c0) {
        RowBlock<decltype(lane), true>(m, xp + row / m.h * image, gr, kp,
                                       dxp + row * row_size, acc, y, c0);
      });
    }
  });
  std::copy(total.begin(), total.begin() + 9 * m.c, dk->typed_data());
  std::copy(total.begin() + 9 * m.c, total.end(), db->typed_data());
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffvitDepthwiseConv3x3BiasGeluF32, DepthwiseConv3x3BiasGelu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // kernel
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()   // in_bias
                                  .Ret<ffi::Buffer<ffi::F32>>()); // y

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffvitDepthwiseConv3x3BwdF32, DepthwiseConv3x3Bwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // kernel
                                  .Arg<ffi::Buffer<ffi::F32>>()   // g
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()); // dk

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffvitDepthwiseConv3x3BiasGeluBwdF32, DepthwiseConv3x3BiasGeluBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // kernel
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()   // gy
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()); // db
