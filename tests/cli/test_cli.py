"""The `tokenloom` command as users run it: real subprocesses, real model, clear one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ENGINE = ["--kv-cache-memory", "256MiB", "--max-model-len", "1024"]


def tokenloom(*args, stdin: str | None = None, env: dict | None = None, timeout: int = 300):
    return subprocess.run([sys.executable, "-m", "tokenloom", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def assert_clean_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_path_is_a_clear_error(tmp_path):
    assert_clean_error(tokenloom("generate", str(tmp_path / "nope.gguf"), "hi"), "not found", "nope.gguf")


def test_random_bytes_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(os.urandom(4096))
    assert_clean_error(tokenloom("generate", str(bad), "hi"), "bad.gguf")


@pytest.mark.slow
def test_truncated_gguf_is_a_clear_error(tmp_path, default_gguf):
    cut = tmp_path / "cut.gguf"
    with open(default_gguf, "rb") as f:
        cut.write_bytes(f.read(default_gguf.stat().st_size // 2))
    assert_clean_error(tokenloom("show", str(cut)), "truncated")
    assert_clean_error(tokenloom("generate", str(cut), "hi"), "truncated")


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    assert_clean_error(tokenloom("generate", str(tmp_path), "hi"), "unsupported architecture 'bert'")


def test_unknown_catalogue_name_names_what_was_tried():
    assert_clean_error(tokenloom("generate", "no-such-model", "hi"), "no-such-model", "catalogue")


@pytest.mark.slow
def test_prompt_longer_than_context_is_rejected(default_gguf):
    proc = tokenloom("generate", "smollm2-135m", "word " * 300, "--max-model-len", "128", "--kv-cache-memory", "64MiB")
    assert_clean_error(proc, "context window is 128 tokens")


@pytest.mark.slow
def test_generate_streams_an_answer(default_gguf):
    proc = tokenloom("generate", "smollm2-135m", "--chat", "-v", "What is the capital of France?", "-n", "24", *ENGINE)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "TTFT" in proc.stderr


@pytest.mark.slow
def test_run_is_a_multi_turn_chat(default_gguf):
    script = "\n".join([
        "/set parameter temperature 0",
        "/set parameter num_predict 24",
        "/set verbose",
        "What is the capital of France?",
        "/set quiet",
        "And of Italy?",
        "/show parameters",
        "/clear",
        "/set system You are a pirate.",
        "/bogus",
        "/bye",
        "this line is never read",
    ]) + "\n"
    proc = tokenloom("run", "smollm2-135m", *ENGINE, stdin=script)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Set parameter 'temperature' to '0.0'" in out
    assert "Paris" in out
    assert "Cleared session context" in out and "Set system message." in out
    assert "Unknown command '/bogus'" in out
    # /set verbose: Ollama's statistics after the reply, and none after /set quiet
    assert "Set 'verbose' mode." in out and "Set 'quiet' mode." in out
    stats = dict(line.split(":", 1) for line in out.splitlines() if line.startswith(("prompt eval", "eval ")))
    assert out.count("\neval rate:") == 1 and set(stats) == {
        "prompt eval count", "prompt eval duration", "prompt eval rate", "eval count", "eval duration", "eval rate"}
    n_eval = int(stats["eval count"].split()[0])
    assert 0 < n_eval <= 24 and int(stats["prompt eval count"].split()[0]) > 10
    assert float(stats["eval rate"].split()[0]) > 0


@pytest.mark.slow
def test_list_and_show(default_gguf):
    proc = tokenloom("list")
    assert proc.returncode == 0 and "smollm2-135m" in proc.stdout and "downloaded" in proc.stdout
    proc = tokenloom("show", "smollm2-135m")
    assert proc.returncode == 0, proc.stderr
    for needle in ("architecture       llama", "layers             30", "heads (q / kv)     9 / 3",
                   "Q4_1", "context length     8192", "<|im_start|>"):
        assert needle in proc.stdout


def test_pull_rejects_unknown_names(tmp_path):
    assert_clean_error(tokenloom("pull", "nothing-like-this", env={"TOKENLOOM_HOME": str(tmp_path)}), "unknown model")
