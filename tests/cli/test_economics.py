"""The economics of a token (bench/economics.py, roofline.py, token_economics.py, plots.py): parameter, byte and
FLOP counts against published parameter counts, transformers' own models and hand-computed values; the cost
formula; the roofline cache; the bench reports' economics section against its own inputs; the PNG charts."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from tests.cli.test_cli import assert_clean_error, tokenloom
from tokenloom.bench import economics as E
from tokenloom.bench.known_models import KNOWN, known_config
from tokenloom.config import ModelConfig, TokenloomError

# Published parameter counts (the Hugging Face model cards / safetensors metadata).
PUBLISHED = {"llama-3.1-8b": 8_030_261_248, "llama-3.1-70b": 70_553_706_496, "llama-3.2-1b": 1_235_814_400,
             "llama-3.2-3b": 3_212_749_824, "qwen2.5-0.5b": 494_032_768, "qwen2.5-7b": 7_615_616_512,
             "qwen3-8b": 8_190_735_360, "mixtral-8x7b": 46_702_792_704, "gemma-2-9b": 9_241_705_984}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_the_published_ones(name):
    assert E.param_counts(KNOWN[name]).total == PUBLISHED[name]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mixtral"])
def test_parameter_counts_match_transformers(arch, tmp_path):
    from tests.conftest import make_tiny
    from tokenloom.model_executor.model_loader import config_from_hf

    model = make_tiny(arch, tmp_path)
    cfg = config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert E.param_counts(cfg).total == sum(p.numel() for p in model.parameters())


def test_llama_3_1_8b_bytes_and_flops_by_hand():
    cfg = known_config("meta-llama/Llama-3.1-8B-Instruct")[1]
    assert E.weight_bytes(cfg, "bf16") == 2 * 8_030_261_248  # 16.06 GB
    assert E.kv_bytes_per_token(cfg, "bf16") == 2 * 32 * 8 * 128 * 2 == 131072
    assert E.kv_bytes_per_token(cfg, "int8") == 32 * 2 * 8 * (128 + 4)  # int8 + a float32 scale per token and head
    # linear parameters a token passes: 32 x (q, k, v, o = 41,943,040 + MLP 176,160,768) + LM head 525,336,576
    linear = 32 * (41_943_040 + 176_160_768) + 525_336_576
    assert E.decode_flops_per_token(cfg, 0) == 2 * linear
    assert E.decode_flops_per_token(cfg, 1000) == 2 * linear + 4 * 32 * 128 * 1000 * 32
    assert E.kv_bytes_read(cfg, 1000) == 1000 * 131072
    p = 7
    assert E.prefill_flops(cfg, p) == pytest.approx(sum(E.decode_flops_per_token(cfg, t) for t in range(1, p + 1)))
    # a decode step reads every linear weight and the LM head, one embedding row per token, the norms
    assert E.decode_weight_bytes(cfg, "bf16", 1) == 2 * (linear + 4096 + 32 * 2 * 4096 + 4096)
    assert E.weight_bytes(KNOWN["llama-3.1-70b"], "bf16") / 1e9 == pytest.approx(141.1, abs=0.05)


def test_sliding_window_layers_read_their_window():
    cfg = KNOWN["gemma-2-9b"]  # 42 layers, every other one a 4096-token window
    assert E.kv_bytes_read(cfg, 8192) == 2 * 8 * 256 * 2 * (21 * 4096 + 21 * 8192)
    assert E.attention_flops(cfg, 8192) == 4 * 16 * 256 * (21 * 4096 + 21 * 8192)
    assert E.kv_bytes_read(cfg, 100) == 2 * 8 * 256 * 2 * 42 * 100


def test_quantized_forms_and_moe():
    assert E.bytes_per_weight("q4_1") == 20 / 32 and E.bytes_per_weight("Q4_K") == 144 / 256
    assert E.bytes_per_weight("q8_0") == 34 / 32 and E.bytes_per_weight("int8") == 1.0
    with pytest.raises(TokenloomError, match="unknown weight dtype"):
        E.bytes_per_weight("int3")
    cfg = KNOWN["mixtral-8x7b"]
    assert E.expected_experts_touched(8, 2, 1) == pytest.approx(2)
    assert E.expected_experts_touched(8, 2, 64) == pytest.approx(8, abs=1e-6)
    expert = 3 * 4096 * 14336
    one = E.decode_weight_bytes(cfg, "bf16", 1)
    # 1000 tokens route to all 8 experts of each layer (6 more than one token's 2) and read 999 more embedding rows
    assert E.decode_weight_bytes(cfg, "bf16", 1000) - one == pytest.approx(2 * (6 * 32 * expert + 999 * 4096))
    # one token: attention, its 2 experts and the router in 32 layers, the LM head, its embedding row, the norms
    active = 32 * (41_943_040 + 2 * expert + 4096 * 8) + 32000 * 4096 + 4096 + (32 * 2 * 4096 + 4096)
    assert one == 2 * active
    assert (active + 32000 * 4096) / 1e9 == pytest.approx(12.9, abs=0.15)  # Mistral's "12.9B active" (with the table)


def test_cost_and_shares_by_hand():
    assert E.cost_per_million(3.6, 1000.0) == pytest.approx(1.0)  # $3.6/h at 1000 tok/s: 3.6M tokens an hour
    assert E.cost_per_million(0.805, 250.0) == pytest.approx(0.805 / 0.9)
    assert E.cost_per_million(None, 10.0) is None and E.cost_per_million(1.0, 0.0) is None
    roofs = E.Roofs(bandwidth=10e9, gemm_bf16=1e12, gemm_fp32=1e11)
    s = E.shares(roofs, "bfloat16", bytes_per_token=1e8, flops_per_token=2e9, tok_s=50.0)
    assert s["bandwidth_share"] == pytest.approx(0.5) and s["gemm_share"] == pytest.approx(0.1)
    assert E.shares(roofs, "float32", 1e8, 2e9, 50.0)["gemm_share"] == pytest.approx(1.0)


def test_prices_from_args():
    from tokenloom.bench.hardware import INSTANCES, price_from_args

    assert price_from_args(SimpleNamespace(price_per_hour=2.5, instance="p5.48xlarge"))[0] == 2.5  # given wins
    assert price_from_args(SimpleNamespace(price_per_hour=None, instance="c7i.8xlarge"))[0] == \
        INSTANCES["c7i.8xlarge"].price_per_hour
    assert price_from_args(SimpleNamespace(price_per_hour=None, instance=None)) == (None, "")
    with pytest.raises(TokenloomError, match="unknown instance"):
        price_from_args(SimpleNamespace(price_per_hour=None, instance="z9.huge"))
    with pytest.raises(TokenloomError, match=">= 0"):
        price_from_args(SimpleNamespace(price_per_hour=-1.0, instance=None))


def test_best_rate_is_amount_over_the_fastest_round():
    import time

    from tokenloom.bench.roofline import _best_rate

    delays = iter([0.0, 0.08, 0.04, 0.06])
    rate = _best_rate(lambda: time.sleep(next(delays)), 1e9, rounds=3)
    assert 1e9 / 0.05 < rate <= 1e9 / 0.04  # the 0.04 s round, plus the call's own overhead


def test_roofline_cache_keeps_the_best_roofs(tmp_path, monkeypatch):
    from tokenloom.bench import roofline

    monkeypatch.setenv("TOKENLOOM_ROOFLINE", str(tmp_path / "roofs.json"))
    figures = iter([dict(read_bandwidth=10e9, copy_bandwidth=12e9, gemm_bf16=1e12, gemm_fp32=1e11),
                    dict(read_bandwidth=6e9, copy_bandwidth=13e9, gemm_bf16=2e12, gemm_fp32=0.5e11)])
    calls = []

    def fake_measure(buffer=None):
        calls.append(buffer)
        return dict(next(figures), measured_at="now", threads=2, llc_bytes=0, cpu="test")

    monkeypatch.setattr(roofline, "measure", fake_measure)
    roofs, _ = roofline.machine_roofs()
    assert roofs.bandwidth == 10e9 and len(calls) == 1
    assert roofline.machine_roofs()[0].bandwidth == 10e9 and len(calls) == 1  # from the cache
    roofs, raw = roofline.machine_roofs(refresh=True, buffer=1 << 20)
    assert calls[-1] == 1 << 20
    assert (roofs.bandwidth, roofs.gemm_bf16, roofs.gemm_fp32) == (10e9, 2e12, 1e11)  # best of each roof
    assert raw["last"]["read_bandwidth"] == 6e9


def test_bandwidth_and_gemm_measure_something():
    from tokenloom.bench.roofline import measure_bandwidth, measure_gemm

    bw = measure_bandwidth(16 << 20, rounds=2)
    assert bw["read"] > 1e8 and bw["copy"] > 1e8 and bw["buffer_bytes"] == 16 << 20
    g = measure_gemm(torch.float32, (64, 128), rounds=2)
    assert g["flops"] == max(g["per_size"].values()) > 1e6


def _model_bytes(model, skip_embedding: bool) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if not (skip_embedding and "embed_tokens" in n))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loaded_step_bytes_match_the_transformers_model(tiny_llama, dtype):
    """A float model's decode step reads all its weights but the embedding table (one row a token)."""
    from tokenloom import LLM
    from tokenloom.bench.token_economics import loaded_step_bytes

    path, hf = tiny_llama
    assert not hf.config.tie_word_embeddings
    llm = LLM(str(path), dtype=dtype, max_model_len=256, kv_cache_memory=8 << 20)
    size = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    want = _model_bytes(hf, skip_embedding=True) * size // 4
    row = 64 * size
    assert loaded_step_bytes(llm.engine, 1) == pytest.approx(want + row, rel=0.002)
    assert loaded_step_bytes(llm.engine, 3) == pytest.approx(want + 3 * row, rel=0.002)


@pytest.mark.slow
def test_default_model_reads_about_its_gguf_tensors(default_gguf):
    """SmolLM2 Q4_1 (tied embeddings, read whole as the LM head): a decode step reads about the file's tensor
    bytes (the compiled stack's float16 block scales; int4 with float32 scales on the layer-by-layer path)."""
    from tokenloom import LLM
    from tokenloom.bench.token_economics import loaded_step_bytes
    from tokenloom.gguf.loader import open_gguf_checked

    file_bytes = sum(int(t.n_bytes) for t in open_gguf_checked(str(default_gguf)).tensors)
    llm = LLM(str(default_gguf), max_model_len=256, kv_cache_memory=8 << 20)
    fused = llm.engine.runner.fused is not None
    assert loaded_step_bytes(llm.engine, 1) == pytest.approx(file_bytes, rel=0.05 if fused else 0.25)


# ---- PNG charts --------------------------------------------------------------------------------------------
def _assert_png(path):
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_charts_are_valid_pngs(tmp_path, monkeypatch):
    from tokenloom.bench import plots

    runs = [{"concurrency": c, "out_tok_s": 10.0 * c, "req_s": c / 3, "goodput_req_s": c / 4,
             "ttft_ms": {"p50": 50.0 * c, "p90": 80.0 * c}, "tpot_ms": {"p50": 20.0 + c, "p90": 30.0 + c}}
            for c in (1, 2, 4, 8)]
    rows = [{"label": "original (bfloat16)", "method": "original", "decode_tok_s": 50.0, "dppl_pct": 0.0, "ppl": 10.0,
             "weight_bytes": 270e6},
            {"label": "int4", "method": "int4", "decode_tok_s": 90.0, "dppl_pct": 3.5, "ppl": 10.35,
             "weight_bytes": 90e6}]
    paths = [plots.throughput_vs_concurrency(runs, tmp_path / "a" / "tput.png", "t"),
             plots.latency_distributions([0.1, 0.2, 0.25, 0.5], [0.01, 0.02, 0.015, 0.03], tmp_path / "lat.png", "t"),
             plots.quality_vs_speed(rows, tmp_path / "qs.png", "t"), plots.quant_bars(rows, tmp_path / "bars.png", "t")]
    for p in paths:
        _assert_png(p)
    monkeypatch.setattr(plots, "_pyplot", lambda: (_ for _ in ()).throw(TokenloomError("no matplotlib")))
    bare = plots.quant_bars(rows, tmp_path / "bare.png", "t")  # the fallback, still a PNG
    assert bare.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(TokenloomError, match="matplotlib"):
        plots.quality_vs_speed(rows, tmp_path / "none.png", "t")


# ---- the bench reports ----------------------------------------------------------------------------------------
@pytest.fixture()
def known_roofs(tmp_path):
    """A roofline cache with known roofs for this machine's key, so reports are checked against them."""
    from tokenloom.bench.roofline import _cache_key

    path = tmp_path / "roofs.json"
    env = {"TOKENLOOM_ROOFLINE": str(path)}
    entry = dict(read_bandwidth=10e9, copy_bandwidth=15e9, gemm_bf16=1e12, gemm_fp32=2e11, measured_at="test",
                 threads=0, llc_bytes=0, cpu="test")
    path.write_text(json.dumps({_cache_key(t): entry for t in range(1, 257)}))
    return env


@pytest.mark.slow
def test_latency_report_economics(default_gguf, known_roofs):
    proc = tokenloom("bench", "latency", str(default_gguf), "--input-len", "16", "--output-len", "8",
                     "--num-iters", "1", "--instance", "c7i.xlarge", "--json", env=known_roofs)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    econ = res["economics"]
    d, p, c = econ["decode"], econ["prefill"], econ["cost"]
    assert econ["roofs"]["bandwidth"] == 10e9 and "economics" in proc.stderr
    assert d["tok_s"] == res["decode_tok_s"] and d["ctx"] == 16 + 4 and d["batch"] == 1
    assert d["bytes_per_token"] == pytest.approx(d["weight_bytes_per_step"] + d["kv_bytes_per_token"])
    assert d["kv_bytes_per_token"] == 20 * 30 * 2 * 3 * 64 * 2  # SmolLM2: 30 layers, 3 KV heads of 64, bf16
    assert d["bandwidth_share"] == pytest.approx(d["bytes_per_token"] * res["decode_tok_s"] / 10e9)
    assert d["gemm_share"] == pytest.approx(d["flops_per_token"] * res["decode_tok_s"] / 1e12)
    assert p["tok_s"] == pytest.approx(res["prefill_tok_s"])
    assert c["price_per_hour"] == 0.1785
    assert c["usd_per_million_tokens"] == pytest.approx(0.1785 / (3600 * res["decode_tok_s"]) * 1e6)


def test_bench_price_flags_are_checked_before_the_run():
    assert_clean_error(tokenloom("bench", "latency", "/nonexistent.gguf", "--instance", "z9.huge"),
                       "unknown instance", "c7i.8xlarge")
    assert_clean_error(tokenloom("bench", "throughput", "/nonexistent.gguf", "--price-per-hour", "-2"), ">= 0")


@pytest.mark.slow
def test_roofline_command(default_gguf, tmp_path):
    env = {"TOKENLOOM_ROOFLINE": str(tmp_path / "roofs.json")}
    proc = tokenloom("bench", "roofline", str(default_gguf), "--buffer", "64MiB", "--threads", "1", "--input-len", "16",
                     "--output-len", "8", "--batch", "2", "--num-iters", "1", "--json", env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    m = res["machine"]
    assert m["buffer_bytes"] == 64 << 20 and m["read_bandwidth"] > 0 and m["gemm_bf16"] > 0
    assert json.loads((tmp_path / "roofs.json").read_text())  # cached for the other reports
    for key in ("economics", "economics_batch"):
        d = res[key]["decode"]
        assert d["bandwidth_share"] == pytest.approx(d["bytes_per_token"] * d["tok_s"] / m["read_bandwidth"])
    assert res["economics_batch"]["decode"]["batch"] == 2
    assert math.isfinite(res["economics"]["prefill"]["gemm_share"])


@pytest.mark.slow
def test_serve_over_several_concurrencies_with_charts(tiny_llama, tmp_path, known_roofs, monkeypatch):
    """`bench serve --concurrency 1,2 --plot DIR` against a live server: one run per level, the charts written and
    readable, and the economics of the busiest level from what /api/show says of the model."""
    import threading
    import time

    import uvicorn

    from tokenloom import LLM
    from tokenloom.bench.serve import bench_serve
    from tokenloom.engine.async_engine import AsyncEngine
    from tokenloom.entrypoints.server import build_app

    monkeypatch.setenv("TOKENLOOM_ROOFLINE", known_roofs["TOKENLOOM_ROOFLINE"])
    path, _ = tiny_llama
    engine = AsyncEngine(LLM(str(path), dtype="float32", max_model_len=256, kv_cache_memory=16 << 20).engine).start()
    server = uvicorn.Server(uvicorn.Config(build_app(engine, None), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.02)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    try:
        args = SimpleNamespace(base_url=url, model=None, num_prompts=6, request_rate=float("inf"), concurrency="1,3",
                               input_len=8, output_len=6, dist="fixed", slo_ttft_ms=60000.0, slo_tpot_ms=60000.0,
                               api_key=None, seed=0, plot=str(tmp_path / "charts"), price_per_hour=3.6, instance=None)
        res = bench_serve(args)
    finally:
        server.should_exit = True
        thread.join(15)
        engine.shutdown()
    assert res["concurrency"] == [1, 3] and [r["completed"] for r in res["runs"]] == [6, 6]
    assert all("_raw" not in r for r in res["runs"])
    json.dumps(res)  # the report is JSON as it is
    names = sorted(p.rsplit("/", 1)[-1] for p in res["charts"])
    assert names == ["serve_latency_c1.png", "serve_latency_c3.png", "serve_throughput.png"]
    for p in res["charts"]:
        _assert_png(__import__("pathlib").Path(p))
    top = max(res["runs"], key=lambda r: r["out_tok_s"])
    econ = res["economics"]
    assert econ["cost"]["usd_per_million_tokens"] == pytest.approx(3.6 / (3600 * top["out_tok_s"]) * 1e6)
    d = econ["decode"]  # the tiny model: 2 layers, 2 KV heads of 16, bf16 KV at context 8 + 3
    assert d["kv_bytes_per_token"] == 11 * 2 * 2 * 2 * 16 * 2
    assert d["bandwidth_share"] == pytest.approx(d["bytes_per_token"] * top["out_tok_s"] / 10e9)


def test_economics_of_a_model_not_loaded_here_and_of_split_ranks(tiny_llama, known_roofs, monkeypatch, capsys,
                                                                   tmp_path):
    """The sections the multi-process reports print (bench disagg: a model in worker processes, known by its
    architecture and stored size; bench parallel: the weights of every rank), checked by hand."""
    from tokenloom import LLM
    from tokenloom.bench.disagg import _stored_bytes
    from tokenloom.bench.token_economics import model_section, section

    monkeypatch.setenv("TOKENLOOM_ROOFLINE", known_roofs["TOKENLOOM_ROOFLINE"])
    path, _ = tiny_llama
    llm = LLM(str(path), dtype="float32", max_model_len=64, kv_cache_memory=4 << 20)
    cfg, args = llm.engine.model_config, SimpleNamespace(price_per_hour=3.6, instance=None)
    kv = 10 * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2  # bf16 K and V read at context 10
    sec = model_section(args, cfg, 1e6, 100.0, 4, 10)
    d = sec["decode"]
    assert d["kv_bytes_per_token"] == kv and d["bytes_per_token"] == pytest.approx(1e6 / 4 + kv)
    assert d["bandwidth_share"] == pytest.approx((1e6 / 4 + kv) * 100 / 10e9)
    assert sec["cost"]["usd_per_million_tokens"] == pytest.approx(3.6 / (3600 * 100) * 1e6)
    assert "economics" in capsys.readouterr().out
    split = section(llm.engine, args, decode={"tok_s": 50.0, "batch": 2, "ctx": 10}, step_bytes=3e6, show=False)
    assert split["decode"]["weight_bytes_per_step"] == 3e6 and capsys.readouterr().out == ""
    assert split["decode"]["bytes_per_token"] == pytest.approx(3e6 / 2 + split["decode"]["kv_bytes_per_token"])
    stored = sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")
    assert stored > 0 and _stored_bytes(path) == stored
    (tmp_path / "m.gguf").write_bytes(b"x" * 1234)
    assert _stored_bytes(tmp_path / "m.gguf") == 1234
