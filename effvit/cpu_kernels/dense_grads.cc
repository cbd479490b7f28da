// The parameter gradient of a dense layer y = x W + b over P rows (tokens of every image):
//
//   dW[c, f] = sum_p x[p, c] g[p, f],   db[f] = sum_p g[p, f],   g = dL/dy
//
// a matmul that contracts the long row axis of both operands (P = batch x tokens, up to
// 100k) down to a small C x F. XLA:CPU hands it to Eigen, which splits the work over the
// output's blocks only: with C x F as small as 32 x 32 one thread runs it, and at
// (P, C, F) = (25088, 256, 32) it took 7.9 ms where PyTorch's took 3.1.
//
// Work: the rows are cut into chunks (more where C is small) and C into blocks of 48; each
// (chunk, block) task accumulates its rows into its own partial dW in registers, 6 x 64 at a
// time, over row blocks that stay in L2. The partials are then added in chunk order, so the
// result depends on the shapes only, not on the thread count or timing.
//
// The filter gradient of a 3×3 conv (stride 1, zero padding 1) on NHWC maps is nine such
// matmuls, one per tap (dy, dx), each over the input shifted by that tap:
//
//   dK[dy, dx, c, f] = sum_{b,i,j} x[b, i + dy - 1, j + dx - 1, c] g[b, i, j, f]
//
// XLA:CPU runs it as a convolution whose window is the whole map, after transposing x and g
// to put the batch innermost. Here the caller pads x by (1, 2) rows and (1, 1) columns and g
// by 2 zero columns on the right, both Wp = W + 2 wide: output pixel q = i Wp + j of an image
// then reads tap (dy, dx) at padded pixel q + dy Wp + dx, one fixed offset per tap, so each tap
// is the dense case above with x's rows shifted (the padded columns of g are zero and cancel
// what the shift wraps into the next row; the second bottom row of x keeps it inside the
// image).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"
#include "matmul_tiles.h"

namespace ffi = xla::ffi;

namespace {

using namespace effvit;

constexpr int64_t kRowsPerTile = 6;    // the tiles' heights divide multiples of 6 (6, 12, 24)
constexpr int64_t kBlockC = 48;        // channels per task
constexpr int64_t kBlockBytes = 1 << 19;   // x and g rows read per pass: half of L2

int64_t CeilDiv(int64_t n, int64_t m) { return (n + m - 1) / m; }

// C in near-equal blocks of whole register tiles, at most kBlockC each.
int64_t ChannelBlocks(int64_t c_total) { return std::max<int64_t>(1, CeilDiv(c_total, kBlockC)); }

int64_t BlockChannels(int64_t c_total) {
  return CeilDiv(CeilDiv(c_total, ChannelBlocks(c_total)), kRowsPerTile) * kRowsPerTile;
}

}  // namespace

static ffi::Error DenseGrads(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dw,
                             ffi::ResultBuffer<ffi::F32> db) {
  const auto xd = x.dimensions(), gd = g.dimensions();
  if (!IsRows(xd) || !IsRows(gd) || xd[0] != gd[0])
    return ffi::Error::InvalidArgument(
        "effvit dense gradient: expected x (P, C) and g (P, F) with the same P");
  const int64_t p_total = xd[0], c_total = xd[1], f_total = gd[1];
  const float *xp = x.typed_data(), *gp = g.typed_data();
  // Rows in chunks of at least 512 (fewer partials to add), enough chunks x blocks for the
  // threads to balance.
  const int64_t c_blocks = ChannelBlocks(c_total), block_c = BlockChannels(c_total);
  const int64_t chunks = std::clamp<int64_t>(
      std::min<int64_t>(32 / c_blocks, p_total / 512), 1, kChunks);
  const int64_t block_rows = std::clamp<int64_t>(
      kBlockBytes / (4 * (std::min(block_c, c_total) + f_total)), 16, 1024);
  const int64_t n = c_total * f_total;
  std::vector<float> partial(chunks * (n + f_total), 0.f);   // per chunk: dW, then db
  float* pp = partial.data();
  ParallelFor(pool, chunks * c_blocks, [=](int64_t task) {
    const int64_t chunk = task / c_blocks, cb = task % c_blocks;
    const int64_t begin = p_total * chunk / chunks, end = p_total * (chunk + 1) / chunks;
    const int64_t c0 = cb * block_c, cn = std::min(block_c, c_total - c0);
    float* out = pp + chunk * (n + f_total);
    for (int64_t r = begin; r < end; r += block_rows) {
      const int64_t rows = std::min(block_rows, end - r);
      float* o = out + c0 * f_total;
      MatmulTiles(Transposed{xp + r * c_total + c0, c_total}, gp + r * f_total, f_total, rows,
                  cn, o, f_total, o);
      if (cb == 0) {
        float* dbp = out + n;
        for (int64_t q = r; q < r + rows; ++q)
          ForChannelBlocks(f_total, [&](auto lane, int64_t f0) {
            using V = decltype(lane);
            Store<V>(dbp + f0, Load<V>(dbp + f0) + Load<V>(gp + q * f_total + f0));
          });
      }
    }
  });
  AddInOrder(pp, chunks, n + f_total, n, dw->typed_data());
  AddInOrder(pp + n, chunks, n + f_total, f_total, db->typed_data());
  return ffi::Error::Success();
}

static ffi::Error Conv3x3FilterGrads(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xpad,
                                     ffi::Buffer<ffi::F32> gpad,
                                     ffi::ResultBuffer<ffi::F32> dk) {
  const auto xd = xpad.dimensions(), gd = gpad.dimensions();
  if (xd.size() != 4 || gd.size() != 4 || xd[0] != gd[0] || xd[1] != gd[1] + 3 ||
      xd[2] != gd[2] || gd[2] < 3)
    return ffi::Error::InvalidArgument(
        "effvit 3x3 conv filter gradient: expected x padded to (B, H + 3, W + 2, C) and g to "
        "(B, H, W + 2, F)");
  const int64_t wp = gd[2], c_total = xd[3], f_total = gd[3];
  const int64_t q_image = gd[1] * wp, x_image = xd[1] * wp, p_total = gd[0] * q_image;
  const float *xp = xpad.typed_data(), *gp = gpad.typed_data();
  const int64_t c_blocks = ChannelBlocks(c_total), block_c = BlockChannels(c_total);
  // Nine times the work of a dense gradient per row: fewer, larger chunks (fewer partials).
  const int64_t chunks = std::clamp<int64_t>(
      std::min<int64_t>(16 / c_blocks, p_total / 512), 1, kChunks);
  // g's rows and the x rows of all nine taps (2 Wp + 2 more) stay in L2 across the taps.
  const int64_t block_rows = std::clamp<int64_t>(
      kBlockBytes / (4 * (std::min(block_c, c_total) + f_total)) - 2 * wp - 2, 16, 1024);
  const int64_t n = 9 * c_total * f_total;
  std::vector<float> partial(chunks * n, 0.f);
  float* pp = partial.data();
  ParallelFor(pool, chunks * c_blocks, [=](int64_t task) {
    const int64_t chunk = task / c_blocks, cb = task % c_blocks;
    const int64_t begin = p_total * chunk / chunks, end = p_total * (chunk + 1) / chunks;
    const int64_t c0 = cb * block_c, cn = std::min(block_c, c_total - c0);
    float* out = pp + chunk * n;
    for (int64_t r = begin; r < end;) {
      const int64_t b = r / q_image, q = r % q_image;
      const int64_t rows = std::min({block_rows, end - r, q_image - q});
      for (int64_t tap = 0; tap < 9; ++tap) {
        const int64_t shift = (tap / 3) * wp + tap % 3;
        float* o = out + (tap * c_total + c0) * f_total;
        MatmulTiles(Transposed{xp + (b * x_image + q + shift) * c_total + c0, c_total},
                    gp + r * f_total, f_total, rows, cn, o, f_total, o);
      }
      r += rows;
    }
  });
  AddInOrder(pp, chunks, n, n, dk->typed_data());
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffvitConv3x3FilterGradsF32, Conv3x3FilterGrads,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x, padded
                                  .Arg<ffi::Buffer<ffi::F32>>()   // g, padded
                                  .Ret<ffi::Buffer<ffi::F32>>()); // dK (3, 3, C, F)

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffvitDenseGradsF32, DenseGrads,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // g
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dW
                                  .Ret<ffi::Buffer<ffi::F32>>()); // db
