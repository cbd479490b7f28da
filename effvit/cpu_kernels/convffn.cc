// PVTv2's ConvFFN for inference, in one pass over the image (and, at the end, the plain
// transformer MLP of PVTv1 and Twins, y = gelu(x W1 + b1) W2 + b2, in one pass over the rows):
//
//   h = x W1 + b1                      (B, H, W, D), D = 4-8 C hidden channels
//   u = gelu(dwconv3x3(h) + kb)        zero padding, exact GELU
//   y = u W2 + b2                      (B, H, W, F)
//
// XLA runs it as three ops (fc1's matmul, effvit's conv + GELU kernel, fc2's matmul), each
// writing a hidden map that the next reads back: the model's largest activations, far larger
// than the caches (32 x 56 x 56 x 256 floats = 103 MB in pvt_v2_b0's first stage). Here a task
// takes a band of rows of one image and goes a group of rows at a time (one row of a 56-wide
// map, all 7 of a 7-wide one): it computes the groups of h that the group's conv needs into a
// ring of three, u's rows into one more buffer, and y's rows from them, so h and u stay in
// cache and only x and y touch memory. Rows of h next to a band's edge are computed by both
// bands, with the same operations, so results do not depend on the split.
//
// Alone, float32, batch 8 and 32 (2-core Zen 4): 1.1-1.4x faster than the three ops at 56, 28
// and 14 px, where per image the matmuls run at 90-115 GFLOP/s on one core and the conv + GELU
// takes a quarter to a third of the time; at 7 px 0.8-1.05x (XLA's matmuls reuse the
// weights over the whole batch), so effvit.layers keeps the three ops there.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"
#include "conv_gelu.h"
#include "matmul_tiles.h"

namespace ffi = xla::ffi;

using namespace effvit;

static ffi::Error ConvFfn(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> w1, ffi::Buffer<ffi::F32> b1,
                          ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> kb,
                          ffi::Buffer<ffi::F32> w2, ffi::Buffer<ffi::F32> b2,
                          ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), kd = k.dimensions();
  if (xd.size() != 4 || !IsMatrix(w1.dimensions(), xd[3]))
    return ffi::Error::InvalidArgument("effvit ConvFFN: expected x (B, H, W, C), W1 (C, D)");
  const int64_t batch = xd[0], height = xd[1], width = xd[2], c = xd[3];
  const int64_t d = w1.dimensions()[1];
  if (!IsVector(b1.dimensions(), d) || kd.size() != 3 || kd[0] != 3 || kd[1] != 3 ||
      kd[2] != d || !IsVector(kb.dimensions(), d) || !IsMatrix(w2.dimensions(), d))
    return ffi::Error::InvalidArgument(
        "effvit ConvFFN: expected b1 (D,), kernel (3, 3, D), its bias (D,), W2 (D, F)");
  const int64_t f = w2.dimensions()[1];
  if (!IsVector(b2.dimensions(), f))
    return ffi::Error::InvalidArgument("effvit ConvFFN: expected b2 (F,)");
  const float *xp = x.typed_data(), *w1p = w1.typed_data(), *b1p = b1.typed_data();
  const float *kp = k.typed_data(), *kbp = kb.typed_data(), *w2p = w2.typed_data();
  const float* b2p = b2.typed_data();
  float* yp = y->typed_data();
  const RowGroups split(batch, height, width);
  const int64_t group = split.group, groups = split.groups, bands = split.bands;
  // Hidden rows are often whole pages long (56 x 256 floats): the ring's slots and u are set
  // apart by odd multiples of 64 bytes, so that reads of one do not alias stores to another
  // within a page (see GeluForwardRow).
  const int64_t row = width * d, slot_stride = group * row + 16;
  const int64_t u_offset = 3 * slot_stride + 528, buffer_size = u_offset + group * row;
  const std::vector<float> zeros(d, 0.f);
  const float* zp = zeros.data();
  ParallelFor(pool, batch * bands, [=](int64_t task) {
    const int64_t b = task / bands, band = task % bands;
    const int64_t begin = groups * band / bands, end = groups * (band + 1) / bands;
    // Zeroed (no slower): a row of h a bug failed to compute reads as zeros, not as whatever a
    // previous task left in reused memory, often that very row.
    std::vector<float> buffer(buffer_size);
    float* u = buffer.data() + u_offset;
    // Group j of h (rows j group ...) in the ring's slot j % 3; row r of h.
    auto slot = [&](int64_t j) { return buffer.data() + j % 3 * slot_stride; };
    auto h_row = [&](int64_t r) { return slot(r / group) + r % group * row; };
    auto rows_in = [&](int64_t j) { return std::min(group, height - j * group); };
    const float* xb = xp + b * height * width * c;
    int64_t ready = std::max<int64_t>(begin - 1, 0);   // first group of h not yet in the ring
    for (int64_t j = begin; j < end; ++j) {
      for (const int64_t last = std::min(j + 1, groups - 1); ready <= last; ++ready)
        MatmulTiles(Plain{xb + ready * group * row / d * c, c}, w1p, d, c,
                    rows_in(ready) * width, b1p, 0, slot(ready));
      const int64_t r0 = j * group;
      for (int64_t r = r0; r < r0 + rows_in(j); ++r) {
        const float* rows[3] = {r > 0 ? h_row(r - 1) : nullptr, h_row(r),
                                r + 1 < height ? h_row(r + 1) : nullptr};
        GeluForwardRow(rows, width, d, kp, kbp, zp, u + (r - r0) * row);
      }
      MatmulTiles(Plain{u, d}, w2p, f, d, rows_in(j) * width, b2p, 0,
                  yp + (b * height + r0) * width * f);
    }
  });
  return ffi::Error::Success();
}

// The plain MLP: blocks of rows of x (P, C) in tasks, each block's h = x W1 + b1 kept in cache
// (at most 256 KB), GELU applied there, y = u W2 + b2 written. Rows are independent, so the
// blocking does not change results.
static ffi::Error Mlp(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w1,
                      ffi::Buffer<ffi::F32> b1, ffi::Buffer<ffi::F32> w2,
                      ffi::Buffer<ffi::F32> b2, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  if (!IsRows(xd) || !IsMatrix(w1.dimensions(), xd[1]))
    return ffi::Error::InvalidArgument("effvit MLP: expected x (P, C), W1 (C, D)");
  const int64_t p = xd[0], c = xd[1], d = w1.dimensions()[1];
  if (!IsVector(b1.dimensions(), d) || !IsMatrix(w2.dimensions(), d) ||
      !IsVector(b2.dimensions(), w2.dimensions()[1]))
    return ffi::Error::InvalidArgument("effvit MLP: expected b1 (D,), W2 (D, F), b2 (F,)");
  const int64_t f = w2.dimensions()[1];
  const int64_t block = std::clamp<int64_t>(65536 / d, 24, 128);
  const float *xp = x.typed_data(), *w1p = w1.typed_data(), *b1p = b1.typed_data();
  const float *w2p = w2.typed_data(), *b2p = b2.typed_data();
  float* yp = y->typed_data();
  ParallelFor(pool, (p + block - 1) / block, [=](int64_t task) {
    const int64_t r0 = task * block, m = std::min(block, p - r0);
    std::vector<float> h(m * d);
    MatmulTiles(Plain{xp + r0 * c, c}, w1p, d, c, m, b1p, 0, h.data());
    float* hp = h.data();
    ForChannelBlocks(m * d, [&](auto lane, int64_t i) {
      using V = decltype(lane);
      const V v = Load<V>(hp + i);
      Store<V>(hp + i, v * Cdf<V>(v));
    });
    MatmulTiles(Plain{hp, d}, w2p, f, d, m, b2p, 0, yp + r0 * f);
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffvitMlpF32, Mlp,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x (P, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W1 (C, D)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b1
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W2 (D, F)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b2
                                  .Ret<ffi::Buffer<ffi::F32>>()); // y (P, F)

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffvitConvFfnF32, ConvFfn,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x (B, H, W, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W1 (C, D)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b1
                                  .Arg<ffi::Buffer<ffi::F32>>()   // conv kernel (3, 3, D)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // conv bias
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W2 (D, F)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b2
                                  .Ret<ffi::Buffer<ffi::F32>>()); // y (B, H, W, F)
