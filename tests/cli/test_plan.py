"""`tokenloom plan`: memory, roofline bounds, layouts and cost against hand-computed values, the model sources it
reads, its errors, and the CPU plan against the default model's measured decode rate on this machine."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from tests.cli.test_cli import assert_clean_error, tokenloom
from tokenloom.bench import economics as E
from tokenloom.bench.hardware import accelerator
from tokenloom.bench.known_models import KNOWN
from tokenloom.bench.plan import Layout, PlanInputs, PlanModel, choose, plan

# Llama-3.1-8B by hand: linear parameters a token passes (q, k, v, o + MLP in 32 layers, the LM head)
LINEAR_8B = 32 * (41_943_040 + 176_160_768) + 525_336_576
DECODE_BYTES_8B = 2 * (LINEAR_8B + 4096 + 32 * 2 * 4096 + 4096)  # + one embedding row + the norms, bf16
LLAMA_8B_CONFIG = {  # meta-llama/Llama-3.1-8B's config.json (the fields tokenloom reads)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"}}


def run_plan(capsys, *argv: str) -> SimpleNamespace:
    """`tokenloom plan ARGV` in this process (the CLI's own entry point, without a Python start per call)."""
    from tokenloom.cli.main import main

    capsys.readouterr()
    rc = main(["plan", *argv])
    out = capsys.readouterr()
    return SimpleNamespace(returncode=rc, stdout=out.out, stderr=out.err)


def _llama8b(**kw) -> tuple[PlanModel, PlanInputs]:
    cfg = KNOWN["llama-3.1-8b"]
    model = PlanModel("llama-3.1-8b", cfg, "bf16", E.weight_bytes(cfg, "bf16"))
    inp = PlanInputs(**{**dict(target_qps=10, prompt_len=1024, output_len=256, slo_ttft_ms=500, slo_tpot_ms=50,
                               price_per_hour=12.29), **kw})
    return model, inp


def test_llama_8b_on_one_h100_by_hand():
    model, inp = _llama8b()
    h100 = accelerator("H100")
    lay = Layout(model, h100, inp, 1, 1)
    r = lay.evaluate()
    assert model.weight_bytes == 16_060_522_496 and r["weights_per_rank_gb"] == pytest.approx(16.06, abs=0.01)
    assert lay.kv_per_token_rank == 131072
    free = 80e9 * 0.9 - 16_060_522_496 - 2e9
    assert r["kv_tokens_per_rank"] == int(free / 131072)
    assert r["max_concurrent_seqs"] == int(free / 131072) // (1024 + 256)
    # prefill: 2 x linear x 1024 + causal attention 4 x heads x head_dim x layers x 1024 x 1025 / 2, at 55 % of 989 TF
    flops = 2 * LINEAR_8B * 1024 + 4 * 32 * 128 * 32 * 1024 * 1025 / 2
    assert r["prefill_ms"] == pytest.approx(flops / (989e12 * 0.55) * 1e3)
    # decode at batch 1: the weights once plus the KV of 1024 + 128 tokens, at 70 % of 3.35 TB/s
    assert r["tpot_ms_batch1"] == pytest.approx((DECODE_BYTES_8B + 1152 * 131072) / (3350e9 * 0.7) * 1e3)
    assert r["meets_slo"] and r["replicas"] == math.ceil(10 / r["qps_per_replica"])
    assert r["usd_per_hour"] == pytest.approx(12.29 * r["devices"])
    assert r["usd_per_million_output_tokens"] == pytest.approx(r["usd_per_hour"] / (3600 * 10 * 256) * 1e6)


def test_tensor_parallel_halves_the_bounds_and_adds_all_reduces():
    model, inp = _llama8b()
    h100 = accelerator("H100")
    one, two = Layout(model, h100, inp, 1, 1), Layout(model, h100, inp, 2, 1)
    assert two.weights_per_rank == one.weights_per_rank / 2 and two.kv_per_token_rank == 131072 / 2
    # two all-reduces a layer of 1 x 4096 bf16 values: ring 2 (tp - 1) / tp of the bytes over 450 GB/s, + 8 us
    comm = 32 * 2 * (8e-6 + 1 * 4096 * 2 / 450e9)
    assert two.tpot_s(1) == pytest.approx(one.tpot_s(1) / 2 + comm)
    comm_prefill = 32 * 2 * (8e-6 + 1024 * 4096 * 2 / 450e9)
    assert two.prefill_s == pytest.approx(one.prefill_s / 2 + comm_prefill)
    # a pipeline stage holds half the layers: the same TPOT bound (stages in turn), twice the sequences in flight
    pp = Layout(model, h100, inp, 1, 2)
    assert pp.kv_per_token_rank == 131072 / 2
    handoff = 8e-6 + 4096 * 2 / 450e9
    assert pp.tpot_s(1) == pytest.approx(one.tpot_s(1) + handoff)


def test_kv_heads_replicate_past_their_number():
    cfg = KNOWN["qwen2.5-7b"]  # 4 KV heads: at tp 8 every rank still holds one
    model = PlanModel("q", cfg, "bf16", E.weight_bytes(cfg, "bf16"))
    lay = Layout(model, accelerator("H100"), PlanInputs(), 8, 1)
    assert lay.kv_per_token_rank == 28 * 2 * 1 * 128 * 2


def test_70b_needs_four_h100s():
    cfg = KNOWN["llama-3.1-70b"]  # 141.1 GB in bf16: per rank 141.1 / tp against 80 x 0.9 - 2 = 70 GB
    model = PlanModel("70b", cfg, "bf16", E.weight_bytes(cfg, "bf16"))
    inp = PlanInputs(target_qps=1, prompt_len=512, output_len=128, slo_ttft_ms=2000, slo_tpot_ms=100)
    fits = {(lay.tp, lay.pp): lay.fits for lay in (Layout(model, accelerator("H100"), inp, t, 1) for t in (1, 2, 4))}
    assert fits == {(1, 1): False, (2, 1): False, (4, 1): True}
    res = plan(model, accelerator("H100"), inp)
    assert res["best"]["ranks"] >= 4 and all(not r["meets_slo"] for r in res["layouts"] if r["ranks"] < 4)


def test_the_cheapest_layout_meeting_the_slos_wins():
    model, inp = _llama8b(slo_tpot_ms=5.0)  # one H100 decodes a token in ~6.5 ms at best: too slow
    res = plan(model, accelerator("H100"), inp)
    rows = {(r["tp"], r["pp"]): r for r in res["layouts"]}
    assert rows[(1, 1)]["tpot_ms_batch1"] > 5 and not rows[(1, 1)]["meets_slo"]
    ok = [r for r in res["layouts"] if r["meets_slo"]]
    best = res["best"]
    assert best["tp"] >= 2 and best["usd_per_hour"] == min(r["usd_per_hour"] for r in ok)
    assert best["tpot_ms"] <= 5.0 and best["ttft_ms"] <= 500
    assert choose([{**best, "meets_slo": False}]) is None


def test_the_operating_point_keeps_littles_law_and_the_slos():
    model, inp = _llama8b(target_qps=200)
    res = plan(model, accelerator("H100"), inp)
    for r in res["layouts"]:
        if not r["meets_slo"]:
            continue
        q, p = r["qps_per_replica"], r["prefill_ms"] / 1000
        tpot_eff = r["tpot_ms_at_batch"] / 1000 / (1 - q * p)
        assert tpot_eff <= inp.slo_tpot_ms / 1000 + 1e-9
        assert q * inp.output_len * tpot_eff <= r["pp"] * r["batch"] + 1e-6  # the sequences fit the batch
        assert p / (1 - q * p) + r["tpot_ms_at_batch"] / 1000 <= inp.slo_ttft_ms / 1000 + 1e-9
        assert r["replicas"] == math.ceil(200 / q - 1e-9) and r["ttft_ms"] <= inp.slo_ttft_ms + 1e-6


def test_cli_json_for_a_known_id_and_its_config_json(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B_CONFIG))
    args = ["--gpu", "H100", "--target-qps", "10", "--prompt-len", "1024", "--output-len", "256", "--json"]
    by_id = json.loads(run_plan(capsys, "meta-llama/Llama-3.1-8B-Instruct", *args).stdout)
    by_config = json.loads(run_plan(capsys, str(tmp_path / "config.json"), *args).stdout)
    for res in (by_id, by_config):
        assert res["model"]["weight_bytes"] == 16_060_522_496 and res["model"]["kv_bytes_per_token"] == 131072
        assert res["model"]["params"] == 8_030_261_248
    assert by_id["layouts"] == by_config["layouts"] and by_id["best"]["meets_slo"]
    int4 = json.loads(run_plan(capsys, "llama-3.1-8b", "-q", "int4", *args).stdout)
    # int4 decoder weights (0.5 B + fp16 scale and zero per 128), embeddings and LM head in bf16
    want = (8_030_261_248 - 2 * 525_336_576 - 266_240) * (0.5 + 4 / 128) + 2 * 2 * 525_336_576 + 2 * 266_240
    assert int4["model"]["weight_bytes"] == pytest.approx(want)
    out = run_plan(capsys, "llama-3.1-8b", "--instance", "g6.xlarge").stdout
    assert "L4" in out and "$0.805/device-h" in out and "best" in out


def test_an_hf_folder_is_sized_by_its_files(tiny_llama, capsys):
    from tokenloom.loader.safetensors import safetensors_files

    path, _ = tiny_llama
    res = json.loads(run_plan(capsys, str(path), "--gpu", "L4", "--json", "--prompt-len", "64").stdout)
    assert res["model"]["weight_bytes"] == sum(f.stat().st_size for f in safetensors_files(path))
    assert res["model"]["weight_dtype"] == "float32"


@pytest.mark.slow
def test_a_gguf_file_is_sized_by_its_tensors(default_gguf, tmp_path):
    from tokenloom.gguf.loader import open_gguf_checked

    known = json.dumps({key: dict(read_bandwidth=10e9, copy_bandwidth=1e10, gemm_bf16=1e12, gemm_fp32=1e11,
                                  measured_at="test", threads=2, llc_bytes=0, cpu="test") for key in _keys()})
    (tmp_path / "roofs.json").write_text(known)
    proc = tokenloom("plan", str(default_gguf), "--cpu", "--prompt-len", "128", "--output-len", "64", "--json",
                     env={"TOKENLOOM_ROOFLINE": str(tmp_path / "roofs.json")})
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    file_bytes = sum(int(t.n_bytes) for t in open_gguf_checked(str(default_gguf)).tensors)
    assert res["model"]["weight_bytes"] == file_bytes and res["model"]["weight_dtype"] == "q4_1"
    assert res["hardware"]["bandwidth_gbs"] == 10.0 and len(res["layouts"]) == 1
    r = res["layouts"][0]
    kv = (128 + 32) * 30 * 2 * 3 * 64 * 2
    decode = E.decode_weight_bytes(E_cfg(res), "q4_1", 1) * file_bytes / E.weight_bytes(E_cfg(res), "q4_1")
    assert r["tpot_ms_batch1"] == pytest.approx((decode + kv) / (10e9 * 0.5) * 1e3)


def E_cfg(res):
    from tokenloom.config import ModelConfig

    return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in res["model"]["config"].items()})


def _keys():
    from tokenloom.bench.roofline import _cache_key

    return [_cache_key(t) for t in range(1, 257)]


def test_errors_are_one_line(capsys):
    assert_clean_error(tokenloom("plan", "no-such-model-xyz"), "not found", "--list")  # as a user runs it
    assert_clean_error(run_plan(capsys, "llama-3.1-8b", "--gpu", "TPU9"), "unknown accelerator", "H100")
    assert_clean_error(run_plan(capsys, "llama-3.1-8b", "-q", "int3"), "unknown weight dtype")
    assert_clean_error(run_plan(capsys, "llama-3.1-8b", "--target-qps", "0"), "--target-qps")
    assert_clean_error(run_plan(capsys, "llama-3.1-8b", "--instance", "c7i.8xlarge"), "--cpu")
    assert_clean_error(run_plan(capsys), "MODEL_OR_CONFIG")
    listing = run_plan(capsys, "--list")
    assert listing.returncode == 0 and "p5.48xlarge" in listing.stdout and "llama-3.1-70b" in listing.stdout


@pytest.mark.slow
def test_cpu_plan_against_the_measured_decode_rate(default_gguf, tmp_path):
    """The CPU plan's batch-1 decode and prefill (this machine's roofs, measured in this run, at the stated
    efficiencies) against the default model's rates measured by `bench latency` in the same run: within a factor
    of 3 either way (the weights, ~100 MB, may sit in a large last-level cache and beat the DRAM roof; the machine
    is shared and noisy). One thread: the roofs and the model share it alike."""
    env = {"TOKENLOOM_ROOFLINE": str(tmp_path / "roofs.json")}
    planned = tokenloom("plan", str(default_gguf), "--cpu", "--threads", "1", "--prompt-len", "64",
                        "--output-len", "32", "--json", env=env)
    assert planned.returncode == 0, planned.stderr
    layout = json.loads(planned.stdout)["layouts"][0]
    measured = tokenloom("bench", "latency", str(default_gguf), "--threads", "1", "--input-len", "64",
                         "--output-len", "32", "--num-iters", "2", "--json", env=env)
    assert measured.returncode == 0, measured.stderr
    res = json.loads(measured.stdout)
    assert 1 / 3 < res["decode_tok_s"] / (1000 / layout["tpot_ms_batch1"]) < 3, (res, layout)
    assert 1 / 3 < res["prefill_tok_s"] / layout["prefill_tok_s"] < 3, (res, layout)
