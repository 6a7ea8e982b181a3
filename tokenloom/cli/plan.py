"""`tokenloom plan MODEL_OR_CONFIG --gpu H100 | --cpu ...`: weights and KV per rank, roofline-bound prefill and
decode, the TP/PP/replica layout that meets a target load within SLOs, and its cost (bench/plan.py)."""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from tokenloom.config import TokenloomError


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="size a deployment: layout (TP/PP/replicas), memory, latency bounds, $ per 1M "
                                    "tokens, on a GPU of the table or this machine")
    p.add_argument("model", nargs="?", default=None, metavar="MODEL_OR_CONFIG",
                   help="a catalogue name, a .gguf file, an HF folder, a config.json, or a known model id "
                        "(llama-3.1-8b, qwen2.5-7b, ... : `--list`)")
    hw = p.add_mutually_exclusive_group()
    hw.add_argument("--gpu", default=None, help="accelerator: H100, H200, A100, L4, L40S, MI300X, ... (`--list`)")
    hw.add_argument("--cpu", action="store_true", help="this machine, at its measured roofs (bench roofline)")
    p.add_argument("--instance", default=None, metavar="NAME",
                   help="a cloud instance: its accelerator and on-demand price (e.g. p5.48xlarge, g6.xlarge)")
    p.add_argument("--dtype", "-q", default=None, metavar="DTYPE",
                   help="weights: bf16, fp16, fp8, int8, int4, nf4, q4_0, q4_1, q4_k_m, q8_0, ... (default: the "
                        "model's own: a GGUF file's tensors as they are, a config's torch_dtype, else bf16)")
    p.add_argument("--kv-cache-dtype", default="bf16", help="bf16 (default), fp8, int8, fp32")
    p.add_argument("--target-qps", type=float, default=1.0, help="requests per second to carry")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=100.0)
    p.add_argument("--price-per-hour", type=float, default=None, metavar="USD",
                   help="$ per device-hour (per machine-hour with --cpu); default: the table's list price")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most sequences a stage decodes together")
    p.add_argument("--max-tp", type=int, default=8)
    p.add_argument("--max-pp", type=int, default=8)
    p.add_argument("--memory-utilization", type=float, default=0.9, help="share of device memory the server takes")
    p.add_argument("--reserve-gb", type=float, default=None,
                   help="per rank, for activations and the runtime (default 2 on GPUs, 0.5 on CPUs)")
    p.add_argument("--decode-efficiency", type=float, default=None,
                   help="share of the bandwidth roof decode reaches (default 0.7 GPU, 0.5 CPU)")
    p.add_argument("--prefill-efficiency", type=float, default=None,
                   help="share of the GEMM roof prefill reaches (default 0.55 GPU, 0.15 CPU)")
    p.add_argument("--threads", type=int, default=0, help="--cpu: threads the roofs are measured with")
    p.add_argument("--list", action="store_true", help="list the accelerators, instances and known models")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.set_defaults(func=cmd_plan)


def _gguf_model(path: Path, name: str):
    from tokenloom.gguf.loader import config_from_metadata, open_gguf_checked
    from tokenloom.gguf.reader import read_metadata

    reader = open_gguf_checked(str(path))
    cfg = config_from_metadata(read_metadata(reader), {t.name for t in reader.tensors})
    by_type = Counter()
    for t in reader.tensors:
        by_type[t.tensor_type.name.lower()] += int(t.n_elements)
    return name, cfg, by_type.most_common(1)[0][0], float(sum(int(t.n_bytes) for t in reader.tensors))


def _hf_model(config_json: Path, name: str):
    from tokenloom.config import ModelConfig
    from tokenloom.loader.safetensors import load_hf_config, safetensors_files

    try:
        raw = json.loads(config_json.read_text())
    except (OSError, ValueError) as exc:
        raise TokenloomError(f"cannot read {config_json}: {exc}") from None
    if config_json.name == "config.json":  # the loader's reading (a multimodal config's text part)
        raw = load_hf_config(config_json.parent)
    try:  # with the defaults the architecture's config class implies (Qwen2's q/k/v bias)
        from tokenloom.model_executor.model_loader import config_from_hf

        cfg = config_from_hf(raw)
    except TokenloomError:  # an architecture tokenloom does not run can still be sized
        cfg = ModelConfig.from_hf(raw)
    dtype = str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16")
    size = None
    try:
        files = safetensors_files(config_json.parent)
        size = float(sum(f.stat().st_size for f in files)) or None
    except Exception:  # noqa: BLE001 - a bare config.json: sized from its numbers
        pass
    return name, cfg, dtype, size


def load_plan_model(spec: str, dtype: str | None, kv_dtype: str):
    """A PlanModel from a known id, a config.json, an HF folder, a .gguf file or a catalogue name."""
    from tokenloom.bench import economics as E
    from tokenloom.bench.known_models import known_config
    from tokenloom.bench.plan import PlanModel

    path = Path(spec).expanduser()
    if (known := known_config(spec)) is not None and not path.exists():
        name, cfg, own, size = known[0], known[1], "bf16", None
    elif path.is_file() and path.suffix == ".json":
        name, cfg, own, size = _hf_model(path, path.parent.name or path.stem)
    elif path.is_dir() and (path / "config.json").is_file():
        name, cfg, own, size = _hf_model(path / "config.json", path.name)
    elif path.is_file() and path.suffix == ".gguf":
        name, cfg, own, size = _gguf_model(path, path.stem)
    else:
        from tokenloom.loader.sources import resolve_model

        try:
            src = resolve_model(spec, download=False)
        except TokenloomError as exc:
            raise TokenloomError(f"{exc} (or name a known model: `tokenloom plan --list`)") from None
        if src.kind == "gguf":
            name, cfg, own, size = _gguf_model(Path(src.path), src.name)
        else:
            name, cfg, own, size = _hf_model(Path(src.path) / "config.json", src.name)
    weight_dtype = dtype or own
    E.bytes_per_weight(weight_dtype)  # an unknown dtype is an error here, with the known ones
    weight_bytes = E.weight_bytes(cfg, weight_dtype) if dtype or not size else size
    return PlanModel(name, cfg, weight_dtype, weight_bytes, kv_dtype)


def _cpu_hardware(threads: int):
    import torch

    from tokenloom.bench.hardware import Accelerator
    from tokenloom.bench.roofline import _available_bytes, machine_roofs

    if threads:
        torch.set_num_threads(threads)
    roofs, raw = machine_roofs()
    return Accelerator(f"cpu: {raw['cpu']} ({raw['threads']} threads)", _available_bytes() / 1e9,
                       roofs.bandwidth / 1e9, roofs.gemm_bf16 / 1e12, 0, "none", 0, 0, max_per_node=1), raw


def build_inputs(args, hw, cpu: bool):
    from tokenloom.bench.plan import CPU_EFFICIENCY, GPU_EFFICIENCY, PlanInputs

    eff = CPU_EFFICIENCY if cpu else GPU_EFFICIENCY
    price = args.price_per_hour if args.price_per_hour is not None else (hw.price_per_hour or None)
    return PlanInputs(target_qps=args.target_qps, prompt_len=args.prompt_len, output_len=args.output_len,
                      slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms, max_num_seqs=args.max_num_seqs,
                      memory_utilization=args.memory_utilization,
                      reserve_gb=args.reserve_gb if args.reserve_gb is not None else (0.5 if cpu else 2.0),
                      decode_efficiency=args.decode_efficiency or eff[0],
                      prefill_efficiency=args.prefill_efficiency or eff[1], price_per_hour=price,
                      max_tp=args.max_tp, max_pp=args.max_pp)


def cmd_plan(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from tokenloom.bench import hardware as H
    from tokenloom.bench.plan import plan

    if args.list:
        print_tables()
        return
    if not args.model:
        raise TokenloomError("plan needs MODEL_OR_CONFIG (a known model id, a .gguf, an HF folder or a config.json)")
    cpu, machine = args.cpu, None
    inst = H.instance(args.instance) if args.instance else None
    if cpu:
        hw, machine = _cpu_hardware(args.threads)
        if inst is not None:
            hw = replace(hw, price_per_hour=inst.price_per_hour)
    else:
        name = args.gpu or (inst.accelerator if inst else "") or "H100"
        if inst is not None and not inst.accelerator:
            raise TokenloomError(f"{inst.name} has no accelerator: use --cpu --instance {inst.name}")
        hw = H.accelerator(name)
        if inst is not None:
            hw = replace(hw, price_per_hour=inst.price_per_hour / inst.count)
    model = load_plan_model(args.model, args.dtype, args.kv_cache_dtype)
    res = plan(model, hw, build_inputs(args, hw, cpu), cpu=cpu)
    if machine is not None:
        res["machine"] = machine
    if args.json:
        print(json.dumps(res, default=str))
    else:
        print_plan(res)


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def print_plan(res: dict) -> None:
    m, hw, inp = res["model"], res["hardware"], res["inputs"]
    print(f"model     {m['name']}: {m['params'] / 1e9:.3f}B parameters, {m['weight_dtype']} weights "
          f"{m['weight_bytes'] / 1e9:.2f} GB, KV {m['kv_bytes_per_token']:.0f} B/token ({m['kv_dtype']}), "
          f"{m['decode_flops_per_token'] / 1e9:.2f} GFLOP/decode token, prefill {m['prefill_flops'] / 1e12:.3f} TFLOP")
    price = f"${inp['price_per_hour']:.3f}/device-h" if inp["price_per_hour"] is not None else "no price"
    print(f"hardware  {hw['name']}: {hw['memory_gb']:.0f} GB, {hw['bandwidth_gbs']:.0f} GB/s, "
          f"{hw['bf16_tflops']:.3g} TFLOP/s bf16, link {hw['link']}; {price}; efficiency: decode "
          f"{inp['decode_efficiency']:.0%} of bandwidth, prefill {inp['prefill_efficiency']:.0%} of GEMM")
    print(f"target    {inp['target_qps']:g} req/s, prompt {inp['prompt_len']}, output {inp['output_len']}, SLO TTFT "
          f"{inp['slo_ttft_ms']:g} ms, TPOT {inp['slo_tpot_ms']:g} ms")
    print(f"{'tp':>3}{'pp':>3}{'GB/rank':>9}{'KV tok/rank':>13}{'max seqs':>10}{'prefill tok/s':>14}"
          f"{'TPOT@1 ms':>10}{'batch':>6}{'TPOT ms':>9}{'QPS/repl':>10}{'repl':>6}{'devs':>6}{'TTFT ms':>9}"
          f"{'$/h':>9}{'$/1M out':>10}  SLO")
    for r in res["layouts"]:
        print(f"{r['tp']:>3}{r['pp']:>3}{r['weights_per_rank_gb']:>9.2f}{r['kv_tokens_per_rank']:>13,}"
              f"{r['max_concurrent_seqs']:>10,}{r['prefill_tok_s']:>14,.0f}{r['tpot_ms_batch1']:>10.2f}"
              f"{r['batch']:>6}{r['tpot_ms_at_batch']:>9.2f}{r['qps_per_replica']:>10.2f}{r['replicas']:>6}"
              f"{r['devices']:>6}{_fmt(r['ttft_ms'], '9.1f', '        -')}"
              f"{_fmt(r['usd_per_hour'], '9.2f', '        -')}"
              f"{_fmt(r['usd_per_million_output_tokens'], '10.3f', '         -')}  "
              f"{'yes' if r['meets_slo'] else ('no' if r['fits'] else 'does not fit')}")
    best = res["best"]
    if best is None:
        print("no layout meets the SLOs: relax them, shorten the lengths, or pick a larger accelerator",
              file=sys.stderr)
        return
    cost = ""
    if best["usd_per_hour"] is not None:
        cost = (f", ${best['usd_per_hour']:.2f}/h, ${best['usd_per_million_output_tokens']:.3f} per 1M output "
                f"tokens (${best['usd_per_million_tokens']:.3f} per 1M prompt + output)")
    print(f"best      tp={best['tp']} pp={best['pp']} x {best['replicas']} replica(s) = {best['devices']} device(s): "
          f"TTFT ~{best['ttft_ms']:.0f} ms, TPOT ~{best['tpot_ms']:.1f} ms at batch {best['batch_at_target']}{cost}")


def print_tables() -> None:
    from tokenloom.bench.hardware import ACCELERATORS, INSTANCES
    from tokenloom.bench.known_models import KNOWN

    print("accelerators (datasheet peaks, dense):")
    for a in ACCELERATORS.values():
        price = f"${a.price_per_hour:.2f}/h" if a.price_per_hour else "no list price"
        print(f"  {a.name:10} {a.memory_gb:5.0f} GB {a.bandwidth_gbs:6.0f} GB/s {a.bf16_tflops:6.0f} TFLOP/s bf16  "
              f"{a.link} {a.link_gbs:.0f} GB/s  {price}")
    print("instances (on-demand list prices, mid-2025; they drift):")
    for i in INSTANCES.values():
        print(f"  {i.name:18} ${i.price_per_hour:8.4f}/h  {i.hardware}")
    print("known models: " + ", ".join(KNOWN))
