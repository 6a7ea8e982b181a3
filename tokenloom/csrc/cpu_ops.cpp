// Built on first use by tokenloom.kernels.build.CppExtension; the Python side, and what these kernels
// do, is in tokenloom.kernels.cpu_ops.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <cmath>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

bool has_avx512() {
#ifdef __AVX512F__
  return true;
#else
  return false;
#endif
}

#ifdef __AVX512F__
namespace {

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

// softmax of s[0..n) in place; returns 1 / sum so callers can fold it into their output
inline float softmax_unnormalised(float* s, int64_t n) {
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
  return 1.0f / _mm512_reduce_add_ps(vsum);
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

// Ask for the K and V rows (all heads: `row_bytes` each) of the block `ahead` blocks after the one holding
// context position `pos`: a sequence's blocks lie anywhere in the pool, so the hardware prefetchers cannot see
// the next one coming.
template <typename T>
inline void prefetch_block(const int64_t* blocks, int64_t block_size, int64_t pos, int64_t ahead, int64_t end,
                           const T* kc, const T* vc, int64_t slot_stride, int64_t row_bytes) {
  const int64_t first = (pos / block_size + ahead) * block_size;
  if (first >= end) return;
  const int64_t base = blocks[first / block_size] * block_size, rows = std::min(block_size, end - first);
  const char* k = reinterpret_cast<const char*>(kc + base * slot_stride);
  const char* v = reinterpret_cast<const char*>(vc + base * slot_stride);
  for (int64_t byte = 0; byte < rows * row_bytes; byte += 64) {
    _mm_prefetch(k + byte, _MM_HINT_T0);
    _mm_prefetch(v + byte, _MM_HINT_T1);
  }
}

// One (sequence, KV head): the GT query heads sharing it (GT = 0: a run-time count, up to 16) against the
// context positions s0 .. s0 + n - 1. Two passes over the cache rows: scores, then the softmax-weighted sum of
// values, one 16-wide slice of the head at a time so that every accumulator stays in a register. The first
// head of a sequence prefetches whole rows (every head's K and V), which the other heads then find in cache.
template <typename T, int GT>
void attend_one(const float* qf, int64_t G_rt, int64_t D, const T* kc, const T* vc, int64_t slot_stride,
                const int64_t* blocks, int64_t block_size, int64_t s0, int64_t n, float* scores, T* out,
                int64_t prefetch_bytes) {
  constexpr int GMAX = GT ? GT : 16;
  const int64_t G = GT ? GT : G_rt, C = D / 16;
  for_each_key(blocks, block_size, s0, n, [&](int64_t slot, int64_t j) {
    if (prefetch_bytes && j == 0)  // two blocks in flight: the next one, and the one after it
      prefetch_block(blocks, block_size, s0, 1, s0 + n, kc, vc, slot_stride, prefetch_bytes);
    if (prefetch_bytes && (j == 0 || (s0 + j) % block_size == 0))
      prefetch_block(blocks, block_size, s0 + j, 2, s0 + n, kc, vc, slot_stride, prefetch_bytes);
    const T* k = kc + slot * slot_stride;
    __m512 a[GMAX];
    for (int64_t g = 0; g < G; ++g) a[g] = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; ++c) {
      const __m512 kk = Vec<T>::load(k + c * 16);
      for (int64_t g = 0; g < G; ++g) a[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qf + g * D + c * 16), kk, a[g]);
    }
    for (int64_t g = 0; g < G; ++g) scores[g * n + j] = _mm512_reduce_add_ps(a[g]);
  });
  float inv[GMAX];
  for (int64_t g = 0; g < G; ++g) inv[g] = softmax_unnormalised(scores + g * n, n);
  for (int64_t c = 0; c < C; ++c) {
    __m512 acc[GMAX];
    for (int64_t g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
    for_each_key(blocks, block_size, s0, n, [&](int64_t slot, int64_t j) {
      const __m512 vv = Vec<T>::load(vc + slot * slot_stride + c * 16);
      for (int64_t g = 0; g < G; ++g) acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g * n + j]), vv, acc[g]);
    });
    for (int64_t g = 0; g < G; ++g) Vec<T>::store(out + g * D + c * 16, _mm512_mul_ps(acc[g], _mm512_set1_ps(inv[g])));
  }
}

template <typename T>
void decode_attention_impl(const T* q, int64_t q_stride, const T* kc, const T* vc, int64_t slot_stride,
                           const int64_t* table, int64_t table_stride, int64_t block_size, const int64_t* lens,
                           const int64_t* starts, T* out, int64_t B, int64_t H, int64_t KVH, int64_t D,
                           float scale) {
  const int64_t G = H / KVH, C = D / 16;
  // one task per sequence, its KV heads in turn: a slot's heads are adjacent in memory and read together
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), scores;
    for (int64_t b = begin; b < end; ++b)
    for (int64_t h = 0; h < KVH; ++h) {
      const int64_t s0 = starts[b], n = lens[b] - s0;
      scores.resize(G * n);
      for (int64_t g = 0; g < G; ++g)  // the queries, scaled once
        for (int64_t c = 0; c < C; ++c)
          _mm512_storeu_ps(&qf[g * D + c * 16],
                           _mm512_mul_ps(Vec<T>::load(q + b * q_stride + (h * G + g) * D + c * 16),
                                         _mm512_set1_ps(scale)));
      const int64_t* blocks = table + b * table_stride;
      T* o = out + (b * H + h * G) * D;
      const T *k = kc + h * D, *v = vc + h * D;
      const int64_t pf = h == 0 ? slot_stride * static_cast<int64_t>(sizeof(T)) : 0;
#define TL_ATTEND(GT) attend_one<T, GT>(qf.data(), G, D, k, v, slot_stride, blocks, block_size, s0, n, scores.data(), o, pf)
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
  });
}

template <typename T>
void rms_norm_impl(const T* x, int64_t x_stride, const T* res, T* sum, const T* w, T* out, int64_t M, int64_t N,
                   float eps) {
  at::parallel_for(0, M, 8, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const T* xr = x + m * x_stride;
      __m512 ss = _mm512_setzero_ps();
      for (int64_t k = 0; k < N; k += 16) {
        __m512 v = Vec<T>::load(xr + k);
        if (res) {  // the residual stream: x + residual, rounded to T as a torch add would
          v = Vec<T>::round(_mm512_add_ps(v, Vec<T>::load(res + m * N + k)));
          Vec<T>::store(sum + m * N + k, v);
        }
        ss = _mm512_fmadd_ps(v, v, ss);
      }
      const __m512 r = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / N + eps));
      const T* src = res ? sum + m * N : xr;
      for (int64_t k = 0; k < N; k += 16) {
        __m512 v = Vec<T>::round(_mm512_mul_ps(Vec<T>::load(src + k), r));  // normalised, cast to T
        Vec<T>::store(out + m * N + k, _mm512_mul_ps(v, Vec<T>::load(w + k)));  // then times the weight
      }
    }
  });
}

template <typename T>
void rotary_impl(T* x, int64_t x_stride, const T* cos, const T* sin, int64_t M, int64_t heads, int64_t D) {
  const int64_t half = D / 2;
  at::parallel_for(0, M, 8, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const T* c = cos + m * D;
      const T* s = sin + m * D;
      for (int64_t h = 0; h < heads; ++h) {
        T* p = x + m * x_stride + h * D;
        for (int64_t k = 0; k < half; k += 16) {
          __m512 x1 = Vec<T>::load(p + k), x2 = Vec<T>::load(p + half + k);
          // x * cos + cat(-x2, x1) * sin, each product rounded to T before the sum
          __m512 lo = _mm512_sub_ps(Vec<T>::round(_mm512_mul_ps(x1, Vec<T>::load(c + k))),
                                    Vec<T>::round(_mm512_mul_ps(x2, Vec<T>::load(s + k))));
          __m512 hi = _mm512_add_ps(Vec<T>::round(_mm512_mul_ps(x2, Vec<T>::load(c + half + k))),
                                    Vec<T>::round(_mm512_mul_ps(x1, Vec<T>::load(s + half + k))));
          Vec<T>::store(p + k, lo);
          Vec<T>::store(p + half + k, hi);
        }
      }
    }
  });
}

}  // namespace

#define TL_DISPATCH(dtype, ...)                                                   \
  if ((dtype) == torch::kBFloat16) {                                              \
    using scalar = c10::BFloat16;                                                 \
    __VA_ARGS__;                                                                  \
  } else {                                                                        \
    TORCH_CHECK((dtype) == torch::kFloat32, "tokenloom cpu_ops: bfloat16 or float32 only"); \
    using scalar = float;                                                         \
    __VA_ARGS__;                                                                  \
  }

// q [B, H, D] (rows may be strided), caches [S, KVH, D], block_table [B, max_blocks], lens/starts [B]
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_table, int64_t block_size, torch::Tensor lens,
                                     torch::Tensor starts, double scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(1);
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == D && k_cache.is_contiguous() && v_cache.is_contiguous());
  TORCH_CHECK(D % 16 == 0 && H % KVH == 0 && H / KVH <= 16 && k_cache.scalar_type() == q.scalar_type());
  auto table = block_table.contiguous();
  auto out = torch::empty({B, H * D}, q.options());
  TL_DISPATCH(q.scalar_type(), decode_attention_impl<scalar>(
      q.data_ptr<scalar>(), q.stride(0), k_cache.data_ptr<scalar>(), v_cache.data_ptr<scalar>(), KVH * D,
      table.data_ptr<int64_t>(), table.size(1), block_size, lens.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
      out.data_ptr<scalar>(), B, H, KVH, D, static_cast<float>(scale)));
  return out;
}

// RMSNorm of x [M, N] (rows may be strided); with a residual [M, N], of x + residual, returned as well
std::vector<torch::Tensor> rms_norm(torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor weight,
                                    double eps) {
  const int64_t M = x.size(0), N = x.size(1);
  TORCH_CHECK(x.stride(1) == 1 && N % 16 == 0 && weight.is_contiguous() && weight.scalar_type() == x.scalar_type());
  auto out = torch::empty({M, N}, x.options());
  torch::Tensor res, sum;
  if (residual) {
    res = residual->contiguous();
    sum = torch::empty({M, N}, x.options());
  }
  TL_DISPATCH(x.scalar_type(), rms_norm_impl<scalar>(
      x.data_ptr<scalar>(), x.stride(0), residual ? res.data_ptr<scalar>() : nullptr,
      residual ? sum.data_ptr<scalar>() : nullptr, weight.data_ptr<scalar>(), out.data_ptr<scalar>(), M, N,
      static_cast<float>(eps)));
  if (residual) return {out, sum};
  return {out};
}

// in place on the first `heads` heads of each row of x [M, >= heads * D] (rows may be strided); cos/sin [M, D]
void rotary_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, int64_t heads, int64_t D) {
  TORCH_CHECK(x.stride(1) == 1 && D % 32 == 0 && cos.is_contiguous() && sin.is_contiguous());
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type());
  TL_DISPATCH(x.scalar_type(), rotary_impl<scalar>(x.data_ptr<scalar>(), x.stride(0), cos.data_ptr<scalar>(),
                                                   sin.data_ptr<scalar>(), x.size(0), heads, D));
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("has_avx512", torch::wrap_pybind_function(has_avx512), "has_avx512");
#ifdef __AVX512F__  // without it the module only says so (has_avx512() is false)
  m.def("paged_decode_attention", torch::wrap_pybind_function(paged_decode_attention), "paged_decode_attention");
  m.def("rms_norm", torch::wrap_pybind_function(rms_norm), "rms_norm");
  m.def("rotary_", torch::wrap_pybind_function(rotary_), "rotary_");
#endif
}
