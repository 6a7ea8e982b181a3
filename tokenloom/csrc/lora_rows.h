// The LoRA deltas of the decode stack (decode_stack.cpp): per token row b with an adapter slot s,
//   y[b] += (x[b] A_s^T) B_s^T
// with the factors where the LoRA layers keep them (tokenloom/lora/layers.py, LoRALinear): a [slots, R, in] (A's
// rows), b [slots, R, out] (B^T's rows, the scale folded in), in the model's dtype, and per slot and packed slice
// (q/k/v, gate/up) the (first rank row, ranks, first output, outputs) in slices [slots, S, 4]. The stack shares
// these tensors, so a slot the LoRA manager (re)loads is seen at the next step. float32 arithmetic, 16 outputs at
// a time in the expand, a slot's rows in blocks of four (each row's arithmetic that of the row alone, whatever
// the batch). Where in the stack's parallel region each part runs: see DecodeStack::run.
#pragma once
#include <torch/extension.h>
#include <c10/util/BFloat16.h>
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>
#include "attention_rows.h"

#ifdef __AVX512F__
namespace tl {

struct LoraFactors {
  static constexpr int64_t PREFETCH_AHEAD = 64;  // outputs: the expand prefetches this far ahead of its chunk
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

  // the slice of the slot's factors whose outputs hold o, or null
  const int64_t* slice_of(int64_t slot, int64_t o) const {
    for (int64_t i = 0; i < S; ++i) {
      const int64_t* p = slice(slot, i);
      if (o >= p[2] && o < p[2] + p[3]) return p;
    }
    return nullptr;
  }

  // xa rows (xa + rows[r] * R) of NR rows of one slot, ranks of slice i: x rows (x + rows[r] * in) . A's rank
  // rows. Each (row, rank) is one accumulator over `in` and one reduction, as a row alone; four ranks of NR rows
  // at a time, so an A load serves every row and the chains do not wait on each other.
  template <typename T, int NR>
  void shrink_block(const float* x, const int64_t* rows, int64_t slot, int64_t i, float* xa) const {
    const int64_t* p = slice(slot, i);
    const int64_t r0 = p[0], rn = p[1];
    const float* xr[NR];
    for (int r = 0; r < NR; ++r) xr[r] = x + rows[r] * in;
    int64_t j = r0;
    for (; j + 4 <= r0 + rn; j += 4) {
      const T* a0 = a_rows<T>(slot, j);
      __m512 s[NR][4];
      for (int r = 0; r < NR; ++r)
        for (int q = 0; q < 4; ++q) s[r][q] = _mm512_setzero_ps();
      for (int64_t k = 0; k < in; k += 16) {
        const __m512 a[4] = {Vec<T>::load(a0 + k), Vec<T>::load(a0 + in + k), Vec<T>::load(a0 + 2 * in + k),
                             Vec<T>::load(a0 + 3 * in + k)};
        for (int r = 0; r < NR; ++r) {
          const __m512 vx = _mm512_loadu_ps(xr[r] + k);
          for (int q = 0; q < 4; ++q) s[r][q] = _mm512_fmadd_ps(vx, a[q], s[r][q]);
        }
      }
      for (int r = 0; r < NR; ++r)
        for (int q = 0; q < 4; ++q) xa[rows[r] * R + j + q] = _mm512_reduce_add_ps(s[r][q]);
    }
    for (; j < r0 + rn; ++j) {
      const T* a0 = a_rows<T>(slot, j);
      __m512 s[NR];
      for (int r = 0; r < NR; ++r) s[r] = _mm512_setzero_ps();
      for (int64_t k = 0; k < in; k += 16) {
        const __m512 a = Vec<T>::load(a0 + k);
        for (int r = 0; r < NR; ++r) s[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr[r] + k), a, s[r]);
      }
      for (int r = 0; r < NR; ++r) xa[rows[r] * R + j] = _mm512_reduce_add_ps(s[r]);
    }
  }

  // the deltas of outputs o .. o + 16 (o a multiple of 16) of NR rows of one slot from their xa rows; false where
  // the slot's adapter has no factors for them. Each row has two FMA chains over the ranks (even, odd), as a row
  // alone; a B load serves every row.
  template <typename T, int NR>
  bool expand_block(const float* xa, const int64_t* rows, int64_t slot, int64_t o, __m512* delta) const {
    const int64_t* p = slice_of(slot, o);
    if (!p || !p[1]) return false;
    const float* xr[NR];
    __m512 acc0[NR], acc1[NR];
    for (int r = 0; r < NR; ++r) xr[r] = xa + rows[r] * R, acc0[r] = acc1[r] = _mm512_setzero_ps();
    int64_t j = p[0];
    for (; j + 2 <= p[0] + p[1]; j += 2) {
      // B's rank rows are as many streams as ranks, too many for the hardware prefetcher: the chunks ahead
      _mm_prefetch(reinterpret_cast<const char*>(b_at<T>(slot, j, o + PREFETCH_AHEAD)), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(b_at<T>(slot, j + 1, o + PREFETCH_AHEAD)), _MM_HINT_T0);
      const __m512 b0 = Vec<T>::load(b_at<T>(slot, j, o)), b1 = Vec<T>::load(b_at<T>(slot, j + 1, o));
      for (int r = 0; r < NR; ++r) {
        acc0[r] = _mm512_fmadd_ps(_mm512_set1_ps(xr[r][j]), b0, acc0[r]);
        acc1[r] = _mm512_fmadd_ps(_mm512_set1_ps(xr[r][j + 1]), b1, acc1[r]);
      }
    }
    if (j < p[0] + p[1]) {
      const __m512 b0 = Vec<T>::load(b_at<T>(slot, j, o));
      for (int r = 0; r < NR; ++r) acc0[r] = _mm512_fmadd_ps(_mm512_set1_ps(xr[r][j]), b0, acc0[r]);
    }
    for (int r = 0; r < NR; ++r) delta[r] = _mm512_add_ps(acc0[r], acc1[r]);
    return true;
  }

  // f(a value of the factors' dtype, n as a compile-time constant) for n (1..4) rows: the two above's dispatch
  template <typename F>
  auto dispatch(int64_t n, F&& f) const {
    auto by_rows = [&](auto t) {
      switch (n) {
        case 4: return f(t, std::integral_constant<int, 4>{});
        case 3: return f(t, std::integral_constant<int, 3>{});
        case 2: return f(t, std::integral_constant<int, 2>{});
        default: return f(t, std::integral_constant<int, 1>{});
      }
    };
    return bf16 ? by_rows(c10::BFloat16{}) : by_rows(float{});
  }
  void shrink(const float* x, const int64_t* rows, int64_t n, int64_t slot, int64_t i, float* xa) const {
    dispatch(n, [&](auto t, auto nr) { shrink_block<decltype(t), decltype(nr)::value>(x, rows, slot, i, xa); });
  }
  bool expand(const float* xa, const int64_t* rows, int64_t n, int64_t slot, int64_t o, __m512* delta) const {
    return dispatch(n, [&](auto t, auto nr) {
      return expand_block<decltype(t), decltype(nr)::value>(xa, rows, slot, o, delta);
    });
  }
};

// A step's adapter rows by slot, in blocks of up to four rows of one slot (the unit of the shrink and expand)
struct LoraGroups {
  struct Block { int64_t slot, first, n; };  // rows[first .. first + n)
  std::vector<int64_t> rows;
  std::vector<Block> blocks;

  void build(const int64_t* slots, int64_t B) {
    rows.clear(), blocks.clear();
    for (int64_t b = 0; b < B; ++b)
      if (slots[b] >= 0) rows.push_back(b);
    std::stable_sort(rows.begin(), rows.end(), [&](int64_t a, int64_t b) { return slots[a] < slots[b]; });
    for (int64_t i = 0, n = static_cast<int64_t>(rows.size()); i < n;) {
      int64_t e = i + 1;
      while (e < n && e - i < 4 && slots[rows[e]] == slots[rows[i]]) ++e;
      blocks.push_back({slots[rows[i]], i, e - i});
      i = e;
    }
  }
};

// One projection's LoRA work in one step: its factors, the step's adapter rows, the shrink results xa [rows, R]
// (shared, or the thread's own), and the thread's scratch for deltas: delta [rows][16], has [rows] (whether the
// row got one)
struct LoraStep {
  const LoraFactors* f;
  const LoraGroups* groups;
  float* xa;
  float* delta;
  uint8_t* has;
};

}  // namespace tl
#endif
