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
#include <cstdint>
#include <vector>

#include "common.h"
#include "conv_gelu.h"

namespace ffi = xla::ffi;

namespace {

using namespace effvit;

struct Map {
  int64_t b, h, w, c;
};

// rows[0..2] = rows y - 1, y, y + 1 of image xb (nullptr outside the map).
void RowsAround(const Map& m, const float* xb, int64_t y, const float* rows[3]) {
  for (int i = 0; i < 3; ++i) {
    const int64_t r = y + i - 1;
    rows[i] = r >= 0 && r < m.h ? xb + r * m.w * m.c : nullptr;
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
    const float* rows[3];
    RowsAround(m, xp + row / m.h * image, row % m.h, rows);
    GeluForwardRow(rows, m.w, m.c, kp, h0, ip, yp + row * m.w * m.c);
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
      const float* xr[3];
      RowsAround(m, xp + row / m.h * image, y, xr);
      ForChannelBlocks(m.c, [&](auto lane, int64_t c0) {
        ConvGradRowBlock<decltype(lane), false>(m.w, m.c, xr, gr, kp, dxp + row * row_size, acc,
                                                c0);
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
        const float* xr[3];
        RowsAround(m, xp + r / m.h * image, r % m.h, xr);
        ForChannelBlocks(m.c, [&](auto lane, int64_t c0) {
          GeluGradRowBlock<decltype(lane)>(m.w, m.c, xr, kp, bp, gyp + r * row_size, slot(r),
                                           nullptr, c0);
        });
      }
      ready = last + 1;
      const float* gr[3] = {y > 0 ? slot(row - 1) : nullptr, slot(row),
                            y + 1 < m.h ? slot(row + 1) : nullptr};
      const float* xr[3];
      RowsAround(m, xp + row / m.h * image, y, xr);
      ForChannelBlocks(m.c, [&](auto lane, int64_t c0) {
        ConvGradRowBlock<decltype(lane), true>(m.w, m.c, xr, gr, kp, dxp + row * row_size, acc,
                                               c0);
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
