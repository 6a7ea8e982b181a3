// Paged decode attention for x86 AVX-512: one query token per sequence reads its K/V straight from the paged
// cache through its block table, in fp32 arithmetic. Shared by cpu_ops.cpp (one op per layer) and
// decode_stack.cpp (the whole decoder in one call).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <c10/util/BFloat16.h>
#ifdef __AVX512F__
#include <immintrin.h>

namespace tl {

template <typename T> struct Vec;

template <> struct Vec<float> {
  static __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
  static __m512 round(__m512 v) { return v; }
};

template <> struct Vec<c10::BFloat16> {
  static __m512 load(const c10::BFloat16* p) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  // float32 bits rounded to nearest even at bfloat16 precision (the result's top 16 bits)
  static __m512i rne(__m512 v) {
    __m512i x = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
    return _mm512_add_epi32(x, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  }
  static void store(c10::BFloat16* p, __m512 v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rne(v), 16)));
  }
  static __m512 round(__m512 v) {
    return _mm512_castsi512_ps(_mm512_and_si512(rne(v), _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  }
};

// e^x for x <= 0 (softmax after subtracting the max): 2^n * p(r), |r| <= ln2/2, degree-6 Taylor polynomial
inline __m512 exp_nonpos(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// softmax of s[0..n) in place, unnormalised (e^(s - max)); returns the sum, the max in *max_out
inline float softmax_unnormalised(float* s, int64_t n, float* max_out) {
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + j));
  float m = _mm512_reduce_max_ps(vmax);
  for (; j < n; ++j) m = std::max(m, s[j]);
  __m512 vm = _mm512_set1_ps(m), vsum = _mm512_setzero_ps();
  for (j = 0; j < n; j += 16) {
    __mmask16 k = n - j >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (n - j)) - 1);
    __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), vm));
    _mm512_mask_storeu_ps(s + j, k, e);
    vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(k, e));
  }
  *max_out = m;
  return _mm512_reduce_add_ps(vsum);
}

// f(slot, j) for the context positions s0 .. s0 + n - 1 (j counted from 0), walking the block table a block at
// a time: one division per block, not per key
template <typename F>
inline void for_each_key(const int64_t* blocks, int64_t block_size, int64_t s0, int64_t n, F&& f) {
  for (int64_t j = 0; j < n;) {
    const int64_t pos = s0 + j, off = pos % block_size;
    const int64_t base = blocks[pos / block_size] * block_size + off, count = std::min(block_size - off, n - j);
    for (int64_t t = 0; t < count; ++t, ++j) f(base + t, j);
  }
}

// One KV head's rows in the paged cache, as attend_part reads them: load(slot, c) gives values c*16 .. c*16 + 15
// of the head's row at `slot` as float32; bytes(slot) is where that row starts (prefetches read whole slots from
// the first head's); at_head(h, D) is head h's reader from head 0's. Plain rows: the values themselves, in the
// model's dtype or float32.
template <typename T>
struct KvHead {
  const T* p;  // the head's first value in slot 0
  int64_t stride;  // values per slot (every head's)
  __m512 load(int64_t slot, int64_t c) const { return Vec<T>::load(p + slot * stride + c * 16); }
  const char* bytes(int64_t slot) const { return reinterpret_cast<const char*>(p + slot * stride); }
  KvHead at_head(int64_t h, int64_t D) const { return {p + h * D, stride}; }  // from head 0's reader
};

// int8 rows with a float32 scale per (slot, head), dequantized as the layer path reads them: (q * scale) rounded
// to the model's dtype R
template <typename R>
struct KvHeadInt8 {
  const int8_t* p;
  const float* scale;  // the head's scale in slot 0
  int64_t stride, scale_stride;  // values, scales per slot
  __m512 load(int64_t slot, int64_t c) const {
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + slot * stride + c * 16));
    const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
    return Vec<R>::round(_mm512_mul_ps(v, _mm512_set1_ps(scale[slot * scale_stride])));
  }
  const char* bytes(int64_t slot) const { return reinterpret_cast<const char*>(p + slot * stride); }
  KvHeadInt8 at_head(int64_t h, int64_t D) const { return {p + h * D, scale + h, stride, scale_stride}; }
};

// f(K reader, V reader, a slot's bytes) at head 0 of a paged cache [slots, KVH, D]: int8 rows with float32 scales
// [slots, KVH] where k_scale is given (read as the model's dtype T), else rows of T
template <typename T, typename F>
void with_kv_heads(const void* k, const void* v, const float* k_scale, const float* v_scale, int64_t KVH,
                   int64_t D, F&& f) {
  if (k_scale)
    f(KvHeadInt8<T>{static_cast<const int8_t*>(k), k_scale, KVH * D, KVH},
      KvHeadInt8<T>{static_cast<const int8_t*>(v), v_scale, KVH * D, KVH}, KVH * D);
  else
    f(KvHead<T>{static_cast<const T*>(k), KVH * D}, KvHead<T>{static_cast<const T*>(v), KVH * D},
      KVH * D * static_cast<int64_t>(sizeof(T)));
}

// Ask for the K and V rows (all heads: `row_bytes` each) of the block `ahead` blocks after the one holding
// context position `pos`: a sequence's blocks lie anywhere in the pool, so the hardware prefetchers cannot see
// the next one coming.
template <typename KV>
inline void prefetch_block(const int64_t* blocks, int64_t block_size, int64_t pos, int64_t ahead, int64_t end,
                           const KV& kc, const KV& vc, int64_t row_bytes) {
  const int64_t first = (pos / block_size + ahead) * block_size;
  if (first >= end) return;
  const int64_t base = blocks[first / block_size] * block_size, rows = std::min(block_size, end - first);
  const char* k = kc.bytes(base);
  const char* v = vc.bytes(base);
  for (int64_t byte = 0; byte < rows * row_bytes; byte += 64) {
    _mm_prefetch(k + byte, _MM_HINT_T0);
    _mm_prefetch(v + byte, _MM_HINT_T1);
  }
}

// One (sequence, KV head): the GT query heads sharing it (GT = 0: a run-time count, up to 16) against the
// context positions s0 .. s0 + n - 1 (n >= 1), K and V read through KvHead or KvHeadInt8. Two passes over the
// cache rows: scores, then the softmax-weighted sum of values, one 16-wide slice of the head at a time so that
// every accumulator stays in a register. The result is unnormalised (flash-decoding's partial): acc[g * D + d] =
// sum_j e^(s_j - m_g) v_j, with the max m_g and the sum l_g of the weights, so that parts over different key
// ranges merge exactly. The first head of a sequence prefetches whole rows (every head's K and V: prefetch_bytes
// each), which the other heads then find in cache.
template <typename KV, int GT>
void attend_part(const float* qf, int64_t G_rt, int64_t D, const KV& kc, const KV& vc, const int64_t* blocks,
                 int64_t block_size, int64_t s0, int64_t n, float* scores, float* acc_out, float* m_out,
                 float* l_out, int64_t prefetch_bytes) {
  constexpr int GMAX = GT ? GT : 16;
  const int64_t G = GT ? GT : G_rt, C = D / 16;
  for_each_key(blocks, block_size, s0, n, [&](int64_t slot, int64_t j) {
    if (prefetch_bytes && j == 0)  // two blocks in flight: the next one, and the one after it
      prefetch_block(blocks, block_size, s0, 1, s0 + n, kc, vc, prefetch_bytes);
    if (prefetch_bytes && (j == 0 || (s0 + j) % block_size == 0))
      prefetch_block(blocks, block_size, s0 + j, 2, s0 + n, kc, vc, prefetch_bytes);
    __m512 a[GMAX];
    for (int64_t g = 0; g < G; ++g) a[g] = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; ++c) {
      const __m512 kk = kc.load(slot, c);
      for (int64_t g = 0; g < G; ++g) a[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qf + g * D + c * 16), kk, a[g]);
    }
    for (int64_t g = 0; g < G; ++g) scores[g * n + j] = _mm512_reduce_add_ps(a[g]);
  });
  for (int64_t g = 0; g < G; ++g) l_out[g] = softmax_unnormalised(scores + g * n, n, m_out + g);
  for (int64_t c = 0; c < C; ++c) {
    __m512 acc[GMAX];
    for (int64_t g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
    for_each_key(blocks, block_size, s0, n, [&](int64_t slot, int64_t j) {
      const __m512 vv = vc.load(slot, c);
      for (int64_t g = 0; g < G; ++g) acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g * n + j]), vv, acc[g]);
    });
    for (int64_t g = 0; g < G; ++g) _mm512_storeu_ps(acc_out + g * D + c * 16, acc[g]);
  }
}

// attend_part over GT's dispatch: the compile-time head counts 1..8, else a run-time count
template <typename KV>
void attend_part_any(const float* qf, int64_t G, int64_t D, const KV& kc, const KV& vc, const int64_t* blocks,
                     int64_t block_size, int64_t s0, int64_t n, float* scores, float* acc, float* m, float* l,
                     int64_t prefetch_bytes) {
#define TL_ATTEND(GT) \
  attend_part<KV, GT>(qf, G, D, kc, vc, blocks, block_size, s0, n, scores, acc, m, l, prefetch_bytes)
  switch (G) {
    case 1: TL_ATTEND(1); break;
    case 2: TL_ATTEND(2); break;
    case 3: TL_ATTEND(3); break;
    case 4: TL_ATTEND(4); break;
    case 5: TL_ATTEND(5); break;
    case 6: TL_ATTEND(6); break;
    case 7: TL_ATTEND(7); break;
    case 8: TL_ATTEND(8); break;
    default: TL_ATTEND(0);
  }
#undef TL_ATTEND
}

// out[g] = (sum over parts of e^(m_p - M) acc_p) / (sum of e^(m_p - M) l_p): the parts of one head group merged
template <typename T>
void merge_parts(const float* acc, const float* m, const float* l, int64_t parts, int64_t G, int64_t D,
                 int64_t part_stride, T* out) {
  for (int64_t g = 0; g < G; ++g) {
    float M = -INFINITY;
    for (int64_t p = 0; p < parts; ++p) M = std::max(M, m[p * G + g]);
    float L = 0.f;
    for (int64_t p = 0; p < parts; ++p) L += std::exp(m[p * G + g] - M) * l[p * G + g];
    for (int64_t c = 0; c < D / 16; ++c) {
      __m512 sum = _mm512_setzero_ps();
      for (int64_t p = 0; p < parts; ++p)
        sum = _mm512_fmadd_ps(_mm512_set1_ps(parts == 1 ? 1.f : std::exp(m[p * G + g] - M)),
                              _mm512_loadu_ps(acc + p * part_stride + g * D + c * 16), sum);
      Vec<T>::store(out + g * D + c * 16, _mm512_mul_ps(sum, _mm512_set1_ps(1.0f / L)));
    }
  }
}
}  // namespace tl
#endif
