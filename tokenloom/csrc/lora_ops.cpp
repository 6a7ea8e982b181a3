// Built on first use by tokenloom.kernels.build.CppExtension; the Python side, and what this kernel does, is in
// tokenloom.kernels.lora_ops.
#include <torch/extension.h>
#include "cpu_features.h"
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include "attention_rows.h"
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#ifdef __AVX512F__
namespace {

using namespace tl;

constexpr int64_t TILE = 8;  // rows of one run that share each load of a factor row

// y[t][o] += sum_j xa[t][j] b[j][o] over each slice's own outputs and ranks
template <typename T, int64_t ROWS>
void expand(T* y, int64_t out, const T* b, const int64_t* slices, int64_t S, const float* xa, int64_t R) {
  for (int64_t i = 0; i < S; ++i) {
    const int64_t r0 = slices[i * 4], rn = slices[i * 4 + 1], o0 = slices[i * 4 + 2], on = slices[i * 4 + 3];
    if (!rn) continue;
    for (int64_t o = o0; o < o0 + on; o += 32) {  // two vectors of outputs per pass over the ranks
      const bool two = o + 16 < o0 + on;
      __m512 acc0[ROWS], acc1[ROWS];
      for (int64_t t = 0; t < ROWS; ++t) acc0[t] = acc1[t] = _mm512_setzero_ps();
      for (int64_t j = r0; j < r0 + rn; ++j) {
        const __m512 vb0 = Vec<T>::load(b + j * out + o), vb1 = Vec<T>::load(b + j * out + (two ? o + 16 : o));
        for (int64_t t = 0; t < ROWS; ++t) {
          const __m512 vx = _mm512_set1_ps(xa[t * R + j]);
          acc0[t] = _mm512_fmadd_ps(vx, vb0, acc0[t]);
          acc1[t] = _mm512_fmadd_ps(vx, vb1, acc1[t]);
        }
      }
      for (int64_t t = 0; t < ROWS; ++t) {
        T* yp = y + t * out + o;
        Vec<T>::store(yp, _mm512_add_ps(Vec<T>::load(yp), acc0[t]));
        if (two) Vec<T>::store(yp + 16, _mm512_add_ps(Vec<T>::load(yp + 16), acc1[t]));
      }
    }
  }
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// xa[t][j] = x[t] . a[j] for bfloat16 x and A: 32 products per instruction, two rank rows per pass over x
template <int64_t ROWS>
void shrink_bf16(const uint16_t* x, const uint16_t* a, int64_t in, const int64_t* slices, int64_t S, float* xa,
                 int64_t R) {
  for (int64_t i = 0; i < S; ++i) {
    const int64_t r0 = slices[i * 4], rn = slices[i * 4 + 1];
    for (int64_t j = r0; j < r0 + rn; j += 2) {
      const bool two = j + 1 < r0 + rn;
      const uint16_t* a0 = a + j * in;
      const uint16_t* a1 = two ? a0 + in : a0;
      __m512 acc0[ROWS], acc1[ROWS];
      for (int64_t t = 0; t < ROWS; ++t) acc0[t] = acc1[t] = _mm512_setzero_ps();
      for (int64_t k = 0; k < in; k += 32) {
        const __m512bh va0 = (__m512bh)_mm512_loadu_si512(a0 + k), va1 = (__m512bh)_mm512_loadu_si512(a1 + k);
        for (int64_t t = 0; t < ROWS; ++t) {
          const __m512bh vx = (__m512bh)_mm512_loadu_si512(x + t * in + k);
          acc0[t] = _mm512_dpbf16_ps(acc0[t], vx, va0);
          acc1[t] = _mm512_dpbf16_ps(acc1[t], vx, va1);
        }
      }
      for (int64_t t = 0; t < ROWS; ++t) {
        xa[t * R + j] = _mm512_reduce_add_ps(acc0[t]);
        if (two) xa[t * R + j + 1] = _mm512_reduce_add_ps(acc1[t]);
      }
    }
  }
}
#endif

// y[t] += (x[t] A^T) B^T for the ROWS rows t of one tile, all of one slot: a [R, in] (A's rows), b [R, out]
// (B^T's rows, the scale folded in), both in T like x and y; slices [S, 4]: (first rank row, ranks, first output,
// outputs) of each packed slice (ranks 0: the adapter leaves that slice alone). float32 sums; y rounded to T once,
// as y + delta would be. ROWS is a compile-time constant so that the accumulators live in registers.
template <typename T, int64_t ROWS>
void tile_impl(T* y, const T* x, int64_t in, int64_t out, const T* a, const T* b, const int64_t* slices,
               int64_t S, float* xa, int64_t R, float* xbuf) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (in % 32 == 0) {  // bfloat16: the shrink as vdpbf16ps on x and A as they are (exact products, fp32 sums)
      shrink_bf16<ROWS>(reinterpret_cast<const uint16_t*>(x), reinterpret_cast<const uint16_t*>(a), in, slices, S,
                        xa, R);
      expand<T, ROWS>(y, out, b, slices, S, xa, R);
      return;
    }
  }
#endif
  const float* xf;  // the tile's rows in float32: converted once, not once per rank row
  if constexpr (std::is_same_v<T, float>) {
    xf = x;
  } else {
    for (int64_t t = 0; t < ROWS; ++t)
      for (int64_t k = 0; k < in; k += 16) _mm512_storeu_ps(xbuf + t * in + k, Vec<T>::load(x + t * in + k));
    xf = xbuf;
  }
  for (int64_t i = 0; i < S; ++i) {  // shrink: xa[t][j] = x[t] . a[j], two rank rows per pass over x
    const int64_t r0 = slices[i * 4], rn = slices[i * 4 + 1];
    for (int64_t j = r0; j < r0 + rn; j += 2) {
      const bool two = j + 1 < r0 + rn;
      const T* a0 = a + j * in;
      const T* a1 = two ? a0 + in : a0;
      __m512 acc0[ROWS], acc1[ROWS];
      for (int64_t t = 0; t < ROWS; ++t) acc0[t] = acc1[t] = _mm512_setzero_ps();
      for (int64_t k = 0; k < in; k += 16) {
        const __m512 va0 = Vec<T>::load(a0 + k), va1 = Vec<T>::load(a1 + k);
        for (int64_t t = 0; t < ROWS; ++t) {
          const __m512 vx = _mm512_loadu_ps(xf + t * in + k);
          acc0[t] = _mm512_fmadd_ps(vx, va0, acc0[t]);
          acc1[t] = _mm512_fmadd_ps(vx, va1, acc1[t]);
        }
      }
      for (int64_t t = 0; t < ROWS; ++t) {
        xa[t * R + j] = _mm512_reduce_add_ps(acc0[t]);
        if (two) xa[t * R + j + 1] = _mm512_reduce_add_ps(acc1[t]);
      }
    }
  }
  expand<T, ROWS>(y, out, b, slices, S, xa, R);
}

template <typename T>
void tile(int64_t rows, T* y, const T* x, int64_t in, int64_t out, const T* a, const T* b, const int64_t* slices,
          int64_t S, float* xa, int64_t R, float* xbuf) {
  switch (rows) {
#define TL_ROWS(n) case n: tile_impl<T, n>(y, x, in, out, a, b, slices, S, xa, R, xbuf); break;
    TL_ROWS(1) TL_ROWS(2) TL_ROWS(3) TL_ROWS(4) TL_ROWS(5) TL_ROWS(6) TL_ROWS(7) TL_ROWS(8)
#undef TL_ROWS
    default: TORCH_CHECK(false, "lora_apply_: tiles have 1 to 8 rows");
  }
}

}  // namespace

// y [T, out] += the LoRA deltas of the rows in `runs` [G, 3] (slot, first row, end row), in place; x [T, in] the
// layer's input; a [K, R, in] and b [K, R, out] the slots' factors (all four of one dtype, contiguous);
// slices [K, S, 4] int64, per slot and packed slice (first rank row, ranks, first output, outputs). Rows in no
// run are not touched. in and every slice's outputs are multiples of 16.
void lora_apply_(torch::Tensor y, torch::Tensor x, torch::Tensor a, torch::Tensor b, torch::Tensor slices,
                 torch::Tensor runs) {
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2 && y.is_contiguous() && x.is_contiguous() && y.size(0) == x.size(0));
  TORCH_CHECK(y.scalar_type() == x.scalar_type() && a.scalar_type() == x.scalar_type() &&
              b.scalar_type() == x.scalar_type());
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && a.dim() == 3 && b.dim() == 3);
  TORCH_CHECK(slices.scalar_type() == torch::kLong && slices.is_contiguous() && slices.dim() == 3);
  TORCH_CHECK(runs.scalar_type() == torch::kLong && runs.is_contiguous() && runs.dim() == 2 && runs.size(1) == 3);
  const int64_t T = x.size(0), in = x.size(1), out = y.size(1), K = a.size(0), R = a.size(1), S = slices.size(1);
  TORCH_CHECK(a.size(2) == in && b.size(0) == K && b.size(1) == R && b.size(2) == out && slices.size(0) == K);
  TORCH_CHECK(in % 16 == 0, "lora_apply_: input width must be a multiple of 16");
  const int64_t* sl = slices.data_ptr<int64_t>();
  for (int64_t s = 0; s < K; ++s)
    for (int64_t i = 0; i < S; ++i) {
      const int64_t* p = sl + (s * S + i) * 4;
      TORCH_CHECK(p[0] >= 0 && p[1] >= 0 && p[0] + p[1] <= R && p[2] >= 0 && p[2] + p[3] <= out &&
                  p[2] % 16 == 0 && p[3] % 16 == 0, "lora_apply_: bad slice");
    }
  const int64_t* rp = runs.data_ptr<int64_t>();
  std::vector<int64_t> tasks;  // (slot, first row, rows): each run cut into tiles
  for (int64_t g = 0; g < runs.size(0); ++g) {
    const int64_t slot = rp[g * 3], start = rp[g * 3 + 1], end = rp[g * 3 + 2];
    TORCH_CHECK(slot >= 0 && slot < K && start >= 0 && start <= end && end <= T, "lora_apply_: bad run");
    for (int64_t r = start; r < end; r += TILE) tasks.insert(tasks.end(), {slot, r, std::min(TILE, end - r)});
  }
  TL_DISPATCH(x.scalar_type(), {
    scalar* Y = y.data_ptr<scalar>();
    const scalar* X = x.data_ptr<scalar>();
    const scalar* A = a.data_ptr<scalar>();
    const scalar* B = b.data_ptr<scalar>();
    at::parallel_for(0, static_cast<int64_t>(tasks.size() / 3), 1, [&](int64_t begin, int64_t end) {
      std::vector<float> xa(TILE * R), xbuf(std::is_same_v<scalar, float> ? 0 : TILE * in);
      for (int64_t k = begin; k < end; ++k) {
        const int64_t slot = tasks[k * 3], r = tasks[k * 3 + 1], n = tasks[k * 3 + 2];
        tile<scalar>(n, Y + r * out, X + r * in, in, out, A + slot * R * in, B + slot * R * out, sl + slot * S * 4,
                     S, xa.data(), R, xbuf.data());
      }
    });
  });
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("has_avx512", torch::wrap_pybind_function(has_avx512), "has_avx512");
#ifdef __AVX512F__  // without it the module only says so (has_avx512() is false)
  m.def("lora_apply_", torch::wrap_pybind_function_no_gil(lora_apply_), "lora_apply_");
#endif
}
