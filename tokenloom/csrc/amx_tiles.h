// Matrix products of a wide decode batch on Intel AMX tiles: quantized weight rows are dequantized to bfloat16,
// 16 rows at a time, into a small buffer the tiles read, and met by the batch's activations (bfloat16, laid out
// as AMX wants its B operand) in tdpbf16ps. A row costs its dequantization once per step, whatever the batch, so
// from about eight rows on this beats the integer matrix-vector kernels of gemv_rows.h, whose float epilogue per
// block of 32 columns is paid per (weight row, activation row). The weights become what the layer-by-layer
// path's dequantization gives (w = q s + o, rounded to bfloat16) and the products are summed in float32 by the
// tiles: the function of the torch path, in another summation order. Used by decode_stack.cpp.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define TL_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace tl {

// Linux hands out the tile registers' state only on request (once per process)
inline bool amx_usable() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

// tiles 0-3: C, 16 weight rows x 16 activation rows (float32) for up to four blocks of 16 activation rows;
// 4: A, 16 weight rows x 32 columns (bfloat16); 5: B, 16 column pairs x 16 activation rows x 2 (bfloat16)
inline void amx_configure() {
  alignas(64) uint8_t cfg[64] = {};
  cfg[0] = 1;  // palette 1
  for (int t = 0; t < 6; ++t) {
    const uint16_t colsb = 64;
    std::memcpy(cfg + 16 + 2 * t, &colsb, 2);
    cfg[48 + t] = 16;
  }
  asm volatile("" ::: "memory");  // the compiler does not see ldtilecfg read cfg: keep the stores above
  _tile_loadconfig(cfg);
}

// 0, 16, 32, ... 240: the scatter offsets (in 4-byte units) of 16 values 64 bytes apart, one tile row each
inline __m512i lanes_times16() {
  return _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                            _mm512_set1_epi32(16));
}

// x [M, K] (float32 holding bfloat16 values) as B operands: per block of 16 rows, [K / 2][16][2] bfloat16
// (rows past M are zero); a row's 32 columns become 16 pairs, scattered 16 rows apart
inline void amx_pack_x(const float* x, int64_t M, int64_t K, std::vector<uint16_t>& out) {
  const int64_t blocks = (M + 15) / 16;
  out.assign(blocks * K * 16, 0);
  const __m512i pair_index = lanes_times16();
  for (int64_t m = 0; m < M; ++m) {
    uint16_t* dst = out.data() + (m / 16) * K * 16 + (m % 16) * 2;
    const float* src = x + m * K;
    for (int64_t k = 0; k < K; k += 32) {
      const __m512i pairs = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + k + 16), _mm512_loadu_ps(src + k));
      _mm512_i32scatter_epi32(dst + k * 16, pair_index, pairs, 4);
    }
  }
}

// one 32-column block of a 4-bit split32 row (low nibbles: columns 0-15, high: 16-31), w = q s + o, to bfloat16
inline void amx_dequant_u4(const uint8_t* q, float s, float o, uint16_t* out) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  const __m512 sv = _mm512_set1_ps(s), ov = _mm512_set1_ps(o);
  const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15))), sv, ov);
  const __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), sv, ov);
  _mm512_storeu_si512(out, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

// one 32-column block of an 8-bit row, w = q s + o (signed: q as int8), to bfloat16
template <bool SIGNED>
inline void amx_dequant_u8(const uint8_t* q, float s, float o, uint16_t* out) {
  const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16));
  const __m512i va = SIGNED ? _mm512_cvtepi8_epi32(a) : _mm512_cvtepu8_epi32(a);
  const __m512i vb = SIGNED ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b);
  const __m512 sv = _mm512_set1_ps(s), ov = _mm512_set1_ps(o);
  const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(va), sv, ov);
  const __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(vb), sv, ov);
  _mm512_storeu_si512(out, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

// c [16 weight rows][16 activation rows] (float32) for the activation blocks mb0..mb0+nb (nb <= 4), from w
// (16 rows x K bfloat16, row-major) and xp (amx_pack_x); K % 32 == 0; the tiles are configured
inline void amx_tile_products(const uint16_t* w, const uint16_t* xp, int64_t K, int64_t mb0, int64_t nb, float* c) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const int64_t bstride = K * 16;  // bfloat16 values per activation block in xp
  for (int64_t k = 0; k < K; k += 32) {
    _tile_loadd(4, w + k, K * 2);
    const uint16_t* b = xp + mb0 * bstride + k * 16;
    _tile_loadd(5, b, 64);
    _tile_dpbf16ps(0, 4, 5);
    if (nb > 1) {
      _tile_loadd(5, b + bstride, 64);
      _tile_dpbf16ps(1, 4, 5);
    }
    if (nb > 2) {
      _tile_loadd(5, b + 2 * bstride, 64);
      _tile_dpbf16ps(2, 4, 5);
    }
    if (nb > 3) {
      _tile_loadd(5, b + 3 * bstride, 64);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
  _tile_stored(0, c, 64);
  if (nb > 1) _tile_stored(1, c + 256, 64);
  if (nb > 2) _tile_stored(2, c + 512, 64);
  if (nb > 3) _tile_stored(3, c + 768, 64);
}


enum class TileWeights { U4, U8, S8 };

// out[m * 16 + r] (m < M, r < 16) = weight row r of the `count` rows at q (row_bytes apart; rows past count
// give 0) against activation row m, from xp (amx_pack_x); scales s and offsets o (may be null) per group of
// `group` columns, G per row; wt: a scratch buffer. The tiles are configured.
inline void amx_rows16(TileWeights kind, const uint8_t* q, int64_t row_bytes, const float* s, const float* o,
                       int64_t G, int64_t group, int64_t count, const uint16_t* xp, int64_t M, int64_t K,
                       std::vector<uint16_t>& wt, float* out) {
  wt.resize(16 * K);
  for (int64_t r = 0; r < 16; ++r) {
    uint16_t* dst = wt.data() + r * K;
    if (r >= count) {
      std::memset(dst, 0, K * 2);
      continue;
    }
    for (int64_t b = 0; b < K / 32; ++b) {
      const int64_t g = r * G + b * 32 / group;
      const float sc = s[g], off = o ? o[g] : 0.f;
      const uint8_t* qb = q + r * row_bytes + (kind == TileWeights::U4 ? b * 16 : b * 32);
      if (kind == TileWeights::U4) amx_dequant_u4(qb, sc, off, dst + b * 32);
      else if (kind == TileWeights::U8) amx_dequant_u8<false>(qb, sc, off, dst + b * 32);
      else amx_dequant_u8<true>(qb, sc, off, dst + b * 32);
    }
  }
  alignas(64) float c[1024];
  const int64_t blocks = (M + 15) / 16;
  for (int64_t mb0 = 0; mb0 < blocks; mb0 += 4) {
    const int64_t nb = std::min<int64_t>(4, blocks - mb0);
    amx_tile_products(wt.data(), xp, K, mb0, nb, c);
    const __m512i row_index = lanes_times16();
    for (int64_t i = 0; i < nb; ++i) {  // c[n][m] to out[m][n]: weight row n's 16 results scattered 16 apart
      const int64_t m0 = (mb0 + i) * 16, rows = std::min<int64_t>(16, M - m0);
      const __mmask16 keep = rows >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << rows) - 1);
      for (int64_t r = 0; r < 16; ++r)
        _mm512_mask_i32scatter_ps(out + m0 * 16 + r, keep, row_index, _mm512_load_ps(c + i * 256 + r * 16), 4);
    }
  }
}

}  // namespace tl
#endif
