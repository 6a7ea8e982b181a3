// Exact integer products of a few activation rows on the AMX int8 tiles: the decode step's rows (one per sequence,
// plus a sequence's speculative drafts) against 4- and 8-bit weights in blocks of 32 columns (the ggml formats,
// int4-g32). The activations are quantized per block of 32 to int16 (gemv_rows.h: quantize_x, split_x16) and
// enter as two int8 rows (x = 256 hi + lo); the weights are rearranged once, at load, into the tiles' B layout
// (16 weight rows x 32 columns per block, four consecutive columns of a row side by side). One tdpbsud gives the
// exact int32 dot products of four activation rows with 16 weight rows over two blocks; the float epilogue, per
// row, scales them by the block's weight and activation scales. A row's result depends on nothing but the row, and
// a tile instruction costs the same for one activation row as for four: a draft row costs ~0.14 of a one-token
// step (where the four-row integer kernels of gemv_rows.h, paying their arithmetic per row, cost ~0.4).
// Used by decode_stack.cpp for every integer row of a step (one-token decodes too, so both compute one function).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace tl {

// A part's weights (rows x K, groups of 32) in tile order: per 16-row chunk and 32-column block, the B operand
// (u8: 512 bytes, B[j][4w + i] = q[w][4j + i]; u4: 256 bytes of nibble pairs, byte 64t + 4w + i holding columns
// 4t + i (low nibble) and 16 + 4t + i (high) of row w, which unpack into B's rows t and 4 + t), and the block's
// scales and offsets of the 16 rows side by side (rows past the part's are zero): as float16 bits where the
// part's are exact in float16 (the ggml formats': fewer bytes a token), else float32
struct Amx8Weights {
  bool u4 = false, offsets = false, half = false;
  int64_t chunks = 0, blocks = 0;
  std::vector<uint8_t> q;
  std::vector<float> s, o;
  std::vector<uint16_t> s16, o16;

  // scale16, offset16: the same values as float16 bits, or null
  void build(bool four_bit, const uint8_t* src, const float* scale, const float* offset, const uint16_t* scale16,
             const uint16_t* offset16, int64_t rows, int64_t K) {
    u4 = four_bit;
    offsets = offset != nullptr;
    half = scale16 && (offset16 || !offsets);
    chunks = (rows + 15) / 16;
    blocks = K / 32;
    const int64_t per = u4 ? 256 : 512, row_bytes = u4 ? K / 2 : K, n_scales = chunks * blocks * 16;
    q.assign(chunks * blocks * per, 0);
    s.assign(half ? 0 : n_scales, 0.f);
    o.assign(offsets && !half ? n_scales : 0, 0.f);
    s16.assign(half ? n_scales : 0, 0);
    o16.assign(offsets && half ? n_scales : 0, 0);
    for (int64_t n = 0; n < rows; ++n) {
      const int64_t c = n / 16, w = n % 16;
      for (int64_t b = 0; b < blocks; ++b) {
        uint8_t* dst = q.data() + (c * blocks + b) * per;
        const uint8_t* row = src + n * row_bytes + b * (u4 ? 16 : 32);
        for (int64_t j = 0; j < (u4 ? 4 : 8); ++j)
          std::memcpy(dst + j * 64 + 4 * w, row + 4 * j, 4);
        const int64_t at = (c * blocks + b) * 16 + w;
        if (half) {
          s16[at] = scale16[n * blocks + b];
          if (offsets) o16[at] = offset16[n * blocks + b];
        } else {
          s[at] = scale[n * blocks + b];
          if (offsets) o[at] = offset[n * blocks + b];
        }
      }
    }
  }
};

}  // namespace tl

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512BW__)
#define TL_AMX8 1
#include <immintrin.h>

namespace tl {

// tiles 0-3 and 6-7: C, 4 rows per activation row (see amx8_split_rows) x 16 int32, one per group of `rows`
// activation rows (at most 4); 4: A, the group's rows x 64 int8; 5: B, 16 x 64 bytes (two blocks of 16 weight rows)
inline void amx8_configure(int64_t rows) {
  alignas(64) uint8_t cfg[64] = {};
  cfg[0] = 1;  // palette 1
  for (int t = 0; t < 8; ++t) {
    const uint16_t colsb = 64;
    std::memcpy(cfg + 16 + 2 * t, &colsb, 2);
    cfg[48 + t] = static_cast<uint8_t>(t == 5 ? 16 : 4 * rows);
  }
  asm volatile("" ::: "memory");  // the compiler does not see ldtilecfg read cfg: keep the stores above
  _tile_loadconfig(cfg);
}

// Activation rows (int16, quantize_x) as the tiles' A operands, two 32-column blocks per 64 columns. Per 64
// columns and row m, four rows of 64 bytes: the high bytes of the first block (the second half zero), of the
// second block (the first half zero), then the low bytes the same way (x = 256 hi + lo, lo in [-128, 127]); so
// one tile product gives each block's dot apart. xa [K / 64][padded][4][64], padded >= M rows (zero).
inline void amx8_split_rows(const int16_t* x, int64_t M, int64_t padded, int64_t K, std::vector<int8_t>& xa) {
  xa.assign(K / 64 * padded * 256, 0);
  const __m512i bias = _mm512_set1_epi16(128), byte = _mm512_set1_epi16(255);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; k += 32) {  // one block: its 32 values
      const __m512i v = _mm512_loadu_si512(x + m * K + k);
      const __m512i lo = _mm512_sub_epi16(_mm512_and_si512(_mm512_add_epi16(v, bias), byte), bias);
      const __m512i hi = _mm512_srai_epi16(_mm512_sub_epi16(v, lo), 8);
      int8_t* row = xa.data() + ((k / 64 * padded + m) * 4 + k % 64 / 32) * 64 + k % 64;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(row), _mm512_cvtepi16_epi8(hi));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + 2 * 64), _mm512_cvtepi16_epi8(lo));
    }
}

// the weights of 64 columns (two blocks) of chunk c as a B operand: 4-bit nibbles unpacked into bt, 8-bit in place
inline const uint8_t* amx8_b_operand(const Amx8Weights& W, int64_t c, int64_t kc, uint8_t* bt) {
  const int64_t per = W.u4 ? 256 : 512;
  const uint8_t* src = W.q.data() + (c * W.blocks + 2 * kc) * per;
  if (!W.u4) return src;
  const __m512i low4 = _mm512_set1_epi8(15);
  for (int h = 0; h < 2; ++h)
    for (int t = 0; t < 4; ++t) {
      const __m512i v = _mm512_loadu_si512(src + h * 256 + 64 * t);
      _mm512_store_si512(bt + h * 512 + 64 * t, _mm512_and_si512(v, low4));
      _mm512_store_si512(bt + h * 512 + 64 * (4 + t), _mm512_and_si512(_mm512_srli_epi16(v, 4), low4));
    }
  return bt;
}

// the products of one group of activation rows (its C tile stored at ct) into their accumulators: blocks b and
// b + 1 of chunk c, scaled by the weights' and the activations' block scales; offsets meet the block sums
inline void amx8_epilogue(const Amx8Weights& W, int64_t c, int64_t b, const int32_t* ct, int64_t n, const float* dx,
                          const float* xs, __m512* acc, __m512* off) {
  const int64_t B = W.blocks;
  for (int h = 0; h < 2; ++h) {
    const int64_t at = (c * B + b + h) * 16;
    auto load16 = [&](const std::vector<float>& f, const std::vector<uint16_t>& f16) {
      return W.half ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(f16.data() + at)))
                    : _mm512_loadu_ps(f.data() + at);
    };
    const __m512 sv = load16(W.s, W.s16), ov = W.offsets ? load16(W.o, W.o16) : _mm512_setzero_ps();
    for (int64_t m = 0; m < n; ++m) {
      const __m512i hi = _mm512_load_si512(ct + (4 * m + h) * 16), lo = _mm512_load_si512(ct + (4 * m + 2 + h) * 16);
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(hi, 8), lo));
      acc[m] = _mm512_fmadd_ps(dot, _mm512_mul_ps(sv, _mm512_set1_ps(dx[m * B + b + h])), acc[m]);
      if (W.offsets) off[m] = _mm512_fmadd_ps(ov, _mm512_set1_ps(xs[m * B + b + h]), off[m]);
    }
  }
}

// C tile t = 0 + A x B (tile numbers are immediates: one case per C tile)
inline void amx8_zero_dot(int t) {
  switch (t) {
    case 0: _tile_zero(0); _tile_dpbsud(0, 4, 5); break;
    case 1: _tile_zero(1); _tile_dpbsud(1, 4, 5); break;
    case 2: _tile_zero(2); _tile_dpbsud(2, 4, 5); break;
    case 3: _tile_zero(3); _tile_dpbsud(3, 4, 5); break;
    case 6: _tile_zero(6); _tile_dpbsud(6, 4, 5); break;
    default: _tile_zero(7); _tile_dpbsud(7, 4, 5); break;
  }
}

inline void amx8_store(int t, int32_t* ct) {
  switch (t) {
    case 0: _tile_stored(0, ct, 64); break;
    case 1: _tile_stored(1, ct, 64); break;
    case 2: _tile_stored(2, ct, 64); break;
    case 3: _tile_stored(3, ct, 64); break;
    case 6: _tile_stored(6, ct, 64); break;
    default: _tile_stored(7, ct, 64); break;
  }
}

// out[m * 16 + w] (m < M <= 3 g, g: the configured rows of a group) = weight row w of chunk c against activation
// row m: sum over blocks of s[w, b] dx[m, b] (exact int32 dot) + o[w, b] xs[m, b]. xa from amx8_split_rows (its
// row stride `padded`; the M rows from the first wanted, and rows past M to the end of the last group readable);
// dx, xs [M][blocks]: the activations' block scales and block sums (quantize_x). The products of 64 columns are
// stored (and scaled) while the next 64 columns' run, in the other set of C tiles: a tile store waits for its
// product, and a product for the store of its tile (a fourth group, with no tiles left to take turns, cost more
// than a second pass over the weights).
inline void amx8_chunk(const Amx8Weights& W, int64_t c, const int8_t* xa, int64_t padded, int64_t M, int64_t g,
                       int64_t K, const float* dx, const float* xs, float* out) {
  alignas(64) uint8_t bt[2][1024];
  alignas(64) int32_t ct[16 * 16];
  __m512 acc[12], off[12];
  for (int64_t m = 0; m < M; ++m) acc[m] = off[m] = _mm512_setzero_ps();
  const int64_t groups = (M + g - 1) / g, B = W.blocks, chunks = K / 64;
  static constexpr int turns[2][3] = {{0, 1, 2}, {3, 6, 7}};  // the C tiles of even and odd 64 columns
  for (int64_t kc = 0; kc <= chunks; ++kc) {
    const int now = static_cast<int>(kc & 1);
    if (kc < chunks) {
      _tile_loadd(5, amx8_b_operand(W, c, kc, bt[now]), 64);
      const int8_t* a = xa + kc * padded * 256;
      for (int64_t i = 0; i < groups; ++i) {
        _tile_loadd(4, a + i * g * 256, 64);
        amx8_zero_dot(turns[now][i]);
      }
    }
    if (kc == 0) continue;
    for (int64_t i = 0; i < groups; ++i) {  // the previous 64 columns' products, while these run
      amx8_store(turns[1 - now][i], ct);
      const int64_t m0 = i * g;
      amx8_epilogue(W, c, 2 * (kc - 1), ct, std::min(g, M - m0), dx + m0 * B, xs + m0 * B, acc + m0, off + m0);
    }
  }
  for (int64_t m = 0; m < M; ++m) _mm512_storeu_ps(out + m * 16, _mm512_add_ps(acc[m], off[m]));
}

}  // namespace tl
#endif
