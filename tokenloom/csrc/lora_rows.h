// The LoRA deltas of the decode stack (decode_stack.cpp): per token row b with an adapter slot s,
//   y[b] += (x[b] A_s^T) B_s^T
// with the factors where the LoRA layers keep them (tokenloom/lora/layers.py, LoRALinear): a [slots, R, in] (A's
// rows), b [slots, R, out] (B^T's rows, the scale folded in), in the model's dtype, and per slot and packed slice
// (q/k/v, gate/up) the (first rank row, ranks, first output, outputs) in slices [slots, S, 4]. The stack shares
// these tensors, so a slot the LoRA manager (re)loads is seen at the next step. float32 arithmetic, 16 outputs at
// a time in the expand. Where in the stack's parallel region each part runs (no barrier of its own): see
// DecodeStack::run.
#pragma once
#include <torch/extension.h>
#include <c10/util/BFloat16.h>
#include <cstdint>
#include "attention_rows.h"

#ifdef __AVX512F__
namespace tl {

struct LoraFactors {
  torch::Tensor a, b, slices;  // held: the LoRA layer's buffers
  int64_t slots = 0, R = 0, S = 0, in = 0, out = 0;
  bool bf16 = false;
  const void *ap = nullptr, *bp = nullptr;
  const int64_t* sp = nullptr;

  bool defined() const { return ap != nullptr; }
  const int64_t* slice(int64_t slot, int64_t i) const { return sp + (slot * S + i) * 4; }

  void set(torch::Tensor a_, torch::Tensor b_, torch::Tensor slices_, int64_t in_, int64_t out_, bool bf16_) {
    const auto dtype = bf16_ ? at::kBFloat16 : at::kFloat;
    TORCH_CHECK(a_.dim() == 3 && b_.dim() == 3 && a_.is_contiguous() && b_.is_contiguous() &&
                a_.scalar_type() == dtype && b_.scalar_type() == dtype,
                "decode_stack: LoRA factors must be contiguous [slots, R, in] / [slots, R, out] in the model dtype");
    TORCH_CHECK(a_.size(2) == in_ && b_.size(2) == out_ && a_.size(0) == b_.size(0) && a_.size(1) == b_.size(1),
                "decode_stack: LoRA factor shapes do not match the layer");
    TORCH_CHECK(slices_.scalar_type() == at::kLong && slices_.is_contiguous() && slices_.dim() == 3 &&
                slices_.size(0) == a_.size(0) && slices_.size(2) == 4, "decode_stack: LoRA slices [slots, S, 4]");
    a = a_, b = b_, slices = slices_;
    slots = a.size(0), R = a.size(1), S = slices.size(1), in = in_, out = out_, bf16 = bf16_;
    ap = a.data_ptr(), bp = b.data_ptr(), sp = slices.data_ptr<int64_t>();
  }

  // the slot's slices are inside its factors, on 16-output boundaries (checked once a step for the slots used:
  // the manager rewrites them when it loads a slot)
  void check_slot(int64_t slot) const {
    for (int64_t i = 0; i < S; ++i) {
      const int64_t* p = slice(slot, i);
      TORCH_CHECK(p[0] >= 0 && p[1] >= 0 && p[0] + p[1] <= R && p[2] >= 0 && p[3] >= 0 && p[2] + p[3] <= out &&
                  p[2] % 16 == 0 && p[3] % 16 == 0, "decode_stack: bad LoRA slice");
    }
  }

  template <typename T>
  const T* a_rows(int64_t slot, int64_t j) const { return static_cast<const T*>(ap) + (slot * R + j) * in; }
  template <typename T>
  const T* b_at(int64_t slot, int64_t j, int64_t o) const {
    return static_cast<const T*>(bp) + (slot * R + j) * out + o;
  }

  // xa[r0 .. r0 + rn) = x . A_slot's rows r0.. for slice i: four rank rows per pass over x
  template <typename T>
  void shrink_slice(const float* x, int64_t slot, int64_t i, float* xa) const {
    const int64_t* p = slice(slot, i);
    const int64_t r0 = p[0], rn = p[1];
    int64_t j = r0;
    for (; j + 4 <= r0 + rn; j += 4) {
      const T* a0 = a_rows<T>(slot, j);
      __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
      for (int64_t k = 0; k < in; k += 16) {
        const __m512 vx = _mm512_loadu_ps(x + k);
        s0 = _mm512_fmadd_ps(vx, Vec<T>::load(a0 + k), s0);
        s1 = _mm512_fmadd_ps(vx, Vec<T>::load(a0 + in + k), s1);
        s2 = _mm512_fmadd_ps(vx, Vec<T>::load(a0 + 2 * in + k), s2);
        s3 = _mm512_fmadd_ps(vx, Vec<T>::load(a0 + 3 * in + k), s3);
      }
      xa[j] = _mm512_reduce_add_ps(s0);
      xa[j + 1] = _mm512_reduce_add_ps(s1);
      xa[j + 2] = _mm512_reduce_add_ps(s2);
      xa[j + 3] = _mm512_reduce_add_ps(s3);
    }
    for (; j < r0 + rn; ++j) {
      const T* a0 = a_rows<T>(slot, j);
      __m512 s0 = _mm512_setzero_ps();
      for (int64_t k = 0; k < in; k += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), Vec<T>::load(a0 + k), s0);
      xa[j] = _mm512_reduce_add_ps(s0);
    }
  }

  void shrink(const float* x, int64_t slot, int64_t i, float* xa) const {
    if (bf16)
      shrink_slice<c10::BFloat16>(x, slot, i, xa);
    else
      shrink_slice<float>(x, slot, i, xa);
  }

  // the delta of outputs o .. o + 16 (o a multiple of 16) from the row's xa; false where the slot's adapter has no
  // factors for them
  template <typename T>
  bool expand16_t(const float* xa, int64_t slot, int64_t o, __m512& delta) const {
    for (int64_t i = 0; i < S; ++i) {
      const int64_t* p = slice(slot, i);
      if (o < p[2] || o >= p[2] + p[3]) continue;
      if (!p[1]) return false;
      __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0;  // two chains: the ranks' FMAs need not wait on each other
      int64_t j = p[0];
      for (; j + 2 <= p[0] + p[1]; j += 2) {
        acc0 = _mm512_fmadd_ps(_mm512_set1_ps(xa[j]), Vec<T>::load(b_at<T>(slot, j, o)), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_set1_ps(xa[j + 1]), Vec<T>::load(b_at<T>(slot, j + 1, o)), acc1);
      }
      if (j < p[0] + p[1]) acc0 = _mm512_fmadd_ps(_mm512_set1_ps(xa[j]), Vec<T>::load(b_at<T>(slot, j, o)), acc0);
      delta = _mm512_add_ps(acc0, acc1);
      return true;
    }
    return false;
  }

  bool expand16(const float* xa, int64_t slot, int64_t o, __m512& delta) const {
    return bf16 ? expand16_t<c10::BFloat16>(xa, slot, o, delta) : expand16_t<float>(xa, slot, o, delta);
  }
};

// One projection's LoRA work in one step: its factors, the rows' slots (-1: the base model) and the shrink
// results xa [rows, R]
struct LoraStep {
  const LoraFactors* f;
  const int64_t* slot;
  float* xa;
};

}  // namespace tl
#endif
