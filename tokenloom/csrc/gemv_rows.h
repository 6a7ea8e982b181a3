// Row kernels of the weight-only matrix-vector products: one output row (one weight row against one activation
// row) per call, fp32 accumulation. Shared by quant_gemv.cpp (one op per layer) and decode_stack.cpp (the whole
// decoder in one call). What the formats are: tokenloom.kernels.quant_ops.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace tl {

// per-group sums of x: xs[m, g] = sum_{k in group g} x[m, k]
inline std::vector<float> group_sums(const float* x, int64_t M, int64_t K, int64_t group) {
  int64_t G = (K + group - 1) / group;
  std::vector<float> xs(M * G, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xs[m * G + k / group] += x[m * K + k];
  return xs;
}

#ifdef __AVX512F__

// sum_g (o[g] + coef * s[g]) * xs[g] over the G groups of a row (o may be null): the offsets' share of a row's
// dot product, vectorised (a scalar chain of dependent adds here cost more than the row's weights did)
inline float offset_dot(const float* o, const float* s, float coef, const float* xs, int64_t G) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; g += 16) {
    const __mmask16 m = G - g >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (G - g)) - 1);
    __m512 v = o ? _mm512_maskz_loadu_ps(m, o + g) : _mm512_setzero_ps();
    if (coef != 0.f) v = _mm512_fmadd_ps(_mm512_set1_ps(coef), _mm512_maskz_loadu_ps(m, s + g), v);
    acc = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(m, xs + g), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// 16 weight bytes at p as floats; `n` < 16 reads only the first n (the others are 0)
template <bool SIGNED>
inline __m512 w8x16(const uint8_t* p, int64_t n = 16) {
  const __m128i b = n >= 16 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))
                            : _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << n) - 1), p);
  return _mm512_cvtepi32_ps(SIGNED ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b));
}
#endif

// one row of an 8-bit affine (or signed per-row) weight against one activation row
template <bool SIGNED>
float row_u8(const float* x, const uint8_t* q, const float* s, const float* o, const float* xs, int64_t K,
             int64_t group) {
  float out = 0.f;
#ifdef __AVX512F__
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();  // even / odd groups: two chains
  int64_t gi = 0;
  for (int64_t g0 = 0; g0 < K; g0 += group, ++gi) {
    const int64_t g1 = std::min(K, g0 + group);
    __m512 p0 = _mm512_setzero_ps(), p1 = _mm512_setzero_ps();
    int64_t k = g0;
    if (g1 - g0 >= 128) {  // long groups (per-row int8): four independent chains
      __m512 p2 = _mm512_setzero_ps(), p3 = _mm512_setzero_ps();
      for (; k + 64 <= g1; k += 64) {
        p0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), w8x16<SIGNED>(q + k), p0);
        p1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), w8x16<SIGNED>(q + k + 16), p1);
        p2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 32), w8x16<SIGNED>(q + k + 32), p2);
        p3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 48), w8x16<SIGNED>(q + k + 48), p3);
      }
      p0 = _mm512_add_ps(p0, p2);
      p1 = _mm512_add_ps(p1, p3);
    }
    for (; k + 32 <= g1; k += 32) {
      p0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), w8x16<SIGNED>(q + k), p0);
      p1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), w8x16<SIGNED>(q + k + 16), p1);
    }
    for (; k < g1; k += 16) {
      const int64_t n = std::min<int64_t>(16, g1 - k);
      const __mmask16 m = n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1);
      p0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + k), w8x16<SIGNED>(q + k, n), p0);
    }
    const __m512 p = _mm512_add_ps(p0, p1);
    if (gi & 1) acc1 = _mm512_fmadd_ps(p, _mm512_set1_ps(s[gi]), acc1);
    else acc0 = _mm512_fmadd_ps(p, _mm512_set1_ps(s[gi]), acc0);
  }
  out = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  if (o) out += offset_dot(o, s, 0.f, xs, gi);
#else
  for (int64_t g0 = 0, gi = 0; g0 < K; g0 += group, ++gi) {
    int64_t g1 = std::min(K, g0 + group);
    float d = 0.f;
    for (int64_t k = g0; k < g1; ++k) d += x[k] * (SIGNED ? (float)(int8_t)q[k] : (float)q[k]);
    out += d * s[gi];
    if (o) out += o[gi] * xs[gi];
  }
#endif
  return out;
}

// one row of split32-packed 4-bit values; `code` (16 floats) maps nibbles to values (NF4) or is null (affine)
inline float row_u4(const float* x, const uint8_t* q, const float* s, const float* o, const float* xs, int64_t K,
             int64_t group, const float* code) {
  float out = 0.f;
#ifdef __AVX512F__
  __m512 acc = _mm512_setzero_ps();
  const __m512i mask = _mm512_set1_epi32(15);
  __m512 table = code ? _mm512_loadu_ps(code) : _mm512_setzero_ps();
  for (int64_t g0 = 0, gi = 0; g0 < K; g0 += group, ++gi) {
    int64_t g1 = std::min(K, g0 + group);
    __m512 p0 = _mm512_setzero_ps(), p1 = _mm512_setzero_ps();
    for (int64_t k = g0; k < g1; k += 32) {
      __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k / 2)));
      __m512i lo = _mm512_and_si512(v, mask), hi = _mm512_srli_epi32(v, 4);
      __m512 wl = code ? _mm512_permutexvar_ps(lo, table) : _mm512_cvtepi32_ps(lo);
      __m512 wh = code ? _mm512_permutexvar_ps(hi, table) : _mm512_cvtepi32_ps(hi);
      p0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), wl, p0);
      p1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), wh, p1);
    }
    acc = _mm512_fmadd_ps(_mm512_add_ps(p0, p1), _mm512_set1_ps(s[gi]), acc);
  }
  out += _mm512_reduce_add_ps(acc);
  if (o) out += offset_dot(o, s, 0.f, xs, (K + group - 1) / group);
#else
  for (int64_t g0 = 0, gi = 0; g0 < K; g0 += group, ++gi) {
    int64_t g1 = std::min(K, g0 + group);
    float d = 0.f;
    for (int64_t k = g0; k < g1; k += 32)
      for (int j = 0; j < 16; ++j) {
        uint8_t b = q[k / 2 + j];
        float lo = code ? code[b & 15] : (float)(b & 15), hi = code ? code[b >> 4] : (float)(b >> 4);
        d += x[k + j] * lo + x[k + 16 + j] * hi;
      }
    out += d * s[gi];
    if (o) out += o[gi] * xs[gi];
  }
#endif
  return out;
}

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define TL_BF16 1
// bf16 activations: the nibbles become bf16 through a 32-entry register table (vpermw) and meet x in
// vdpbf16ps (two products per fp32 lane). 64-column steps read x from xq, a copy arranged per 64 columns as
// [0..15, 32..47 | 16..31, 48..63] to match the nibble order of two split32 chunks; 32-column steps use x.
// Without a code book (affine nibbles) the table lookup is an OR: bf16 bits 0x4300 | v are exactly 128 + v, and
// the 128 * sum(x) this adds is taken off through the offset term (o - 128 s) by the caller.
template <bool LUT>
float row_u4_bf16(const uint16_t* x, const uint16_t* xq, const uint8_t* q, const float* s, const float* o,
                  const float* xs, int64_t K, int64_t group, __m512i table) {
  float out = 0.f;
  __m512 acc = _mm512_setzero_ps();
  const __m512i mask16 = _mm512_set1_epi16(15);
  const __m256i mask8 = _mm512_castsi512_si256(mask16);
  const __m512i magic = _mm512_set1_epi16(0x4300);
  int64_t g0 = 0, gi = 0;
  if (group == 32) {
    // two 32-column groups per step: fp32 lanes 0-7 of the dot products hold the first group, 8-15 the second
    for (; g0 + 64 <= K; g0 += 64, gi += 2) {
      __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + g0 / 2)));
      __m512i il = _mm512_and_si512(v, mask16), ih = _mm512_srli_epi16(v, 4);
      __m512i wl = LUT ? _mm512_permutexvar_epi16(il, table) : _mm512_or_si512(il, magic);
      __m512i wh = LUT ? _mm512_permutexvar_epi16(ih, table) : _mm512_or_si512(ih, magic);
      __m512 p = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)wl, (__m512bh)_mm512_loadu_si512(xq + g0));
      p = _mm512_dpbf16_ps(p, (__m512bh)wh, (__m512bh)_mm512_loadu_si512(xq + g0 + 32));
      __m512 sv = _mm512_insertf32x8(_mm512_set1_ps(s[gi]), _mm256_set1_ps(s[gi + 1]), 1);
      acc = _mm512_fmadd_ps(p, sv, acc);
    }
  }
  for (; g0 < K; g0 += group, ++gi) {
    int64_t g1 = std::min(K, g0 + group);
    __m512 p0 = _mm512_setzero_ps(), p1 = _mm512_setzero_ps();
    int64_t k = g0;
    if ((g1 - g0) % 64 == 0) {
      __m512 p2 = _mm512_setzero_ps(), p3 = _mm512_setzero_ps();
      for (; k + 128 <= g1; k += 128) {
        __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + k / 2)));
        __m512i u = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + k / 2 + 32)));
        __m512i il = _mm512_and_si512(v, mask16), ih = _mm512_srli_epi16(v, 4);
        __m512i jl = _mm512_and_si512(u, mask16), jh = _mm512_srli_epi16(u, 4);
        __m512i wl = LUT ? _mm512_permutexvar_epi16(il, table) : _mm512_or_si512(il, magic);
        __m512i wh = LUT ? _mm512_permutexvar_epi16(ih, table) : _mm512_or_si512(ih, magic);
        __m512i vl = LUT ? _mm512_permutexvar_epi16(jl, table) : _mm512_or_si512(jl, magic);
        __m512i vh = LUT ? _mm512_permutexvar_epi16(jh, table) : _mm512_or_si512(jh, magic);
        p0 = _mm512_dpbf16_ps(p0, (__m512bh)wl, (__m512bh)_mm512_loadu_si512(xq + k));
        p1 = _mm512_dpbf16_ps(p1, (__m512bh)wh, (__m512bh)_mm512_loadu_si512(xq + k + 32));
        p2 = _mm512_dpbf16_ps(p2, (__m512bh)vl, (__m512bh)_mm512_loadu_si512(xq + k + 64));
        p3 = _mm512_dpbf16_ps(p3, (__m512bh)vh, (__m512bh)_mm512_loadu_si512(xq + k + 96));
      }
      p0 = _mm512_add_ps(p0, p2);
      p1 = _mm512_add_ps(p1, p3);
      for (; k < g1; k += 64) {
        __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + k / 2)));
        __m512i il = _mm512_and_si512(v, mask16), ih = _mm512_srli_epi16(v, 4);
        __m512i wl = LUT ? _mm512_permutexvar_epi16(il, table) : _mm512_or_si512(il, magic);
        __m512i wh = LUT ? _mm512_permutexvar_epi16(ih, table) : _mm512_or_si512(ih, magic);
        p0 = _mm512_dpbf16_ps(p0, (__m512bh)wl, (__m512bh)_mm512_loadu_si512(xq + k));
        p1 = _mm512_dpbf16_ps(p1, (__m512bh)wh, (__m512bh)_mm512_loadu_si512(xq + k + 32));
      }
    } else {
      for (; k < g1; k += 32) {
        __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k / 2)));
        __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, mask8)),
                                         _mm256_srli_epi16(v, 4), 1);
        __m512i w = LUT ? _mm512_permutexvar_epi16(idx, table) : _mm512_or_si512(idx, magic);
        p0 = _mm512_dpbf16_ps(p0, (__m512bh)w, (__m512bh)_mm512_loadu_si512(x + k));
      }
    }
    acc = _mm512_fmadd_ps(_mm512_add_ps(p0, p1), _mm512_set1_ps(s[gi]), acc);
  }
  // offsets, and the 128 * sum(x) of the OR trick
  if (o || !LUT) out = offset_dot(o, s, LUT ? 0.f : -128.f, xs, (K + group - 1) / group);
  return out + _mm512_reduce_add_ps(acc);
}
#endif


// x (bfloat16 bits) arranged per 64 columns as [0..15, 32..47 | 16..31, 48..63]: the nibble order of two split32
// chunks, which row_u4_bf16's 64-column steps read
inline void arrange_x64(const uint16_t* x, uint16_t* xq, int64_t K) {
  for (int64_t k = 0; k < K; ++k) {
    int64_t b = k / 64 * 64, j = k % 64;
    xq[b + (j < 16 ? j : j < 32 ? j + 16 : j < 48 ? j - 16 : j)] = x[k];
  }
}

// dense rows: float32 weights against float32 x; bfloat16 weights against bfloat16 x (fp32 accumulation)
inline float row_f32(const float* x, const float* w, int64_t K) {
  float out = 0.f;
  int64_t k = 0;
#ifdef __AVX512F__
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  for (; k + 32 <= K; k += 32) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(w + k), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), _mm512_loadu_ps(w + k + 16), a1);
  }
  for (; k + 16 <= K; k += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(w + k), a0);
  out = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
  for (; k < K; ++k) out += x[k] * w[k];
  return out;
}

#ifdef TL_BF16
inline float row_bf16(const uint16_t* x, const uint16_t* w, int64_t K) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(x + k), (__m512bh)_mm512_loadu_si512(w + k));
    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(x + k + 32), (__m512bh)_mm512_loadu_si512(w + k + 32));
  }
  for (; k + 32 <= K; k += 32)
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(x + k), (__m512bh)_mm512_loadu_si512(w + k));
  float out = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  for (; k < K; ++k) {
    uint32_t a = (uint32_t)x[k] << 16, b = (uint32_t)w[k] << 16;
    float fa, fb;
    std::memcpy(&fa, &a, 4);
    std::memcpy(&fb, &b, 4);
    out += fa * fb;
  }
  return out;
}
#endif


// ---- four rows at a time ------------------------------------------------------------------------------------
// A decode step's rows are short (K of a few hundred): one row per call spends as long on its reductions, offset
// terms and call as on its weights. These kernels run four weight rows against one activation row, sharing the
// activation loads, with four independent accumulator chains and one reduction pass at the end.

#ifdef TL_BF16
// rows n..n+3 of split32 4-bit weights, groups of 32, K % 64 == 0; xq: x arranged by arrange_x64; the 0x4300
// trick's 128 * sum(x) is taken off with the offsets (offset_dot with coef -128), as row_u4_bf16 does
inline void rows4_u4_bf16_g32(const uint16_t* xq, const uint8_t* q, int64_t row_bytes, const float* s,
                              const float* o, const float* xs, int64_t K, float* out) {
  const int64_t G = K / 32;
  const __m512i mask16 = _mm512_set1_epi16(15), magic = _mm512_set1_epi16(0x4300);
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t k = 0, g = 0; k < K; k += 64, g += 2) {
    const __m512bh x0 = (__m512bh)_mm512_loadu_si512(xq + k), x1 = (__m512bh)_mm512_loadu_si512(xq + k + 32);
    for (int r = 0; r < 4; ++r) {
      const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * row_bytes + k / 2)));
      const __m512i wl = _mm512_or_si512(_mm512_and_si512(v, mask16), magic);
      const __m512i wh = _mm512_or_si512(_mm512_srli_epi16(v, 4), magic);
      __m512 p = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)wl, x0);
      p = _mm512_dpbf16_ps(p, (__m512bh)wh, x1);
      const float* sr = s + r * G + g;
      acc[r] = _mm512_fmadd_ps(p, _mm512_insertf32x8(_mm512_set1_ps(sr[0]), _mm256_set1_ps(sr[1]), 1), acc[r]);
    }
  }
  for (int r = 0; r < 4; ++r)
    out[r] = _mm512_reduce_add_ps(acc[r]) + offset_dot(o ? o + r * G : nullptr, s + r * G, -128.f, xs, G);
}
#endif

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__F16C__)
#define TL_VNNI 1

// Scales stored as float32, or as float16 bits (uint16_t): half the bytes of a 4-bit row's metadata, and exact
// for the ggml formats whose block scales are float16 in the file
inline __m512 load16_masked(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16_masked(__mmask16 m, const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
inline __m128 load2(const float* p) { return _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p))); }
inline __m128 load2(const uint16_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm_cvtph_ps(_mm_cvtsi32_si128(v));
}

// sum_g o[g] * xs[g] over the G groups of a row (o: float32 or float16 bits)
template <typename S>
inline float offset_dot_s(const S* o, const float* xs, int64_t G) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; g += 16) {
    const __mmask16 m = G - g >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (G - g)) - 1);
    acc = _mm512_fmadd_ps(load16_masked(m, o + g), _mm512_maskz_loadu_ps(m, xs + g), acc);
  }
  return _mm512_reduce_add_ps(acc);
}


// rows n..n+3 of signed 8-bit weights with one scale per row (w = s q, int8 weight-only), K % 64 == 0, against x
// quantized by quantize_x<int8_t>: vpdpbusd wants unsigned weights, so q + 128 (q ^ 0x80) meets x, and the 128 sum(x)
// this adds is taken off with the block sums
inline void rows4_s8_vnni(const int8_t* xq, const float* dx, const float* xsums, const uint8_t* q,
                          int64_t row_bytes, const float* s, int64_t K, float* out) {
  const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t k = 0, g = 0; k < K; k += 64, g += 2) {
    const __m512i xv = _mm512_loadu_si512(xq + k);
    const __m512 dxv = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(load2(dx + g)));
    for (int r = 0; r < 4; ++r) {
      const __m512i w = _mm512_xor_si512(_mm512_loadu_si512(q + r * row_bytes + k), flip);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xv)), dxv, acc[r]);
    }
  }
  float total = 0.f;
  for (int64_t b = 0; b < K / 32; ++b) total += xsums[b];
  for (int r = 0; r < 4; ++r) out[r] = s[r] * (_mm512_reduce_add_ps(acc[r]) - 128.f * total);
}

// x [K] quantized per block of 32 to T (int8 as ggml's Q8_0 activations: d = max|x| / 127; int16: d = max|x| /
// 32639, a rounding error below bfloat16's own), xq ~ x / d[b]; sums[b] = d[b] * sum(xq) over the block (the
// offset terms must see the same quantized x as the products, or an offset of -128 s, Q8_0 stored unsigned,
// would turn the rounding of x into an error 128 times larger). xq is in column order; xq_arranged, if given,
// gets the same values in arrange_x64's order (the nibble order of split32 rows). 32639 = 127 * 256 + 127 keeps
// split_x16's high byte within int8.
template <typename T>
inline void quantize_x(const float* x, int64_t K, T* xq, T* xq_arranged, float* d, float* sums) {
  constexpr float levels = sizeof(T) == 1 ? 127.f : 32639.f;
  for (int64_t b = 0; b < K / 32; ++b) {
    const __m512 a = _mm512_loadu_ps(x + b * 32), c = _mm512_loadu_ps(x + b * 32 + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(c)));
    const float db = amax / levels, inv = amax > 0.f ? levels / amax : 0.f;
    const __m512i ia = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(inv)));  // round to nearest even
    const __m512i ic = _mm512_cvtps_epi32(_mm512_mul_ps(c, _mm512_set1_ps(inv)));
    // block b's halves: columns 32b.. and 32b + 16..; arranged, block 2j's go to 64j and 64j + 32, block 2j+1's to
    // 64j + 16 and 64j + 48
    const int64_t al = b / 2 * 64 + (b % 2) * 16;
    if constexpr (sizeof(T) == 1) {
      const __m128i qa = _mm512_cvtsepi32_epi8(ia), qc = _mm512_cvtsepi32_epi8(ic);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + b * 32), qa);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + b * 32 + 16), qc);
      if (xq_arranged) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(xq_arranged + al), qa);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(xq_arranged + al + 32), qc);
      }
    } else {
      const __m256i qa = _mm512_cvtsepi32_epi16(ia), qc = _mm512_cvtsepi32_epi16(ic);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + b * 32), qa);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + b * 32 + 16), qc);
      if (xq_arranged) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq_arranged + al), qa);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq_arranged + al + 32), qc);
      }
    }
    d[b] = db;
    sums[b] = db * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(ia, ic)));
  }
}


// scales of two 32-column blocks of a row: adjacent (groups of 32) or the same group's twice (larger groups)
inline __m128 scale_pair(const float* s, int64_t j0, int64_t j1) {
  return j1 == j0 + 1 ? load2(s + j0) : _mm_set1_ps(s[j0]);
}
inline __m128 scale_pair(const uint16_t* s, int64_t j0, int64_t j1) {
  return j1 == j0 + 1 ? load2(s + j0) : _mm_set1_ps(_cvtsh_ss(s[j0]));
}

// The common frame of the four-row integer kernels: rows n..n+3, K % 64 == 0, groups of `group` columns (a
// multiple of 32) with a scale s (and an offset o) each. dot(r, k) gives the int32 products of row r with the
// quantized x over columns k..k+63, its 16 lanes split between the chunk's two 32-column blocks as `pattern`
// says (lane -> 0 or 1); they are scaled by s * dx of their block and summed, then the offsets meet the block
// sums of x (xsums: per group, see group_xsums).
template <typename S, typename Dot>
inline void rows4_grouped(__m512i pattern, const float* dx, const float* xsums, const S* s, const S* o, int64_t K,
                          int64_t group, float* out, Dot dot) {
  const int64_t G = (K + group - 1) / group, per = group / 32;  // a last group may be partial
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t k = 0, b = 0; k < K; k += 64, b += 2) {
    const __m512 dxv = _mm512_permutexvar_ps(pattern, _mm512_castps128_ps512(load2(dx + b)));
    const int64_t j0 = per == 1 ? b : b / per, j1 = per == 1 ? b + 1 : (b + 1) / per;  // no division for groups of 32
    for (int r = 0; r < 4; ++r) {
      const __m512 sv = _mm512_permutexvar_ps(pattern, _mm512_castps128_ps512(scale_pair(s + r * G, j0, j1)));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot(r, k)), _mm512_mul_ps(sv, dxv), acc[r]);
    }
  }
  for (int r = 0; r < 4; ++r)
    out[r] = _mm512_reduce_add_ps(acc[r]) + (o ? offset_dot_s(o + r * G, xsums, G) : 0.f);
}

// block sums of x (per 32 columns) added up per group of `group` columns (the last one may be partial)
inline void group_xsums(const float* block_sums, int64_t K, int64_t group, float* out) {
  const int64_t per = group / 32, blocks = K / 32;
  for (int64_t j = 0; j * per < blocks; ++j) {
    float t = 0.f;
    for (int64_t b = j * per; b < std::min(blocks, (j + 1) * per); ++b) t += block_sums[b];
    out[j] = t;
  }
}

// lanes 0-7: the first group of a 64-column chunk, 8-15: the second (column order, and row_u4_bf16's)
inline __m512i halves_pattern() { return _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0); }

// rows n..n+3 of 8-bit unsigned weights (w = s q + o per group of 32) against x from quantize_x<int8_t>
template <typename S>
inline void rows4_u8_vnni_gk(const int8_t* xq, const float* dx, const float* xsums, const uint8_t* q,
                              int64_t row_bytes, const S* s, const S* o, int64_t K, int64_t group, float* out) {
  rows4_grouped(halves_pattern(), dx, xsums, s, o, K, group, out, [&](int r, int64_t k) {
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(q + r * row_bytes + k),
                               _mm512_loadu_si512(xq + k));
  });
}

// rows n..n+3 of split32 4-bit weights against x from quantize_x<int8_t> (arranged): the nibbles of 64 columns
// unpacked into one register of bytes [lo nibbles | hi nibbles], which is exactly arrange_x64's order, and met
// with vpdpbusd. Each 32-bit lane sums four columns of one group; lanes 0-3 and 8-11 belong to the first group of
// the 64, 4-7 and 12-15 to the second. (vpdpbusd is ~2.5x the throughput of vdpbf16ps on the CPUs measured.)
template <typename S>
inline void rows4_u4_vnni_gk(const int8_t* xq, const float* dx, const float* xsums, const uint8_t* q,
                              int64_t row_bytes, const S* s, const S* o, int64_t K, int64_t group, float* out) {
  const __m512i pattern = _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);
  const __m256i low4 = _mm256_set1_epi8(15);
  rows4_grouped(pattern, dx, xsums, s, o, K, group, out, [&](int r, int64_t k) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * row_bytes + k / 2));
    const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(b, low4)),
                                         _mm256_and_si256(_mm256_srli_epi16(b, 4), low4), 1);
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(xq + k));
  });
}

// rows n..n+3 of split32 4-bit weights against x from quantize_x<int16_t> (arranged): nibbles widened to 16 bits
// meet x in vpdpwssd; int32 lanes 0-7 hold the first group of each 64 columns, 8-15 the second (as row_u4_bf16)
template <typename S>
inline void rows4_u4_i16_gk(const int16_t* xq, const float* dx, const float* xsums, const uint8_t* q,
                             int64_t row_bytes, const S* s, const S* o, int64_t K, int64_t group, float* out) {
  const __m512i low4 = _mm512_set1_epi16(15);
  rows4_grouped(halves_pattern(), dx, xsums, s, o, K, group, out, [&](int r, int64_t k) {
    const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * row_bytes + k / 2)));
    const __m512i p = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_and_si512(v, low4), _mm512_loadu_si512(xq + k));
    return _mm512_dpwssd_epi32(p, _mm512_srli_epi16(v, 4), _mm512_loadu_si512(xq + k + 32));
  });
}

// rows4_grouped against M activation rows at once: load(r, k) fetches (and widens) weight row r's 64 columns
// once, dot(w, m, k) meets them with activation row m, so a few rows (speculative drafts, small batches) cost far
// less than M passes. Per (activation row, weight row) the arithmetic is the one-row kernel's, in the same order:
// the same result to the bit. out[m * 4 + r].
template <int M, typename S, typename Load, typename Dot>
inline void rows4_grouped_m(const float* const* dx, const float* const* xsums, const S* s, const S* o, int64_t K,
                            int64_t group, float* out, Load load, Dot dot) {
  const __m512i pattern = halves_pattern();
  const int64_t G = (K + group - 1) / group, per = group / 32;
  __m512 acc[M][4];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0, b = 0; k < K; k += 64, b += 2) {
    __m512 dxv[M];
    for (int m = 0; m < M; ++m) dxv[m] = _mm512_permutexvar_ps(pattern, _mm512_castps128_ps512(load2(dx[m] + b)));
    const int64_t j0 = per == 1 ? b : b / per, j1 = per == 1 ? b + 1 : (b + 1) / per;  // no division for groups of 32
    for (int r = 0; r < 4; ++r) {
      const auto w = load(r, k);
      const __m512 sv = _mm512_permutexvar_ps(pattern, _mm512_castps128_ps512(scale_pair(s + r * G, j0, j1)));
      for (int m = 0; m < M; ++m)
        acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot(w, m, k)), _mm512_mul_ps(sv, dxv[m]), acc[m][r]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < 4; ++r)
      out[m * 4 + r] = _mm512_reduce_add_ps(acc[m][r]) + (o ? offset_dot_s(o + r * G, xsums[m], G) : 0.f);
}

// rows4_u4_i16_gk for M activation rows: the nibbles widened once
template <int M, typename S>
inline void rows4_u4_i16_gk_m(const int16_t* const* xq, const float* const* dx, const float* const* xsums,
                              const uint8_t* q, int64_t row_bytes, const S* s, const S* o, int64_t K, int64_t group,
                              float* out) {
  const __m512i low4 = _mm512_set1_epi16(15);
  struct W { __m512i lo, hi; };
  rows4_grouped_m<M>(dx, xsums, s, o, K, group, out, [&](int r, int64_t k) {
    const auto* p = reinterpret_cast<const __m256i*>(q + r * row_bytes + k / 2);
    const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(p));
    return W{_mm512_and_si512(v, low4), _mm512_srli_epi16(v, 4)};
  }, [&](const W& w, int m, int64_t k) {
    return _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(_mm512_setzero_si512(), w.lo, _mm512_loadu_si512(xq[m] + k)),
                               w.hi, _mm512_loadu_si512(xq[m] + k + 32));
  });
}

// rows4_u8_i16_gk for M activation rows: each weight load serves all of them (dot64_split's arithmetic)
template <int M, typename S>
inline void rows4_u8_i16_gk_m(const int8_t* const* xh, const int8_t* const* xl, const float* const* dx,
                              const float* const* xsums, const uint8_t* q, int64_t row_bytes, const S* s, const S* o,
                              int64_t K, int64_t group, float* out) {
  rows4_grouped_m<M>(dx, xsums, s, o, K, group, out,
                     [&](int r, int64_t k) { return _mm512_loadu_si512(q + r * row_bytes + k); },
                     [&](__m512i w, int m, int64_t k) {
    const __m512i h = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(xh[m] + k));
    const __m512i l = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(xl[m] + k));
    return _mm512_add_epi32(_mm512_slli_epi32(h, 8), l);
  });
}

// int16 activations as two int8 halves, x = 256 hi + lo with lo in [-128, 127] (quantize_x<int16_t>'s range keeps hi
// in [-127, 127]): 8-bit weights then meet them in two vpdpbusd (u8 x s8), twice the work of int8 activations
// instead of widening every weight byte to 16 bits
inline void split_x16(const int16_t* x, int64_t n, int8_t* hi, int8_t* lo) {
  for (int64_t i = 0; i < n; ++i) {
    const int32_t l = ((x[i] + 128) & 255) - 128;
    lo[i] = static_cast<int8_t>(l);
    hi[i] = static_cast<int8_t>((x[i] - l) >> 8);
  }
}

// int32 lanes: lanes 0-7 sum the first 32 of 64 weight bytes (unsigned; XOR 0x80 turns int8 into q + 128) against
// x, lanes 8-15 the next 32
template <bool SIGNED>
inline __m512i dot64_split(const uint8_t* q, __m512i xh, __m512i xl) {
  __m512i w = _mm512_loadu_si512(q);
  if (SIGNED) w = _mm512_xor_si512(w, _mm512_set1_epi8(static_cast<char>(0x80)));
  const __m512i h = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xh);
  const __m512i l = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xl);
  return _mm512_add_epi32(_mm512_slli_epi32(h, 8), l);
}

// rows n..n+3 of 8-bit unsigned weights (w = s q + o per group of 32) against int16 x (split_x16)
template <typename S>
inline void rows4_u8_i16_gk(const int8_t* xh, const int8_t* xl, const float* dx, const float* xsums,
                             const uint8_t* q, int64_t row_bytes, const S* s, const S* o, int64_t K, int64_t group,
                             float* out) {
  rows4_grouped(halves_pattern(), dx, xsums, s, o, K, group, out, [&](int r, int64_t k) {
    return dot64_split<false>(q + r * row_bytes + k, _mm512_loadu_si512(xh + k), _mm512_loadu_si512(xl + k));
  });
}

// rows n..n+3 of signed 8-bit weights with one scale per row (int8 weight-only), K % 64 == 0, int16 x
// (split_x16): the q + 128 of dot64_split adds 128 sum(x), taken off with the block sums
inline void rows4_s8_i16(const int8_t* xh, const int8_t* xl, const float* dx, const float* xsums, const uint8_t* q,
                         int64_t row_bytes, const float* s, int64_t K, float* out) {
  const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t k = 0, g = 0; k < K; k += 64, g += 2) {
    const __m512i h = _mm512_loadu_si512(xh + k), l = _mm512_loadu_si512(xl + k);
    const __m512 dxv = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(load2(dx + g)));
    for (int r = 0; r < 4; ++r)
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot64_split<true>(q + r * row_bytes + k, h, l)), dxv, acc[r]);
  }
  float total = 0.f;
  for (int64_t b = 0; b < K / 32; ++b) total += xsums[b];
  for (int r = 0; r < 4; ++r) out[r] = s[r] * (_mm512_reduce_add_ps(acc[r]) - 128.f * total);
}
#endif



}  // namespace tl
