"""The engine's decode step on CUDA, checked in one short run (issue 11): what benchmarks/gpu_check.sh runs.

  (c) CUDA against CPU, float32: the logits of a prefill (max |diff|, top-1 agreement per position) and greedy
      decoding with logprobs (tokens, max |diff| of the chosen tokens' logprobs);
  (d) CUDA-graph replay against eager (enforce_eager) at batches 1, 3 and 8, float32: greedy tokens identical,
      top-5 logprobs close, and the steps that replayed a graph counted;
  (e) decode tokens/s at batches 1 and 64 with graphs on and off (bfloat16 on CUDA).

Models: a tiny random Llama, always (written here, no download); on CUDA also a random Llama of SmolLM2-135M's
shapes (the default model's layers, heads and vocabulary, so its tokens/s stand for the default model's); and the
default model itself (smollm2-135m GGUF) when it is already in $TOKENLOOM_HOME or given with --gguf: nothing is
downloaded. --device cpu runs what a CPU can (CPU against CPU, no graphs, eager tokens/s) as a dry run.
Prints a report, then one JSON line.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from tokenloom import LLM, SamplingParams
from tokenloom.config import TokenloomError
from tokenloom.loader.sources import DEFAULT_MODEL, resolve_model

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                     tie_word_embeddings=True)
MAX_MODEL_LEN = 1024


def write_random_llama(path: Path, shape: dict, seed: int = 0) -> Path:
    """An HF Llama folder (config.json, model.safetensors in bfloat16, no tokenizer) of random weights scaled so
    that the logits are peaked (few near-ties for greedy decoding to flip on)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    H, I, V = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    D = H // heads

    def mat(rows, cols):
        return (torch.randn(rows, cols, generator=g) / cols**0.5).to(torch.bfloat16)

    def norm():
        return (1 + 0.1 * torch.randn(H, generator=g)).to(torch.bfloat16)

    t = {"model.embed_tokens.weight": torch.randn(V, H, generator=g).to(torch.bfloat16), "model.norm.weight": norm()}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
                  p + "self_attn.q_proj.weight": mat(heads * D, H), p + "self_attn.k_proj.weight": mat(kv * D, H),
                  p + "self_attn.v_proj.weight": mat(kv * D, H), p + "self_attn.o_proj.weight": mat(H, heads * D),
                  p + "mlp.gate_proj.weight": mat(I, H), p + "mlp.up_proj.weight": mat(I, H),
                  p + "mlp.down_proj.weight": mat(H, I)})
    if not shape["tie_word_embeddings"]:
        t["lm_head.weight"] = mat(V, H)
    path.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5, "bos_token_id": 1,
              "eos_token_id": 2, "torch_dtype": "bfloat16", **shape}
    (path / "config.json").write_text(json.dumps(config))
    save_file(t, str(path / "model.safetensors"))
    return path


def prompts(n: int, vocab: int, seed: int, lengths=(7, 19, 32, 11, 25)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def make_llm(model: str, device: str, dtype: str, eager: bool, max_num_seqs: int = 8, **kw) -> LLM:
    return LLM(model, dtype=dtype, device=device, max_model_len=MAX_MODEL_LEN, max_num_seqs=max_num_seqs,
               enforce_eager=eager, **kw)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def release() -> None:
    """Free the engines just dropped (their KV caches, graphs and weights) before the next ones load."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prefill_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """float32 logits [T, V] of one causal forward over ids (a scratch cache), on the host."""
    with torch.inference_mode():
        return llm.engine.model.compute_logits(llm.engine.executor.hidden_states(ids)).float().cpu()


def greedy(llm: LLM, batch: list[list[int]], max_tokens: int, logprobs: int = 5):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=logprobs)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(batch, params)]


def compare_runs(a, b) -> dict:
    """Greedy runs a and b (per sequence: tokens, logprobs): identical sequences, and the largest logprob gap
    over the entries both report while their tokens agree."""
    same, gap = 0, 0.0
    for (ta, la), (tb, lb) in zip(a, b):
        same += ta == tb
        for x, y, ea, eb in zip(ta, tb, la, lb):
            gap = max([gap] + [abs(ea[t] - eb[t]) for t in ea.keys() & eb.keys()])
            if x != y:
                break
    return {"sequences_identical": f"{same}/{len(a)}", "identical": same == len(a), "max_logprob_diff": gap}


def vocab_of(llm: LLM) -> int:
    return llm.engine.model_config.vocab_size


def check_logits(model: str, device: str) -> dict:
    """(c) the device against the CPU, float32, eager on both."""
    cpu, dev = make_llm(model, "cpu", "float32", True), make_llm(model, device, "float32", True)
    batch = prompts(3, vocab_of(cpu), seed=1)
    diffs, agree, total = [], 0, 0
    for ids in batch:
        a, b = prefill_logits(cpu, ids), prefill_logits(dev, ids)
        diffs.append((a - b).abs().max().item())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
    decode = compare_runs(greedy(cpu, batch, 16), greedy(dev, batch, 16))
    del cpu, dev
    release()
    return {"prefill_max_abs_diff": max(diffs), "prefill_top1_agreement": agree / total, "decode": decode}


def check_graphs(model: str, device: str) -> dict:
    """(d) graph replay against eager on the device, float32, at batches 1, 3 and 8."""
    eager, graphed = make_llm(model, device, "float32", True), make_llm(model, device, "float32", False)
    runner = graphed.engine.runner
    if runner.graphs is None:
        return {"skipped": "the engine set up no CUDA graphs (see the log: TOKENLOOM_CUDA_GRAPHS, the model)"}
    out = {}
    for b in (1, 3, 8):
        before = runner.steps_by_path["graph"]
        batch = prompts(b, vocab_of(eager), seed=10 + b)
        res = compare_runs(greedy(eager, batch, 24), greedy(graphed, batch, 24))
        out[f"batch{b}"] = {**res, "graph_steps": runner.steps_by_path["graph"] - before}
    out["buckets_captured"] = sorted(runner.graphs.graphs)
    out["disabled"] = runner.graphs.disabled
    del eager, graphed, runner
    release()
    return out


def decode_tok_s(llm: LLM, device: str, batch: int, prompt_len: int, max_tokens: int) -> dict:
    """Decode tokens/s of `batch` sequences: the prompts prefilled in one step, then the decode steps timed."""
    eng = llm.engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(batch)
    for _ in range(batch):
        eng.add_request(torch.randint(3, vocab_of(llm), (prompt_len,), generator=g).tolist(), params)
    eng.step()
    sync(device)
    steps, start = 0, time.perf_counter()
    while eng.has_unfinished():
        eng.step()
        steps += 1
    sync(device)
    elapsed = time.perf_counter() - start
    return {"tok_s": batch * (max_tokens - 1) / elapsed, "ms_per_step": 1e3 * elapsed / max(steps, 1)}


def bench(model: str, device: str, dtype: str, max_tokens: int, prompt_len: int = 32) -> dict:
    """(e) decode tokens/s at batches 1 and 64, graphs on and off (off only on the CPU); each measured after a
    warm-up run of the same shape (which captures the graphs)."""
    out = {}
    for graphs in ((True, False) if device.startswith("cuda") else (False,)):
        llm = make_llm(model, device, dtype, eager=not graphs, max_num_seqs=64,
                       max_num_batched_tokens=max(2048, 64 * prompt_len))
        for b in (1, 64):
            decode_tok_s(llm, device, b, prompt_len, max_tokens)
            before = llm.engine.runner.steps_by_path["graph"]
            res = decode_tok_s(llm, device, b, prompt_len, max_tokens)
            res["graph_steps"] = llm.engine.runner.steps_by_path["graph"] - before
            out[f"batch{b}_graphs_{'on' if graphs else 'off'}"] = res
        del llm
        release()
    return out


def find_default_model(gguf: str | None, name: str) -> tuple[str | None, str]:
    """(model path, why not) of the real model: --gguf, else the catalogue name if already downloaded."""
    if gguf:
        return (gguf, "") if Path(gguf).expanduser().is_file() else (None, f"--gguf {gguf}: no such file")
    try:
        return str(resolve_model(name, download=False).path), ""
    except TokenloomError as e:  # never downloads: the device machine has no network
        return None, f"{e} (pass --gguf PATH or a TOKENLOOM_HOME that holds it)"


def environment(device: str) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": device}
    if device.startswith("cuda"):
        env.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
    return env


def run(args) -> dict:
    device, report = args.device, {"env": environment(args.device), "models": {}}
    cuda, full = device.startswith("cuda"), device.startswith("cuda") or args.full
    print("environment:", json.dumps(report["env"]))
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    models = {"tiny-random-llama": str(write_random_llama(work / "tiny", TINY))}
    if full:
        models["smollm2-shape-random"] = str(write_random_llama(work / "shape", SMOLLM2_SHAPE))
    real, why = find_default_model(args.gguf, args.model)
    if real and not full:
        real, why = None, f"found at {real}, left out of the CPU dry run (--full runs it)"
    if real:
        models[args.model] = real
    else:
        print(f"{args.model}: skipped: {why}")
        report["models"][args.model] = {"skipped": why}
    for name, path in models.items():
        entry = report["models"][name] = {"logits_vs_cpu": check_logits(path, device)}
        print(f"{name}: {device} vs cpu, float32: {json.dumps(entry['logits_vs_cpu'])}")
        if cuda:
            entry["graphs_vs_eager"] = check_graphs(path, device)
        else:
            entry["graphs_vs_eager"] = {"skipped": "CUDA graphs are CUDA-only (tests/worker/test_cuda_graphs.py "
                                                   "runs the replay path on the CPU with a stand-in for the capture)"}
        print(f"{name}: graph replay vs eager: {json.dumps(entry['graphs_vs_eager'], default=str)}")
    name = args.model if real else "smollm2-shape-random" if full else "tiny-random-llama"
    dtype = "bfloat16" if cuda else "float32"
    report["bench"] = {"model": name, "dtype": dtype, **bench(models[name], device, dtype, args.max_tokens)}
    for key, res in report["bench"].items():
        if isinstance(res, dict):
            print(f"decode {name} {dtype} {key}: {res['tok_s']:.1f} tok/s, {res['ms_per_step']:.2f} ms/step, "
                  f"{res['graph_steps']} graph steps")
    report["ok"] = all(_ok(m) for m in report["models"].values())
    return report


def _ok(entry: dict) -> bool:
    if "skipped" in entry:
        return True
    lv = entry["logits_vs_cpu"]
    good = lv["prefill_top1_agreement"] >= 0.99 and lv["decode"]["identical"]
    graphs = entry["graphs_vs_eager"]
    if "skipped" not in graphs:
        good &= all(graphs[f"batch{b}"]["identical"] and graphs[f"batch{b}"]["graph_steps"] > 0 for b in (1, 3, 8))
    return good


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run of what a CPU can check)")
    p.add_argument("--gguf", default=None, help="the default model's GGUF file, if it is not in $TOKENLOOM_HOME")
    p.add_argument("--model", default=DEFAULT_MODEL, help="catalogue name looked up (never downloaded)")
    p.add_argument("--max-tokens", type=int, default=None, help="decode tokens per sequence in the tokens/s runs")
    p.add_argument("--full", action="store_true", help="on the CPU too, the SmolLM2-shaped random model")
    p.add_argument("--json-out", default=None, help="also write the JSON report to this file")
    args = p.parse_args(argv)
    if args.max_tokens is None:
        args.max_tokens = 128 if args.device.startswith("cuda") else 16
    start = time.perf_counter()
    report = run(args)
    report["seconds"] = round(time.perf_counter() - start, 1)
    line = json.dumps(report, default=str)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    print(f"gpu_check {'OK' if report['ok'] else 'MISMATCH'} in {report['seconds']} s")
    print(line)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
