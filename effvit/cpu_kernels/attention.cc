// Softmax attention over few keys, forward and gradient, for XLA:CPU: spatial-reduction
// attention (PVT, PVTv2, Twins' GSA: M = 49 keys at 224 px) and Twins' 7x7 windows.
//
// Per batch element and head, with Q (N, d), K and V (M, d) and s = d^-1/2:
//   S = s Q Kᵀ,   P = softmax(S) over the keys,   O = P V,   lse_i = log Σ_j exp(S_ij)
// Gradient, given dO, from the forward's O and lse:
//   P = exp(S − lse),   dV = Pᵀ dO,   dP = dO Vᵀ,   D_i = Σ_t dO_it O_it,
//   dS = P ⊙ (dP − D),   dQ = s dS K,   dK = s dSᵀ Q
// XLA:CPU runs these as a dozen ops, each a pass over the (N, M) logits or probabilities in
// memory, with transposes between them (pvt_v2_b0's training step: 16% of its time for 2% of
// its multiply-adds). Here a task takes up to kChunkRows query rows of one (batch element,
// head) and goes kBlockRows rows at a time: S, P, dP and dS stay in cache, and only q, k, v,
// o, lse and the gradients touch memory. The products run on matmul_tiles.h's register tiles.
//
// dK and dV sum over the query rows: each chunk of rows adds into a partial of its own and the
// partials are added in chunk order. The chunks depend on N only, so results do not depend on
// the thread count, on timing, or on the other images of the batch.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "common.h"
#include "conv_gelu.h"
#include "matmul_tiles.h"

namespace ffi = xla::ffi;

namespace {

using namespace effvit;

constexpr int64_t kBlockRows = 64;    // S, P, dP, dS of a block: 64 x 64 floats each at M <= 64
constexpr int64_t kChunkRows = 512;   // query rows of a task

// q, o (B, N, H, d); k, v (B, M, H, d); lse (B, N, H). mp: M rounded up to a multiple of 16.
struct Dims {
  int64_t batch, n, m, heads, d, mp;
  int64_t chunks() const { return (n + kChunkRows - 1) / kChunkRows; }
  // An item is a chunk of one (batch element, head); a task takes `group` consecutive items,
  // several when N is small (Twins' windows, the last stage), for the setup's sake.
  int64_t items() const { return batch * heads * chunks(); }
  int64_t group() const {
    return std::clamp<int64_t>(kChunkRows / n, 1, std::max<int64_t>(items() / 8, 1));
  }
  int64_t tasks() const { return (items() + group() - 1) / group(); }
  int64_t ld() const { return heads * d; }   // between tokens
  // Offset of token i of head h of batch element b, in an array of `tokens` tokens.
  int64_t At(int64_t b, int64_t tokens, int64_t i, int64_t h) const {
    return ((b * tokens + i) * heads + h) * d;
  }
};

// One (batch element, head)'s keys and values, laid out for the products:
//   kt (d, mp) = s Kᵀ, zero columns past M:  S = Q kt
//   v (M, d):                                O = P v
// and for the gradient:
//   vt (d, mp) = Vᵀ:                         dP = dO vt
//   ks (M, d) = s K:                         dQ = dS ks
struct Keys {
  std::vector<float> kt, v, vt, ks;
  // Columns of kt and vt past M stay zero.
  Keys(const Dims& dm, bool grads) : kt(dm.d * dm.mp, 0.f), v(dm.m * dm.d) {
    if (grads) {
      vt.assign(dm.d * dm.mp, 0.f);
      ks.resize(dm.m * dm.d);
    }
  }
  void Fill(const Dims& dm, const float* k, const float* v_in, int64_t b, int64_t h,
            float scale) {
    const bool grads = !ks.empty();
    for (int64_t j = 0; j < dm.m; ++j) {
      const float* kj = k + dm.At(b, dm.m, j, h);
      const float* vj = v_in + dm.At(b, dm.m, j, h);
      for (int64_t t = 0; t < dm.d; ++t) {
        kt[t * dm.mp + j] = scale * kj[t];
        v[j * dm.d + t] = vj[t];
        if (grads) {
          vt[t * dm.mp + j] = vj[t];
          ks[j * dm.d + t] = scale * kj[t];
        }
      }
    }
  }
};

float HorizontalSum(Vec16 v) {
  float s = 0.f;
  for (int l = 0; l < 16; ++l) s += v[l];
  return s;
}

float RowMax(const float* row, int64_t m) {
  constexpr float kLowest = std::numeric_limits<float>::lowest();
  Vec16 mv = Vec16{} + kLowest;
  float mx = kLowest;
  int64_t j = 0;
  for (; j + 16 <= m; j += 16) {
    const Vec16 x = Load<Vec16>(row + j);
    mv = x > mv ? x : mv;
  }
  for (int l = 0; l < 16; ++l) mx = std::max(mx, mv[l]);
  for (; j < m; ++j) mx = std::max(mx, row[j]);
  return mx;
}

// row[j] = exp(row[j] - shift) for j < m (shift >= every row[j]); returns their sum.
float ExpRow(float* row, int64_t m, float shift) {
  Vec16 acc{};
  float tail = 0.f;
  int64_t j = 0;
  for (; j + 16 <= m; j += 16) {
    const Vec16 e = ExpNonPositive<Vec16>(Load<Vec16>(row + j) - shift);
    Store<Vec16>(row + j, e);
    acc += e;
  }
  for (; j < m; ++j) tail += row[j] = ExpNonPositive<float>(row[j] - shift);
  return HorizontalSum(acc) + tail;
}

float Dot(const float* a, const float* b, int64_t n) {
  Vec16 acc{};
  float tail = 0.f;
  int64_t t = 0;
  for (; t + 16 <= n; t += 16) acc += Load<Vec16>(a + t) * Load<Vec16>(b + t);
  for (; t < n; ++t) tail += a[t] * b[t];
  return HorizontalSum(acc) + tail;
}

// Copies `rows` rows of `cols` floats, from row stride `from_ld` to `to_ld`, times `scale`.
void CopyRows(const float* from, int64_t from_ld, float* to, int64_t to_ld, int64_t rows,
              int64_t cols, float scale = 1.f) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t t = 0; t < cols; ++t) to[r * to_ld + t] = scale * from[r * from_ld + t];
}

// Per-task scratch for one block: the (rows, mp) matrices and (rows, d) rows of a block.
struct Block {
  std::vector<float> zeros;
  std::unique_ptr<float[]> s, p, o, a, b;   // every use writes before it reads
  float inv[kBlockRows];
  explicit Block(const Dims& dm)
      : zeros(std::max(dm.mp, dm.d), 0.f), s(new float[kBlockRows * dm.mp]),
        p(new float[kBlockRows * dm.mp]), o(new float[kBlockRows * dm.d]),
        a(new float[kBlockRows * dm.d]), b(new float[kBlockRows * dm.d]) {}
};

// S (rows, mp) of `rows` query rows from q (rows ld() apart). The gradient recomputes S with
// this same call, bit for bit, so that S - lse <= 0 where ExpRow needs it.
void Logits(const Dims& dm, const Keys& keys, const Block& bk, const float* q, int64_t rows,
            float* s) {
  MatmulTiles(Plain{q, dm.ld()}, keys.kt.data(), dm.mp, dm.d, rows, bk.zeros.data(), 0, s);
}

// O and lse of `rows` query rows from q (rows ld() apart; o likewise, lse heads apart).
void ForwardBlock(const Dims& dm, const Keys& keys, Block& bk, const float* q, int64_t rows,
                  float* o, float* lse) {
  const int64_t mp = dm.mp, d = dm.d;
  Logits(dm, keys, bk, q, rows, bk.s.get());
  for (int64_t r = 0; r < rows; ++r) {
    float* row = bk.s.get() + r * mp;
    const float mx = RowMax(row, dm.m), sum = ExpRow(row, dm.m, mx);
    lse[r * dm.heads] = mx + std::log(sum);
    bk.inv[r] = 1.f / sum;
  }
  MatmulTiles(Plain{bk.s.get(), mp}, keys.v.data(), d, dm.m, rows, bk.zeros.data(), 0,
              bk.o.get());
  for (int64_t r = 0; r < rows; ++r)
    CopyRows(bk.o.get() + r * d, d, o + r * dm.ld(), dm.ld(), 1, d, bk.inv[r]);
}

// dQ of `rows` query rows (strided as in ForwardBlock), and their terms of dK / s and dV added
// to dk, dv (M, d).
void BackwardBlock(const Dims& dm, const Keys& keys, Block& bk, const float* q, const float* o,
                   const float* lse, const float* g, int64_t rows, float* dq, float* dk,
                   float* dv) {
  const int64_t mp = dm.mp, d = dm.d, m = dm.m, ld = dm.ld();
  float *p = bk.p.get(), *ds = bk.s.get();
  Logits(dm, keys, bk, q, rows, p);
  for (int64_t r = 0; r < rows; ++r) ExpRow(p + r * mp, m, lse[r * dm.heads]);
  MatmulTiles(Plain{g, ld}, keys.vt.data(), mp, d, rows, bk.zeros.data(), 0, ds);   // dP
  for (int64_t r = 0; r < rows; ++r) {
    const float dr = Dot(g + r * ld, o + r * ld, d);
    for (int64_t j = 0; j < m; ++j) ds[r * mp + j] = p[r * mp + j] * (ds[r * mp + j] - dr);
  }
  MatmulTiles(Plain{ds, mp}, keys.ks.data(), d, m, rows, bk.zeros.data(), 0, bk.o.get());
  CopyRows(bk.o.get(), d, dq, ld, rows, d);
  CopyRows(q, ld, bk.a.get(), d, rows, d);
  CopyRows(g, ld, bk.b.get(), d, rows, d);
  MatmulTiles(Transposed{ds, mp}, bk.a.get(), d, rows, m, dk, d, dk);
  MatmulTiles(Transposed{p, mp}, bk.b.get(), d, rows, m, dv, d, dv);
}

constexpr char kShapes[] =
    "effvit attention: expected q (B, N, H, d), k and v (B, M, H, d), M >= 1";

// Whether q is (B, N, H, d) and k, v (B, M, H, d); if so, sets *dm.
bool GetDims(ffi::Span<const int64_t> q, ffi::Span<const int64_t> k, ffi::Span<const int64_t> v,
             Dims* dm) {
  if (q.size() != 4 || k.size() != 4 || v.size() != 4 || k[0] != q[0] || k[2] != q[2] ||
      k[3] != q[3] || v[0] != k[0] || v[1] != k[1] || v[2] != k[2] || v[3] != k[3] || k[1] < 1)
    return false;
  *dm = Dims{q[0], q[1], k[1], q[2], q[3], (k[1] + 15) / 16 * 16};
  return true;
}

bool Same(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b) {
  return std::equal(a.begin(), a.end(), b.begin(), b.end());
}

bool IsLse(const Dims& dm, ffi::Span<const int64_t> l) {
  return l.size() == 3 && l[0] == dm.batch && l[1] == dm.n && l[2] == dm.heads;
}

// fn(keys, block, item) for every item, a task's items on one thread sharing its scratch.
template <typename F>
void ForItems(ffi::ThreadPool& pool, const Dims& dm, bool grads, F fn) {
  ParallelFor(pool, dm.tasks(), [=](int64_t task) {
    Keys keys(dm, grads);
    Block bk(dm);
    const int64_t end = std::min(dm.items(), (task + 1) * dm.group());
    for (int64_t item = task * dm.group(); item < end; ++item) fn(keys, bk, item);
  });
}

}  // namespace

static ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                            ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v, float scale,
                            ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse) {
  Dims dm;
  if (!GetDims(q.dimensions(), k.dimensions(), v.dimensions(), &dm))
    return ffi::Error::InvalidArgument(kShapes);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = o->typed_data(), *lp = lse->typed_data();
  ForItems(pool, dm, false, [=](Keys& keys, Block& bk, int64_t item) {
    const int64_t chunk = item % dm.chunks(), bh = item / dm.chunks();
    const int64_t b = bh / dm.heads, h = bh % dm.heads;
    keys.Fill(dm, kp, vp, b, h, scale);
    const int64_t end = std::min(dm.n, (chunk + 1) * kChunkRows);
    for (int64_t i = chunk * kChunkRows; i < end; i += kBlockRows) {
      const int64_t at = dm.At(b, dm.n, i, h);
      ForwardBlock(dm, keys, bk, qp + at, std::min(kBlockRows, end - i), op + at,
                   lp + (b * dm.n + i) * dm.heads + h);
    }
  });
  return ffi::Error::Success();
}

static ffi::Error AttentionBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                               ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                               ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse,
                               ffi::Buffer<ffi::F32> g, float scale,
                               ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                               ffi::ResultBuffer<ffi::F32> dv) {
  Dims dm;
  if (!GetDims(q.dimensions(), k.dimensions(), v.dimensions(), &dm))
    return ffi::Error::InvalidArgument(kShapes);
  if (!Same(o.dimensions(), q.dimensions()) || !Same(g.dimensions(), q.dimensions()) ||
      !IsLse(dm, lse.dimensions()))
    return ffi::Error::InvalidArgument(
        "effvit attention gradient: expected o and dO shaped as q, lse (B, N, H)");
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *op = o.typed_data(), *lp = lse.typed_data(), *gp = g.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  // Each task's terms of dK / s and dV, (M, d) each, then added up in chunk order.
  const int64_t part = 2 * dm.m * dm.d;
  std::vector<float> partials(dm.items() * part, 0.f);
  float* pp = partials.data();
  ForItems(pool, dm, true, [=](Keys& keys, Block& bk, int64_t item) {
    const int64_t chunk = item % dm.chunks(), bh = item / dm.chunks();
    const int64_t b = bh / dm.heads, h = bh % dm.heads;
    keys.Fill(dm, kp, vp, b, h, scale);
    float* dk_part = pp + item * part;
    const int64_t end = std::min(dm.n, (chunk + 1) * kChunkRows);
    for (int64_t i = chunk * kChunkRows; i < end; i += kBlockRows) {
      const int64_t at = dm.At(b, dm.n, i, h);
      BackwardBlock(dm, keys, bk, qp + at, op + at, lp + (b * dm.n + i) * dm.heads + h, gp + at,
                    std::min(kBlockRows, end - i), dqp + at, dk_part, dk_part + dm.m * dm.d);
    }
  });
  ParallelFor(pool, dm.batch * dm.heads, [=](int64_t bh) {
    std::vector<float> sum(part);
    AddInOrder(pp + bh * dm.chunks() * part, dm.chunks(), part, part, sum.data());
    const int64_t b = bh / dm.heads, h = bh % dm.heads, at = dm.At(b, dm.m, 0, h);
    CopyRows(sum.data(), dm.d, dkp + at, dm.ld(), dm.m, dm.d, scale);
    CopyRows(sum.data() + dm.m * dm.d, dm.d, dvp + at, dm.ld(), dm.m, dm.d);
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffvitAttentionF32, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q (B, N, H, d)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k (B, M, H, d)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v (B, M, H, d)
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // o (B, N, H, d)
                                  .Ret<ffi::Buffer<ffi::F32>>()); // lse (B, N, H)

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffvitAttentionBwdF32, AttentionBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v
                                  .Arg<ffi::Buffer<ffi::F32>>()   // o
                                  .Arg<ffi::Buffer<ffi::F32>>()   // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dO
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()); // dv
