// Gradient of a 3x3, stride-1, zero-padded depthwise conv of an NHWC float32 map, in one pass.
//
// Forward (effvit.layers.depthwise_conv), padding 1:
//   y[b, r, s, c] = sum_{i,j in 0..2} x[b, r + i - 1, s + j - 1, c] * k[i, j, c]
// Given g = dL/dy, this computes both
//   dx[b, r, s, c] = sum_{i,j} g[b, r - i + 1, s - j + 1, c] * k[i, j, c]
//   dk[i, j, c]    = sum_{b,r,s} g[b, r, s, c] * x[b, r + i - 1, s + j - 1, c]
// (terms outside the map are zero). XLA:CPU computes dk as nine reductions, each a full pass
// over x and g, and dx as a tenth pass; here one pass reads x and g once and writes dx.
//
// Work: one image row at a time, 16 channels at a time: the 9 taps of k and of dk's running
// sums stay in vector registers along the row. Rows are split into a fixed number of chunks
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

void Row(const Map& m, const float* x, const float* g, const float* k, float* dx, float* acc,
         int64_t row) {
  const int64_t image = m.h * m.w * m.c, b = row / m.h, y = row % m.h;
  const float *xb = x + b * image, *gb = g + b * image;
  float* dx_row = dx + row * m.w * m.c;
  int64_t c0 = 0;
  for (; c0 + 16 <= m.c; c0 += 16) RowBlock<Vec16>(m, xb, gb, k, dx_row, acc, y, c0);
  for (; c0 < m.c; ++c0) RowBlock<float>(m, xb, gb, k, dx_row, acc, y, c0);
}

// Chunks are claimed from a shared counter. The caller works too and then waits only for
// claimed chunks, so tasks the pool starts late find nothing left and touch no buffers.
struct Progress {
  std::atomic<int64_t> next{0};
  int64_t done = 0;
  std::mutex mu;
  std::condition_variable all_done;
};

}  // namespace

static ffi::Error DepthwiseConv3x3Bwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                      ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> g,
                                      ffi::ResultBuffer<ffi::F32> dx,
                                      ffi::ResultBuffer<ffi::F32> dk) {
  const auto xd = x.dimensions(), kd = k.dimensions(), gd = g.dimensions();
  if (xd.size() != 4 || kd.size() != 3 || kd[0] != 3 || kd[1] != 3 || kd[2] != xd[3] ||
      gd.size() != 4 || !std::equal(xd.begin(), xd.end(), gd.begin()))
    return ffi::Error::InvalidArgument(
        "effvit depthwise_conv3x3 gradient: expected x and g (B, H, W, C), kernel (3, 3, C)");
  const Map m{xd[0], xd[1], xd[2], xd[3]};
  const int64_t rows = m.b * m.h, taps = 9 * m.c;
  const int64_t chunks = std::min(rows, kChunks);
  std::vector<float> partial(chunks * taps, 0.f);
  const float *xp = x.typed_data(), *kp = k.typed_data(), *gp = g.typed_data();
  float *dxp = dx->typed_data(), *pp = partial.data();
  auto progress = std::make_shared<Progress>();
  auto work = [=]() {
    for (int64_t i; (i = progress->next.fetch_add(1)) < chunks;) {
      for (int64_t r = rows * i / chunks; r < rows * (i + 1) / chunks; ++r)
        Row(m, xp, gp, kp, dxp, pp + i * taps, r);
      std::lock_guard<std::mutex> lock(progress->mu);
      if (++progress->done == chunks) progress->all_done.notify_all();
    }
  };
  const int64_t helpers = std::min(chunks, pool.num_threads()) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work(); });
  work();
  {
    std::unique_lock<std::mutex> lock(progress->mu);
    progress->all_done.wait(lock, [&] { return progress->done == chunks; });
  }
  float* dkp = dk->typed_data();
  std::fill(dkp, dkp + taps, 0.f);
  for (int64_t i = 0; i < chunks; ++i)
    for (int64_t t = 0; t < taps; ++t) dkp[t] += pp[i * taps + t];
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffvitDepthwiseConv3x3BwdF32, DepthwiseConv3x3Bwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // kernel
                                  .Arg<ffi::Buffer<ffi::F32>>()   // g
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()); // dk
