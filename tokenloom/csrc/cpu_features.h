// What an extension was compiled with, for its Python side (tokenloom.kernels.build checks has_avx512()), and
// the dtype dispatch the extensions share. Included after <torch/extension.h>.
#pragma once

inline bool has_avx512() {
#ifdef __AVX512F__
  return true;
#else
  return false;
#endif
}

inline bool has_bf16() {  // AVX512-BF16 (vdpbf16ps), with AVX512-BW
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
  return true;
#else
  return false;
#endif
}

// Runs the statements with `scalar` the C++ type of a bfloat16 or float32 tensor's dtype (the dtypes the kernels
// take); any other dtype is an error. A macro, expanded where torch's headers are included.
#define TL_DISPATCH(dtype, ...)                                                      \
  if ((dtype) == torch::kBFloat16) {                                                 \
    using scalar = c10::BFloat16;                                                    \
    __VA_ARGS__;                                                                     \
  } else {                                                                           \
    TORCH_CHECK((dtype) == torch::kFloat32, "tokenloom: bfloat16 or float32 tensors only"); \
    using scalar = float;                                                            \
    __VA_ARGS__;                                                                     \
  }
