// A 3x3, stride-1, zero-padded depthwise conv of an NHWC float32 map: PVTv2's ConvFFN.
//
// Forward, fused with the bias and the exact GELU that follow it in the ConvFFN:
//   h[b, r, s, c] = bias[c] + sum_{i,j in 0..2} x[b, r + i - 1, s + j - 1, c] * k[i, j, c]
//   y = h / 2 * (1 + erf(h / sqrt(2)))
// Gradient of the conv alone, given g = dL/dh:
//   dx[b, r, s, c] = sum_{i,j} g[b, r - i + 1, s - j + 1, c] * k[i, j, c]
//   dk[i, j, c]    = sum_{b,r,s} g[b, r, s, c] * x[b, r + i - 1, s + j - 1, c]
// (terms outside the map are zero). XLA:CPU pads x in a pass of its own before the forward,
// computes dk as nine reductions, each a full pass over x and g, and dx as a tenth pass; here
// the forward reads x once and writes y, and the gradient reads x and g once and writes dx.
//
// Work: one image row at a time, 16 channels at a time: the 9 taps of k (and of dk's running
// sums) stay in vector registers along the row. Rows are split into a fixed number of chunks
// shared by the XLA intra-op threads; each chunk sums into its own dk partial and the partials
// are added in chunk order, so results do not depend on the thread count or scheduling.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kChunks = 16;
typedef float Vec16 __attribute__((vector_size(64), aligned(4)));

struct Map {
  int64_t b, h, w, c;
};

template <typename V>
inline V Load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename V>
inline void Store(float* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

// dx of image row `y` and that row's terms of dk (added to acc, 9 x C), for the lanes of V
// (16 channels, or 1 for the channel tail) from channel c0. xb, gb: this image of x and g.
template <typename V>
void RowBlock(const Map& m, const float* __restrict xb, const float* __restrict gb,
              const float* __restrict k, float* __restrict dx_row, float* __restrict acc,
              int64_t y, int64_t c0) {
  const int64_t c = m.c, w = m.w;
  V kv[9], sum[9];
  for (int t = 0; t < 9; ++t) {
    kv[t] = Load<V>(k + t * c + c0);
    sum[t] = Load<V>(acc + t * c + c0);
  }
  for (int64_t s = 0; s < w; ++s) {
    const V go = Load<V>(gb + (y * w + s) * c + c0);
    V d{};
    for (int i = 0; i < 3; ++i) {
      const int64_t rg = y - i + 1, rx = y + i - 1;
      for (int j = 0; j < 3; ++j) {
        const int64_t sg = s - j + 1, sx = s + j - 1;
        if (rg >= 0 && rg < m.h && sg >= 0 && sg < w)
          d += Load<V>(gb + (rg * w + sg) * c + c0) * kv[i * 3 + j];
        if (rx >= 0 && rx < m.h && sx >= 0 && sx < w)
          sum[i * 3 + j] += go * Load<V>(xb + (rx * w + sx) * c + c0);
      }
    }
    Store<V>(dx_row + s * c + c0, d);
  }
  for (int t = 0; t < 9; ++t) Store<V>(acc + t * c + c0, sum[t]);
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
  return x * p / q;
}

// y for image row `y` (out_row), channels [c0, c0 + lanes).
template <typename V>
void ForwardRowBlock(const Map& m, const float* __restrict xb, const float* __restrict k,
                     const float* __restrict bias, float* __restrict out_row, int64_t y,
                     int64_t c0) {
  const int64_t c = m.c, w = m.w;
  V kv[9];
  for (int t = 0; t < 9; ++t) kv[t] = Load<V>(k + t * c + c0);
  const V b = Load<V>(bias + c0);
  for (int64_t s = 0; s < w; ++s) {
    V h = b;
    for (int i = 0; i < 3; ++i) {
      const int64_t r = y + i - 1;
      if (r < 0 || r >= m.h) continue;
      for (int j = 0; j < 3; ++j) {
        const int64_t sx = s + j - 1;
        if (sx >= 0 && sx < w) h += Load<V>(xb + (r * w + sx) * c + c0) * kv[i * 3 + j];
      }
    }
    Store<V>(out_row + s * c + c0, h * 0.5f * (1.f + Erf<V>(h * 0.70710678118654752f)));
  }
}

// f(lane, c0) over the channels: 16 at a time with lane a Vec16, then the tail one at a time
// with lane a float; f picks its vector type as decltype(lane).
template <typename F>
void ForChannelBlocks(int64_t c, F f) {
  int64_t c0 = 0;
  for (; c0 + 16 <= c; c0 += 16) f(Vec16{}, c0);
  for (; c0 < c; ++c0) f(0.f, c0);
}

// Chunks are claimed from a shared counter. The caller works too and then waits only for
// claimed chunks, so tasks the pool starts late find nothing left and touch no buffers.
struct Progress {
  std::atomic<int64_t> next{0};
  int64_t done = 0;
  std::mutex mu;
  std::condition_variable all_done;
};

// fn(i) for i in [0, n), on the calling thread and the pool's; returns when all are done.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, F fn) {
  auto progress = std::make_shared<Progress>();
  auto work = [progress, n, fn]() {
    for (int64_t i; (i = progress->next.fetch_add(1)) < n;) {
      fn(i);
      std::lock_guard<std::mutex> lock(progress->mu);
      if (++progress->done == n) progress->all_done.notify_all();
    }
  };
  const int64_t helpers = std::min(n, pool.num_threads()) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work(); });
  work();
  std::unique_lock<std::mutex> lock(progress->mu);
  progress->all_done.wait(lock, [&] { return progress->done == n; });
}

bool IsMap(ffi::Span<const int64_t> d) { return d.size() == 4; }

bool IsKernel(ffi::Span<const int64_t> k, int64_t c) {
  return k.size() == 3 && k[0] == 3 && k[1] == 3 && k[2] == c;
}

}  // namespace

static ffi::Error DepthwiseConv3x3BiasGelu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                           ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> bias,
                                           ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  if (!IsMap(xd) || !IsKernel(k.dimensions(), xd[3]) || bias.dimensions().size() != 1 ||
      bias.dimensions()[0] != xd[3])
    return ffi::Error::InvalidArgument(
        "effvit depthwise_conv3x3 forward: expected x (B, H, W, C), kernel (3, 3, C), bias (C,)");
  const Map m{xd[0], xd[1], xd[2], xd[3]};
  const int64_t rows = m.b * m.h, image = m.h * m.w * m.c;
  const float *xp = x.typed_data(), *kp = k.typed_data(), *bp = bias.typed_data();
  float* yp = y->typed_data();
  ParallelFor(pool, rows, [=](int64_t row) {
    const float* xb = xp + row / m.h * image;
    float* out_row = yp + row * m.w * m.c;
    ForChannelBlocks(m.c, [&](auto lane, int64_t c0) {
      ForwardRowBlock<decltype(lane)>(m, xb, kp, bp, out_row, row % m.h, c0);
    });
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
  const int64_t rows = m.b * m.h, taps = 9 * m.c, image = m.h * m.w * m.c;
  const int64_t chunks = std::min(rows, kChunks);
  std::vector<float> partial(chunks * taps, 0.f);
  const float *xp = x.typed_data(), *kp = k.typed_data(), *gp = g.typed_data();
  float *dxp = dx->typed_data(), *pp = partial.data();
  ParallelFor(pool, chunks, [=](int64_t i) {
    for (int64_t row = rows * i / chunks; row < rows * (i + 1) / chunks; ++row) {
      const float *xb = xp + row / m.h * image, *gb = gp + row / m.h * image;
      float* dx_row = dxp + row * m.w * m.c;
      ForChannelBlocks(m.c, [&](auto lane, int64_t c0) {
        RowBlock<decltype(lane)>(m, xb, gb, kp, dx_row, pp + i * taps, row % m.h, c0);
      });
    }
  });
  float* dkp = dk->typed_data();
  std::fill(dkp, dkp + taps, 0.f);
  for (int64_t i = 0; i < chunks; ++i)
    for (int64_t t = 0; t < taps; ++t) dkp[t] += pp[i * taps + t];
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffvitDepthwiseConv3x3BiasGeluF32, DepthwiseConv3x3BiasGelu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // kernel
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias
                                  .Ret<ffi::Buffer<ffi::F32>>()); // y

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffvitDepthwiseConv3x3BwdF32, DepthwiseConv3x3Bwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // kernel
                                  .Arg<ffi::Buffer<ffi::F32>>()   // g
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()); // dk
