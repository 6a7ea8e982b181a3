// Built on first use by tokenloom.kernels.build.CppExtension; the Python side, and what these kernels
// do, is in tokenloom.kernels.quant_ops.
#include <torch/extension.h>
#include "cpu_features.h"
#include <ATen/Parallel.h>
#include <cstdint>
#include <cstring>
#include <c10/util/BFloat16.h>
#include "gemv_rows.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

using namespace tl;

constexpr int64_t GRAIN = 16;  // output rows per parallel task


// x as float32 (a bfloat16 x is widened into `buf`); outputs are written in x's dtype
const float* as_f32(const torch::Tensor& x, std::vector<float>& buf) {
  if (x.scalar_type() == at::kFloat) return x.data_ptr<float>();
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  const c10::BFloat16* p = x.data_ptr<c10::BFloat16>();
  buf.resize(x.numel());
  for (int64_t i = 0; i < x.numel(); ++i) buf[i] = (float)p[i];
  return buf.data();
}

struct Out {
  float* f = nullptr;
  c10::BFloat16* b = nullptr;
  void set(int64_t i, float v) { if (f) f[i] = v; else b[i] = c10::BFloat16(v); }
};

Out out_of(torch::Tensor& y) {
  Out o;
  if (y.scalar_type() == at::kFloat) o.f = y.data_ptr<float>(); else o.b = y.data_ptr<c10::BFloat16>();
  return o;
}

void check(const torch::Tensor& t, c10::ScalarType st, int64_t dim, const char* name) {
  TORCH_CHECK(t.scalar_type() == st, name, ": wrong dtype");
  TORCH_CHECK(t.dim() == dim, name, ": wrong rank");
  TORCH_CHECK(t.is_contiguous(), name, ": not contiguous");
  TORCH_CHECK(t.device().is_cpu(), name, ": not on the CPU");
}

}  // namespace

// x [M, K] f32; q [N, K] u8 (signed: the int8 bits); scale [N, G] f32; offset [N, G] f32 or empty
torch::Tensor gemv_u8(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor offset, int64_t group,
                      bool is_signed) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x: 2-d contiguous");
  check(q, at::kByte, 2, "q"); check(scale, at::kFloat, 2, "scale");
  int64_t M = x.size(0), K = x.size(1), N = q.size(0), G = scale.size(1);
  TORCH_CHECK(q.size(1) == K && scale.size(0) == N && G == (K + group - 1) / group, "gemv_u8: shapes");
  bool has_o = offset.numel() > 0;
  if (has_o) check(offset, at::kFloat, 2, "offset");
  auto y = torch::empty({M, N}, x.options());
  std::vector<float> xbuf;
  const float* xp = as_f32(x, xbuf); const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>(); const float* op = has_o ? offset.data_ptr<float>() : nullptr;
  Out yo = out_of(y);
  std::vector<float> xs = has_o ? group_sums(xp, M, K, group) : std::vector<float>(M * G, 0.f);
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m = 0; m < M; ++m)
        yo.set(m * N + n, is_signed
            ? row_u8<true>(xp + m * K, qp + n * K, sp + n * G, nullptr, nullptr, K, group)
            : row_u8<false>(xp + m * K, qp + n * K, sp + n * G, op ? op + n * G : nullptr, xs.data() + m * G, K,
                            group));
  });
  return y;
}

// x [M, K] f32; q [N, K/2] u8 split32; scale / offset [N, G]; code: 16 floats (NF4) or empty (affine)
torch::Tensor gemv_u4(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor offset, int64_t group,
                      torch::Tensor code) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x: 2-d contiguous");
  check(q, at::kByte, 2, "q"); check(scale, at::kFloat, 2, "scale");
  int64_t M = x.size(0), K = x.size(1), N = q.size(0), G = scale.size(1);
  TORCH_CHECK(K % 32 == 0 && group % 32 == 0, "gemv_u4: K and group must be multiples of 32");
  TORCH_CHECK(q.size(1) == K / 2 && scale.size(0) == N && G == (K + group - 1) / group, "gemv_u4: shapes");
  bool has_o = offset.numel() > 0, has_code = code.numel() > 0;
  if (has_o) check(offset, at::kFloat, 2, "offset");
  if (has_code) { check(code, at::kFloat, 1, "code"); TORCH_CHECK(code.numel() == 16, "code: 16 values"); }
  auto y = torch::empty({M, N}, x.options());
  std::vector<float> xbuf;
  const float* xp = as_f32(x, xbuf); const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>(); const float* op = has_o ? offset.data_ptr<float>() : nullptr;
  const float* cp = has_code ? code.data_ptr<float>() : nullptr;
  Out yo = out_of(y);
  std::vector<float> xs = has_o ? group_sums(xp, M, K, group) : std::vector<float>(M * G, 0.f);
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m = 0; m < M; ++m)
        yo.set(m * N + n, row_u4(xp + m * K, qp + n * (K / 2), sp + n * G, op ? op + n * G : nullptr,
                                 xs.data() + m * G, K, group, cp));
  });
  return y;
}

// bf16 activations (see row_u4_bf16); falls back to the fp32 kernel where AVX512-BF16 is missing
torch::Tensor gemv_u4_bf16(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor offset,
                           int64_t group, torch::Tensor code) {
#ifdef TL_BF16
  check(x, at::kBFloat16, 2, "x"); check(q, at::kByte, 2, "q"); check(scale, at::kFloat, 2, "scale");
  int64_t M = x.size(0), K = x.size(1), N = q.size(0), G = scale.size(1);
  TORCH_CHECK(K % 32 == 0 && group % 32 == 0, "gemv_u4_bf16: K and group must be multiples of 32");
  TORCH_CHECK(q.size(1) == K / 2 && scale.size(0) == N && G == (K + group - 1) / group, "gemv_u4_bf16: shapes");
  bool has_o = offset.numel() > 0, has_code = code.numel() > 0;
  if (has_o) check(offset, at::kFloat, 2, "offset");
  if (has_code) { check(code, at::kFloat, 1, "code"); TORCH_CHECK(code.numel() == 16, "code: 16 values"); }
  // nibble -> bf16 table (values 0..15, or the code book rounded to bf16)
  alignas(64) uint16_t tab[32] = {0};
  for (int i = 0; i < 16; ++i) {
    float v = has_code ? code.data_ptr<float>()[i] : (float)i;
    tab[i] = c10::BFloat16(v).x;
  }
  __m512i table = _mm512_load_si512(tab);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  std::vector<uint16_t> xq(M * K);
  std::vector<float> xf(M * K);
  for (int64_t m = 0; m < M; ++m) {
    arrange_x64(xp + m * K, xq.data() + m * K, K);
    for (int64_t k = 0; k < K; ++k) {
      uint32_t bits = (uint32_t)xp[m * K + k] << 16;
      std::memcpy(&xf[m * K + k], &bits, 4);
    }
  }
  std::vector<float> xs = (has_o || !has_code) ? group_sums(xf.data(), M, K, group) : std::vector<float>(M * G, 0.f);
  auto y = torch::empty({M, N}, x.options());
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>(); const float* op = has_o ? offset.data_ptr<float>() : nullptr;
  Out yo = out_of(y);
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m = 0; m < M; ++m)
        yo.set(m * N + n, has_code
            ? row_u4_bf16<true>(xp + m * K, xq.data() + m * K, qp + n * (K / 2), sp + n * G,
                                op ? op + n * G : nullptr, xs.data() + m * G, K, group, table)
            : row_u4_bf16<false>(xp + m * K, xq.data() + m * K, qp + n * (K / 2), sp + n * G,
                                 op ? op + n * G : nullptr, xs.data() + m * G, K, group, table));
  });
  return y;
#else
  return gemv_u4(x, q, scale, offset, group, code);
#endif
}

// Dequantize to a float32 / bfloat16 [N, K] matrix (prefill: the weight is expanded once per forward and
// multiplied by a BLAS GEMM). u4: split32-packed nibbles (code book or affine); u8: one byte per weight.
template <typename T>
void dequant_rows(const uint8_t* q, const float* s, const float* o, const float* code, int64_t N, int64_t K,
                  int64_t group, int64_t G, bool packed4, T* out) {
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
    std::vector<float> row(K);
    for (int64_t n = n0; n < n1; ++n) {
      if (packed4) {
        const uint8_t* qr = q + n * (K / 2);
        for (int64_t c = 0; c < K / 32; ++c)
          for (int j = 0; j < 16; ++j) {
            uint8_t b = qr[c * 16 + j];
            row[c * 32 + j] = code ? code[b & 15] : (float)(b & 15);
            row[c * 32 + 16 + j] = code ? code[b >> 4] : (float)(b >> 4);
          }
      } else {
        const uint8_t* qr = q + n * K;
        for (int64_t k = 0; k < K; ++k) row[k] = (float)qr[k];
      }
      T* dst = out + n * K;
      for (int64_t g0 = 0, gi = 0; g0 < K; g0 += group, ++gi) {
        int64_t g1 = std::min(K, g0 + group);
        float sc = s[n * G + gi], of = o ? o[n * G + gi] : 0.f;
        for (int64_t k = g0; k < g1; ++k) dst[k] = (T)(row[k] * sc + of);
      }
    }
  });
}

torch::Tensor dequant(torch::Tensor q, torch::Tensor scale, torch::Tensor offset, int64_t group, torch::Tensor code,
                      int64_t K, bool packed4, bool bf16) {
  check(q, at::kByte, 2, "q"); check(scale, at::kFloat, 2, "scale");
  int64_t N = q.size(0), G = scale.size(1);
  TORCH_CHECK(scale.size(0) == N && G == (K + group - 1) / group, "dequant: shapes");
  TORCH_CHECK(packed4 ? (K % 32 == 0 && q.size(1) == K / 2) : q.size(1) == K, "dequant: q shape");
  bool has_o = offset.numel() > 0, has_code = code.numel() > 0;
  if (has_o) check(offset, at::kFloat, 2, "offset");
  const float* op = has_o ? offset.data_ptr<float>() : nullptr;
  const float* cp = has_code ? code.data_ptr<float>() : nullptr;
  auto out = torch::empty({N, K}, q.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  if (bf16)
    dequant_rows<c10::BFloat16>(q.data_ptr<uint8_t>(), scale.data_ptr<float>(), op, cp, N, K, group, G, packed4,
                                out.data_ptr<c10::BFloat16>());
  else
    dequant_rows<float>(q.data_ptr<uint8_t>(), scale.data_ptr<float>(), op, cp, N, K, group, G, packed4,
                        out.data_ptr<float>());
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_u8", torch::wrap_pybind_function_no_gil(gemv_u8), "gemv_u8");
  m.def("gemv_u4", torch::wrap_pybind_function_no_gil(gemv_u4), "gemv_u4");
  m.def("gemv_u4_bf16", torch::wrap_pybind_function_no_gil(gemv_u4_bf16), "gemv_u4_bf16");
  m.def("dequant", torch::wrap_pybind_function_no_gil(dequant), "dequant");
  m.def("has_bf16", torch::wrap_pybind_function(has_bf16), "has_bf16");
  m.def("has_avx512", torch::wrap_pybind_function(has_avx512), "has_avx512");
}
