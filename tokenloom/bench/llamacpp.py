"""llama.cpp on the same GGUF file, in the same run: the baseline of `tokenloom bench latency|throughput
--compare llama.cpp`.

Two ways to reach it, the first found wins:
  * llama.cpp's own benchmark tools (`llama-bench`, `llama-batched-bench`): --llama-cpp-bin DIR, else
    $TOKENLOOM_LLAMA_CPP_BIN, else PATH, else ~/.cache/llamacpp/bin (where ../shared/tools/build-llamacpp.sh
    puts them). These are the figures llama.cpp's users quote, so they are preferred.
  * the `llama-cpp-python` binding (the `bench` extra; pip builds it from source once): prefill and decode
    timed here the way llama-bench times them (a random prompt evaluated in one batch, then one token at a time).
Decode is measured after the prompt (llama-bench -d PROMPT_LEN), as tokenloom's is: after a long prompt every
token attends over it.
Both run with the same thread count as tokenloom.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tokenloom.config import TokenloomError


def find_tool(name: str, bin_dir: str | None = None) -> str | None:
    for d in (bin_dir, os.environ.get("TOKENLOOM_LLAMA_CPP_BIN")):
        if d and (Path(d) / name).is_file():
            return str(Path(d) / name)
    if found := shutil.which(name):
        return found
    default = Path.home() / ".cache" / "llamacpp" / "bin" / name
    return str(default) if default.is_file() else None


def gguf_file(engine) -> str:
    src = engine.model_source
    if src.kind != "gguf":
        raise TokenloomError("--compare llama.cpp needs a GGUF model (llama.cpp runs GGUF files only)")
    return str(src.path)


def _run(cmd: list[str], timeout: float) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TokenloomError(f"llama.cpp did not run ({exc})") from None
    if proc.returncode < 0:
        raise _Died(signal.Signals(-proc.returncode).name)
    if proc.returncode != 0:
        raise TokenloomError(f"{Path(cmd[0]).name} failed: {_last_line(proc)}")
    return proc.stdout


def _last_line(proc: subprocess.CompletedProcess) -> str:
    """What a failed process said last (stderr, else stdout), or its exit status."""
    return ((proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit status {proc.returncode}"])[0]


class _Died(TokenloomError):
    """llama.cpp killed by a signal, e.g. SIGILL from its AMX kernels for repacked weights on some machines."""


def _run_tool(cmd: list[str], no_repack: list[str], timeout: float) -> tuple[str, str]:
    """(stdout, note): llama.cpp's defaults first; a build whose repacked-weight kernels die on this CPU is run
    again with repacking off (its plain kernels), and the figures say so."""
    try:
        return _run(cmd, timeout), ""
    except _Died as died:
        try:
            return _run(cmd + no_repack, timeout), f", repacking off: the default died of {died}"
        except _Died as again:
            raise TokenloomError(f"{Path(cmd[0]).name} died of {again} on this CPU, also with repacking off; "
                                 "build llama.cpp for this CPU and pass --llama-cpp-bin DIR") from None


def latency(path: str, threads: int, prompt_len: int, output_len: int, repetitions: int,
            bin_dir: str | None = None) -> dict:
    """{"prefill_tok_s", "decode_tok_s", "via"} of llama.cpp at batch 1 on `path`."""
    if tool := find_tool("llama-bench", bin_dir):
        # prefill from an empty context, then decode at the depth the prompt leaves (as tokenloom's decode runs)
        common = [tool, "-m", path, "-t", str(threads), "-r", str(repetitions), "-o", "json"]
        no_repack = ["--repack", "0"]
        pp, note = _run_tool(common + ["-p", str(prompt_len), "-n", "0"], no_repack, timeout=1800)
        # both halves on the same kernels: once the defaults died, decode runs with repacking off from the start
        tg, note2 = _run_tool(common + ["-p", "0", "-n", str(output_len), "-d", str(prompt_len)]
                              + (no_repack if note else []), no_repack, timeout=1800)
        return {"prefill_tok_s": json.loads(pp)[0]["avg_ts"], "decode_tok_s": json.loads(tg)[0]["avg_ts"],
                "via": "llama-bench" + (note or note2)}
    return _latency_binding(path, threads, prompt_len, output_len, repetitions)


def _latency_binding(path, threads, prompt_len, output_len, repetitions) -> dict:
    """llama-cpp-python's figures, measured in a child process: a llama.cpp build that dies on this CPU (SIGILL
    from a feature its build assumed, as 0.3.36's AMX kernels do on some machines) ends there, not in tokenloom."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise TokenloomError("--compare llama.cpp needs llama.cpp's llama-bench (--llama-cpp-bin DIR) or the "
                             "llama-cpp-python package (pip install 'tokenloom[bench]')")
    args = json.dumps([path, threads, prompt_len, output_len, repetitions])
    code = ("import json, sys; from tokenloom.bench.llamacpp import binding_latency; "
            "print(json.dumps(binding_latency(*json.loads(sys.argv[1]))))")
    try:
        proc = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        raise TokenloomError("llama-cpp-python did not finish in 30 minutes") from None
    if proc.returncode < 0:
        raise TokenloomError(f"llama-cpp-python died of {signal.Signals(-proc.returncode).name} on this CPU; "
                             "build llama.cpp's own tools for it and pass --llama-cpp-bin DIR")
    if proc.returncode != 0:
        raise TokenloomError(f"llama-cpp-python failed: {_last_line(proc)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def binding_latency(path, threads, prompt_len, output_len, repetitions) -> dict:
    """What _latency_binding's child process runs: prefill and decode timed through llama-cpp-python."""
    from llama_cpp import Llama
    import random

    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=prompt_len + output_len + 8,
                n_batch=max(prompt_len, 8), verbose=False)
    rng = random.Random(0)
    vocab = llm.n_vocab()
    prompt = [rng.randrange(100, vocab) for _ in range(prompt_len)]
    pp, tg = [], []
    for _ in range(repetitions):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        pp.append(prompt_len / (time.perf_counter() - start))
        start = time.perf_counter()  # decode after the prompt, as llama-bench -d and tokenloom measure it
        for _ in range(output_len):
            llm.eval([rng.randrange(100, vocab)])
        tg.append(output_len / (time.perf_counter() - start))
    return {"prefill_tok_s": sum(pp) / len(pp), "decode_tok_s": sum(tg) / len(tg), "via": "llama-cpp-python"}


def batched(path: str, threads: int, prompt_len: int, output_len: int, num_seqs: int,
            bin_dir: str | None = None) -> dict:
    """{"elapsed_s", "out_tok_s", "total_tok_s", "decode_tok_s", "via"} of llama-batched-bench with num_seqs
    parallel sequences: output tokens over the whole run (prefill included, as tokenloom's figure), and its
    decode-phase rate (S_TG) too."""
    tool = find_tool("llama-batched-bench", bin_dir)
    if tool is None:
        raise TokenloomError("--compare llama.cpp for throughput needs llama.cpp's llama-batched-bench "
                             "(--llama-cpp-bin DIR; ../shared/tools/build-llamacpp.sh builds it)")
    ctx = num_seqs * (prompt_len + output_len) + 64
    out, note = _run_tool([tool, "-m", path, "-t", str(threads), "-c", str(ctx), "-b", "2048", "-ub", "512",
                           "-npp", str(prompt_len), "-ntg", str(output_len), "-npl", str(num_seqs),
                           "--output-format", "jsonl"], ["--no-repack"], timeout=3600)
    row = next(json.loads(line) for line in out.splitlines() if line.startswith("{"))
    n_out = row["pl"] * row["tg"]
    return {"elapsed_s": row["t"], "out_tok_s": n_out / row["t"], "total_tok_s": row["speed"],
            "decode_tok_s": row["speed_tg"], "via": "llama-batched-bench" + note}
