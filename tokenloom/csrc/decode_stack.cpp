// Built on first use by tokenloom.kernels.build.CppExtension; the Python side is
// tokenloom.model_executor.fused_decode, which says what this does and when it runs.
//
// The whole decoder stack of a Llama-family model for a batch of decode tokens (one new token per sequence), in
// one call and one OpenMP parallel region: per layer, the weight-streaming matrix-vector products are split
// over the threads by output rows, attention by (sequence, KV head, key range), and the small per-row work
// (norms, residual adds) is repeated by every thread on its own copy of the residual stream, so a layer costs
// six barriers and no allocation, dispatch or Python. Activations are float32; in a bfloat16 model they are
// rounded to bfloat16 exactly where the layer-by-layer torch path materialises a bfloat16 tensor, so both paths
// compute the same function up to float32 summation order.
#include <torch/extension.h>
#include "cpu_features.h"
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <omp.h>
#include <cmath>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>
#include "amx_int8.h"
#include "amx_tiles.h"
#include "attention_rows.h"
#include "gemv_rows.h"
#include "lora_rows.h"

#ifdef __AVX512F__
namespace {

using namespace tl;

enum Kind : int64_t { DENSE_F32 = 0, DENSE_BF16 = 1, U8 = 2, S8 = 3, U4 = 4 };

// One block of output rows of a linear layer, in one weight format (a fused q/k/v can mix formats).
struct Part {
  int64_t kind, rows, group;
  torch::Tensor q, scale, offset, bias;  // held so the weights outlive the Python modules' reshuffles
  torch::Tensor scale16, offset16;  // float16 copies where exact (the ggml block formats): fewer bytes a token
  const uint8_t* qp;
  const float *sp, *op, *bp;
  const uint16_t *sp16 = nullptr, *op16 = nullptr;
  std::shared_ptr<const Amx8Weights> amx8;  // the rows in the AMX int8 tiles' order (amx_int8.h), or null
};

// a float16 copy of t (float32), if every value survives the round trip
torch::Tensor exact_half(const torch::Tensor& t) {
  if (!t.numel()) return t;
  auto h = t.to(at::kHalf);
  return h.to(at::kFloat).equal(t) ? h.contiguous() : torch::Tensor();
}

using PartSpec = std::tuple<int64_t, torch::Tensor, torch::Tensor, torch::Tensor, int64_t, torch::Tensor>;

struct Lin {
  std::vector<Part> parts;
  int64_t N = 0, K = 0;
};

// int8_tiles: 4- and 8-bit parts in groups of 32 get their AMX int8 copy (their integer rows take the tiles)
Lin make_lin(const std::vector<PartSpec>& specs, int64_t K, bool int8_tiles) {
  Lin lin;
  lin.K = K;
  for (const auto& s : specs) {
    Part p;
    p.kind = std::get<0>(s);
    p.q = std::get<1>(s).contiguous();
    p.scale = std::get<2>(s).contiguous();
    p.offset = std::get<3>(s).contiguous();
    p.group = std::get<4>(s);
    p.bias = std::get<5>(s).contiguous();
    p.rows = p.q.size(0);
    TORCH_CHECK(p.kind >= DENSE_F32 && p.kind <= U4, "decode_stack: unknown weight kind");
    const int64_t row_bytes = p.kind == DENSE_F32 ? 4 * K : p.kind == DENSE_BF16 ? 2 * K : p.kind == U4 ? K / 2 : K;
    TORCH_CHECK(p.q.numel() * p.q.element_size() == p.rows * row_bytes, "decode_stack: weight shape");
    if (p.kind >= U8) {
      TORCH_CHECK(p.scale.scalar_type() == at::kFloat && p.scale.size(0) == p.rows, "decode_stack: scale");
      TORCH_CHECK(p.group > 0 && p.scale.numel() == p.rows * ((K + p.group - 1) / p.group), "decode_stack: groups");
    }
    if (p.kind == U4) TORCH_CHECK(K % 32 == 0 && p.group % 32 == 0, "decode_stack: u4 needs 32-column groups");
    if (p.offset.numel()) TORCH_CHECK(p.offset.sizes() == p.scale.sizes() && p.offset.scalar_type() == at::kFloat);
    if (p.bias.numel()) TORCH_CHECK(p.bias.numel() == p.rows && p.bias.scalar_type() == at::kFloat);
    p.qp = static_cast<const uint8_t*>(p.q.data_ptr());
    p.sp = p.kind >= U8 ? p.scale.data_ptr<float>() : nullptr;
    p.op = p.offset.numel() ? p.offset.data_ptr<float>() : nullptr;
    p.bp = p.bias.numel() ? p.bias.data_ptr<float>() : nullptr;
    if ((p.kind == U4 || p.kind == U8) && p.group == 32) {
      auto s16 = exact_half(p.scale), o16 = exact_half(p.offset);
      if (s16.defined() && (o16.defined() || !p.offset.numel())) {
        p.scale16 = s16;
        p.offset16 = o16;
        p.sp16 = reinterpret_cast<const uint16_t*>(s16.data_ptr());
        p.op16 = o16.numel() ? reinterpret_cast<const uint16_t*>(o16.data_ptr()) : nullptr;
      }
    }
    if (int8_tiles && (p.kind == U4 || p.kind == U8) && p.group == 32 && K % 64 == 0) {
      auto w = std::make_shared<Amx8Weights>();
      w->build(p.kind == U4, p.qp, p.sp, p.op, p.sp16, p.op16, p.rows, K);
      p.amx8 = w;
    }
    lin.N += p.rows;
    lin.parts.push_back(std::move(p));
  }
  return lin;
}

enum Proj : int64_t { PROJ_QKV = 0, PROJ_O = 1, PROJ_GATE_UP = 2, PROJ_DOWN = 3 };

struct Layer {
  torch::Tensor in_norm, post_norm, q_norm, k_norm, k_cache, v_cache;  // norms float32; caches [S, KVH, D]
  torch::Tensor k_scale, v_scale;  // an int8 cache's float32 scales [S, KVH], else empty
  Lin qkv, o, gate_up, down;
  LoraFactors lora[4];  // by Proj: the adapters' factors of the projections LoRA wraps (lora_rows.h)
};

inline float round_bf16(float v) {
  uint32_t x;
  std::memcpy(&x, &v, 4);
  x = (x + 0x7fff + ((x >> 16) & 1)) & 0xffff0000u;
  std::memcpy(&v, &x, 4);
  return v;
}

inline uint16_t bf16_bits(float v) {  // v already a bfloat16 value
  uint32_t x;
  std::memcpy(&x, &v, 4);
  return static_cast<uint16_t>(x >> 16);
}

// sigmoid(x) * x for 16 lanes, through e^(-|x|) (exp_nonpos's range)
inline __m512 silu16(__m512 x) {
  const __m512 ax = _mm512_abs_ps(x);
  const __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_setzero_ps(), ax));
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 inv = _mm512_div_ps(one, _mm512_add_ps(one, e));
  const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 sig = _mm512_mask_mul_ps(inv, neg, e, inv);  // x < 0: e / (1 + e)
  return _mm512_mul_ps(x, sig);
}

// An activation block [M, K] quantized per block of 32 (quantize_x): in column order and in arrange_x64's
template <typename T>
struct QuantizedX {
  std::vector<T> plain, arranged;
  std::vector<float> scale, sums;
  bool ready = false;

  void fill(const float* x, int64_t M, int64_t K) {  // K % 64 == 0
    const int64_t B = K / 32;
    plain.resize(M * K);
    arranged.resize(M * K);
    scale.resize(M * B);
    sums.resize(M * B);
    for (int64_t m = 0; m < M; ++m)
      quantize_x(x + m * K, K, plain.data() + m * K, arranged.data() + m * K, scale.data() + m * B,
                 sums.data() + m * B);
    ready = true;
  }
};

// One thread's view of an activation block [M, K] prepared for every weight format: float32, bfloat16 bits and
// the 64-column arrangement of row_u4_bf16, and per-group sums for each group size met.
// Keys per attention part (see DecodeStack::run): long contexts give every thread work, short ones stay whole.
constexpr int64_t KEY_CHUNK = 128;

struct Prep {
  const float* x = nullptr;
  std::vector<uint16_t> xb, xq;
  std::vector<float> sums;
  QuantizedX<int8_t> q8;
  QuantizedX<int16_t> q16;
  std::vector<int8_t> x16h, x16l;  // q16's column-order copy split into bytes (split_x16)
  std::vector<float> gsums;  // block sums per group (groups of more than 32 columns)
  std::vector<float> gsums_m;  // the same for up to four activation rows at once (dot_rows_m)
  int64_t sums_group = -1, M = 0, K = 0;
  bool have_bf16 = false;
  std::vector<uint16_t> xp, wt;  // AMX: x as B operands, the dequantized rows (amx_tiles.h)
  std::vector<float> tiles, tiles2;  // AMX products [M][16] of a chunk (gate_up: gate's and up's)
  bool have_xp = false;
  std::vector<int8_t> x2;  // AMX int8: the integer rows as A operands (amx8_split_rows)
  bool have_x2 = false;
  int64_t tile_config = 0;  // the tiles' shapes in force: 0 unknown, -1 bf16 products, g > 0 int8 groups of g rows
  std::vector<float> amx_out, amx_out2;  // their products [rows][16] of a chunk (gate_up: gate's and up's)
  int64_t tile_m = 0;  // the leading rows that take the AMX tiles (the rest the integer kernels)
};

class DecodeStack {
 public:
  DecodeStack(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate, double eps,
              int64_t sliding_window, bool bf16, torch::Tensor cos, torch::Tensor sin)
      : Hd_(hidden), H_(heads), KVH_(kv_heads), D_(head_dim), I_(intermediate), eps_(static_cast<float>(eps)),
        window_(sliding_window), bf16_(bf16), act_bits_(bf16 ? 16 : 0), cos_(cos.to(at::kFloat).contiguous()),
        sin_(sin.to(at::kFloat).contiguous()) {
    TORCH_CHECK(D_ % 16 == 0 && H_ % KVH_ == 0 && H_ / KVH_ <= 16, "decode_stack: head shape");
    TORCH_CHECK(Hd_ % 16 == 0 && I_ % 16 == 0, "decode_stack: sizes must be multiples of 16");
    TORCH_CHECK(cos_.size(1) == D_, "decode_stack: rotary table");
#ifndef TL_BF16
    TORCH_CHECK(!bf16, "decode_stack: bfloat16 models need AVX512-BF16");
#endif
  }

  void add_layer(torch::Tensor in_norm, torch::Tensor post_norm, torch::Tensor q_norm, torch::Tensor k_norm,
                 std::vector<PartSpec> qkv, std::vector<PartSpec> o, std::vector<PartSpec> gate_up,
                 std::vector<PartSpec> down, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor k_scale,
                 torch::Tensor v_scale) {
    Layer L;
    L.in_norm = in_norm.to(at::kFloat).contiguous();
    L.post_norm = post_norm.to(at::kFloat).contiguous();
    L.q_norm = q_norm.numel() ? q_norm.to(at::kFloat).contiguous() : q_norm;
    L.k_norm = k_norm.numel() ? k_norm.to(at::kFloat).contiguous() : k_norm;
    L.qkv = make_lin(qkv, Hd_, int8_tiles_);
    L.o = make_lin(o, H_ * D_, int8_tiles_);
    L.gate_up = make_lin(gate_up, Hd_, int8_tiles_);
    L.down = make_lin(down, I_, int8_tiles_);
    TORCH_CHECK(L.qkv.N == (H_ + 2 * KVH_) * D_ && L.o.N == Hd_ && L.gate_up.N == 2 * I_ && L.down.N == Hd_,
                "decode_stack: layer shapes");
    const bool int8 = k_scale.numel() > 0;
    const auto cache_type = int8 ? at::kChar : bf16_ ? at::kBFloat16 : at::kFloat;
    for (const auto& c : {k_cache, v_cache})
      TORCH_CHECK(c.scalar_type() == cache_type && c.is_contiguous() && c.dim() == 3 && c.size(1) == KVH_ &&
                  c.size(2) == D_, "decode_stack: KV cache must be [slots, kv_heads, head_dim] in the model dtype "
                  "(int8 with scales)");
    for (const auto& sc : {k_scale, v_scale})
      TORCH_CHECK(!int8 || (sc.scalar_type() == at::kFloat && sc.is_contiguous() && sc.dim() == 2 &&
                            sc.size(0) == k_cache.size(0) && sc.size(1) == KVH_),
                  "decode_stack: an int8 KV cache's scales must be float32 [slots, kv_heads]");
    TORCH_CHECK(layers_.empty() || layers_[0].k_scale.numel() == k_scale.numel(),
                "decode_stack: every layer's KV cache of one kind");
    L.k_cache = k_cache;
    L.v_cache = v_cache;
    L.k_scale = k_scale;
    L.v_scale = v_scale;
    layers_.push_back(std::move(L));
  }

  // the LoRA factors of one projection (Proj) of a layer, shared with its LoRA layer (see lora_rows.h)
  void set_lora(int64_t layer, int64_t proj, torch::Tensor a, torch::Tensor b, torch::Tensor slices) {
    TORCH_CHECK(layer >= 0 && layer < num_layers() && proj >= PROJ_QKV && proj <= PROJ_DOWN,
                "decode_stack: set_lora index");
    Layer& L = layers_[layer];
    const Lin& lin = proj == PROJ_QKV ? L.qkv : proj == PROJ_O ? L.o : proj == PROJ_GATE_UP ? L.gate_up : L.down;
    L.lora[proj].set(a, b, slices, lin.K, lin.N, bf16_);
  }

  void set_head(torch::Tensor final_norm, std::vector<PartSpec> head) {
    final_norm_ = final_norm.to(at::kFloat).contiguous();
    head_ = make_lin(head, Hd_, int8_tiles_);
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  // Decode batches of at least `rows` rows take the AMX tiles (amx_tiles.h) for quantized weights; 0: never.
  // Returns the setting in force: 0 where the build or the CPU has no AMX.
  int64_t set_tile_rows(int64_t rows) {
    TORCH_CHECK(rows >= 0, "decode_stack: tile rows must be >= 0");
#ifdef TL_AMX
    tile_rows_ = bf16_ && amx_usable() ? rows : 0;
#endif
    return tile_rows_;
  }
  int64_t tile_steps() const { return tile_steps_; }  // forward calls whose batch took the tiles
  // Integer rows of 4- and 8-bit weights in groups of 32 take the AMX int8 tiles (amx_int8.h), where the CPU has
  // them and activations are int16 (set_activation_bits); set before the layers are added. Returns the setting in
  // force.
  bool set_int8_tiles(bool on) {
    TORCH_CHECK(layers_.empty(), "decode_stack: set_int8_tiles before add_layer");
    int8_tiles_ = false;
#if defined(TL_AMX) && defined(TL_AMX8)
    int8_tiles_ = on && act_bits_ == 16 && amx_usable();
#endif
    return int8_tiles_;
  }
  void set_activation_bits(int64_t bits) {
    TORCH_CHECK(bits == 0 || bits == 8 || bits == 16, "decode_stack: activation bits are 0, 8 or 16");
    act_bits_ = bits;
  }

  // which kernel each block of output rows takes, counted over the stack (what tests and benchmarks report):
  // "u4-i16", "u8-i8", "s8-i16", ... (weights, then the integer activations; float16 scales marked "+f16"),
  // "u4-bf16", "row"
  std::map<std::string, int64_t> kernel_counts() const {
    std::map<std::string, int64_t> counts;
    auto count = [&](const Lin& lin) {
      for (const auto& part : lin.parts) ++counts[kernel_name(part, lin.K)];
    };
    for (const auto& L : layers_) {
      count(L.qkv);
      count(L.o);
      count(L.gate_up);
      count(L.down);
    }
    count(head_);
    return counts;
  }

  // x [B, hidden] (the token embeddings), positions / slots / context_lens [B], block_table [B, W] (int64):
  // the final-normed hidden states [B, hidden] in the model dtype, or with `logits` the LM head's float32
  // logits of the rows in head_rows (ascending; empty: every row) [R, vocab]. Rows are independent tokens: a
  // sequence may take several consecutive rows (speculative drafts), each seeing the K/V its earlier rows wrote.
  // lora_slots [B] (or empty: every row the base model): each row's LoRA slot, -1 for the base model; a row with
  // a slot gets its adapter's deltas in every projection set_lora gave factors for. tiled_rows: how many leading
  // rows take the AMX tiles for quantized weights, the others the integer kernels (where there are tiles: see
  // set_tile_rows); -1: the stack's choice, every row of a batch of tile rows or more without drafts, else none.
  torch::Tensor forward(torch::Tensor x, torch::Tensor positions, torch::Tensor slots, torch::Tensor block_table,
                        int64_t block_size, torch::Tensor context_lens, bool logits, torch::Tensor head_rows,
                        torch::Tensor lora_slots, int64_t tiled_rows) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == Hd_, "decode_stack: x must be [B, hidden]");
    TORCH_CHECK(!logits || head_.N > 0, "decode_stack: no LM head set");
    TORCH_CHECK(tiled_rows <= x.size(0), "decode_stack: more tiled rows than rows");
    const int64_t B = x.size(0);
    auto xf = x.to(at::kFloat).contiguous();
    auto pos = positions.to(at::kLong).contiguous(), slot = slots.to(at::kLong).contiguous();
    auto table = block_table.to(at::kLong).contiguous(), lens = context_lens.to(at::kLong).contiguous();
    TORCH_CHECK(pos.numel() == B && slot.numel() == B && lens.numel() == B && table.size(0) == B);
    TORCH_CHECK(pos.max().item<int64_t>() < cos_.size(0), "decode_stack: position beyond the rotary table");
    auto rows = head_rows.to(at::kLong).contiguous();
    const int64_t R = rows.numel() ? rows.numel() : B;
    const int64_t* row_ids = rows.numel() ? rows.data_ptr<int64_t>() : nullptr;
    for (int64_t i = 0; row_ids && i < R; ++i)
      TORCH_CHECK(row_ids[i] >= i && row_ids[i] < B && (i == 0 || row_ids[i] > row_ids[i - 1]),
                  "decode_stack: head_rows must be ascending rows of the batch");
    auto out = torch::empty({logits ? R : B, logits ? head_.N : Hd_}, logits ? xf.options() : x.options());
    auto lslots = lora_slots.to(at::kLong).contiguous();
    const int64_t* lora = check_lora_slots(lslots, B) ? lslots.data_ptr<int64_t>() : nullptr;
    if (bf16_)
      run<c10::BFloat16>(B, xf.data_ptr<float>(), pos.data_ptr<int64_t>(), slot.data_ptr<int64_t>(),
                         table.data_ptr<int64_t>(), table.size(1), block_size, lens.data_ptr<int64_t>(), logits,
                         row_ids, R, out, lora, tiled_rows);
    else
      run<float>(B, xf.data_ptr<float>(), pos.data_ptr<int64_t>(), slot.data_ptr<int64_t>(),
                 table.data_ptr<int64_t>(), table.size(1), block_size, lens.data_ptr<int64_t>(), logits, row_ids, R,
                 out, lora, tiled_rows);
    return out;
  }

 private:
  int64_t Hd_, H_, KVH_, D_, I_;
  float eps_;
  int64_t window_;
  bool bf16_;
  // 4- and 8-bit weights meet activations quantized per block of 32 in integer dot products: 16 = int16
  // (vpdpwssd; the rounding is below bfloat16's, the default of bfloat16 models), 8 = int8 (vpdpbusd, as
  // llama.cpp; faster, ~1 % perplexity), 0 = float activations (float32 models)
  int64_t act_bits_;
  int64_t tile_rows_ = 0;
  bool int8_tiles_ = false;
  mutable int64_t tile_steps_ = 0;
  torch::Tensor cos_, sin_, final_norm_;
  std::vector<Layer> layers_;
  Lin head_;

  // whether any row runs an adapter; checks the slots and, for each slot used, its slices in every layer
  bool check_lora_slots(const torch::Tensor& lslots, int64_t B) const {
    if (!lslots.numel()) return false;
    TORCH_CHECK(lslots.numel() == B, "decode_stack: lora_slots must have one slot per row");
    const int64_t* s = lslots.data_ptr<int64_t>();
    std::vector<bool> used;
    bool any = false;
    for (int64_t b = 0; b < B; ++b) {
      if (s[b] < 0) {
        TORCH_CHECK(s[b] == -1, "decode_stack: a LoRA slot is -1 (the base model) or a slot of the factors");
        continue;
      }
      any = true;
      if (s[b] >= static_cast<int64_t>(used.size())) used.resize(s[b] + 1, false);
      used[s[b]] = true;
    }
    if (!any) return false;
    bool factors = false;
    for (const auto& L : layers_)
      for (const auto& f : L.lora) {
        if (!f.defined()) continue;
        factors = true;
        TORCH_CHECK(static_cast<int64_t>(used.size()) <= f.slots, "decode_stack: LoRA slot beyond the factors");
        for (int64_t slot = 0; slot < static_cast<int64_t>(used.size()); ++slot)
          if (used[slot]) f.check_slot(slot);
      }
    TORCH_CHECK(factors, "decode_stack: rows with a LoRA slot but no LoRA factors set");
    return true;
  }

  // xa [B, R] of one projection's adapter rows from its input x [B, K]. Shared xa: called by every thread, the
  // (block of rows, slice) tasks split between them without a barrier (nowait: the gemv that follows ends in
  // one). Per thread (`all`: each thread's own xa): every task, no sharing.
  void lora_shrink(const LoraStep& ls, const float* x, bool all = false) const {
    const LoraFactors& f = *ls.f;
    const LoraGroups& g = *ls.groups;
    const int64_t S = f.S, tasks = static_cast<int64_t>(g.blocks.size()) * S;
    auto task = [&](int64_t t) {
      const LoraGroups::Block& bl = g.blocks[t / S];
      f.shrink(x, g.rows.data() + bl.first, bl.n, bl.slot, t % S, ls.xa);
    };
    if (all) {
      for (int64_t t = 0; t < tasks; ++t) task(t);
      return;
    }
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t t = 0; t < tasks; ++t) task(t);
  }

  // the deltas of outputs o .. o + 16 of every adapter row into delta [B][16]; has[b]: row b got one
  void lora_deltas(const LoraStep& ls, int64_t o, float* delta, uint8_t* has) const {
    const LoraGroups& g = *ls.groups;
    __m512 d[4];
    for (const LoraGroups::Block& bl : g.blocks) {
      const int64_t* rows = g.rows.data() + bl.first;
      const bool got = ls.f->expand(ls.xa, rows, bl.n, bl.slot, o, d);
      for (int64_t r = 0; r < bl.n; ++r) {
        has[rows[r]] = got;
        if (got) _mm512_storeu_ps(delta + rows[r] * 16, d[r]);
      }
    }
  }

  // y[0..16) += a delta, rounded as the LoRA layer's output y + delta
  void add_delta(float* y, const float* delta) const {
    _mm512_storeu_ps(y, _mm512_add_ps(_mm512_loadu_ps(y), _mm512_loadu_ps(delta)));
    rnd(y, 16);
  }

  // y [B, N] (shared, the projection's output) += each adapter row's delta, rounded: the threads split the
  // 16-output chunks, and wait for each other at the end (y is read whole next)
  void lora_expand(const LoraStep& ls, float* y, int64_t N) const {
#pragma omp for schedule(static)
    for (int64_t c = 0; c < N / 16; ++c) {
      lora_deltas(ls, c * 16, ls.delta, ls.has);
      for (int64_t b : ls.groups->rows)
        if (ls.has[b]) add_delta(y + b * N + c * 16, ls.delta + b * 16);
    }
  }

  // x [B, N] += y, rounded: every thread on its own copy of x, y shared and left as it is
  void add_residual(float* x, const float* y, int64_t B, int64_t N) const {
    for (int64_t i = 0; i < B * N; i += 16)
      _mm512_storeu_ps(x + i, _mm512_add_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
    rnd(x, B * N);
  }

  void rnd(float* v, int64_t n) const {
    if (!bf16_) return;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(v + i, Vec<c10::BFloat16>::round(_mm512_loadu_ps(v + i)));
    for (; i < n; ++i) v[i] = round_bf16(v[i]);
  }

  // out = norm(x) * w per row, with the torch path's rounding (normalised row, then the product)
  void rms_norm(const float* x, const float* w, float* out, int64_t M, int64_t N) const {
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * N;
      float* o = out + m * N;
      __m512 ss = _mm512_setzero_ps();
      for (int64_t k = 0; k < N; k += 16) {
        __m512 v = _mm512_loadu_ps(xr + k);
        ss = _mm512_fmadd_ps(v, v, ss);
      }
      const __m512 r = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / N + eps_));
      for (int64_t k = 0; k < N; k += 16) _mm512_storeu_ps(o + k, _mm512_mul_ps(_mm512_loadu_ps(xr + k), r));
      rnd(o, N);
      for (int64_t k = 0; k < N; k += 16)
        _mm512_storeu_ps(o + k, _mm512_mul_ps(_mm512_loadu_ps(o + k), _mm512_loadu_ps(w + k)));
      rnd(o, N);
    }
  }

  void prepare(Prep& p, const float* x, int64_t M, int64_t K) const {
    p.x = x;
    p.M = M;
    p.K = K;
    p.sums_group = -1;
    p.have_bf16 = false;
    p.q8.ready = false;
    p.q16.ready = false;
    p.have_xp = false;
    p.have_x2 = false;
    p.tile_config = 0;  // torch's own AMX kernels may have loaded other shapes since
  }

  // whether the first p.tile_m activation rows meet rows of `part` on the AMX tiles
  static bool tiled(const Part& part, const Prep& p, int64_t K) {
    return p.tile_m > 0 && K % 32 == 0 && (part.kind == U4 || part.kind == U8 || part.kind == S8);
  }

#ifdef TL_AMX
  // out[m * 16 + i] = row local + i (i < count) of `part` against activation row m, for the first p.tile_m rows
  void tile_rows(const Part& part, Prep& p, int64_t local, int64_t count, int64_t K, float* out) const {
    if (!p.have_xp) {
      amx_pack_x(p.x, p.tile_m, K, p.xp);  // bf16_: x holds bfloat16 values
      p.have_xp = true;
    }
    if (p.tile_config != -1) {  // (a batch-invariant step's other rows may take the int8 tiles in between)
      amx_configure();
      p.tile_config = -1;
    }
    const int64_t G = (K + part.group - 1) / part.group;
    const TileWeights kind = part.kind == U4 ? TileWeights::U4 : part.kind == U8 ? TileWeights::U8 : TileWeights::S8;
    const int64_t row_bytes = part.kind == U4 ? K / 2 : K;
    amx_rows16(kind, part.qp + local * row_bytes, row_bytes, part.sp + local * G, part.op ? part.op + local * G : nullptr,
               G, part.group, count, p.xp.data(), p.tile_m, K, p.wt, out);
  }
#else
  void tile_rows(const Part&, Prep&, int64_t, int64_t, int64_t, float*) const {}
#endif

#ifdef TL_VNNI
  void need_q16(Prep& p) const {  // callers check K % 64 == 0
    if (p.q16.ready) return;
    p.q16.fill(p.x, p.M, p.K);
    p.x16h.resize(p.M * p.K);
    p.x16l.resize(p.M * p.K);
    split_x16(p.q16.plain.data(), p.M * p.K, p.x16h.data(), p.x16l.data());
  }

  void need_q8(Prep& p) const {
    if (!p.q8.ready) p.q8.fill(p.x, p.M, p.K);
  }
#endif

  // whether the part's integer rows take the AMX int8 tiles (their copy is made for int16 activations)
  bool int8_tiled(const Part& part) const { return part.amx8 && act_bits_ == 16; }

#ifdef TL_AMX8
  // out[(m - m0) * 16 + i] = row local + i of `part` (a chunk of 16 rows with its int8 tile copy) against
  // activation row m, for the rows m0..M (the step's integer rows: m0 is the same for every chunk)
  void int8_tile_rows(const Part& part, Prep& p, int64_t m0, int64_t M, int64_t local, int64_t K, float* out) const {
    const int64_t rows = M - m0, g = std::min<int64_t>(4, rows), B = K / 32, padded = (rows + g - 1) / g * g;
    if (!p.have_x2) {
      need_q16(p);
      amx8_split_rows(p.q16.plain.data() + m0 * K, rows, padded, K, p.x2);
      p.have_x2 = true;
    }
    if (p.tile_config != g) {
      amx8_configure(g);
      p.tile_config = g;
    }
    for (int64_t a = 0; a < rows; a += 3 * g)  // up to three groups of g rows per pass over the weights
      amx8_chunk(*part.amx8, local / 16, p.x2.data() + a * 256, padded, std::min(3 * g, rows - a), g, K,
                 p.q16.scale.data() + (m0 + a) * B, p.q16.sums.data() + (m0 + a) * B, out + a * 16);
  }
#endif

  // which four-row kernel a block of rows takes (rows left over, and other formats: one row at a time)
  enum Path { ROW, INT16, INT8, BF16_U4 };
  Path path_of(const Part& part, int64_t K) const {
#ifdef TL_VNNI
    const bool fmt = part.kind == S8 || ((part.kind == U4 || part.kind == U8) && part.group % 32 == 0);
    if (act_bits_ && K % 64 == 0 && fmt) return act_bits_ == 8 ? INT8 : INT16;
#endif
#ifdef TL_BF16
    if (part.kind == U4 && bf16_ && part.group == 32 && K % 64 == 0) return BF16_U4;
#endif
    return ROW;
  }

  std::string kernel_name(const Part& part, int64_t K) const {
    static const char* kinds[] = {"f32", "bf16", "u8", "s8", "u4"};
    const std::string f16 = part.sp16 ? "+f16" : "";
    if (int8_tiled(part)) return std::string(kinds[part.kind]) + "-amx8" + (part.amx8->half ? "+f16" : "");
    switch (path_of(part, K)) {
      case INT16: return std::string(kinds[part.kind]) + "-i16" + f16;
      case INT8: return std::string(kinds[part.kind]) + "-i8" + f16;
      case BF16_U4: return "u4-bf16";
      default: return "row";
    }
  }

  // four rows of `part` from row n against one quantized activation row (its int8 or int16 copy in the arranged
  // order for 4-bit rows, column order otherwise); xs: x's block sums, xg: the same per group of the part
  template <typename XQ, typename U4K, typename U8K, typename S8K>
  void rows4_integer(const Part& part, int64_t n, int64_t K, const XQ* xq, const XQ* xq_arranged, const float* dx,
                     const float* xs, const float* xg, float* out, U4K u4k, U8K u8k, S8K s8k) const {
    if (part.kind == S8) return s8k(xq, dx, xs, part.qp + n * K, K, part.sp + n, K, out);
    const int64_t G = (K + part.group - 1) / part.group, g = part.group;
    const bool u4 = part.kind == U4;
    const uint8_t* q = part.qp + n * (u4 ? K / 2 : K);
    if (part.sp16) {
      const uint16_t *s = part.sp16 + n * G, *o = part.op16 ? part.op16 + n * G : nullptr;
      return u4 ? u4k(xq_arranged, dx, xg, q, K / 2, s, o, K, g, out) : u8k(xq, dx, xg, q, K, s, o, K, g, out);
    }
    const float *s = part.sp + n * G, *o = part.op ? part.op + n * G : nullptr;
    return u4 ? u4k(xq_arranged, dx, xg, q, K / 2, s, o, K, g, out) : u8k(xq, dx, xg, q, K, s, o, K, g, out);
  }

  // x's block sums per group of `group` columns (the block sums themselves for groups of 32)
  const float* group_sums_of(Prep& p, const float* block_sums, int64_t K, int64_t group) const {
    if (group == 32) return block_sums;
    p.gsums.resize((K + group - 1) / group);
    group_xsums(block_sums, K, group, p.gsums.data());
    return p.gsums.data();
  }

  // out[i][0..count) = rows local..local+count of `part` against activation rows m0..m0+mc (mc <= 4): 4- and
  // 8-bit affine weights with int16 activations load (and widen) each weight once for all mc rows
  // (rows4_u4_i16_gk_m, rows4_u8_i16_gk_m: the same result to the bit); other formats run dot_rows per row
  void dot_rows_m(const Part& part, Prep& p, int64_t m0, int64_t mc, int64_t local, int64_t count, int64_t K,
                  float (*out)[16]) const {
#ifdef TL_VNNI
    if (mc > 1 && count % 4 == 0 && (part.kind == U4 || part.kind == U8) && path_of(part, K) == INT16) {
      need_q16(p);
      const int64_t B = K / 32, G = (K + part.group - 1) / part.group;
      const bool u4 = part.kind == U4;
      const int16_t* xq[4];
      const int8_t *xh[4], *xl[4];
      const float *dx[4], *xg[4];
      if (part.group != 32) p.gsums_m.resize(4 * G);
      for (int64_t i = 0; i < mc; ++i) {
        const int64_t m = m0 + i;
        xq[i] = p.q16.arranged.data() + m * K;
        xh[i] = p.x16h.data() + m * K;
        xl[i] = p.x16l.data() + m * K;
        dx[i] = p.q16.scale.data() + m * B;
        xg[i] = p.q16.sums.data() + m * B;
        if (part.group != 32) {
          group_xsums(xg[i], K, part.group, p.gsums_m.data() + i * G);
          xg[i] = p.gsums_m.data() + i * G;
        }
      }
      for (int64_t i = 0; i < count; i += 4) {
        const int64_t n = local + i;
        const uint8_t* q = part.qp + n * (u4 ? K / 2 : K);
        float o4[16];
        if (part.sp16)
          rows_m(u4, mc, xq, xh, xl, dx, xg, q, part.sp16 + n * G, part.op16 ? part.op16 + n * G : nullptr, K,
                 part.group, o4);
        else
          rows_m(u4, mc, xq, xh, xl, dx, xg, q, part.sp + n * G, part.op ? part.op + n * G : nullptr, K,
                 part.group, o4);
        for (int64_t m = 0; m < mc; ++m)
          for (int r = 0; r < 4; ++r) out[m][i + r] = o4[m * 4 + r];
      }
      return;
    }
#endif
    for (int64_t i = 0; i < mc; ++i) dot_rows(part, p, m0 + i, local, count, K, out[i]);
  }

#ifdef TL_VNNI
  template <typename S>
  static void rows_m(bool u4, int64_t mc, const int16_t* const* xq, const int8_t* const* xh, const int8_t* const* xl,
                     const float* const* dx, const float* const* xg, const uint8_t* q, const S* s, const S* o,
                     int64_t K, int64_t g, float* out) {
    if (u4) {
      if (mc == 2) return rows4_u4_i16_gk_m<2>(xq, dx, xg, q, K / 2, s, o, K, g, out);
      if (mc == 3) return rows4_u4_i16_gk_m<3>(xq, dx, xg, q, K / 2, s, o, K, g, out);
      return rows4_u4_i16_gk_m<4>(xq, dx, xg, q, K / 2, s, o, K, g, out);
    }
    if (mc == 2) return rows4_u8_i16_gk_m<2>(xh, xl, dx, xg, q, K, s, o, K, g, out);
    if (mc == 3) return rows4_u8_i16_gk_m<3>(xh, xl, dx, xg, q, K, s, o, K, g, out);
    return rows4_u8_i16_gk_m<4>(xh, xl, dx, xg, q, K, s, o, K, g, out);
  }
#endif

  // out[0..count) = rows local..local+count of `part` against activation row m (before bias): four rows per
  // kernel call where the format has a four-row kernel, else one by one
  void dot_rows(const Part& part, Prep& p, int64_t m, int64_t local, int64_t count, int64_t K, float* out) const {
    int64_t i = 0;
    const Path path = count >= 4 ? path_of(part, K) : ROW;
#ifdef TL_VNNI
    if (path == INT16) {
      need_q16(p);
      const int64_t B = K / 32;
      const float *dx = p.q16.scale.data() + m * B, *xs = p.q16.sums.data() + m * B;
      const float* xg = part.kind == S8 ? xs : group_sums_of(p, xs, K, part.group);
      const int8_t *xh = p.x16h.data() + m * K, *xl = p.x16l.data() + m * K;
      auto s8k = [&](const int16_t*, const float*, const float*, const uint8_t* q, int64_t rb, const float* s,
                     int64_t K, float* o) { rows4_s8_i16(xh, xl, dx, xs, q, rb, s, K, o); };
      auto u4k = [](auto... a) { rows4_u4_i16_gk(a...); };
      auto u8k = [&](const int16_t*, const float*, const float* sums, const uint8_t* q, int64_t rb, auto s, auto o,
                     int64_t K, int64_t group, float* out) {
        rows4_u8_i16_gk(xh, xl, dx, sums, q, rb, s, o, K, group, out);
      };
      for (; i + 4 <= count; i += 4)
        rows4_integer(part, local + i, K, p.q16.plain.data() + m * K, p.q16.arranged.data() + m * K, dx, xs, xg,
                      out + i, u4k, u8k, s8k);
    } else if (path == INT8) {
      need_q8(p);
      const int64_t B = K / 32;
      auto s8k = [](const int8_t* xq, const float* dx, const float* xs, const uint8_t* q, int64_t rb, const float* s,
                    int64_t K, float* o) { rows4_s8_vnni(xq, dx, xs, q, rb, s, K, o); };
      auto u4k = [](auto... a) { rows4_u4_vnni_gk(a...); };
      auto u8k = [](auto... a) { rows4_u8_vnni_gk(a...); };
      const float* xs = p.q8.sums.data() + m * B;
      const float* xg = part.kind == S8 ? xs : group_sums_of(p, xs, K, part.group);
      for (; i + 4 <= count; i += 4)
        rows4_integer(part, local + i, K, p.q8.plain.data() + m * K, p.q8.arranged.data() + m * K,
                      p.q8.scale.data() + m * B, xs, xg, out + i, u4k, u8k, s8k);
    }
#endif
#ifdef TL_BF16
    if (path == BF16_U4) {
      need_bf16(p);
      const int64_t G = K / 32;
      const float* xs = need_sums(p, 32) + m * G;
      for (; i + 4 <= count; i += 4) {
        const int64_t n = local + i;
        rows4_u4_bf16_g32(p.xq.data() + m * K, part.qp + n * (K / 2), K / 2, part.sp + n * G,
                          part.op ? part.op + n * G : nullptr, xs, K, out + i);
      }
    }
#endif
    for (; i < count; ++i) out[i] = row(part, p, m, local + i, K);
  }

  void need_bf16(Prep& p) const {
    if (p.have_bf16) return;
    p.xb.resize(p.M * p.K);
    p.xq.resize(p.M * p.K);
    for (int64_t i = 0; i < p.M * p.K; ++i) p.xb[i] = bf16_bits(round_bf16(p.x[i]));
    for (int64_t m = 0; m < p.M; ++m) arrange_x64(p.xb.data() + m * p.K, p.xq.data() + m * p.K, p.K);
    p.have_bf16 = true;
  }

  const float* need_sums(Prep& p, int64_t group) const {
    if (p.sums_group != group) {
      p.sums = group_sums(p.x, p.M, p.K, group);
      p.sums_group = group;
    }
    return p.sums.data();
  }

  // y[m, n] for output row n of `part` (n counted within the part)
  float row(const Part& part, Prep& p, int64_t m, int64_t n, int64_t K) const {
    const int64_t G = part.kind >= U8 ? (K + part.group - 1) / part.group : 0;
    const float* x = p.x + m * K;
    switch (part.kind) {
      case DENSE_F32:
        return row_f32(x, reinterpret_cast<const float*>(part.qp) + n * K, K);
#ifdef TL_BF16
      case DENSE_BF16:
        need_bf16(p);
        return row_bf16(p.xb.data() + m * K, reinterpret_cast<const uint16_t*>(part.qp) + n * K, K);
#endif
      case S8:
        return row_u8<true>(x, part.qp + n * K, part.sp + n * G, nullptr, nullptr, K, part.group);
      case U8: {
        const float* xs = part.op ? need_sums(p, part.group) + m * G : nullptr;
        return row_u8<false>(x, part.qp + n * K, part.sp + n * G, part.op ? part.op + n * G : nullptr, xs, K,
                             part.group);
      }
      case U4: {
#ifdef TL_BF16
        if (bf16_) {
          need_bf16(p);
          const float* xs = need_sums(p, part.group) + m * G;  // also takes off the 0x4300 trick's 128 * sum(x)
          return row_u4_bf16<false>(p.xb.data() + m * K, p.xq.data() + m * K, part.qp + n * (K / 2),
                                    part.sp + n * G, part.op ? part.op + n * G : nullptr, xs, K, part.group,
                                    _mm512_setzero_si512());
        }
#endif
        const float* xs = part.op ? need_sums(p, part.group) + m * G : nullptr;
        return row_u4(x, part.qp + n * (K / 2), part.sp + n * G, part.op ? part.op + n * G : nullptr, xs, K,
                      part.group, nullptr);
      }
    }
    TORCH_CHECK(false, "decode_stack: weight kind without a kernel on this CPU");
    return 0.f;
  }

  // which part holds global row n, and its index there
  static const Part& locate(const Lin& lin, int64_t& n) {
    for (const auto& part : lin.parts) {
      if (n < part.rows) return part;
      n -= part.rows;
    }
    return lin.parts.back();
  }

  // y [M, N] = x W^T (+ bias), rounded; called by every thread of the region (rows split between them, 16 at a
  // time: every part's row count is a multiple of 16 but perhaps the LM head's, whose last chunk is shorter)
  void gemv(const Lin& lin, Prep& p, float* y, int64_t M) const {
    const int64_t N = lin.N, K = lin.K, chunks = (N + 15) / 16;
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      int64_t local = c * 16;
      const Part& part = locate(lin, local);
      const int64_t count = std::min<int64_t>(16, part.rows - local);
      const int64_t T = tiled(part, p, K) ? p.tile_m : 0;  // rows [0, T) on the tiles, the rest below
      // y's rows m0.. (n of them) of this chunk from their products v [n][16], with the bias, rounded
      auto put = [&](const float* v, int64_t m0, int64_t n) {
        for (int64_t m = m0; m < m0 + n; ++m)
          for (int64_t i = 0; i < count; ++i) {
            const float r = v[(m - m0) * 16 + i] + (part.bp ? part.bp[local + i] : 0.f);
            y[m * N + c * 16 + i] = bf16_ ? round_bf16(r) : r;
          }
      };
      if (T) {
        p.tiles.resize(T * 16);
        tile_rows(part, p, local, count, K, p.tiles.data());
        put(p.tiles.data(), 0, T);
      }
#ifdef TL_AMX8
      if (T < M && int8_tiled(part)) {
        p.amx_out.resize((M - T) * 16);
        int8_tile_rows(part, p, T, M, local, K, p.amx_out.data());
        put(p.amx_out.data(), T, M - T);
        continue;
      }
#endif
      float v[4][16];
      for (int64_t m0 = T; m0 < M; m0 += 4) {
        const int64_t mc = std::min<int64_t>(4, M - m0);
        dot_rows_m(part, p, m0, mc, local, count, K, v);
        put(v[0], m0, mc);
      }
    }
  }

  // act [M, I] = silu(gate) * up from the fused gate_up weight: gate rows n.. and up rows I + n.. go to the same
  // thread, 16 of each at a time; ls: the LoRA deltas to add to gate and up (lora_shrink done, scratch for two
  // sets of deltas), or null
  void gemv_glu(const Lin& lin, Prep& p, float* act, int64_t M, const LoraStep* ls = nullptr) const {
    const int64_t I = I_, K = lin.K, chunks = I / 16;
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      int64_t g = c * 16, u = I + c * 16;
      const Part& pg = locate(lin, g);
      const Part& pu = locate(lin, u);
      alignas(64) float gates[4][16], ups[4][16];
      const int64_t T = tiled(pg, p, K) && tiled(pu, p, K) ? p.tile_m : 0;  // rows [0, T) on the tiles
      if (T) {
        p.tiles.resize(T * 16);
        p.tiles2.resize(T * 16);
        tile_rows(pg, p, g, 16, K, p.tiles.data());
        tile_rows(pu, p, u, 16, K, p.tiles2.data());
      }
      bool int8_tiles = false;  // the integer rows' gate and up from the AMX int8 tiles
#ifdef TL_AMX8
      if (T < M && int8_tiled(pg) && int8_tiled(pu)) {
        int8_tiles = true;
        p.amx_out.resize((M - T) * 16);
        p.amx_out2.resize((M - T) * 16);
        int8_tile_rows(pg, p, T, M, g, K, p.amx_out.data());
        int8_tile_rows(pu, p, T, M, u, K, p.amx_out2.data());
      }
#endif
      float* delta_up = ls ? ls->delta + M * 16 : nullptr;
      uint8_t* has_up = ls ? ls->has + M : nullptr;
      if (ls) {
        lora_deltas(*ls, g, ls->delta, ls->has);
        lora_deltas(*ls, u, delta_up, has_up);
      }
      for (int64_t m = 0; m < M; ++m) {
        const bool tile = m < T;
        const int64_t m0 = T + ((m - T) & ~int64_t(3));
        if (!tile && !int8_tiles && m == m0) {  // four activation rows at a time
          dot_rows_m(pg, p, m0, std::min<int64_t>(4, M - m0), g, 16, K, gates);
          dot_rows_m(pu, p, m0, std::min<int64_t>(4, M - m0), u, 16, K, ups);
        }
        float* gate = tile ? p.tiles.data() + m * 16 : int8_tiles ? p.amx_out.data() + (m - T) * 16 : gates[m - m0];
        float* up = tile ? p.tiles2.data() + m * 16 : int8_tiles ? p.amx_out2.data() + (m - T) * 16 : ups[m - m0];
        for (int64_t j = 0; j < 16; ++j) {
          gate[j] += pg.bp ? pg.bp[g + j] : 0.f;
          up[j] += pu.bp ? pu.bp[u + j] : 0.f;
        }
        rnd(gate, 16);
        rnd(up, 16);
        if (ls && ls->has[m]) add_delta(gate, ls->delta + m * 16);
        if (ls && has_up[m]) add_delta(up, delta_up + m * 16);
        float* a = act + m * I + c * 16;
        _mm512_storeu_ps(a, silu16(_mm512_loadu_ps(gate)));
        rnd(a, 16);
        _mm512_storeu_ps(a, _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(up)));
        rnd(a, 16);
      }
    }
  }

  // the rotate-half embedding of `heads` heads at row v, with the torch kernel's rounding of each product
  void rotate(float* v, int64_t heads, int64_t position) const {
    const float* c = cos_.data_ptr<float>() + position * D_;
    const float* s = sin_.data_ptr<float>() + position * D_;
    const int64_t half = D_ / 2;
    for (int64_t h = 0; h < heads; ++h) {
      float* p = v + h * D_;
      for (int64_t k = 0; k < half; ++k) {
        float ck = c[k], sk = s[k], ch = c[half + k], sh = s[half + k];
        if (bf16_) ck = round_bf16(ck), sk = round_bf16(sk), ch = round_bf16(ch), sh = round_bf16(sh);
        float x1 = p[k], x2 = p[half + k];
        float a = x1 * ck, b = x2 * sk, cc = x2 * ch, d = x1 * sh;
        if (bf16_) a = round_bf16(a), b = round_bf16(b), cc = round_bf16(cc), d = round_bf16(d);
        p[k] = a - b;
        p[half + k] = cc + d;
      }
      rnd(p, D_);
    }
  }

  // a token's K and V rows (every KV head) into the cache at `slot`: as the model's dtype, or, in an int8 cache,
  // quantized per head as the layer path's LayerKVCache.write does (symmetric, scale max|x| / 127, ties to even)
  template <typename T>
  void write_kv(const Layer& L, int64_t slot, const float* k, const float* v) const {
    const int64_t n = KVH_ * D_;
    if (!L.k_scale.numel()) {
      T* kc = L.k_cache.data_ptr<T>() + slot * n;
      T* vc = L.v_cache.data_ptr<T>() + slot * n;
      for (int64_t i = 0; i < n; ++i) kc[i] = static_cast<T>(k[i]), vc[i] = static_cast<T>(v[i]);
      return;
    }
    const std::tuple<const float*, const torch::Tensor*, const torch::Tensor*> planes[] = {
        {k, &L.k_cache, &L.k_scale}, {v, &L.v_cache, &L.v_scale}};
    for (auto [x, cache, scales] : planes)
      for (int64_t h = 0; h < KVH_; ++h) {
        const float* xh = x + h * D_;
        __m512 amax = _mm512_setzero_ps();
        for (int64_t i = 0; i < D_; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(xh + i)));
        const float s = std::max(_mm512_reduce_max_ps(amax), 1e-8f) / 127.0f;
        const __m512 vs = _mm512_set1_ps(s);
        int8_t* q = cache->template data_ptr<int8_t>() + slot * n + h * D_;
        for (int64_t i = 0; i < D_; i += 16) {  // x / s (a true division), rounded to the nearest, ties to even
          const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(xh + i), vs),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(r)));
        }
        scales->template data_ptr<float>()[slot * KVH_ + h] = s;
      }
  }

  void head_norm(float* v, int64_t heads, const torch::Tensor& w) const {
    if (!w.numel()) return;
    rms_norm(v, w.data_ptr<float>(), v, heads, D_);
  }

  template <typename T>
  void run(int64_t B, const float* x_in, const int64_t* pos, const int64_t* slot, const int64_t* table,
           int64_t table_stride, int64_t block_size, const int64_t* lens, bool logits, const int64_t* head_rows,
           int64_t R, torch::Tensor& out, const int64_t* lora, int64_t tiled_rows) const {
    const int64_t H = H_, KVH = KVH_, D = D_, G = H / KVH, Hd = Hd_, QKV = (H + 2 * KVH) * D;
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    // Attention: each row's keys [start, len) are cut at multiples of KEY_CHUNK (so a row's result depends on its
    // context alone, not on the batch) and the parts merged flash-decoding style. A work unit is (sequence, KV
    // head, chunk) and takes that chunk for every row of the sequence (a sequence's drafts are consecutive rows
    // of one block table): the chunk's K/V are read once for all of them.
    const int nt = std::max(1, at::get_num_threads());
    std::vector<int64_t> start(B), first_part(B + 1), parts_of(B);
    for (int64_t b = 0; b < B; ++b) {
      start[b] = window_ > 0 ? std::max<int64_t>(0, lens[b] - window_) : 0;
      parts_of[b] = (lens[b] + KEY_CHUNK - 1) / KEY_CHUNK - start[b] / KEY_CHUNK;
      first_part[b + 1] = first_part[b] + KVH * parts_of[b];  // part slots of row b: [head][part]
    }
    struct Unit { int64_t b0, b1, h, chunk; };
    std::vector<Unit> units;
    bool drafts = false;  // some sequence takes several rows
    for (int64_t b0 = 0, b1; b0 < B; b0 = b1) {
      const int64_t* t0 = table + b0 * table_stride;
      for (b1 = b0 + 1; b1 < B && pos[b1] == pos[b1 - 1] + 1 &&
                        std::equal(t0, t0 + table_stride, table + b1 * table_stride);
           ++b1) {
      }
      drafts = drafts || b1 - b0 > 1;
      int64_t c0 = start[b0] / KEY_CHUNK, c1 = 0;
      for (int64_t b = b0; b < b1; ++b) {
        c0 = std::min(c0, start[b] / KEY_CHUNK);
        c1 = std::max(c1, (lens[b] + KEY_CHUNK - 1) / KEY_CHUNK);
      }
      for (int64_t h = 0; h < KVH; ++h)
        for (int64_t c = c0; c < c1; ++c) units.push_back({b0, b1, h, c});
    }
    const int64_t U = static_cast<int64_t>(units.size()), P = first_part[B];
    // Rows on the AMX tiles (quantized weights): tiled_rows >= 0 is the caller's split, its first rows there
    // (batch-invariant steps: the prompt rows); else every row of a wide batch without drafts. The tiles'
    // arithmetic differs from the integer kernels': a sequence's draft rows keep the latter, so that verifying
    // drafts gives each row the logits of a one-token decode at its position, to the bit.
    const int64_t tiled = tile_rows_ == 0 ? 0 : tiled_rows >= 0 ? tiled_rows : B >= tile_rows_ && !drafts ? B : 0;
    int64_t head_T = head_rows ? 0 : std::min(tiled, R);  // the LM head's rows among the first `tiled`
    while (head_rows && head_T < R && head_rows[head_T] < tiled) ++head_T;
    const bool tiles = tiled > 0;
    std::vector<float> qkv(B * QKV), attn_acc(P * G * D), attn_m(P * G), attn_l(P * G), o(B * Hd),
        act(B * I_), down(B * Hd);
    float* result = logits ? out.data_ptr<float>() : nullptr;
    std::vector<float> final_h(B * Hd);
    int64_t lora_r = 0;  // the widest projection's rank rows: xa's row stride is each projection's own
    for (const auto& L : layers_)
      for (const auto& f : L.lora) lora_r = std::max(lora_r, f.R);
    // the shrink results of qkv, o and down, shared (each of their expands ends in a barrier, so one buffer
    // serves them in turn; gate_up's are per thread: see the MLP block), and the step's adapter rows by slot
    std::vector<float> lora_xa(lora ? B * lora_r : 0);
    LoraGroups groups;
    if (lora) groups.build(lora, B);

    if (tiles) ++tile_steps_;
#pragma omp parallel num_threads(nt)
    {
      std::vector<float> x(x_in, x_in + B * Hd), h(B * Hd), attn(B * H * D), qf(G * D), scores;
      Prep prep;
      prep.tile_m = tiled;
      LoraStep qkv_store, o_store, gu_store, down_store;
      const LoraStep *ls_qkv, *ls_o, *ls_gu, *ls_down;
      std::vector<float> gu_xa(lora ? B * lora_r : 0), delta(lora ? 2 * B * 16 : 0);
      std::vector<uint8_t> has(lora ? 2 * B : 0);
      // the projection's LoRA work this step, or null (no adapter rows, or no factors for it)
      auto lora_step = [&](const Layer& L, Proj proj, LoraStep& ls, float* xa) -> const LoraStep* {
        if (!lora || !L.lora[proj].defined()) return nullptr;
        ls = {&L.lora[proj], &groups, xa, delta.data(), has.data()};
        return &ls;
      };
      for (const Layer& L : layers_) {
        // attention block
        rms_norm(x.data(), L.in_norm.data_ptr<float>(), h.data(), B, Hd);
        prepare(prep, h.data(), B, Hd);
        // LoRA (lora_rows.h): each projection's shrink goes to the threads before its gemv (which ends in a
        // barrier), and the threads split its expand by output chunks after it (one barrier more for qkv, o and
        // down each: one thread expanding qkv alone, or every thread expanding o and down for its copy of x, cost
        // more)
        if ((ls_qkv = lora_step(L, PROJ_QKV, qkv_store, lora_xa.data()))) lora_shrink(*ls_qkv, h.data());
        gemv(L.qkv, prep, qkv.data(), B);
        if (ls_qkv) lora_expand(*ls_qkv, qkv.data(), QKV);
#pragma omp single
        for (int64_t b = 0; b < B; ++b) {
          float* row = qkv.data() + b * QKV;
          head_norm(row, H, L.q_norm);
          head_norm(row + H * D, KVH, L.k_norm);
          rotate(row, H + KVH, pos[b]);  // q and k heads are adjacent
          write_kv<T>(L, slot[b], row + H * D, row + (H + KVH) * D);
        }
        // the units' attention through the cache's rows (kc, vc: a KV head reader at head 0; row_bytes: a slot's)
        auto attend = [&](auto kc, auto vc, int64_t row_bytes) {
#pragma omp for schedule(dynamic, 1)
          for (int64_t u = 0; u < U; ++u) {
            const Unit& un = units[u];
            const auto kh = kc.at_head(un.h, D), vh = vc.at_head(un.h, D);
            for (int64_t b = un.b0; b < un.b1; ++b) {
              const int64_t s0 = std::max(un.chunk * KEY_CHUNK, start[b]);
              const int64_t s1 = std::min((un.chunk + 1) * KEY_CHUNK, lens[b]);
              if (s1 <= s0) continue;
              const int64_t part = first_part[b] + un.h * parts_of[b] + un.chunk - start[b] / KEY_CHUNK;
              const float* q = qkv.data() + b * QKV + un.h * G * D;
              for (int64_t i = 0; i < G * D; ++i) qf[i] = q[i] * scale;
              scores.resize(G * (s1 - s0));
              attend_part_any(qf.data(), G, D, kh, vh, table + b * table_stride, block_size, s0, s1 - s0,
                              scores.data(), attn_acc.data() + part * G * D, attn_m.data() + part * G,
                              attn_l.data() + part * G, un.h == 0 ? row_bytes : 0);
            }
          }
        };
        const bool int8 = L.k_scale.numel() > 0;
        with_kv_heads<T>(L.k_cache.data_ptr(), L.v_cache.data_ptr(), int8 ? L.k_scale.data_ptr<float>() : nullptr,
                         int8 ? L.v_scale.data_ptr<float>() : nullptr, KVH, D, attend);
        for (int64_t b = 0; b < B; ++b)  // every thread merges the parts into its own copy
          for (int64_t hh = 0; hh < KVH; ++hh) {
            const int64_t p0 = first_part[b] + hh * parts_of[b];
            merge_parts<float>(attn_acc.data() + p0 * G * D, attn_m.data() + p0 * G, attn_l.data() + p0 * G,
                               parts_of[b], G, D, G * D, attn.data() + (b * H + hh * G) * D);
          }
        rnd(attn.data(), B * H * D);
        prepare(prep, attn.data(), B, H * D);
        if ((ls_o = lora_step(L, PROJ_O, o_store, lora_xa.data()))) lora_shrink(*ls_o, attn.data());
        gemv(L.o, prep, o.data(), B);
        if (ls_o) lora_expand(*ls_o, o.data(), Hd);
        add_residual(x.data(), o.data(), B, Hd);
        // MLP block
        rms_norm(x.data(), L.post_norm.data_ptr<float>(), h.data(), B, Hd);
        prepare(prep, h.data(), B, Hd);
        // gate_up's deltas go in before the activation, inside its gemv: every thread computes the whole
        // shrink itself (a barrier costs more than these few dot products, and much more on a busy machine)
        if ((ls_gu = lora_step(L, PROJ_GATE_UP, gu_store, gu_xa.data()))) lora_shrink(*ls_gu, h.data(), true);
        gemv_glu(L.gate_up, prep, act.data(), B, ls_gu);
        prepare(prep, act.data(), B, I_);
        if ((ls_down = lora_step(L, PROJ_DOWN, down_store, lora_xa.data()))) lora_shrink(*ls_down, act.data());
        gemv(L.down, prep, down.data(), B);
        if (ls_down) lora_expand(*ls_down, down.data(), Hd);
        add_residual(x.data(), down.data(), B, Hd);
      }
      rms_norm(x.data(), final_norm_.data_ptr<float>(), h.data(), B, Hd);
      if (logits) {
        for (int64_t i = 0; head_rows && i < R; ++i)  // ascending rows: compacting in place is safe
          std::copy_n(h.data() + head_rows[i] * Hd, Hd, h.data() + i * Hd);
        prepare(prep, h.data(), R, Hd);
        prep.tile_m = head_T;
        gemv(head_, prep, result, R);
      } else {
#pragma omp single
        std::copy(h.begin(), h.end(), final_h.begin());
      }
#ifdef TL_AMX
      if (tiles || int8_tiles_) _tile_release();  // no tile state for the OS to save meanwhile
#endif
    }
    if (!logits) out.copy_(torch::from_blob(final_h.data(), {B, Hd}, at::kFloat));
  }
};

}  // namespace
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("has_avx512", &has_avx512);
  m.def("has_bf16", &has_bf16);

#ifdef __AVX512F__
  py::class_<DecodeStack>(m, "DecodeStack")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, int64_t, bool, torch::Tensor,
                    torch::Tensor>())
      .def("add_layer", &DecodeStack::add_layer)
      .def("set_lora", &DecodeStack::set_lora)
      .def("set_head", &DecodeStack::set_head)
      .def("num_layers", &DecodeStack::num_layers)
      .def("set_activation_bits", &DecodeStack::set_activation_bits)
      .def("set_tile_rows", &DecodeStack::set_tile_rows)
      .def("tile_steps", &DecodeStack::tile_steps)
      .def("set_int8_tiles", &DecodeStack::set_int8_tiles)
      .def("kernel_counts", &DecodeStack::kernel_counts)
      .def("forward", &DecodeStack::forward, py::call_guard<py::gil_scoped_release>());
#endif
}
