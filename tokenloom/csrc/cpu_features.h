// What an extension was compiled with, for its Python side (tokenloom.kernels.build checks has_avx512()).
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
