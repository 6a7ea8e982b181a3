"""Multi-LoRA: PEFT and GGUF adapters against PEFT's own merged model, mixed batches against requests run alone,
prefix-cache isolation, slot and host-memory LRU, and the errors a bad adapter gets."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny
from tests.model_executor.test_models_vs_hf import hf_greedy, record_logits, stop_recording
from tokenloom import LLM, SamplingParams
from tokenloom.config import TokenloomError
from tokenloom.core.request import Request
from tokenloom.lora import LoRAError, LoRARequest

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS = 8
ADAPTERS = {  # name -> PEFT LoraConfig arguments
    "all": dict(r=8, lora_alpha=16, target_modules=ALL),
    # rsLoRA, q/v and the MLP only, per-module rank and alpha
    "rs": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
               rank_pattern={"down_proj": 6}, alpha_pattern={"v_proj": 3}),
    "kq": dict(r=2, lora_alpha=4, target_modules=["k_proj", "q_proj", "up_proj"]),
}


def make_adapter(hf_model, path, seed: int, **lora_kwargs):
    """A PEFT adapter with random non-zero A and B saved at `path`; returns PEFT's merged model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(hf_model), LoraConfig(init_lora_weights=False, **lora_kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # B = 0 would make the adapter the base model
    peft_model.save_pretrained(str(path))
    return peft_model.merge_and_unload().eval()


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    """name -> (LoRARequest, PEFT-merged reference model)."""
    path, hf = tiny_llama
    out = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        where = tmp_path_factory.mktemp(f"lora-{name}")
        out[name] = (LoRARequest(name, i + 1, str(where)), make_adapter(hf, where, seed=10 + i, **kw))
    return out


def _llm(path, **kw):
    kw = dict(dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8, num_blocks=128, block_size=4) | kw
    return LLM(str(path), **kw)


def _greedy(n=STEPS, **kw):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


def _prompt(seed: int, n: int = 21) -> list[int]:
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _check_logits(llm, lora, reference, prompt):
    rec = record_logits(llm)
    fused = llm.engine.runner.fused
    rows = fused.adapter_rows if fused is not None else 0
    out = llm.generate(prompt, _greedy(), lora_request=lora)[0]
    stop_recording(llm)
    if fused is not None:  # the decode steps ran on the compiled stack, which added the adapter's deltas
        assert fused.adapter_rows - rows == STEPS - 1
    ref_tokens, ref_logits = hf_greedy(reference, prompt, STEPS)
    assert len(rec) == STEPS
    for step, (ours, theirs) in enumerate(zip(rec, ref_logits)):
        diff = (ours[0] - theirs).abs().max().item()
        assert diff < 1e-4, f"step {step}: logits differ from PEFT's merged model by {diff}"
    assert out.outputs[0].token_ids == ref_tokens


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_peft_adapter_logits_equal_merged_peft_model(tiny_llama, adapters, name):
    path, hf = tiny_llama
    lora, merged = adapters[name]
    prompt = _prompt(7)
    _, base_logits = hf_greedy(hf, prompt, 1)
    _, merged_logits = hf_greedy(merged, prompt, 1)
    assert (base_logits[0] - merged_logits[0]).abs().max() > 0.05  # the adapter really changes the model
    _check_logits(_llm(path, max_lora_rank=8), lora, merged, prompt)


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf LlamaModel.permute, as convert_lora_to_gguf applies it to B's rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_STEMS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def write_gguf_adapter(peft_dir, out, alpha: float, heads=(4, 2), arch="llama", general_type="adapter"):
    """The PEFT adapter as llama.cpp's convert_lora_to_gguf.py writes it: blk.N.<stem>.weight.lora_a / lora_b,
    B's q/k rows permuted, adapter.lora.alpha."""
    import gguf
    from safetensors.torch import load_file

    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_string("general.type", general_type)
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    for key, t in sorted(load_file(str(peft_dir / "adapter_model.safetensors")).items()):
        parts = key.split(".")  # base_model.model.model.layers.N.<attn|mlp>.<module>.lora_<A|B>.weight
        layer, module, ab = parts[4], parts[6], parts[7]
        if ab == "lora_B" and module in ("q_proj", "k_proj"):
            t = _permute(t, heads[0] if module == "q_proj" else heads[1])
        name = f"blk.{layer}.{GGUF_STEMS[module]}.weight.lora_{ab[-1].lower()}"
        writer.add_tensor(name, t.float().numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def test_gguf_adapter_logits_equal_merged_peft_model(tiny_llama, adapters, tmp_path):
    path, _ = tiny_llama
    lora, merged = adapters["all"]
    # PEFT's scale alpha / r = 16 / 8; llama.cpp's alpha / rank with the same alpha
    gguf_path = write_gguf_adapter(Path(lora.lora_path), tmp_path / "all.gguf", 16.0)
    llm = _llm(path)
    info = llm.add_lora(LoRARequest("all-gguf", 9, str(gguf_path)))
    assert (info.format, info.rank, info.target_modules) == ("gguf", 8, sorted(ALL))
    _check_logits(llm, LoRARequest("all-gguf", 9, str(gguf_path)), merged, _prompt(8))


def _alone(path, prompts, loras):
    """Each request on its own, one after another (distinct prompts: no prefix-cache hits between them)."""
    llm = _llm(path, max_loras=1)
    return [llm.generate(p, _greedy(12, logprobs=2), lora_request=lora)[0].outputs[0]
            for p, lora in zip(prompts, loras)]


def _same(batched, alone):
    for b, a in zip(batched, alone):
        assert b.token_ids == a.token_ids
        for lb, la in zip(b.logprobs, a.logprobs):
            assert lb.keys() == la.keys()
            assert max(abs(lb[t] - la[t]) for t in lb) < 1e-4


def test_mixed_batch_equals_each_request_alone(tiny_llama, adapters):
    path, _ = tiny_llama
    a, b = adapters["all"][0], adapters["rs"][0]
    loras = [None, a, b, a, None, b, a]
    prompts = [_prompt(20 + i, n=5 + 3 * i) for i in range(len(loras))]
    llm = _llm(path, max_loras=2)
    batched = [o.outputs[0] for o in llm.generate(prompts, _greedy(12, logprobs=2), lora_request=loras)]
    _same(batched, _alone(path, prompts, loras))
    assert len({tuple(o.token_ids) for o in batched[:3]}) == 3  # base, A and B differ on their prompts
    runner = llm.engine.runner
    if runner.fused is not None:  # base decodes keep the compiled stack; adapter rows ran layer by layer
        assert runner.steps_by_path["fused"] > 0
    assert llm.engine.kv_cache_manager.num_used_blocks == 0


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slots, runs", [([0, -1, 1, 0, 1, -1, -1, 0, 1], False),
                                         ([-1, -1, 0, 0, 0, 1, 1, -1, -1], True)])
def test_lora_layer_changes_only_its_rows(slots, runs, dtype, kernel, monkeypatch, kernel_calls):
    """One LoRALinear over a packed float Linear (two slices, as q/k/v are), rows of two slots interleaved
    (gathered groups) or in runs: base rows bit-identical to the base layer's, adapter rows base + scale * B A x
    of each slice the adapter has, row by row; through the compiled kernel and through torch's code."""
    from tokenloom.kernels import lora_ops
    from tokenloom.lora.layers import LoRALinear
    from tokenloom.model_executor.forward_context import ForwardContext, LoRAMapping, set_forward_context
    from tokenloom.model_executor.layers.linear import Linear

    calls = kernel_calls(lora_ops.EXTENSION, "the LoRA kernel") if kernel else {}
    if not kernel:
        monkeypatch.setattr(lora_ops.EXTENSION, "state", [None])
    torch.manual_seed(0)
    base = Linear(32, 48, bias=True, dtype=dtype)
    torch.nn.init.normal_(base.weight)
    torch.nn.init.normal_(base.bias)
    out_slices = [(0, 32), (32, 16)]
    layer = LoRALinear(base, max_loras=2, max_rank=8, out_slices=out_slices, dtype=dtype, device=torch.device("cpu"))
    # slot 0: the first slice only (rank 3); slot 1: both (ranks 8 and 4)
    factors = {0: [(torch.randn(3, 32), torch.randn(32, 3), 0.5), None],
               1: [(torch.randn(8, 32), torch.randn(32, 8), 2.0), (torch.randn(4, 32), torch.randn(16, 4), 1.5)]}
    for s, parts in factors.items():
        present = [(p, o) for p, o in zip(parts, out_slices) if p is not None]
        a = torch.cat([p[0] for p, _ in present])
        bt = torch.zeros(a.shape[0], 48)
        ranks, r0 = [], 0
        for p, (o, n) in zip(parts, out_slices):
            if p is None:
                ranks.append((0, 0))
                continue
            bt[r0 : r0 + p[0].shape[0], o : o + n] = (p[1] * p[2]).t()
            ranks.append((r0, p[0].shape[0]))
            r0 += p[0].shape[0]
        layer.set_slot(s, (a, bt, ranks))
    x = torch.randn(9, 32).to(dtype)
    mapping = LoRAMapping.from_spans([(s, i, i + 1) for i, s in enumerate(slots) if s >= 0])
    assert all(isinstance(rows, slice) == runs for _, rows in mapping.groups)
    with set_forward_context(ForwardContext(None, mapping)):
        y = layer(x)
    assert calls.get("lora_apply_", 0) == kernel
    ref = base(x)
    for i, s in enumerate(slots):
        if s < 0:
            assert torch.equal(y[i], ref[i])
            continue
        want = ref[i].float().clone()
        for p, (o, n) in zip(factors[s], out_slices):
            if p is not None:  # the factors as the slot holds them (the model's dtype), the product in float32
                a, bt = p[0].to(dtype).float(), (p[1] * p[2]).t().to(dtype).float()
                want[o : o + n] += bt.t() @ (a @ x[i].float())
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(y[i].float(), want.to(dtype).float(), rtol=tol, atol=tol * 10)
    assert torch.equal(layer(x), base(x))  # outside a forward context: the base layer


def test_adapters_never_share_prefix_blocks(tiny_llama, adapters):
    path, _ = tiny_llama
    a, b = adapters["all"][0], adapters["kq"][0]
    llm = _llm(path, max_loras=2)
    prompt = _prompt(30, n=26)

    def cached(lora):
        return llm.generate(prompt, _greedy(2), lora_request=lora)[0].metrics.num_cached_tokens

    assert [cached(None), cached(a), cached(b)] == [0, 0, 0]  # same tokens, three different K/V
    assert cached(a) == 24 and cached(b) == 24 and cached(None) == 24  # each reuses its own blocks
    llm.remove_lora(a.lora_name)
    llm.add_lora(a)  # the same id added again: its old blocks are not trusted
    assert cached(a) == 0
    # the chains of block hashes of one prompt under the base model and two adapters have nothing in common
    kv, manager = llm.engine.kv_cache_manager, llm.engine.lora_manager
    chains = []
    for lora in (None, a, b):
        req = Request("x", prompt, SamplingParams(), 4, lora_request=lora,
                      lora_hash_seed=manager.prepare(lora) if lora else None)
        chains.append(set(kv._block_hashes(req, 6)))
    assert all(len(c) == 6 for c in chains) and not (chains[0] & chains[1] or chains[0] & chains[2] or
                                                     chains[1] & chains[2])


def test_lru_swapping_with_one_slot(tiny_llama, adapters):
    """max_loras=1: requests of three adapters and the base model, queued together, take turns in the one slot
    (never two adapters in a step) and give what each gives alone; host memory keeps one adapter's weights
    beyond those in use, reading the others back from disk."""
    path, _ = tiny_llama
    a, b, c = (adapters[n][0] for n in ("all", "rs", "kq"))
    loras = [a, b, None, c, a, b, None, a]
    prompts = [_prompt(40 + i, n=4 + 2 * i) for i in range(len(loras))]
    llm = _llm(path, max_loras=1, max_cpu_loras=1)
    manager = llm.engine.lora_manager
    per_step = []
    activate = manager.activate
    manager.activate = lambda ids: per_step.append(set(ids) - {0}) or activate(ids)
    batched = [o.outputs[0] for o in llm.generate(prompts, _greedy(12, logprobs=2), lora_request=loras)]
    _same(batched, _alone(path, prompts, loras))
    assert max(len(s) for s in per_step) == 1
    assert manager.stats["slot_loads"] >= 3
    infos = {i.name: i for i in llm.list_loras()}
    assert set(infos) == {"all", "rs", "kq"}
    assert sum(i.loaded for i in infos.values()) == 1 and sum(i.slot is not None for i in infos.values()) == 1
    assert manager.stats["host_evictions"] >= 2
    reads = manager.stats["disk_reads"]
    out = llm.generate(prompts[1], _greedy(12, logprobs=2), lora_request=b)[0].outputs[0]
    assert manager.stats["disk_reads"] == reads + 1  # its weights had left host memory: read back
    _same([out], [batched[1]])


def test_slot_lru_order(tiny_llama, adapters):
    path, _ = tiny_llama
    llm = _llm(path, max_loras=2, max_cpu_loras=3)
    manager = llm.engine.lora_manager
    ids = {}
    for name in ("all", "rs", "kq"):
        req = adapters[name][0]
        llm.add_lora(req)
        ids[name] = req.lora_int_id
    slot = lambda name: manager.info(name).slot  # noqa: E731
    manager.activate([ids["all"]])
    manager.activate([ids["rs"]])
    manager.activate([ids["all"]])  # "rs" is now the least recently used
    manager.activate([ids["kq"]])
    assert (slot("all"), slot("rs"), slot("kq")) == (0, None, 1)
    manager.activate([ids["rs"], ids["kq"]])  # "all" goes: "kq" is in this step
    assert (slot("all"), slot("rs"), slot("kq")) == (None, 0, 1)
    assert manager.stats["slot_loads"] == 4


def test_add_list_remove_at_run_time(tiny_llama, adapters):
    path, _ = tiny_llama
    lora, merged = adapters["all"]
    llm = _llm(path)
    assert llm.list_loras() == []
    info = llm.add_lora(lora)
    assert (info.name, info.id, info.format, info.rank, info.loaded, info.slot) == ("all", 1, "peft", 8, True, None)
    assert llm.add_lora(lora) == info  # adding it again changes nothing
    with pytest.raises(LoRAError, match="name 'all' is taken"):
        llm.add_lora(LoRARequest("all", 5, lora.lora_path))
    with pytest.raises(LoRAError, match="id 1 is taken by adapter 'all'"):
        llm.add_lora(LoRARequest("other", 1, lora.lora_path))
    rid = llm.engine.add_request(_prompt(1), _greedy(4), lora_request=lora)
    with pytest.raises(LoRAError, match="in use"):
        llm.remove_lora("all")
    llm.engine.abort_request(rid)
    assert llm.remove_lora(1) is True and llm.remove_lora("all") is False
    assert llm.list_loras() == []


def _edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_bad_adapters_are_clear_errors(tiny_llama, adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    path, hf = tiny_llama
    llm = _llm(path, max_lora_rank=4)
    src = adapters["all"][0].lora_path

    def bad(where, match, name="bad"):
        with pytest.raises(LoRAError, match=match) as info:
            llm.add_lora(LoRARequest(name, 7, str(where)))
        assert isinstance(info.value, TokenloomError) and isinstance(info.value, ValueError)
        assert llm.list_loras() == []

    bad(src, r"rank 8 .* more than max_lora_rank 4")
    bad(tmp_path / "nowhere", "no such file or directory")
    bad(_edit_config(src, tmp_path / "t1", target_modules=["q_proj", "w_fancy"]), "'w_fancy', which does not exist")
    renamed = shutil.copytree(src, tmp_path / "t2")
    sd = load_file(str(renamed / "adapter_model.safetensors"))
    save_file({k.replace("layers.1.self_attn.o_proj", "layers.1.self_attn.x_proj"): v for k, v in sd.items()},
              str(renamed / "adapter_model.safetensors"))
    bad(renamed, "'model.layers.1.self_attn.x_proj', which does not exist in this model")
    bad(_edit_config(src, tmp_path / "dora", use_dora=True), "DoRA")
    for name, kw, match in (("deeper", dict(num_hidden_layers=3), "different base model: it changes layer 2"),
                            ("wider", dict(hidden_size=32, intermediate_size=96), "different base model")):
        other = make_tiny("llama", tmp_path / f"{name}-base", **kw)
        make_adapter(other, tmp_path / name, seed=1, r=2, lora_alpha=4, target_modules=ALL)
        bad(tmp_path / name, match)
    make_adapter(hf, tmp_path / "head", seed=1, r=2, lora_alpha=4, target_modules=["lm_head"])
    bad(tmp_path / "head", "LoRA on embed_tokens, lm_head is not supported")
    small = tmp_path / "small"
    make_adapter(hf, small, seed=2, r=2, lora_alpha=4, target_modules=ALL)
    bad(write_gguf_adapter(small, tmp_path / "q.gguf", 4.0, arch="qwen2"), "different base model: a qwen2 adapter")
    bad(write_gguf_adapter(small, tmp_path / "m.gguf", 4.0, general_type="model"), "is not a LoRA adapter")
    with pytest.raises(LoRAError, match="LoRA is not enabled"):
        LLM(str(path), dtype="float32", num_blocks=16).generate([1, 2, 3], lora_request=adapters["all"][0])


def test_async_engine_runs_adapters_and_refuses_bad_ones(tiny_llama, adapters, tmp_path):
    """The server's path: AsyncEngine.add_request with a LoRARequest streams what LLM.generate gives, and an
    adapter that does not fit is a LoRAError from add_request, before anything streams."""
    import asyncio

    from tokenloom.engine.async_engine import AsyncEngine

    path, _ = tiny_llama
    lora = adapters["kq"][0]
    llm = _llm(path)
    want = llm.generate(_prompt(3), _greedy(6), lora_request=lora)[0].outputs[0].token_ids
    aengine = AsyncEngine(llm.engine).start()

    async def run():
        stream = await aengine.add_request(_prompt(3), _greedy(6), lora_request=lora)
        got = (await stream.collect()).outputs[0].token_ids
        with pytest.raises(LoRAError, match="no such file"):
            await aengine.add_request(_prompt(3), _greedy(6), lora_request=LoRARequest("gone", 9, str(tmp_path / "x")))
        return got

    try:
        assert asyncio.run(run()) == want
    finally:
        aengine.shutdown()


def test_bench_lora_json(tiny_llama):
    """`tokenloom bench lora --json`: the same batch on the base model and spread over adapters, one JSON object
    on stdout; adapter rows ran on the compiled stack where there is one, and layer by layer in "lora, layers"."""
    from tokenloom.model_executor.fused_decode import EXTENSION

    from tests.cli.test_cli import tokenloom

    path, _ = tiny_llama
    proc = tokenloom("bench", "lora", str(path), "--dtype", "float32", "--batch", "4", "--num-adapters", "2",
                     "--rank", "4", "--input-len", "8", "--output-len", "4", "--rounds", "1", "--price-per-hour", "3.6",
                     "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["lora_tok_s"] > 0 and res["base_tok_s"] > 0 and res["ratio"] > 0
    econ = res["economics"]  # of the batch spread over the adapters
    assert econ["decode"]["tok_s"] == res["lora_tok_s"] and econ["decode"]["batch"] == 4
    assert econ["cost"]["usd_per_million_tokens"] == pytest.approx(3.6 / (3600 * res["lora_tok_s"]) * 1e6)
    paths = res["steps_by_path"]
    assert paths["lora, layers"]["fused"] == 0 and paths["lora, layers"]["layers"] > 0
    if EXTENSION.load() is not None:  # decodes on the stack, adapter rows and all
        assert res["base_decode_path"] == res["lora_decode_path"] == "fused"
    assert res["lora_layers_tok_s"] > 0 and res["ratio_adapter_rows_layers"] > 0
    assert (res["adapters"], res["rank"], res["batch"]) == (2, 4, 4)
