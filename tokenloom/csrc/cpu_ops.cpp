// Built on first use by tokenloom.kernels.build.CppExtension; the Python side, and what these kernels
// do, is in tokenloom.kernels.cpu_ops.
#include <torch/extension.h>
#include "cpu_features.h"
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include "attention_rows.h"
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#ifdef __AVX512F__
namespace {

using namespace tl;

// kc, vc: KV head readers (attention_rows.h) at head 0; row_bytes: a slot's bytes (every head's K or V)
template <typename T, typename KV>
void decode_attention_impl(const T* q, int64_t q_stride, KV kc, KV vc, int64_t row_bytes, const int64_t* table,
                           int64_t table_stride, int64_t block_size, const int64_t* lens, const int64_t* starts,
                           T* out, int64_t B, int64_t H, int64_t KVH, int64_t D, float scale) {
  const int64_t G = H / KVH, C = D / 16;
  // one task per sequence, its KV heads in turn: a slot's heads are adjacent in memory and read together
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), scores, acc;
    float m[16], l[16];
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
      acc.resize(G * D);
      attend_part_any(qf.data(), G, D, kc.at_head(h, D), vc.at_head(h, D), blocks, block_size, s0, n,
                      scores.data(), acc.data(), m, l, h == 0 ? row_bytes : 0);
      merge_parts<T>(acc.data(), m, l, 1, G, D, 0, out + (b * H + h * G) * D);
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

// q [B, H, D] (rows may be strided), caches [S, KVH, D], block_table [B, max_blocks], lens/starts [B]
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_table, int64_t block_size, torch::Tensor lens,
                                     torch::Tensor starts, double scale, c10::optional<torch::Tensor> k_scale,
                                     c10::optional<torch::Tensor> v_scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(1);
  const bool int8 = k_scale.has_value();
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == D && k_cache.is_contiguous() && v_cache.is_contiguous());
  TORCH_CHECK(D % 16 == 0 && H % KVH == 0 && H / KVH <= 16 &&
              k_cache.scalar_type() == (int8 ? at::kChar : q.scalar_type()));
  TORCH_CHECK(!int8 || (v_scale && k_scale->scalar_type() == at::kFloat && v_scale->scalar_type() == at::kFloat &&
                        k_scale->is_contiguous() && v_scale->is_contiguous() &&
                        k_scale->numel() == k_cache.size(0) * KVH && v_scale->numel() == k_scale->numel()),
              "paged_decode_attention: an int8 cache's scales are float32 [slots, kv_heads]");
  auto table = block_table.contiguous();
  auto out = torch::empty({B, H * D}, q.options());
  TL_DISPATCH(q.scalar_type(), {
    auto run = [&](auto kc, auto vc, int64_t row_bytes) {
      decode_attention_impl<scalar>(q.data_ptr<scalar>(), q.stride(0), kc, vc, row_bytes, table.data_ptr<int64_t>(),
                                    table.size(1), block_size, lens.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
                                    out.data_ptr<scalar>(), B, H, KVH, D, static_cast<float>(scale));
    };
    with_kv_heads<scalar>(k_cache.data_ptr(), v_cache.data_ptr(), int8 ? k_scale->data_ptr<float>() : nullptr,
                          int8 ? v_scale->data_ptr<float>() : nullptr, KVH, D, run);
  });
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

// Structured output's grammar mask, in place: logits[rows[k], t] = -inf wherever bit t % 32 of word t / 32 of
// bitmask[k] is clear (rows empty: row k). One pass over the packed words; all-ones words (the common case in
// free-text stretches) are skipped whole.
void apply_token_bitmask_(torch::Tensor logits, torch::Tensor bitmask, torch::Tensor rows) {
  TORCH_CHECK(logits.scalar_type() == torch::kFloat && logits.dim() == 2 && logits.stride(1) == 1);
  TORCH_CHECK(bitmask.scalar_type() == torch::kInt && bitmask.dim() == 2 && bitmask.is_contiguous());
  TORCH_CHECK(rows.numel() == 0 || (rows.scalar_type() == torch::kLong && rows.numel() == bitmask.size(0)));
  const int64_t n = bitmask.size(0), W = bitmask.size(1), V = std::min<int64_t>(logits.size(1), W * 32);
  const int64_t stride = logits.stride(0);
  float* L = logits.data_ptr<float>();
  const uint32_t* M = reinterpret_cast<const uint32_t*>(bitmask.data_ptr<int32_t>());
  const int64_t* R = rows.numel() ? rows.data_ptr<int64_t>() : nullptr;
  for (int64_t k = 0; k < n; ++k) TORCH_CHECK((R ? R[k] : k) >= 0 && (R ? R[k] : k) < logits.size(0));
  const float neg_inf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      float* row = L + (R ? R[k] : k) * stride;
      const uint32_t* words = M + k * W;
      for (int64_t w = 0; w * 32 < V; ++w) {
        const uint32_t bits = words[w];
        if (bits == 0xffffffffu) continue;
        const int64_t base = w * 32, lim = std::min<int64_t>(32, V - base);
#ifdef __AVX512F__
        if (lim == 32) {  // the cleared bits as two masked stores of 16 lanes
          const __m512 fill = _mm512_set1_ps(neg_inf);
          _mm512_mask_storeu_ps(row + base, static_cast<__mmask16>(~bits & 0xffffu), fill);
          _mm512_mask_storeu_ps(row + base + 16, static_cast<__mmask16>(~bits >> 16), fill);
          continue;
        }
#endif
        for (int64_t i = 0; i < lim; ++i)
          if (!((bits >> i) & 1u)) row[base + i] = neg_inf;
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("has_avx512", torch::wrap_pybind_function(has_avx512), "has_avx512");
  m.def("apply_token_bitmask_", torch::wrap_pybind_function_no_gil(apply_token_bitmask_), "apply_token_bitmask_");
#ifdef __AVX512F__  // without it the module only says so (has_avx512() is false)
  m.def("paged_decode_attention", torch::wrap_pybind_function_no_gil(paged_decode_attention), "paged_decode_attention");
  m.def("rms_norm", torch::wrap_pybind_function_no_gil(rms_norm), "rms_norm");
  m.def("rotary_", torch::wrap_pybind_function_no_gil(rotary_), "rotary_");
#endif
}
