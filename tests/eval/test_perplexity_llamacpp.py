"""llama.cpp-compatible perplexity: llama-perplexity's chunking (floor(tokens / n_ctx) chunks, BOS in place of
each chunk's first token when the model adds BOS, only the second half of each chunk scored), checked against a
transformers forward on a tiny model and against the llama-perplexity binary on the default model."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from tokenloom.config import TokenloomError
from tokenloom.eval.perplexity import llamacpp_chunks, llamacpp_perplexity, llamacpp_text

LLAMA_PERPLEXITY = Path(os.environ.get("LLAMACPP_BIN", Path.home() / ".cache/llamacpp/bin")) / "llama-perplexity"


def test_chunks_follow_llama_perplexity():
    ids = list(range(100, 123))  # 23 tokens
    assert llamacpp_chunks(ids, 8, None) == [ids[0:8], ids[8:16]]  # the 7 left over are dropped
    assert llamacpp_chunks(ids, 8, 1) == [[1] + ids[1:8], [1] + ids[9:16]]  # each chunk starts with BOS
    assert llamacpp_chunks(ids, 5, None, max_chunks=3) == [ids[0:5], ids[5:10], ids[10:15]]
    with pytest.raises(TokenloomError, match="at least 24 tokens"):
        llamacpp_chunks(ids, 12, None)
    assert llamacpp_text("text\n\n") == "text\n" and llamacpp_text("text") == "text"  # -f drops one newline


@pytest.mark.parametrize("bos", [None, 7])
def test_llamacpp_perplexity_matches_transformers_forward(tiny_llama, bos):
    from tokenloom import LLM

    path, hf = tiny_llama
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 320, (300,), generator=g).tolist()
    n_ctx, first = 64, 32
    nlls = []
    for c in range(len(ids) // n_ctx):  # llama-perplexity, written out over the transformers model
        chunk = torch.tensor(ids[c * n_ctx:(c + 1) * n_ctx])
        if bos is not None:
            chunk[0] = bos
        with torch.no_grad():
            logp = torch.log_softmax(hf(chunk[None]).logits[0].double(), -1)
        nlls += [-logp[j, chunk[j + 1]].item() for j in range(first, n_ctx - 1)]
    ref_ppl = math.exp(sum(nlls) / len(nlls))
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=32)
    direct = llamacpp_perplexity(llm.engine.model, ids, n_ctx, bos)
    engine = llamacpp_perplexity(llm.engine.model, ids, n_ctx, bos, llm=llm)  # prefill in chunks of 32
    assert direct.chunks == 4 and direct.tokens == 4 * (n_ctx - first - 1) == len(nlls)
    assert math.isclose(direct.ppl, ref_ppl, rel_tol=1e-4)
    assert math.isclose(engine.ppl, ref_ppl, rel_tol=1e-4)
    running = [math.exp(sum(nlls[:k * 31]) / (k * 31)) for k in range(1, 5)]
    assert all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(direct.running_ppl, running))
    n = len(nlls)
    mean = sum(nlls) / n
    stderr = math.sqrt((sum(x * x for x in nlls) / n - mean * mean) / (n - 1)) * ref_ppl
    assert math.isclose(direct.ppl_stderr, stderr, rel_tol=1e-3)
    assert llm.engine.kv_cache_manager.num_free_blocks == llm.engine.kv_cache_manager.num_blocks


def _llama_perplexity(gguf: str, text: Path, n_ctx: int, chunks: int) -> tuple[float, list[float]]:
    # --no-repack: llama.cpp's plain CPU kernels, the same numerics on every CPU; builds with AMX kernels for
    # repacked weights die of SIGILL on some machines (in llama.cpp, before any figure)
    proc = subprocess.run([str(LLAMA_PERPLEXITY), "-m", gguf, "-f", str(text), "-c", str(n_ctx), "--chunks",
                           str(chunks), "-t", str(min(4, os.cpu_count() or 1)), "--no-repack"],
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    final = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    assert proc.returncode == 0 and final, out[-2000:]
    return float(final.group(1)), [float(x) for x in re.findall(r"\[\d+\]([0-9.]+),", out)]


@pytest.mark.slow
@pytest.mark.skipif(not LLAMA_PERPLEXITY.is_file(), reason="llama.cpp's llama-perplexity is not built")
def test_default_model_within_one_percent_of_llama_perplexity(default_gguf, tmp_path, capsys):
    from tokenloom.cli.main import main
    from tokenloom.quant.calib import evaluation_text

    text = tmp_path / "moby.txt"
    text.write_text(evaluation_text("moby-dick")[:4000] + "\n")
    n_ctx, chunks = 128, 4
    ref_ppl, ref_running = _llama_perplexity(str(default_gguf), text, n_ctx, chunks)
    assert main(["eval", "perplexity", str(default_gguf), "--llamacpp-compat", "--ctx", str(n_ctx), "--chunks",
                 str(chunks), "--text", str(text), "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert ours["chunks"] == chunks == len(ref_running) and ours["tokens"] == chunks * (n_ctx // 2 - 1)
    assert abs(ours["ppl"] / ref_ppl - 1) < 0.01, (ours["ppl"], ref_ppl)
    assert all(abs(a / b - 1) < 0.02 for a, b in zip(ours["running_ppl"], ref_running))
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert main(["eval", "perplexity", str(default_gguf), "--mode", "llamacpp", "--text", str(short)]) == 1
    assert "at least 1024 tokens" in capsys.readouterr().err
