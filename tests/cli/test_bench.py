"""`tokenloom bench latency|throughput`: --json output, and --compare llama.cpp on the same GGUF file (llama.cpp's
own tools stood in for by scripts that answer as they do, so the parsing, the ratio and the errors are checked
without building llama.cpp)."""
from __future__ import annotations

import json
import os
import stat
import statistics
import subprocess
import sys

import pytest

from tests.cli.test_cli import assert_clean_error, tokenloom

pytestmark = pytest.mark.slow  # each runs the default model in a subprocess

LLAMA_BENCH = """#!/bin/sh
# answers as llama-bench -o json does: one row per test; -p 0 -n N -d D is decode at depth D
case "$*" in
  *"-n 0"*) echo '[{"n_prompt": 16, "n_gen": 0, "n_depth": 0, "avg_ts": 400.0}]' ;;
  *) echo "$*" > "$(dirname "$0")/decode_args"; echo '[{"n_prompt": 0, "n_gen": 8, "n_depth": 16, "avg_ts": 50.0}]' ;;
esac
"""

BATCHED_BENCH = """#!/bin/sh
echo 'main: some log line'
echo '{"pp": 16, "tg": 8, "pl": 4, "n_kv": 96, "t_pp": 0.5, "speed_pp": 128.0, "t_tg": 1.5, "speed_tg": 21.3, "t": 2.0, "speed": 48.0}'
"""


@pytest.fixture()
def fake_llama_cpp(tmp_path):
    for name, body in (("llama-bench", LLAMA_BENCH), ("llama-batched-bench", BATCHED_BENCH)):
        path = tmp_path / name
        path.write_text(body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return tmp_path


def test_latency_json_with_llama_cpp_on_the_same_file(default_gguf, fake_llama_cpp):
    proc = tokenloom("bench", "latency", str(default_gguf), "--input-len", "16", "--output-len", "8",
                     "--num-iters", "1", "--compare", "llama.cpp", "--llama-cpp-bin", str(fake_llama_cpp), "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)  # stdout is the JSON alone; the table went to stderr
    assert "tokenloom" in proc.stderr and "llama.cpp" in proc.stderr
    assert res["weights"] == "gguf" and res["decode_path"] == "fused"
    assert res["llama_cpp"] == {"prefill_tok_s": 400.0, "decode_tok_s": 50.0, "via": "llama-bench"}
    assert res["ratio_decode"] == pytest.approx(res["decode_tok_s"] / 50.0)
    assert res["ratio_prefill"] == pytest.approx(res["prefill_tok_s"] / 400.0)
    decode_args = (fake_llama_cpp / "decode_args").read_text().split()
    assert decode_args[decode_args.index("-d") + 1] == "16"  # llama.cpp decodes after the same prompt length
    assert decode_args[decode_args.index("-m") + 1] == str(default_gguf)


def test_throughput_json_with_llama_batched_bench(default_gguf, fake_llama_cpp):
    proc = tokenloom("bench", "throughput", str(default_gguf), "--num-prompts", "4", "--input-len", "16",
                     "--output-len", "8", "--compare", "llama.cpp", "--llama-cpp-bin", str(fake_llama_cpp), "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["llama_cpp"]["out_tok_s"] == pytest.approx(4 * 8 / 2.0)  # output tokens over the whole run
    assert res["llama_cpp"]["decode_tok_s"] == 21.3
    assert res["ratio_out_tok_s"] == pytest.approx(res["out_tok_s"] / 16.0)


def test_compare_needs_a_gguf_model(tmp_path, fake_llama_cpp):
    from tests.conftest import make_tiny

    make_tiny("llama", tmp_path / "m")
    proc = tokenloom("bench", "latency", str(tmp_path / "m"), "--input-len", "8", "--output-len", "4",
                     "--num-iters", "1", "--compare", "llama.cpp", "--llama-cpp-bin", str(fake_llama_cpp))
    assert_clean_error(proc, "GGUF")


def test_compare_without_llama_cpp_says_how_to_get_it(default_gguf, tmp_path):
    from tokenloom.config import tokenloom_home

    # no llama-bench anywhere (HOME moved: not in ~/.cache/llamacpp either), the model and kernels where they are
    env = dict(os.environ, PATH=os.path.dirname(os.__file__) + ":/usr/bin:/bin", HOME=str(tmp_path),
               TOKENLOOM_HOME=str(tokenloom_home()), TOKENLOOM_LLAMA_CPP_BIN="")
    proc = tokenloom("bench", "latency", str(default_gguf), "--input-len", "8", "--output-len", "4",
                     "--num-iters", "1", "--compare", "llama.cpp", env=env)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        assert_clean_error(proc, "llama-bench", "llama-cpp-python")
    else:  # the binding measures, or (a build that dies on this CPU) says so in one line, tokenloom still standing
        if proc.returncode != 0:
            assert_clean_error(proc, "llama-cpp-python died of", "--llama-cpp-bin")


def test_spec_json(default_gguf):
    """`bench spec`: every method beside none on the same tasks, greedy outputs identical, figures in JSON."""
    proc = tokenloom("bench", "spec", str(default_gguf), "--methods", "ngram,layer_skip", "--batch", "1,2",
                     "--rounds", "1", "--output-len", "12", "--tasks", "reformat_json,chat", "-k", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    rows = {(r["method"], r["task"], r["batch"]): r for r in res["results"]}
    assert set(rows) == {(m, t, b) for m in ("none", "ngram", "layer_skip") for t in ("reformat_json", "chat")
                         for b in (1, 2)}
    assert all(r["identical"] and r["decode_tok_s"] > 0 for r in rows.values())
    assert all(rows[("none", t, b)]["speedup"] == 1.0 for t in ("reformat_json", "chat") for b in (1, 2))
    assert "ngram/batch1/grounded" in res["geomean_speedup"]


def test_spec_rejects_an_unknown_method(default_gguf):
    proc = tokenloom("bench", "spec", str(default_gguf), "--methods", "magic", "--rounds", "1")
    assert_clean_error(proc, "unknown method")


def test_structured_json(default_gguf):
    """`bench structured`: constrained and free runs of the same batch, same run; every constrained output that
    closed validates against its schema; the ratio is the constrained rate over the free one."""
    proc = tokenloom("bench", "structured", str(default_gguf), "--concurrency", "4", "--rounds", "2",
                     "--output-len", "160", "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["concurrency"] == 4 and len(res["ratios"]) == 2 and res["free_full_tok_s"] > 0
    assert all(r > 0 for r in res["ratios"])  # the report's ratio is the median of its rounds' (noise is theirs)
    assert res["ratio"] == pytest.approx(statistics.median(res["ratios"]))
    assert res["finished"] > 0 and res["valid"] == res["finished"]
    assert res["mask_ms_per_step"] > 0 and "decode over the first" in proc.stderr


@pytest.mark.slow
def test_serve_chaos_json(default_gguf):
    """The reliability load against a real server: every malformed body is a 4xx, no 5xx, no hang, and at rest
    no KV block is held."""
    from tests.entrypoints.test_server import start_serve

    proc, url = start_serve(str(default_gguf), "--max-model-len", "2048", "--kv-cache-memory", "256MiB",
                            "--kv-release-interval", "0.5")
    try:
        out = subprocess.run([sys.executable, "-m", "tokenloom", "bench", "serve", "--chaos", "--base-url", url,
                              "--num-prompts", "60", "--concurrency", "8", "--malformed", "0.3", "--disconnect", "0.2",
                              "--hang-timeout", "120", "--rest-timeout", "30", "--price-per-hour", "3.6", "--json"],
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr
        res = json.loads(out.stdout)
        assert res["server_errors"] == 0 and res["hangs"] == 0 and res["transport_errors"] == {}, res
        assert res["accepted_malformed"] == 0 and res["refused_valid"] == {}, res
        n_bad = sum(res["client_errors"].values())
        assert n_bad > 5 and res["disconnected"] > 3 and res["completed"] > 15
        assert res["completed"] + res["disconnected"] + n_bad == 60
        assert res["kv_blocks_used_at_rest"] == 0 and res["rss_after_bytes"] > 0
        assert "4xx (malformed)" in out.stderr and "RSS at rest" in out.stderr
        econ = res["economics"]  # from the server's own token counters over the load
        rate, d = econ["cost"]["tok_s"], econ["decode"]
        assert rate > 0 and d["batch"] == 8 and 0 < d["ctx"] < 2048
        assert econ["cost"]["usd_per_million_tokens"] == pytest.approx(3.6 / (3600 * rate) * 1e6)
        assert d["bandwidth_share"] == pytest.approx(d["bytes_per_token"] * rate / econ["roofs"]["bandwidth"])
    finally:
        proc.kill()
        proc.wait()


CRASHING_TOOL = """#!/bin/sh
# as an llama.cpp build whose AMX kernels for repacked weights die of SIGILL: fine only with repacking off
case "$*" in
  *"--repack 0"*|*"--no-repack"*) echo "$*" >> "$(dirname "$0")/args" ;;
  *) kill -ILL $$ ;;
esac
case "$0" in
  *batched*) echo '{"pp": 16, "tg": 8, "pl": 4, "t": 2.0, "speed": 48.0, "speed_tg": 21.3}' ;;
  *) echo '[{"avg_ts": 75.0}]' ;;
esac
"""


def test_a_build_that_dies_with_repacked_weights_runs_again_without(tmp_path):
    from tokenloom.bench import llamacpp

    for name in ("llama-bench", "llama-batched-bench"):
        (tmp_path / name).write_text(CRASHING_TOOL)
        (tmp_path / name).chmod(0o755)
    lat = llamacpp.latency("m.gguf", 2, 16, 8, 1, bin_dir=str(tmp_path))
    assert lat["decode_tok_s"] == 75.0 and lat["via"] == "llama-bench, repacking off: the default died of SIGILL"
    thr = llamacpp.batched("m.gguf", 2, 16, 8, 4, bin_dir=str(tmp_path))
    assert thr["out_tok_s"] == 16.0 and "repacking off" in thr["via"]
    assert len((tmp_path / "args").read_text().splitlines()) == 3  # every figure from the plain kernels
    (tmp_path / "llama-bench").write_text("#!/bin/sh\nkill -ILL $$\n")  # dies either way: one clear error
    with pytest.raises(Exception, match="died of SIGILL on this CPU, also with repacking off"):
        llamacpp.latency("m.gguf", 2, 16, 8, 1, bin_dir=str(tmp_path))
