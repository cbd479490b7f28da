// LayerNorm over the last axis of a float32 (N, C) array: every token norm of the transformers.
//
//   mu = mean_c x,  var = mean_c (x - mu)^2,  r = 1 / sqrt(var + eps)
//   y = (x - mu) * r * scale + bias
// Gradient, given g = dL/dy, with xh = (x - mu) * r and gs = g * scale:
//   dx = r * (gs - mean_c gs - xh * mean_c (gs * xh))
//   dscale = sum_n g * xh,  dbias = sum_n g
// The forward also returns mu and r for the gradient. XLA:CPU runs these as row reductions
// over a short minor axis (C = 32..512) and several elementwise passes, forward and backward:
// 2-3x PyTorch's fused kernels. Here each row is read once into cache and all of its sums,
// outputs and gradient terms are formed there.
//
// Work: rows are split into a fixed number of chunks shared by XLA's intra-op threads; in the
// gradient each chunk sums dscale and dbias into its own partial and the partials are added
// in chunk order, so results do not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"

namespace ffi = xla::ffi;

namespace {

using namespace effvit;

// sum over c of f(lane, c0): f returns decltype(lane) (16 channels at a time, then the tail).
template <typename F>
inline float ChannelSum(int64_t c, F f) {
  Vec16 acc{};
  float sum = 0.f;
  int64_t c0 = 0;
  for (; c0 + 16 <= c; c0 += 16) acc += f(Vec16{}, c0);
  for (; c0 < c; ++c0) sum += f(0.f, c0);
  for (int i = 0; i < 16; ++i) sum += acc[i];
  return sum;
}

}  // namespace

static ffi::Error LayerNormFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                               float eps, ffi::ResultBuffer<ffi::F32> y,
                               ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> rstd) {
  const auto xd = x.dimensions();
  if (!IsRows(xd) || !IsVector(scale.dimensions(), xd[1]) || !IsVector(bias.dimensions(), xd[1]))
    return ffi::Error::InvalidArgument(
        "effvit layer_norm forward: expected x (N, C), scale (C,), bias (C,)");
  const int64_t n = xd[0], c = xd[1];
  const float *xp = x.typed_data(), *sp = scale.typed_data(), *bp = bias.typed_data();
  float *yp = y->typed_data(), *mp = mean->typed_data(), *rp = rstd->typed_data();
  ForRowChunks(pool, n, [=](int64_t, int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float* xr = xp + row * c;
      float* yr = yp + row * c;
      const float mu = ChannelSum(c, [&](auto lane, int64_t c0) {
        return Load<decltype(lane)>(xr + c0);
      }) / c;
      const float var = ChannelSum(c, [&](auto lane, int64_t c0) {
        const auto d = Load<decltype(lane)>(xr + c0) - mu;
        return d * d;
      }) / c;
      const float r = 1.f / std::sqrt(var + eps);
      ForChannelBlocks(c, [&](auto lane, int64_t c0) {
        using V = decltype(lane);
        Store<V>(yr + c0, (Load<V>(xr + c0) - mu) * (r * Load<V>(sp + c0)) + Load<V>(bp + c0));
      });
      mp[row] = mu;
      rp[row] = r;
    }
  });
  return ffi::Error::Success();
}

static ffi::Error LayerNormBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> mean,
                               ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> g,
                               ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                               ffi::ResultBuffer<ffi::F32> dbias) {
  const auto xd = x.dimensions(), gd = g.dimensions();
  if (!IsRows(xd) || !IsVector(scale.dimensions(), xd[1]) || !IsVector(mean.dimensions(), xd[0])
      || !IsVector(rstd.dimensions(), xd[0]) || !std::equal(xd.begin(), xd.end(), gd.begin(),
                                                             gd.end()))
    return ffi::Error::InvalidArgument(
        "effvit layer_norm gradient: expected x and g (N, C), scale (C,), mean and rstd (N,)");
  const int64_t n = xd[0], c = xd[1];
  const float *xp = x.typed_data(), *sp = scale.typed_data(), *mp = mean.typed_data();
  const float *rp = rstd.typed_data(), *gp = g.typed_data();
  float* dxp = dx->typed_data();
  std::vector<float> total(2 * c);   // dscale, then dbias
  SumOverRowChunks(pool, n, 2 * c, total.data(), [=](int64_t begin, int64_t end, float* ds) {
    float* db = ds + c;
    for (int64_t row = begin; row < end; ++row) {
      const float *xr = xp + row * c, *gr = gp + row * c;
      const float mu = mp[row], r = rp[row];
      const float c1 = ChannelSum(c, [&](auto lane, int64_t c0) {
        using V = decltype(lane);
        return Load<V>(gr + c0) * Load<V>(sp + c0);
      }) / c;
      const float c2 = ChannelSum(c, [&](auto lane, int64_t c0) {
        using V = decltype(lane);
        return Load<V>(gr + c0) * Load<V>(sp + c0) * ((Load<V>(xr + c0) - mu) * r);
      }) / c;
      ForChannelBlocks(c, [&](auto lane, int64_t c0) {
        using V = decltype(lane);
        const V gv = Load<V>(gr + c0), xh = (Load<V>(xr + c0) - mu) * r;
        Store<V>(dxp + row * c + c0, r * (gv * Load<V>(sp + c0) - c1 - xh * c2));
        Store<V>(ds + c0, Load<V>(ds + c0) + gv * xh);
        Store<V>(db + c0, Load<V>(db + c0) + gv);
      });
    }
  });
  std::copy(total.begin(), total.begin() + c, dscale->typed_data());
  std::copy(total.begin() + c, total.end(), dbias->typed_data());
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffvitLayerNormF32, LayerNormFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y
                                  .Ret<ffi::Buffer<ffi::F32>>()   // mean
                                  .Ret<ffi::Buffer<ffi::F32>>()); // rstd

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffvitLayerNormBwdF32, LayerNormBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()   // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()   // rstd
                                  .Arg<ffi::Buffer<ffi::F32>>()   // g
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>()); // dbias
