"""The compiled decode stack (model_executor/fused_decode.py) against the layer-by-layer path it replaces: the
same logits (float32 to rounding; bfloat16 within the rounding of one bfloat16 step), the same greedy tokens,
the same KV cache contents, on every architecture variant and weight format it takes; and a clean fallback
where it does not apply. Each test checks which path ran through the runner's `steps_by_path`."""
from __future__ import annotations

import pytest
import torch

from tokenloom import LLM, SamplingParams
from tokenloom.model_executor.fused_decode import EXTENSION, FusedDecoder
from tokenloom.model_executor import fused_decode

from tests.conftest import make_tiny

pytestmark = pytest.mark.skipif(EXTENSION.load() is None, reason=f"no compiled decode stack: {EXTENSION.reason}")

PROMPTS = [[1, 5, 9, 33, 7, 100] * 7, [3, 4, 5], list(range(200, 300)) * 3 + [7]]  # the last splits its keys


def _llm(tmp_path, arch, dtype, quantization=None, kv_cache_dtype="auto", **overrides):
    make_tiny(arch, tmp_path, **overrides)
    return LLM(str(tmp_path), dtype=dtype, quantization=quantization, num_blocks=256, block_size=4,
               kv_cache_dtype=kv_cache_dtype)


def _both_paths(llm, params, prompts=PROMPTS):
    """Outputs with the compiled stack, then with it switched off; the step counts of each run."""
    runner = llm.engine.runner
    assert runner.fused is not None, FusedDecoder.reason
    before = dict(runner.steps_by_path)
    fused = llm.generate(prompts, params)
    assert runner.steps_by_path["fused"] > before["fused"]
    saved, runner.fused = runner.fused, None
    try:
        mid = runner.steps_by_path["fused"]
        layers = llm.generate(prompts, params)
        assert runner.steps_by_path["fused"] == mid
    finally:
        runner.fused = saved
    return fused, layers


def _one_decode_step(llm, prompts):
    """Prefill the prompts, then schedule (not run) their first decode step: (engine, runner, InputBatch)."""
    from tokenloom.worker.input_batch import InputBatch

    eng, runner = llm.engine, llm.engine.runner
    for p in prompts:
        eng.add_request(p, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    eng.step()
    sched = eng.scheduler.schedule()
    assert all(s.num_tokens == 1 for s in sched.scheduled)
    return eng, runner, InputBatch.from_scheduled(sched.scheduled, runner.device)


CASES = [
    ("llama", "float32", None, {}),
    ("llama", "bfloat16", None, {}),
    ("qwen2", "bfloat16", "int8", {}),
    ("qwen3", "float32", None, {}),
    ("qwen3", "bfloat16", "int4", {}),
    ("mistral", "float32", None, {"sliding_window": 48}),
    ("llama", "float32", "int4", {}),
    ("llama", "float32", None, {"kv_cache_dtype": "int8"}),  # an int8 KV cache, read and written by the stack
    ("qwen3", "bfloat16", "int4", {"kv_cache_dtype": "int8"}),
]


@pytest.mark.parametrize("arch,dtype,quant,overrides", CASES,
                         ids=[f"{a}-{d}-{q}" + "".join(f"-{v}" for v in o.values()) for a, d, q, o in CASES])
def test_greedy_tokens_and_logprobs_match_the_layer_path(tmp_path, arch, dtype, quant, overrides):
    llm = _llm(tmp_path, arch, dtype, quant, **overrides)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=3)
    fused, layers = _both_paths(llm, params)
    # float32: summation order only; bfloat16: logits are rounded to bfloat16 (~2^-8 relative) on both paths
    tol = 1e-4 if dtype == "float32" else 0.05
    for a, b in zip(fused, layers):
        ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
        same = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), len(ta))
        for la, lb in zip(a.outputs[0].logprobs[:same], b.outputs[0].logprobs[:same]):
            common = set(la) & set(lb)
            assert common and max(abs(_lp(la[t]) - _lp(lb[t])) for t in common) < tol
        if same < len(ta):  # only where the layer path's top two are tied within rounding (random tiny models)
            assert dtype == "bfloat16", (ta, tb)
            ref = b.outputs[0].logprobs[same]
            assert ta[same] in ref and abs(_lp(ref[ta[same]]) - _lp(ref[tb[same]])) < tol, (ta, tb)


def _lp(v):
    return getattr(v, "logprob", v)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_logits_and_cache_writes_equal_the_layer_path(tmp_path, kv_cache_dtype):
    """One decode step of three sequences of different lengths (one long enough for split key ranges): the
    logits of both paths, and the K/V each writes into the new token's slot (in an int8 cache: the same int8
    values, up to a tie's rounding, and the same scales)."""
    llm = _llm(tmp_path, "llama", "float32", kv_cache_dtype=kv_cache_dtype)
    _, runner, batch = _one_decode_step(llm, PROMPTS)  # the first decode step, run twice below
    cache, scales = runner.kv_cache, runner.cache.scales
    assert (scales is not None) == (kv_cache_dtype == "int8")
    saved = [t.clone() for t in (cache, scales) if t is not None]
    fused_logits = runner.fused.token_logits(batch.input_ids, batch.positions, batch.block_tables, batch.query_lens)
    fused_cache, fused_scales = cache.clone(), None if scales is None else scales.clone()
    for t, old in zip((cache, scales), saved):
        t.copy_(old)
    from tokenloom.model_executor.forward_context import ForwardContext, set_forward_context
    from tokenloom.model_executor.layers.attention import build_attention_metadata

    cfg = runner.config
    meta = build_attention_metadata(batch.query_lens, batch.context_lens, batch.block_tables, runner.block_size,
                                    cfg.num_heads // cfg.num_kv_heads, cfg.sliding_window, runner.device)
    with torch.inference_mode(), set_forward_context(ForwardContext(meta)):
        ref_logits = runner.model.compute_logits(runner.model(batch.input_ids, batch.positions))
    torch.testing.assert_close(fused_logits, ref_logits, rtol=1e-4, atol=1e-4)
    if scales is None:
        torch.testing.assert_close(fused_cache, cache, rtol=1e-5, atol=1e-5)
        return
    written = fused_cache.ne(saved[0]).sum()
    assert written > 0 and fused_cache.ne(cache).sum() <= written // 100  # rounding ties of float32 sums
    assert (fused_cache.int() - cache.int()).abs().max() <= 1
    torch.testing.assert_close(fused_scales, scales, rtol=1e-5, atol=0)


def test_seeded_sampling_and_forks_match(tmp_path):
    llm = _llm(tmp_path, "qwen2", "float32")
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=7, n=2, ignore_eos=True)
    fused, layers = _both_paths(llm, params)
    assert [[c.token_ids for c in o.outputs] for o in fused] == [[c.token_ids for c in o.outputs] for o in layers]


def test_wide_batches_and_prompt_logprobs_take_the_layer_path(tmp_path, monkeypatch):
    llm = _llm(tmp_path, "llama", "float32")
    runner = llm.engine.runner
    assert runner.fused.max_batch == fused_decode.DENSE_MAX_BATCH  # float weights: oneDNN wins wide batches
    monkeypatch.setattr(runner.fused, "max_batch", 2)
    before = dict(runner.steps_by_path)
    llm.generate(PROMPTS, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert runner.steps_by_path["fused"] == before["fused"]  # three sequences decode together: too wide
    before = dict(runner.steps_by_path)
    llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=1))
    assert runner.steps_by_path["fused"] == before["fused"] + 3  # the prompt (with logprobs) runs layer by layer


def test_steps_mixing_prefill_and_decodes_split_between_the_paths(tmp_path):
    """A request that arrives while others decode: its prefill runs layer by layer in the same step as their
    decodes run through the stack, and every output equals the request run alone (greedy, float32)."""
    llm = _llm(tmp_path, "llama", "float32")
    eng, runner = llm.engine, llm.engine.runner
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in PROMPTS]
    ids = [eng.add_request(PROMPTS[0], params)]
    eng.step()
    eng.step()  # the first request decodes ...
    ids += [eng.add_request(p, params) for p in PROMPTS[1:]]  # ... while the others prefill beside it
    before = dict(runner.steps_by_path)
    eng.step()
    assert runner.steps_by_path["fused"] == before["fused"] + 1 and runner.steps_by_path["layers"] == before["layers"] + 1
    done = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
    assert [done[i] for i in ids] == alone


@pytest.mark.parametrize("why,kwargs", [("NF4Linear", {"quantization": "nf4"})])
def test_unsupported_models_fall_back_and_say_why(tmp_path, why, kwargs):
    make_tiny("llama", tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", num_blocks=64, block_size=4, **kwargs)
    assert llm.engine.runner.fused is None and why in FusedDecoder.reason
    out = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4
    assert llm.engine.kv_cache_manager.num_used_blocks == 0


def test_switched_off_by_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENLOOM_FUSED_DECODE", "0")
    make_tiny("llama", tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", num_blocks=64, block_size=4)
    assert llm.engine.runner.fused is None and "TOKENLOOM_FUSED_DECODE" in FusedDecoder.reason


@pytest.mark.slow
def test_default_model_runs_its_gguf_blocks_through_the_stack():
    """The default model, as a user runs it: the GGUF file's own Q4_1/Q8_0 blocks, the compiled stack; greedy
    text equal to the layer path on the same blocks."""
    llm = LLM("smollm2-135m", max_model_len=1024)
    assert llm.engine.config.quantization == "gguf"
    assert llm.engine.model.layers[0].mlp.down_proj.kernel == "gemv"
    prompt = llm.engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three rivers in Europe."}], add_generation_prompt=True)
    fused, layers = _both_paths(llm, SamplingParams(max_tokens=48, temperature=0), [prompt])
    ta, tb = fused[0].outputs[0].token_ids, layers[0].outputs[0].token_ids
    same = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), len(ta))
    assert same >= 24, (fused[0].outputs[0].text, layers[0].outputs[0].text)


INTEGER_CASES = [("int4-g32", 16, "u4-i16", 128), ("int4-g32", 8, "u4-i8", 128), ("int8", 16, "s8-i16", 128),
                 ("int8", 8, "s8-i8", 128),
                 ("int4", 16, "u4-i16", 192)]  # groups of 128 over rows of 192 and 320: a partial last group


@pytest.mark.parametrize("quant,bits,kernel,hidden", INTEGER_CASES,
                         ids=[f"{q}-{k}-{h}" for q, _, k, h in INTEGER_CASES])
def test_integer_activations_stay_within_their_quantization_error(tmp_path, quant, bits, kernel, hidden):
    """bfloat16 models run quantized weights on integer dot products against activations quantized per block of
    32. The rounding error of an activation is uniform within half a step, max|block| / (2 (2^(bits-1) - 1)): its
    standard deviation is max / 440 for int8, about 0.5 % of a gaussian block's spread (max ~ 2.1 sigma), and
    256 times less for int16. A matrix product carries that relative error to its outputs, and the 9 quantized
    products of a 2-layer model add it up in quadrature: ~1.5 % of the logits' spread for int8. So, for int8:
    every logit within five of those (7.5 %) of the float-activation stack's, their mean within 1.5 %. For int16
    the quantization error is negligible and what is left is bfloat16's: an intermediate value that rounds the
    other way (one bfloat16 step, 2^-8) moves the logits by about as much as one int8 step does, but rarely, so
    the bound on the largest error stays at half of int8's while the mean must be three times smaller. And the
    same argmax wherever the float path's top two are further apart than the bound."""
    make_tiny("llama", tmp_path, hidden_size=hidden, intermediate_size=hidden + 128)
    llm = LLM(str(tmp_path), dtype="bfloat16", quantization=quant, num_blocks=256, block_size=4)
    runner = llm.engine.runner
    runner.fused.stack.set_activation_bits(bits)
    # on a CPU with AMX int8 tiles, int16 rows of 32-column groups take them (amx_int8.h), else the AVX-512 kernel
    tiled = kernel.split("-")[0] + "-amx8"
    assert any(k.startswith(kernel) or (bits == 16 and k.startswith(tiled)) for k in runner.fused.kernels), \
        runner.fused.kernels
    _, runner, batch = _one_decode_step(llm, PROMPTS)
    saved = runner.kv_cache.clone()
    int_logits = runner.fused.token_logits(batch.input_ids, batch.positions, batch.block_tables, batch.query_lens)
    runner.kv_cache.copy_(saved)
    runner.fused.stack.set_activation_bits(0)
    float_logits = runner.fused.token_logits(batch.input_ids, batch.positions, batch.block_tables, batch.query_lens)
    spread = float_logits.std(dim=-1, keepdim=True)
    error = (int_logits - float_logits).abs() / spread
    bound, mean_bound = (0.075, 0.015) if bits == 8 else (0.0375, 0.005)
    assert error.max() < bound and error.mean() < mean_bound, (error.max(), error.mean())
    top2 = float_logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * bound * spread[:, 0]
    assert torch.equal(int_logits.argmax(-1)[clear], float_logits.argmax(-1)[clear])


def test_default_quantization_of_gguf_files():
    from tokenloom.config import EngineConfig
    from tokenloom.engine.llm_engine import default_quantization

    assert default_quantization(EngineConfig(), "gguf") == "gguf"  # the file's own blocks, as llama.cpp runs it
    assert default_quantization(EngineConfig(dtype="float32"), "gguf") is None  # a float dtype asked for
    assert default_quantization(EngineConfig(quantization="none"), "gguf") is None
    assert default_quantization(EngineConfig(quantization="int8"), "gguf") == "int8"
    assert default_quantization(EngineConfig(), "hf_dir") is None
    assert default_quantization(EngineConfig(device="cuda"), "gguf") is None


@pytest.mark.slow
def test_default_model_perplexity_through_the_stack_matches_the_float_path():
    """Teacher-forced perplexity of held-out text, one token at a time through the compiled stack (integer dot
    products on the Q4_1 / Q8_0 blocks, activations quantized to int16) and in one causal pass layer by layer
    (bfloat16 activations, the same blocks dequantized per call): within 0.5 %."""
    import math

    from tokenloom.model_executor.sequence_forward import SequenceForward
    from tokenloom.quant.calib import evaluation_tokens
    from tokenloom.worker.kv_cache import KVCache

    llm = LLM("smollm2-135m", max_model_len=1024)
    eng = llm.engine
    ids = evaluation_tokens(eng.tokenizer, max_tokens=384)  # held out: the second half of the text
    model = eng.model
    cache = KVCache(model.config, eng.config.cache, 384 // eng.config.cache.block_size + 1,
                    model.norm.weight.dtype, torch.device("cpu"))
    scratch = FusedDecoder.build(model, cache.layers, eng.config.cache.block_size)
    kernels = scratch.kernels  # the AMX int8 tiles where the CPU has them, else the AVX-512 int16 kernel
    assert kernels.get("u4-amx8+f16", kernels.get("u4-i16+f16")) == 4 * model.config.num_layers, kernels
    table = torch.arange(cache.tensor.shape[2] // eng.config.cache.block_size)[None]
    nll_fused = 0.0
    with torch.inference_mode():
        for t in range(len(ids) - 1):
            pos = torch.tensor([t])
            logits = scratch.logits(torch.tensor([ids[t]]), pos, pos, table, pos + 1)
            nll_fused -= torch.log_softmax(logits[0], -1)[ids[t + 1]].item()
        hidden = SequenceForward(model, len(ids)).hidden(torch.tensor(ids))
        lp = torch.log_softmax(model.compute_logits(hidden[:-1]), -1)
        nll_layers = -lp.gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
    ppl_fused, ppl_layers = (math.exp(n / (len(ids) - 1)) for n in (nll_fused, nll_layers))
    assert abs(ppl_fused / ppl_layers - 1) < 0.005, (ppl_fused, ppl_layers)


TILE_CASES = [("int4-g32", "u4"), ("int8", "s8"), ("int4", "u4")]  # 4-bit groups of 32 and of 128; int8 per row


@pytest.mark.parametrize("quant,kind", TILE_CASES, ids=[q for q, _ in TILE_CASES])
def test_wide_decode_batches_on_amx_tiles_are_as_exact_as_the_integer_kernels(tmp_path, quant, kind):
    """Decode batches of TILE_ROWS rows or more meet quantized weights on AMX tiles (weights dequantized to
    bfloat16 per step, bfloat16 activations, float32 sums: the function the layer path computes in prefill).
    A 12-row step, from the same KV cache, through the tiles and through the integer kernels narrower batches
    take, each against the same quantized model in float32 (one causal pass per row): the tiles' error is that
    of the integer kernels, to within 5 % (mean) and 10 % (largest). On a CPU without AMX the stack says so."""
    from tokenloom.model_executor.sequence_forward import SequenceForward

    make_tiny("llama", tmp_path, hidden_size=128, intermediate_size=256)
    llm = LLM(str(tmp_path), dtype="bfloat16", quantization=quant, num_blocks=256, block_size=4)
    stack = llm.engine.runner.fused.stack
    if llm.engine.runner.fused.tile_rows == 0:
        pytest.skip("no AMX tiles on this CPU (or build): wide batches take the integer kernels")
    assert any(k.startswith(kind) for k in llm.engine.runner.fused.kernels)
    prompts = [[(7 * i + j) % 300 + 3 for j in range(5 + 9 * i)] for i in range(12)]
    stack.set_tile_rows(len(prompts))  # (the default width is larger where the int8 tiles take narrow batches)
    eng, runner, batch = _one_decode_step(llm, prompts)
    step = (batch.input_ids, batch.positions, batch.block_tables, batch.query_lens)
    saved, steps = runner.kv_cache.clone(), stack.tile_steps()
    tiled = runner.fused.token_logits(*step)
    assert stack.tile_steps() == steps + 1  # this step took the tiles
    runner.kv_cache.copy_(saved)
    stack.set_tile_rows(len(prompts) + 1)  # one row too many: the integer kernels
    integer = runner.fused.token_logits(*step)
    assert stack.tile_steps() == steps + 1
    f32 = LLM(str(tmp_path), dtype="float32", quantization=quant, num_blocks=64, block_size=4).engine.model
    with torch.inference_mode():
        rows = [list(r.prompt_token_ids) + [t] for r, t in zip(eng.scheduler.running, batch.input_ids.tolist())]
        ref = torch.cat([f32.compute_logits(SequenceForward(f32, len(r)).hidden(torch.tensor(r))[-1:]) for r in rows])
    spread = ref.std(dim=-1, keepdim=True)
    err_tiles, err_int = ((v - ref).abs() / spread for v in (tiled, integer))
    assert err_tiles.mean() < 1.05 * err_int.mean(), (err_tiles.mean(), err_int.mean())
    assert err_tiles.max() < 1.1 * err_int.max(), (err_tiles.max(), err_int.max())


@pytest.mark.parametrize("quant", ["int4-g32", "int4-b8-g32", "int4-g32-sym"])
def test_amx_int8_tiles_compute_what_the_avx512_kernels_compute(tmp_path, monkeypatch, quant):
    """Where the CPU has AMX int8 tiles, the integer rows of 4- and 8-bit weights in groups of 32 take them
    (amx_int8.h): the same int16 activations and exact int32 block dots as the AVX-512 kernels, scaled and summed
    in another order. A decode step of three sequences, and nine rows of one sequence (drafts: groups of four
    rows), through both: logits within bfloat16 rounding of each other (an intermediate value rounding the
    other way), the argmax equal wherever the top two are clearly apart. vocab 1000: the LM head's last chunk of
    16 rows is partial (int8 per row here, the tiles for its 8-bit blocks in the default model)."""
    make_tiny("llama", tmp_path, hidden_size=128, intermediate_size=320, vocab_size=1000)
    logits = {}
    for on in ("1", "0"):
        monkeypatch.setenv("TOKENLOOM_AMX_INT8", on)
        llm = LLM(str(tmp_path), dtype="bfloat16", quantization=quant, num_blocks=256, block_size=4)
        fused = llm.engine.runner.fused
        tiled = [k for k in fused.kernels if "-amx8" in k]
        if on == "1" and not tiled:
            pytest.skip(f"no AMX int8 tiles on this CPU: {fused.kernels}")
        assert bool(tiled) == (on == "1") and fused.int8_tiles == (on == "1"), fused.kernels
        _, runner, batch = _one_decode_step(llm, PROMPTS)
        step = fused.token_logits(batch.input_ids, batch.positions, batch.block_tables, batch.query_lens)
        rows = fused.token_logits(torch.arange(50, 59), torch.arange(9), [list(range(200, 203))], [9])
        logits[on] = torch.cat([step, rows])
    a, b = logits["1"], logits["0"]
    spread = b.std(dim=-1, keepdim=True)
    error = (a - b).abs() / spread
    assert error.max() < 0.03 and error.mean() < 0.002, (error.max(), error.mean())
    top2 = b.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.06 * spread[:, 0]
    assert torch.equal(a.argmax(-1)[clear], b.argmax(-1)[clear])


def test_amx_int8_copy_only_where_memory_allows(tmp_path):
    """The int8 tiles take a second copy of the 4- and 8-bit weights: it is made only where it takes at most half
    of the host memory free (the runner passes MemAvailable), else the AVX-512 kernels decode."""
    from tokenloom.model_executor.fused_decode import int8_tile_copy_bytes

    llm = _llm(tmp_path, "llama", "bfloat16", "int4-g32", hidden_size=128, intermediate_size=256)
    runner = llm.engine.runner
    model = llm.engine.model
    need = int8_tile_copy_bytes(model, torch.bfloat16)
    assert need >= sum(m.qweight.numel() for layer in model.layers for m in (layer.mlp.down_proj,))
    if not runner.fused.int8_tiles:
        pytest.skip(f"no AMX int8 tiles on this CPU: {runner.fused.kernels}")
    roomy = FusedDecoder.build(model, runner.layer_caches, runner.block_size, spare_bytes=2 * need)
    tight = FusedDecoder.build(model, runner.layer_caches, runner.block_size, spare_bytes=2 * need - 1)
    assert roomy.int8_tiles and any("-amx8" in k for k in roomy.kernels)
    assert not tight.int8_tiles and not any("-amx8" in k for k in tight.kernels), tight.kernels
