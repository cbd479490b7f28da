// BatchNorm in training over the rows of a float32 (R, C) array (an NHWC map, R = B·H·W):
// ResNeSt's norms.
//
//   mean = (1/R) sum_r x,  var = (1/R) sum_r (x - mean)^2,  a = scale / sqrt(var + eps)
//   y = (x - mean) * a + bias
// Gradient, given gy = dL/dy and the statistics' own cotangents gmean, gvar (the running
// averages use them; they are zero in a plain loss), with xh = (x - mean) / sqrt(var + eps):
//   dbias = sum_r gy,  dscale = sum_r gy * xh
//   dx = a * gy + (2 gvar sqrt(var + eps) / R - a dscale / R) * xh + gmean / R - a dbias / R
// XLA:CPU made three passes for the statistics and the output (mean, then var, then y) and
// ran them at a third of PyTorch's channels-last speed on ResNeSt's wide maps. Here the
// forward is two passes (sums of x - s and its square with s = x's first row, which keeps the
// one-pass variance from cancelling, then y) and the gradient two (the sums, then dx).
//
// Work: rows are split into a fixed number of chunks; each chunk sums into its own partial and
// the partials are added in chunk order, so results do not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"

namespace ffi = xla::ffi;

namespace {

using namespace effvit;

// out (k rows of c floats) = the sum over rows of what f(lane, row, c0, acc) adds to acc for
// channels [c0, c0 + lanes) (SumOverRowChunks: in chunk order).
template <typename F>
void ColumnSums(ffi::ThreadPool& pool, int64_t rows, int64_t c, int64_t k, float* out, F f) {
  SumOverRowChunks(pool, rows, k * c, out, [=](int64_t begin, int64_t end, float* acc) {
    for (int64_t row = begin; row < end; ++row)
      ForChannelBlocks(c, [&](auto lane, int64_t c0) { f(lane, row, c0, acc); });
  });
}

// out = coef[0] * a + coef[1] * (b - shift) * coef[2] + coef[3] row by row, coef (4, C)
// per-channel; a may be null (then its term is left out).
void Affine(ffi::ThreadPool& pool, int64_t rows, int64_t c, const float* a, const float* b,
            const float* shift, const float* coef, float* out) {
  ForRowChunks(pool, rows, [=](int64_t, int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      ForChannelBlocks(c, [&](auto lane, int64_t c0) {
        using V = decltype(lane);
        V v = (Load<V>(b + row * c + c0) - Load<V>(shift + c0)) * Load<V>(coef + c + c0) *
              Load<V>(coef + 2 * c + c0) + Load<V>(coef + 3 * c + c0);
        if (a != nullptr) v += Load<V>(coef + c0) * Load<V>(a + row * c + c0);
        Store<V>(out + row * c + c0, v);
      });
    }
  });
}

}  // namespace

static ffi::Error BatchNormFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                               float eps, ffi::ResultBuffer<ffi::F32> y,
                               ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> var) {
  const auto xd = x.dimensions();
  if (!IsRows(xd) || xd[0] < 1 || !IsVector(scale.dimensions(), xd[1]) ||
      !IsVector(bias.dimensions(), xd[1]))
    return ffi::Error::InvalidArgument(
        "effvit batch_norm forward: expected x (R >= 1, C), scale (C,), bias (C,)");
  const int64_t rows = xd[0], c = xd[1];
  const float *xp = x.typed_data(), *shift = xp;   // the first row
  std::vector<float> sums(2 * c);
  ColumnSums(pool, rows, c, 2, sums.data(), [=](auto lane, int64_t row, int64_t c0, float* acc) {
    using V = decltype(lane);
    const V d = Load<V>(xp + row * c + c0) - Load<V>(shift + c0);
    Store<V>(acc + c0, Load<V>(acc + c0) + d);
    Store<V>(acc + c + c0, Load<V>(acc + c + c0) + d * d);
  });
  // coef rows: (unused, 1, a, bias); y = (x - mean) * a + bias.
  std::vector<float> coef(4 * c, 1.f);
  float *mp = mean->typed_data(), *vp = var->typed_data();
  for (int64_t t = 0; t < c; ++t) {
    const double m = sums[t] / static_cast<double>(rows);
    vp[t] = static_cast<float>(std::max(0.0, sums[c + t] / static_cast<double>(rows) - m * m));
    mp[t] = static_cast<float>(shift[t] + m);
    coef[2 * c + t] = scale.typed_data()[t] / std::sqrt(vp[t] + eps);
    coef[3 * c + t] = bias.typed_data()[t];
  }
  Affine(pool, rows, c, nullptr, xp, mp, coef.data(), y->typed_data());
  return ffi::Error::Success();
}

static ffi::Error BatchNormBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> mean,
                               ffi::Buffer<ffi::F32> var, ffi::Buffer<ffi::F32> gy,
                               ffi::Buffer<ffi::F32> gmean, ffi::Buffer<ffi::F32> gvar, float eps,
                               ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                               ffi::ResultBuffer<ffi::F32> dbias) {
  const auto xd = x.dimensions(), gd = gy.dimensions();
  const int64_t c = xd.size() == 2 ? xd[1] : -1;
  if (!IsRows(xd) || !std::equal(xd.begin(), xd.end(), gd.begin(), gd.end()) ||
      !IsVector(scale.dimensions(), c) || !IsVector(mean.dimensions(), c) ||
      !IsVector(var.dimensions(), c) || !IsVector(gmean.dimensions(), c) ||
      !IsVector(gvar.dimensions(), c))
    return ffi::Error::InvalidArgument(
        "effvit batch_norm gradient: expected x and gy (R, C), the rest (C,)");
  const int64_t rows = xd[0];
  const float *xp = x.typed_data(), *gp = gy.typed_data(), *mp = mean.typed_data();
  std::vector<float> inv(c);
  for (int64_t t = 0; t < c; ++t) inv[t] = 1.f / std::sqrt(var.typed_data()[t] + eps);
  const float* ip = inv.data();
  std::vector<float> sums(2 * c);   // dbias, dscale
  ColumnSums(pool, rows, c, 2, sums.data(), [=](auto lane, int64_t row, int64_t c0, float* acc) {
    using V = decltype(lane);
    const V g = Load<V>(gp + row * c + c0);
    const V xh = (Load<V>(xp + row * c + c0) - Load<V>(mp + c0)) * Load<V>(ip + c0);
    Store<V>(acc + c0, Load<V>(acc + c0) + g);
    Store<V>(acc + c + c0, Load<V>(acc + c + c0) + g * xh);
  });
  // coef rows: (a, B, inv, C) with dx = a gy + B (x - mean) inv + C.
  std::vector<float> coef(4 * c);
  const float n = static_cast<float>(rows);
  for (int64_t t = 0; t < c; ++t) {
    const float a = scale.typed_data()[t] * inv[t];
    coef[t] = a;
    coef[c + t] = 2.f * gvar.typed_data()[t] / n / inv[t] - a * sums[c + t] / n;
    coef[2 * c + t] = inv[t];
    coef[3 * c + t] = gmean.typed_data()[t] / n - a * sums[t] / n;
  }
  Affine(pool, rows, c, gp, xp, mp, coef.data(), dx->typed_data());
  std::copy(sums.begin(), sums.begin() + c, dbias->typed_data());
  std::copy(sums.begin() + c, sums.end(), dscale->typed_data());
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffvitBatchNormF32, BatchNormFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y
                                  .Ret<ffi::Buffer<ffi::F32>>()   // mean
                                  .Ret<ffi::Buffer<ffi::F32>>()); // var (biased)

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffvitBatchNormBwdF32, BatchNormBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()   // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()   // var
                                  .Arg<ffi::Buffer<ffi::F32>>()   // gy
                                  .Arg<ffi::Buffer<ffi::F32>>()   // gmean
                                  .Arg<ffi::Buffer<ffi::F32>>()   // gvar
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>()); // dbias
