// The gradient of PVTv2's ConvFFN (convffn.cc) in one pass over the image, for training:
//
//   h = x W1 + b1,  z = dwconv3x3(h) + kb,  u = gelu(z),  y = u W2 + b2
//
// given gy = dL/dy, with gu = gy W2ᵀ and gz = gu * gelu'(z):
//
//   dW2 = Σ uᵀ gy       db2 = Σ gy
//   dk[i, j] = Σ gz h(shifted by the tap)       dkb = Σ gz
//   dh = dwconv3x3ᵀ(gz)                         (the taps mirrored)
//   dW1 = Σ xᵀ dh       db1 = Σ dh       dx = dh W1ᵀ
//
// (sums over every pixel of the batch). Through XLA the ConvFFN's training step writes h and u
// in the forward (B x H x W x D each, 4-8 times x's size) and reads them back in the gradient,
// along with gu, gz and dh, each a pass over memory. Here the forward is the inference kernel
// (convffn.cc), which keeps nothing, and this gradient recomputes h and z from x one group of
// rows at a time (one row of a 56-wide map, 4 of a 14-wide one), in rings of groups that stay
// in cache: only x, gy and dx touch memory.
//
// Order, per task (a band of groups of one image): group j's dh needs gz of groups j - 1 .. j + 1,
// and gz of group j + 1 needs h of groups j .. j + 2, so h runs two groups ahead (a ring of 4)
// and gz one (a ring of 3). At a band's first group the previous groups' h and gz are computed
// again, with the same operations, but only the band's own groups add to the sums. Tasks are
// split into at most kChunks chunks, each summing into its own partial, added in chunk order:
// results depend on the shapes only, not on the thread count or timing.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"
#include "conv_gelu.h"
#include "matmul_tiles.h"

namespace ffi = xla::ffi;

namespace {

using namespace effvit;

// acc[f] += Σ_{i < m} rows[i n + f], f < n.
void AddRows(const float* rows, int64_t m, int64_t n, float* acc) {
  ForChannelBlocks(n, [&](auto lane, int64_t f) {
    using V = decltype(lane);
    V sum = Load<V>(acc + f);
    for (int64_t i = 0; i < m; ++i) sum += Load<V>(rows + i * n + f);
    Store<V>(acc + f, sum);
  });
}

// Offsets of the sums in a chunk's partial: dk (9 x D) and dkb (D) first, in the layout of
// ConvGradRowBlock's acc, then dW1 (C x D), db1, dW2 (D x F), db2.
struct Sums {
  int64_t dk, dkb, dw1, db1, dw2, db2, size;
  Sums(int64_t c, int64_t d, int64_t f)
      : dk(0), dkb(9 * d), dw1(10 * d), db1(dw1 + c * d), dw2(db1 + d), db2(dw2 + d * f),
        size(db2 + f) {}
};

}  // namespace

static ffi::Error ConvFfnBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> w1, ffi::Buffer<ffi::F32> w1t,
                             ffi::Buffer<ffi::F32> b1, ffi::Buffer<ffi::F32> k,
                             ffi::Buffer<ffi::F32> kb, ffi::Buffer<ffi::F32> w2t,
                             ffi::Buffer<ffi::F32> gy, ffi::ResultBuffer<ffi::F32> dx,
                             ffi::ResultBuffer<ffi::F32> dw1, ffi::ResultBuffer<ffi::F32> db1,
                             ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dkb,
                             ffi::ResultBuffer<ffi::F32> dw2, ffi::ResultBuffer<ffi::F32> db2) {
  const auto xd = x.dimensions(), gd = gy.dimensions(), kd = k.dimensions();
  if (xd.size() != 4 || gd.size() != 4 || !std::equal(xd.begin(), xd.end() - 1, gd.begin()) ||
      w1.dimensions().size() != 2 || w1.dimensions()[0] != xd[3])
    return ffi::Error::InvalidArgument(
        "effvit ConvFFN gradient: expected x (B, H, W, C), gy (B, H, W, F), W1 (C, D)");
  const int64_t batch = xd[0], height = xd[1], width = xd[2], c = xd[3], f = gd[3];
  const int64_t d = w1.dimensions()[1];
  if (!IsMatrix(w1t.dimensions(), d, c) || !IsVector(b1.dimensions(), d) || kd.size() != 3 ||
      kd[0] != 3 || kd[1] != 3 || kd[2] != d || !IsVector(kb.dimensions(), d) ||
      !IsMatrix(w2t.dimensions(), f, d))
    return ffi::Error::InvalidArgument(
        "effvit ConvFFN gradient: expected W1ᵀ (D, C), b1 (D,), kernel (3, 3, D), its bias "
        "(D,), W2ᵀ (F, D)");
  const float *xp = x.typed_data(), *w1p = w1.typed_data(), *w1tp = w1t.typed_data();
  const float *b1p = b1.typed_data(), *kp = k.typed_data(), *kbp = kb.typed_data();
  const float *w2tp = w2t.typed_data(), *gyp = gy.typed_data();
  float* dxp = dx->typed_data();
  const RowGroups split(batch, height, width);   // as the forward's
  const int64_t group = split.group, groups = split.groups, bands = split.bands;
  // Slots set apart by odd multiples of 64 bytes against 4K aliasing (see GeluForwardRow).
  const int64_t row = width * d, slot_stride = group * row + 16;
  const Sums sums(c, d, f);
  const std::vector<float> zeros(std::max(c, d), 0.f);
  const float* zp = zeros.data();
  std::vector<float> total(sums.size);
  SumOverRowChunks(pool, batch * bands, sums.size, total.data(), [=](int64_t first_task,
                                                                      int64_t end_task,
                                                                      float* acc) {
    // h's ring (slots 0-3), gz's (4-6), and one slot for u, then for dh, of the current group.
    std::vector<float> buffer(8 * slot_stride);
    float* const scratch = buffer.data() + 7 * slot_stride;
    auto h_group = [&](int64_t j) { return buffer.data() + j % 4 * slot_stride; };
    auto gz_group = [&](int64_t j) { return buffer.data() + (4 + j % 3) * slot_stride; };
    auto h_row = [&](int64_t r) { return h_group(r / group) + r % group * row; };
    auto gz_row = [&](int64_t r) { return gz_group(r / group) + r % group * row; };
    auto rows_in = [&](int64_t j) { return std::min(group, height - j * group); };
    auto around = [&](auto row_of, int64_t r, const float* rows[3]) {
      rows[0] = r > 0 ? row_of(r - 1) : nullptr;
      rows[1] = row_of(r);
      rows[2] = r + 1 < height ? row_of(r + 1) : nullptr;
    };
    for (int64_t task = first_task; task < end_task; ++task) {
      const int64_t b = task / bands, band = task % bands;
      const int64_t begin = groups * band / bands, end = groups * (band + 1) / bands;
      const float* xb = xp + b * height * width * c;
      const float* gyb = gyp + b * height * width * f;
      int64_t h_ready = std::max<int64_t>(begin - 2, 0), gz_ready = std::max<int64_t>(begin - 1, 0);
      for (int64_t j = begin; j < end; ++j) {
        for (; gz_ready <= std::min(j + 1, groups - 1); ++gz_ready) {
          for (; h_ready <= std::min(gz_ready + 1, groups - 1); ++h_ready)
            MatmulTiles(Plain{xb + h_ready * group * width * c, c}, w1p, d, c,
                        rows_in(h_ready) * width, b1p, 0, h_group(h_ready));
          const int64_t r0 = gz_ready * group, pixels = rows_in(gz_ready) * width;
          const float* gy_rows = gyb + r0 * width * f;
          MatmulTiles(Plain{gy_rows, f}, w2tp, d, f, pixels, zp, 0, gz_group(gz_ready));   // gu
          const bool own = gz_ready >= begin && gz_ready < end;
          for (int64_t r = r0; r < r0 + rows_in(gz_ready); ++r) {
            const float* hr[3];
            around(h_row, r, hr);
            float* u_row = own ? scratch + (r - r0) * row : nullptr;
            ForChannelBlocks(d, [&](auto lane, int64_t c0) {
              GeluGradRowBlock<decltype(lane)>(width, d, hr, kp, kbp, gz_row(r), gz_row(r),
                                               u_row, c0);
            });
          }
          if (own) {
            MatmulTiles(Transposed{scratch, d}, gy_rows, f, pixels, d, acc + sums.dw2, f,
                        acc + sums.dw2);
            AddRows(gy_rows, pixels, f, acc + sums.db2);
          }
        }
        const int64_t r0 = j * group, pixels = rows_in(j) * width;
        for (int64_t r = r0; r < r0 + rows_in(j); ++r) {
          const float *hr[3], *gr[3];
          around(h_row, r, hr);
          around(gz_row, r, gr);
          ForChannelBlocks(d, [&](auto lane, int64_t c0) {
            ConvGradRowBlock<decltype(lane), true>(width, d, hr, gr, kp, scratch + (r - r0) * row,
                                                   acc + sums.dk, c0);
          });
        }
        const float* x_rows = xb + r0 * width * c;
        MatmulTiles(Transposed{x_rows, c}, scratch, d, pixels, c, acc + sums.dw1, d,
                    acc + sums.dw1);
        AddRows(scratch, pixels, d, acc + sums.db1);
        MatmulTiles(Plain{scratch, d}, w1tp, c, d, pixels, zp, 0,
                    dxp + (b * height + r0) * width * c);
      }
    }
  });
  const float* t = total.data();
  std::copy(t + sums.dk, t + sums.dkb, dk->typed_data());
  std::copy(t + sums.dkb, t + sums.dw1, dkb->typed_data());
  std::copy(t + sums.dw1, t + sums.db1, dw1->typed_data());
  std::copy(t + sums.db1, t + sums.dw2, db1->typed_data());
  std::copy(t + sums.dw2, t + sums.db2, dw2->typed_data());
  std::copy(t + sums.db2, t + sums.size, db2->typed_data());
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffvitConvFfnBwdF32, ConvFfnBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x (B, H, W, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W1 (C, D)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W1ᵀ (D, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b1
                                  .Arg<ffi::Buffer<ffi::F32>>()   // conv kernel (3, 3, D)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // conv bias
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W2ᵀ (F, D)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // gy (B, H, W, F)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dW1
                                  .Ret<ffi::Buffer<ffi::F32>>()   // db1
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dkernel
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dbias
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dW2
                                  .Ret<ffi::Buffer<ffi::F32>>()); // db2
