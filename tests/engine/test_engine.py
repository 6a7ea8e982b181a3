"""Engine core: batching, chunked prefill, preemption and prefix caching never change the tokens."""
from __future__ import annotations

import random

import pytest
import torch

from tokenloom import LLM, SamplingParams
from tokenloom.config import TokenloomError


def _prompts(n: int, vocab: int, seed: int = 0, lo: int = 3, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _greedy(max_tokens):
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def _alone(path, prompts, max_tokens, **kw):
    llm = LLM(str(path), dtype="float32", max_num_seqs=1, **kw)
    return [llm.generate(p, _greedy(m))[0].outputs[0].token_ids for p, m in zip(prompts, max_tokens)]


@pytest.fixture(scope="module")
def workload(tiny_llama):
    path, _ = tiny_llama
    prompts = _prompts(32, 320)
    max_tokens = [random.Random(i).randint(1, 24) for i in range(32)]
    return path, prompts, max_tokens, _alone(path, prompts, max_tokens)


def _batched(path, prompts, max_tokens, **kw):
    llm = LLM(str(path), dtype="float32", **kw)
    outs = llm.generate(prompts, [_greedy(m) for m in max_tokens])
    return llm, [o.outputs[0].token_ids for o in outs]


def test_batched_equals_alone(workload):
    path, prompts, max_tokens, alone = workload
    llm, batched = _batched(path, prompts, max_tokens, max_num_seqs=32)
    assert batched == alone
    assert llm.engine.stats().num_blocks_used == 0


@pytest.mark.parametrize("chunk", [1, 5, 16, 37])
def test_chunked_prefill_equals_unchunked(workload, chunk):
    path, prompts, max_tokens, alone = workload
    llm, chunked = _batched(path, prompts, max_tokens, max_num_batched_tokens=chunk)
    assert chunked == alone
    assert llm.engine.stats().num_blocks_used == 0


def test_preemption_equals_no_preemption(workload):
    path, prompts, max_tokens, alone = workload
    # 10 blocks of 8 tokens: far fewer than 32 concurrent sequences need, so requests get preempted.
    llm, out = _batched(path, prompts, max_tokens, num_blocks=10, block_size=8, max_model_len=80)
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0
    assert out == alone
    assert stats.num_blocks_used == 0


def test_prefix_cache_reuses_blocks(tiny_llama):
    path, _ = tiny_llama
    shared = _prompts(1, 320, seed=5, lo=100, hi=100)[0]
    first, second = shared + [7, 8, 9], shared + [11, 12]
    llm = LLM(str(path), dtype="float32", block_size=16)
    eng = llm.engine
    a = llm.generate(first, _greedy(8))[0]
    before = eng.stats().prompt_tokens_computed
    b = llm.generate(second, _greedy(8))[0]
    computed = eng.stats().prompt_tokens_computed - before
    assert b.metrics.num_cached_tokens == 96  # the 6 full blocks of the shared 100-token prefix
    assert computed == len(second) - 96
    no_cache = LLM(str(path), dtype="float32", enable_prefix_caching=False)
    assert b.outputs[0].token_ids == no_cache.generate(second, _greedy(8))[0].outputs[0].token_ids
    assert a.outputs[0].token_ids == no_cache.generate(first, _greedy(8))[0].outputs[0].token_ids
    assert eng.stats().prefix_cache_hit_rate > 0


def test_kv_waste_small_on_mixed_lengths(tiny_llama):
    path, _ = tiny_llama
    rng = random.Random(3)
    prompts = _prompts(24, 320, seed=9, lo=40, hi=400)
    params = [_greedy(rng.randint(20, 120)) for _ in prompts]
    llm = LLM(str(path), dtype="float32", max_num_seqs=24)
    llm.generate(prompts, params)
    st = llm.engine.stats()
    assert st.kv_waste_paged < 0.05, st
    assert st.kv_waste_contiguous > st.kv_waste_paged


def test_abort_frees_everything(tiny_llama):
    path, _ = tiny_llama
    llm = LLM(str(path), dtype="float32")
    eng = llm.engine
    ids = [eng.add_request(p, _greedy(50)) for p in _prompts(6, 320, seed=2)]
    for _ in range(4):
        eng.step()
    assert eng.stats().num_blocks_used > 0
    for rid in ids:
        eng.abort_request(rid)
    assert not eng.has_unfinished()
    assert eng.stats().num_blocks_used == 0


def test_streamed_outputs_grow_token_by_token(tiny_llama):
    path, _ = tiny_llama
    llm = LLM(str(path), dtype="float32")
    seen = [len(o.outputs[0].token_ids) for o in llm.stream([5, 6, 7], _greedy(6))]
    assert seen == [1, 2, 3, 4, 5, 6]


def test_too_long_prompt_is_rejected_not_truncated(tiny_llama):
    path, _ = tiny_llama
    llm = LLM(str(path), dtype="float32", max_model_len=64)
    with pytest.raises(TokenloomError, match="context window"):
        llm.generate(list(range(3, 70)), _greedy(4))
    with pytest.raises(TokenloomError, match="exceeds the context window"):
        llm.generate(list(range(3, 40)), _greedy(40))
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize("D,window", [(16, None), (64, None), (64, 6)])
@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("int8", [False, True], ids=["plain", "int8"])
def test_paged_attention_matches_contiguous(D, window, kernels, int8, monkeypatch, kernel_calls):
    """Attention through scattered blocks equals plain causal attention over contiguous K/V: a mixed step (the
    decodes through the fused CPU kernel, or torch's path) and a pure decode step; with an int8 cache, over the
    K/V it holds (values the int8 quantization keeps as they are). The kernel case skips, saying why, where the
    kernels are not built, and checks that they really ran."""
    from tokenloom.kernels import cpu_ops

    if kernels:
        if cpu_ops.ops_for(torch.zeros(1)) is None:
            pytest.skip(f"fused CPU kernels unavailable: {cpu_ops.EXTENSION.reason}")
        calls = kernel_calls(cpu_ops.EXTENSION, "fused CPU kernels")
    else:
        monkeypatch.setattr(cpu_ops.EXTENSION, "state", [None])
    torch.manual_seed(0)
    H, KVH, bs = 6, 2, 4
    # a prefill chunk after a cached prefix, decodes, a fresh prefill
    lens_ctx, lens_q = [13, 1, 9, 22, 7], [5, 1, 9, 1, 1]
    _check_paged_attention(lens_ctx, lens_q, H, KVH, D, bs, window, int8)
    _check_paged_attention([13, 30, 2], [1, 1, 1], H, KVH, D, bs, window, int8)
    if kernels:
        assert calls.get("paged_decode_attention", 0) == 2  # the decodes of each step


def _check_paged_attention(lens_ctx, lens_q, H, KVH, D, bs, window, int8=False):
    from tokenloom.model_executor.layers.attention import LayerKVCache, build_attention_metadata, paged_attention

    def held(x):  # what an int8 cache holds of x: quantizing that again gives it back (up to one ulp of scale)
        q, scale = LayerKVCache._quantize(x)
        return q.float() * scale[..., None]

    num_blocks = 40
    perm = torch.randperm(num_blocks).tolist()
    tables, pos = [], 0
    for c in lens_ctx:
        n = -(-c // bs)
        tables.append(perm[pos : pos + n])
        pos += n
    k_cache = torch.zeros(num_blocks * bs, KVH, D, dtype=torch.int8 if int8 else torch.float32)
    v_cache = torch.zeros_like(k_cache)
    scales = [torch.zeros(num_blocks * bs, KVH) for _ in range(2)] if int8 else [None, None]
    cache = LayerKVCache(k_cache, v_cache, *scales)
    full_k = [torch.randn(c, KVH, D) for c in lens_ctx]
    full_v = [torch.randn(c, KVH, D) for c in lens_ctx]
    if int8:
        full_k, full_v = [held(x) for x in full_k], [held(x) for x in full_v]
    for t, kk, vv, c, q in zip(tables, full_k, full_v, lens_ctx, lens_q):  # the cached prefix is already there
        slots = torch.tensor([t[p // bs] * bs + p % bs for p in range(c - q)], dtype=torch.long)
        cache.write(slots, kk[: c - q], vv[: c - q])
    q_all = [torch.randn(q, H, D) for q in lens_q]
    meta = build_attention_metadata(lens_q, lens_ctx, tables, bs, H // KVH, window, torch.device("cpu"))
    new_k = torch.cat([kk[c - q :] for kk, c, q in zip(full_k, lens_ctx, lens_q)])
    new_v = torch.cat([vv[c - q :] for vv, c, q in zip(full_v, lens_ctx, lens_q)])
    out = paged_attention(torch.cat(q_all), new_k, new_v, cache, meta, D**-0.5)
    refs = []
    for qq, kk, vv, c, q in zip(q_all, full_k, full_v, lens_ctx, lens_q):
        kk, vv = kk.repeat_interleave(H // KVH, 1), vv.repeat_interleave(H // KVH, 1)
        scores = torch.einsum("qhd,khd->hqk", qq, kk) * D**-0.5
        qpos = torch.arange(c - q, c)[:, None]
        kpos = torch.arange(c)[None, :]
        scores = scores.masked_fill((kpos > qpos) | (kpos <= qpos - (window or c)), float("-inf"))
        refs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv).reshape(q, H * D))
    assert torch.allclose(out, torch.cat(refs), atol=1e-5)


def test_int8_kv_cache_halves_memory_and_stays_close(tiny_llama):
    from tests.model_executor.test_models_vs_hf import record_logits

    path, _ = tiny_llama
    prompts = _prompts(4, 320, seed=11, lo=30, hi=50)
    runs = {}
    for kv in ("auto", "int8"):
        llm = LLM(str(path), dtype="bfloat16", kv_cache_dtype=kv, max_num_batched_tokens=16)  # chunks read the cache
        rec = record_logits(llm)
        llm.generate(prompts, [_greedy(8)] * 4)
        runs[kv] = (llm.engine.runner, torch.cat(rec))
    (plain, ref), (quant, ours) = runs["auto"], runs["int8"]
    bytes_plain = plain.kv_cache.element_size() * plain.kv_cache[0, 0, 0].numel()
    bytes_int8 = quant.kv_cache.element_size() * quant.kv_cache[0, 0, 0].numel() + 4 * quant.cache.scales[0, 0, 0].numel()
    D = plain.config.head_dim
    assert bytes_int8 / bytes_plain == (D + 4) / (2 * D)  # int8 values + a float32 scale per head vs bfloat16
    from tokenloom.config import ModelConfig
    from tokenloom.worker.kv_cache import kv_bytes_per_block

    smollm = ModelConfig("llama", 49152, 576, 1536, 30, 9, 3)  # head_dim 64: the int8 pool is about half
    assert kv_bytes_per_block(smollm, 16, torch.bfloat16, "int8") / kv_bytes_per_block(smollm, 16, torch.bfloat16) < 0.54
    assert quant.kv_cache.dtype == torch.int8
    assert (ours - ref).abs().max() < 0.05 * ref.abs().max()


def test_packed_bf16_linears_change_nothing(tiny_llama, monkeypatch):
    import tokenloom.model_executor.layers.linear as linear

    path, _ = tiny_llama
    prompts = _prompts(3, 320, seed=4)
    packed = LLM(str(path), dtype="bfloat16")
    assert type(packed.engine.model.layers[0].mlp.down_proj.method) is linear.OneDNNLinearMethod
    monkeypatch.setattr(linear, "pack_linear_layers", lambda model: 0)
    plain = LLM(str(path), dtype="bfloat16")
    assert type(plain.engine.model.layers[0].mlp.down_proj.method) is linear.UnquantizedLinearMethod
    outs = [[o.outputs[0].token_ids for o in llm.generate(prompts, [_greedy(12)] * 3)] for llm in (packed, plain)]
    assert outs[0] == outs[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cpu_ops_match_torch(dtype, monkeypatch, kernel_calls):
    """The fused RMSNorm (with and without the residual add) and rotary kernels give the torch code's numbers:
    the same roundings to the dtype, so bfloat16 results are bit-identical."""
    from tokenloom.kernels import cpu_ops
    from tokenloom.model_executor.layers.norm import RMSNorm
    from tokenloom.model_executor.layers.rotary import apply_rotary_qk_

    calls = kernel_calls(cpu_ops.EXTENSION, "fused CPU kernels")
    torch.manual_seed(0)
    T, H, KVH, D = 37, 9, 3, 64
    norm = RMSNorm(576, 1e-5).to(dtype)
    norm.weight.data.uniform_(0.5, 1.5)
    x, r = torch.randn(T, 576).to(dtype), torch.randn(T, 576).to(dtype)
    qkv = torch.randn(T, (H + 2 * KVH) * D).to(dtype)
    cos, sin = torch.randn(T, 1, D).to(dtype), torch.randn(T, 1, D).to(dtype)
    fused = norm(x), norm(x, residual=r), apply_rotary_qk_(qkv.clone(), cos, sin, H, KVH, D)
    assert calls == {"rms_norm": 2, "rotary_": 1}
    monkeypatch.setattr(cpu_ops.EXTENSION, "state", [None])
    plain = norm(x), norm(x, residual=r), apply_rotary_qk_(qkv.clone(), cos, sin, H, KVH, D)
    exact = dtype == torch.bfloat16
    for a, b in [(fused[0], plain[0]), *zip(fused[1], plain[1]), (fused[2], plain[2])]:
        assert torch.equal(a, b) if exact else torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert torch.equal(fused[2][:, (H + KVH) * D :], qkv[:, (H + KVH) * D :])  # v heads untouched
