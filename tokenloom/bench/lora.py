"""`tokenloom bench lora`: decode tokens/s of a batch spread over several LoRA adapters against the same batch on
the base model alone, in one engine and one run (goal: >= 80 %).

The adapters are written for the model being measured (random PEFT factors on every linear layer of its decoder
layers, rank --rank). Steps with adapter rows run those rows layer by layer: the compiled decode stack computes
the base weights only, so where the base batch takes it, part of the gap is the stack's, not LoRA's. The base
batch is also measured with the stack off ("base, layers"), which shows LoRA's own cost on the same path.
"""
from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import torch

from tokenloom.bench.common import make_lengths, random_prompts


def write_random_adapter(targets, path: Path, rank: int, seed: int) -> None:
    """A PEFT adapter directory with random factors (B scaled small, so the text stays plausible) on every target
    (lora.layers.LoRATarget by module name)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors, leaves = {}, set()
    for target in targets.values():
        for ckpt, _, rows in target.parts:
            a = torch.randn(rank, target.in_features, generator=g) / target.in_features ** 0.5
            b = torch.randn(rows, rank, generator=g) * 0.02
            tensors[f"base_model.model.{ckpt}.lora_A.weight"] = a.contiguous()
            tensors[f"base_model.model.{ckpt}.lora_B.weight"] = b.contiguous()
            leaves.add(ckpt.rpartition(".")[2])
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(leaves)}
    (path / "adapter_config.json").write_text(json.dumps(config))


def _decode(llm, prompts, params, loras) -> tuple[float, dict[str, int]]:
    """(decode tokens/s of the batch: its size over the mean time between a request's tokens, the steps each
    path took)."""
    eng = llm.engine
    eng.reset_prefix_cache()
    before = dict(eng.runner.steps_by_path)
    outs = llm.generate(prompts, params, lora_request=loras)
    per_token = [(o.metrics.finished_time - o.metrics.first_token_time) / (len(o.outputs[0].token_ids) - 1)
                 for o in outs]
    paths = {k: v - before[k] for k, v in eng.runner.steps_by_path.items()}
    return len(prompts) / statistics.mean(per_token), paths


def bench_lora(args) -> dict:
    from tokenloom.entrypoints.engine_args import make_llm
    from tokenloom.lora import LoRARequest
    from tokenloom.sampling_params import SamplingParams

    args.enable_lora, args.max_loras, args.max_lora_rank = True, args.num_adapters, args.rank
    llm = make_llm(args)
    eng = llm.engine
    runner, manager = eng.runner, eng.lora_manager
    tmp = tempfile.TemporaryDirectory(prefix="tokenloom-bench-lora-")
    adapters = []
    for i in range(args.num_adapters):
        where = Path(tmp.name) / f"adapter-{i}"
        write_random_adapter(manager.targets, where, args.rank, seed=args.seed + i)
        adapters.append(LoRARequest(f"bench-{i}", i + 1, str(where)))
        llm.add_lora(adapters[-1])
    lengths = make_lengths(args.batch, args.input_len, args.output_len, "fixed")
    prompts = random_prompts(lengths, eng.model_config.vocab_size, args.seed)
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    spread = [adapters[i % len(adapters)] for i in range(args.batch)]
    warm = SamplingParams(max_tokens=4, ignore_eos=True)
    llm.generate([p[:8] for p in prompts[:4]], warm, lora_request=spread[:4])
    llm.generate([p[:8] for p in prompts[:4]], warm)
    fused = runner.fused
    runs = {"base": [], "base, layers": [], "lora": []}
    paths = {}
    for _ in range(args.rounds):
        for kind in runs:
            runner.fused = None if kind == "base, layers" else fused
            rate, paths[kind] = _decode(llm, prompts, params, spread if kind == "lora" else None)
            runs[kind].append(rate)
        runner.fused = fused
    best = {kind: max(rates) for kind, rates in runs.items()}
    ratio = statistics.median(lo / b for lo, b in zip(runs["lora"], runs["base"]))
    ratio_layers = statistics.median(lo / b for lo, b in zip(runs["lora"], runs["base, layers"]))
    print(f"model {eng.model_name}  dtype {str(eng.dtype).removeprefix('torch.')}  weights "
          f"{eng.config.quantization or 'float'}  batch {args.batch} over {args.num_adapters} adapters of rank "
          f"{args.rank} (every linear layer)  input {args.input_len}  output {args.output_len}  rounds {args.rounds}")
    for kind, rate in best.items():
        print(f"{kind:13} decode {rate:8.1f} tok/s   steps by path {paths[kind]}")
    print(f"LoRA / base: {ratio * 100:.0f} % (goal >= 80 %)   LoRA / base on the same path (layers): "
          f"{ratio_layers * 100:.0f} %")
    base_path = "fused" if paths["base"].get("fused", 0) > paths["base"].get("layers", 0) else "layers"
    if base_path == "fused":
        print("  the base batch decodes on the compiled stack, which computes base weights only: adapter rows run "
              "layer by layer")
    tmp.cleanup()
    return {"base_tok_s": best["base"], "base_layers_tok_s": best["base, layers"], "lora_tok_s": best["lora"],
            "ratio": ratio, "ratio_same_path": ratio_layers, "steps_by_path": paths, "batch": args.batch,
            "adapters": args.num_adapters, "rank": args.rank, "base_decode_path": base_path}
