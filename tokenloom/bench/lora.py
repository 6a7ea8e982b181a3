"""`tokenloom bench lora`: decode tokens/s of a batch spread over several LoRA adapters against the same batch on
the base model alone, in one engine and one run (goal: >= 80 %).

The adapters are written for the model being measured (random PEFT factors on every linear layer of its decoder
layers, rank --rank). Where the base batch decodes on the compiled stack, adapter rows do too (it adds their
deltas itself); "lora, layers" is the same adapter batch with its adapter rows kept layer by layer (the path
before the stack took them, and where it cannot), "base, layers" the base batch with the stack off: LoRA's own
cost on the layer-by-layer path. Every ratio is of rates measured in the same round.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from tokenloom.bench.common import make_lengths, random_prompts
from tokenloom.bench.token_economics import section


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
    runs = {"base": [], "lora": [], "lora, layers": [], "base, layers": []}
    paths = {}
    for _ in range(args.rounds):
        for kind in runs:
            runner.fused = None if kind == "base, layers" else fused
            if fused is not None:
                fused.lora_enabled = kind != "lora, layers"
            rate, paths[kind] = _decode(llm, prompts, params, spread if kind.startswith("lora") else None)
            runs[kind].append(rate)
        print(f"round {len(runs['base'])}: " + "  ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()) + " tok/s",
              file=sys.stderr, flush=True)  # a long run shows where it is
        runner.fused = fused
        if fused is not None:
            fused.lora_enabled = True
    best = {kind: max(rates) for kind, rates in runs.items()}

    def share(num: str, den: str) -> float:
        return statistics.median(n / d for n, d in zip(runs[num], runs[den]))

    ratio, ratio_rows_layers = share("lora", "base"), share("lora, layers", "base")
    ratio_same_path = share("lora, layers", "base, layers")  # every row layer by layer
    print(f"model {eng.model_name}  dtype {str(eng.dtype).removeprefix('torch.')}  weights "
          f"{eng.config.quantization or 'float'}  batch {args.batch} over {args.num_adapters} adapters of rank "
          f"{args.rank} (every linear layer)  input {args.input_len}  output {args.output_len}  rounds {args.rounds}")
    for kind, rate in best.items():
        print(f"{kind:13} decode {rate:8.1f} tok/s   steps by path {paths[kind]}")
    print(f"LoRA / base: {ratio * 100:.0f} % (goal >= 80 %)   with adapter rows layer by layer: "
          f"{ratio_rows_layers * 100:.0f} %   all layer by layer: {ratio_same_path * 100:.0f} %")
    base_path = "fused" if paths["base"].get("fused", 0) > paths["base"].get("layers", 0) else "layers"
    lora_path = "fused" if paths["lora"].get("fused", 0) > paths["lora"].get("layers", 0) else "layers"
    if base_path == "fused" and lora_path == "layers":
        reason = (fused.lora_reason or "its batch limit") if fused is not None else ""
        print(f"  the base batch decodes on the compiled stack, adapter rows layer by layer ({reason})")
    econ = section(eng, args, decode={"tok_s": best["lora"], "batch": args.batch,
                                      "ctx": args.input_len + args.output_len // 2})
    tmp.cleanup()
    return {"base_tok_s": best["base"], "base_layers_tok_s": best["base, layers"], "lora_tok_s": best["lora"],
            "lora_layers_tok_s": best["lora, layers"], "ratio": ratio, "ratio_adapter_rows_layers": ratio_rows_layers,
            "ratio_same_path": ratio_same_path, "steps_by_path": paths, "batch": args.batch,
            "adapters": args.num_adapters, "rank": args.rank, "base_decode_path": base_path,
            "lora_decode_path": lora_path, "economics": econ}
