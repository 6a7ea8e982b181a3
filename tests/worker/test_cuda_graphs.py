"""CUDA graphs for decode steps (worker/cuda_graphs.py), tested on the CPU: bucket choice, input padding, the
fallbacks, the static attention metadata, and the whole replay path with EagerGraph standing in for the capture
(the only CUDA-only call). Each engine test says which path its steps took (runner.steps_by_path). The one test
that captures real CUDA graphs skips without CUDA."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from tokenloom import LLM, SamplingParams
from tokenloom.config import EngineConfig, LoRAConfig, ModelConfig, SpeculativeConfig
from tokenloom.model_executor.layers.attention import (LayerKVCache, TorchAttentionBackend, build_attention_metadata,
                                                       build_decode_metadata)
from tokenloom.worker.cuda_graphs import (ENV, MAX_BATCH, DecodeGraphs, EagerGraph, batch_buckets, is_plain_decode,
                                          off_reason, pack_inputs, smallest_fit, split_packed, width_bucket)
from tokenloom.worker.model_runner import ModelRunner

HOST = torch.device("cpu")
CUDA = torch.device("cuda")  # a device object only: nothing here touches CUDA


def test_batch_buckets_and_choice():
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_buckets(48) == (1, 2, 4, 8, 16, 32, 64)  # 48 sequences pad to 64
    assert batch_buckets(1) == (1,)
    assert batch_buckets(10_000)[-1] == MAX_BATCH
    sizes = batch_buckets(64)
    assert [smallest_fit(n, sizes) for n in (1, 2, 3, 5, 8, 9, 33, 64)] == [1, 2, 4, 8, 8, 16, 64, 64]
    assert smallest_fit(65, sizes) is None


def test_width_buckets():
    assert [width_bucket(b, 16, 512) for b in (1, 16, 17, 33, 300, 512)] == [16, 16, 32, 64, 512, 512]
    assert width_bucket(513, 16, 512) is None
    assert width_bucket(100, 16, 100) == 100  # the last bucket is the context window, not a power of two
    assert width_bucket(3, 8, 8) == 8


def test_pack_inputs_pads_rows_and_tables():
    host = pack_inputs(torch.tensor([11, 12, 13]), torch.tensor([4, 0, 9]), [5, 1, 10], [[7, 8], [3], [1, 2, 6]],
                       size=4, width=5, pad_block=99)
    ids, pos, ctx, table = split_packed(host, 4, 5)
    assert ids.tolist() == [11, 12, 13, 0] and pos.tolist() == [4, 0, 9, 0] and ctx.tolist() == [5, 1, 10, 1]
    assert table.tolist() == [[7, 8, 0, 0, 0], [3, 0, 0, 0, 0], [1, 2, 6, 0, 0], [99] * 5]
    empty = torch.zeros(0, dtype=torch.long)
    ids, pos, ctx, table = split_packed(pack_inputs(empty, empty, [], [], 2, 3, 7), 2, 3)
    assert ids.tolist() == [0, 0] and ctx.tolist() == [1, 1] and table.tolist() == [[7] * 3] * 2


def _cfg(**kw) -> ModelConfig:
    return ModelConfig("LlamaForCausalLM", 320, 64, 128, 2, 4, 2, **kw)


def test_off_reason(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert off_reason(EngineConfig(), _cfg(), HOST) == "not a CUDA device"
    assert off_reason(EngineConfig(device="cuda"), _cfg(), CUDA) is None
    assert off_reason(EngineConfig(device="cuda", enforce_eager=True), _cfg(), CUDA) == "enforce_eager"
    assert off_reason(EngineConfig(device="cuda", speculative=SpeculativeConfig.parse({"method": "ngram"})), _cfg(),
                      CUDA) == "speculative decoding"
    assert off_reason(EngineConfig(device="cuda", lora=LoRAConfig()), _cfg(), CUDA) == "LoRA"
    assert "mixture of experts" in off_reason(EngineConfig(device="cuda"),
                                              _cfg(num_experts=4, num_experts_per_tok=2), CUDA)
    monkeypatch.setenv(ENV, "0")
    assert off_reason(EngineConfig(device="cuda"), _cfg(), CUDA) == f"{ENV}=0"


def _item(num_tokens=1, computed=10, prompt=5, table=2, spec=(), lora=None):
    req = SimpleNamespace(num_computed_tokens=computed, num_prompt_tokens=prompt, lora_request=lora,
                          block_table=list(range(table)))
    return SimpleNamespace(request=req, num_tokens=num_tokens, spec_token_ids=list(spec))


def _graphs(max_model_len=1024, max_num_seqs=8, block_size=16):
    model = SimpleNamespace(config=_cfg())
    return DecodeGraphs(model, block_size, pad_block=0, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                        device=HOST)


def test_plan_takes_plain_decodes_and_falls_back_for_the_rest():
    g = _graphs()
    assert g.batch_sizes == (1, 2, 4, 8) and (g.min_blocks, g.max_blocks) == (16, 64)
    assert g.plan([_item()]) == (1, 16)
    assert g.plan([_item()] * 3) == (4, 16)
    assert g.plan([_item(table=20), _item()]) == (2, 32)
    assert g.plan([_item(computed=4, prompt=5)]) == (1, 16)  # the prompt's last token alone is a decode
    fallbacks = {
        "prefill": [_item(num_tokens=5, computed=0)],
        "chunk inside a prompt": [_item(num_tokens=1, computed=2, prompt=9)],
        "mixed step": [_item(), _item(num_tokens=4, computed=0)],
        "draft verification": [_item(num_tokens=3, spec=(4, 5))],
        "LoRA": [_item(lora=object())],
        "wider than the batch buckets": [_item()] * 9,
        "wider than the context window": [_item(table=65)],
        "nothing scheduled": [],
    }
    for why, items in fallbacks.items():
        assert g.plan(items) is None, why
    assert not is_plain_decode(_item(lora=object()))
    g.disabled = "a capture failed"
    assert g.plan([_item()]) is None


@pytest.mark.parametrize("window", [None, 6])
def test_static_decode_metadata_matches_the_step_metadata(window):
    """Attention through build_decode_metadata (padded rows and table, fixed width) equals the step's own
    metadata for the real rows, and pad rows write only the pad block."""
    torch.manual_seed(0)
    bs, KVH, H, D, pad_block = 4, 2, 4, 16, 39
    k, v = torch.randn(40 * bs, KVH, D), torch.randn(40 * bs, KVH, D)
    ctx = [5, 13, 1, 30]
    tables = [list(range(i * 8, i * 8 + (c + bs - 1) // bs)) for i, c in enumerate(ctx)]
    B, P, W = len(ctx), 8, 16
    q, kn, vn = torch.randn(P, H, D), torch.randn(P, KVH, D), torch.randn(P, KVH, D)
    eager_cache = LayerKVCache(k.clone(), v.clone())
    meta = build_attention_metadata([1] * B, ctx, tables, bs, H // KVH, window, HOST)
    want = TorchAttentionBackend().attend(q[:B], kn[:B], vn[:B], eager_cache, meta, 0.25)
    packed = pack_inputs(torch.zeros(B, dtype=torch.long), torch.tensor([c - 1 for c in ctx]), ctx, tables, P, W,
                         pad_block)
    _, pos, lens, table = split_packed(packed, P, W)
    cache = LayerKVCache(k.clone(), v.clone())
    static = build_decode_metadata(pos, lens, table, bs, H // KVH, None).for_window(window)
    got = TorchAttentionBackend().attend(q, kn, vn, cache, static, 0.25)
    assert torch.allclose(got[:B], want, atol=1e-6) and torch.isfinite(got).all()
    assert torch.equal(cache.k[: pad_block * bs], eager_cache.k[: pad_block * bs])
    assert static.batches[0].key_slots.shape == (P, W * bs)


def _swap_runner(llm, graphs: bool, capture=None) -> ModelRunner:
    """A layer-by-layer runner in the engine's executor (no compiled CPU stack, which would take the decodes
    first); with graphs, one KV block more than the scheduler knows of, the pad block, as the executor does."""
    eng, ex = llm.engine, llm.engine.executor
    cache_cfg = eng.config.cache
    runner = ModelRunner(ex.model, cache_cfg, ex.num_blocks + graphs, HOST, eng.generator, compiled_decode=False)
    if graphs:
        runner.graphs = DecodeGraphs(ex.model, cache_cfg.block_size, ex.num_blocks, ex.max_model_len, 8, HOST,
                                     capture=capture)
    ex.runner, ex.runners, ex.kv_caches = runner, [runner], [runner.cache]
    eng.reset_prefix_cache()  # the new cache holds none of the blocks cached so far
    return runner


PROMPTS = [[1, 5, 9, 33, 7, 100], [3, 4, 5], [200, 201, 17, 18, 19, 20, 21, 22, 23]]
PARAMS = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2),
          SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True, logprobs=2)]


def _run(llm, prompts):
    outs = [llm.generate(prompts, p) for p in PARAMS]
    return [[(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in out] for out in outs]


def _assert_same(got, want):
    for g_run, w_run in zip(got, want):
        for (g_ids, g_lp), (w_ids, w_lp) in zip(g_run, w_run):
            assert g_ids == w_ids
            for g_step, w_step in zip(g_lp, w_lp):
                assert g_step.keys() == w_step.keys()
                assert all(abs(g_step[t] - w_step[t]) < 1e-4 for t in g_step)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama[0]), dtype="float32", num_blocks=256, block_size=4, max_num_seqs=8)


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["batch1", "batch3"])
def test_replay_path_matches_eager_layers(llm, prompts):
    """The graph path end to end on the CPU (EagerGraph replays the same forward over the padded static buffers):
    the same tokens and logprobs as the eager layers, greedy and sampled; prefills still run the layers."""
    _swap_runner(llm, graphs=False)
    want = _run(llm, prompts)
    runner = _swap_runner(llm, graphs=True)
    got = _run(llm, prompts)
    _assert_same(got, want)
    paths, graphs = runner.steps_by_path, runner.graphs
    assert paths["graph"] >= 2 * 11 and paths["layers"] >= 2 and paths["fused"] == 0
    assert set(graphs.graphs) == {(1 if len(prompts) == 1 else 4, 64)} and graphs.replays == paths["graph"]
    assert all(isinstance(g, EagerGraph) for _, g in graphs.graphs.values())


def test_failed_capture_falls_back_to_eager(llm):
    def broken(fn, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    _swap_runner(llm, graphs=False)
    want = _run(llm, PROMPTS[:2])
    runner = _swap_runner(llm, graphs=True, capture=broken)
    _assert_same(_run(llm, PROMPTS[:2]), want)
    assert runner.steps_by_path["graph"] == 0 and "operation not permitted" in runner.graphs.disabled


def test_cpu_engine_never_takes_the_cuda_path(tiny_llama):
    """A CPU engine: no graphs, the module never imported, every step on the compiled stack or the layers."""
    code = (
        "import json, sys\n"
        "from tokenloom import LLM, SamplingParams\n"
        f"llm = LLM({str(tiny_llama[0])!r}, dtype='float32', num_blocks=64, block_size=4)\n"
        "llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))\n"
        "r = llm.engine.runner\n"
        "print(json.dumps({'graphs': r.graphs is None, 'imported': 'tokenloom.worker.cuda_graphs' in sys.modules,"
        " 'paths': r.steps_by_path}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != ENV}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["graphs"] and not report["imported"]
    assert report["paths"]["graph"] == 0 and report["paths"]["fused"] + report["paths"]["layers"] == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: captures real CUDA graphs")
def test_cuda_graphs_match_eager_on_cuda(tiny_llama):
    path = str(tiny_llama[0])
    eager = LLM(path, dtype="float32", device="cuda", num_blocks=256, block_size=4, max_num_seqs=8,
                enforce_eager=True)
    assert eager.engine.runner.graphs is None
    want = _run(eager, PROMPTS)
    graphed = LLM(path, dtype="float32", device="cuda", num_blocks=256, block_size=4, max_num_seqs=8)
    got = _run(graphed, PROMPTS)
    _assert_same(got, want)
    runner = graphed.engine.runner
    assert runner.steps_by_path["graph"] > 0 and runner.graphs.disabled is None
    assert all(type(g).__name__ == "CudaGraph" for _, g in runner.graphs.graphs.values())
