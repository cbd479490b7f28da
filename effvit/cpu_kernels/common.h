// Helpers shared by effvit's XLA:CPU kernels: unaligned vector loads and stores, a loop over
// channels 16 at a time, and a parallel loop on XLA's intra-op thread pool.
#ifndef EFFVIT_CPU_KERNELS_COMMON_H_
#define EFFVIT_CPU_KERNELS_COMMON_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace effvit {

namespace ffi = xla::ffi;

// Work that sums over rows is split into this many chunks whatever the thread count, and the
// chunks' partial sums are added in chunk order: results do not depend on threads or timing.
constexpr int64_t kChunks = 16;
typedef float Vec16 __attribute__((vector_size(64), aligned(4)));

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

// fn(chunk, begin, end) for rows [begin, end) of [0, rows) split into at most kChunks chunks,
// the same split whatever the thread count.
template <typename F>
void ForRowChunks(ffi::ThreadPool& pool, int64_t rows, F fn) {
  const int64_t chunks = std::min(rows, kChunks);
  ParallelFor(pool, chunks, [=](int64_t i) { fn(i, rows * i / chunks, rows * (i + 1) / chunks); });
}

// out[t] = sum over i < count of partials[i * stride + t], for t < n, added in order of i.
inline void AddInOrder(const float* partials, int64_t count, int64_t stride, int64_t n,
                       float* out) {
  std::fill(out, out + n, 0.f);
  for (int64_t i = 0; i < count; ++i)
    for (int64_t t = 0; t < n; ++t) out[t] += partials[i * stride + t];
}

// out[0, n) = what fn(begin, end, partial) adds to its chunk's zeroed partial (n floats), over
// ForRowChunks's chunks, the partials added in chunk order: independent of threads and timing.
template <typename F>
void SumOverRowChunks(ffi::ThreadPool& pool, int64_t rows, int64_t n, float* out, F fn) {
  const int64_t chunks = std::min(rows, kChunks);
  std::vector<float> partial(chunks * n, 0.f);
  float* pp = partial.data();
  ForRowChunks(pool, rows, [=](int64_t i, int64_t begin, int64_t end) {
    fn(begin, end, pp + i * n);
  });
  AddInOrder(pp, chunks, n, n, out);
}

// Shape checks of FFI buffers: (rows, columns), (rows, cols) with cols < 0 for any, and (n,).
inline bool IsRows(ffi::Span<const int64_t> d) { return d.size() == 2; }

inline bool IsMatrix(ffi::Span<const int64_t> d, int64_t rows, int64_t cols = -1) {
  return d.size() == 2 && d[0] == rows && (cols < 0 || d[1] == cols);
}

inline bool IsVector(ffi::Span<const int64_t> d, int64_t n) { return d.size() == 1 && d[0] == n; }

}  // namespace effvit

#endif  // EFFVIT_CPU_KERNELS_COMMON_H_
