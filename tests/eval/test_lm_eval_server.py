"""lm-evaluation-harness against `tokenloom serve`: /v1/completions with echo and logprobs returns the prompt's token
logprobs as lm-eval's local-completions model reads them, and lm-eval's accuracy on a local task over our items
equals `tokenloom eval mc` on the same items."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

DATA = Path(__file__).parent / "data"
ITEMS = DATA / "mc_items.jsonl"
N_ITEMS = 16  # the first items: lm-eval's `limit` takes the same ones
PROMPT = "The quick brown fox jumps over the lazy dog. The capital of France is"
slow = pytest.mark.slow


class _Server:
    """uvicorn serving `app` from a background thread on a free port."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The default model behind a real server; our own eval and reference logprobs computed on the same engine
    before the server's engine thread takes it over."""
    from tokenloom import LLM
    from tokenloom.engine.async_engine import AsyncEngine
    from tokenloom.entrypoints.server import build_app
    from tokenloom.eval.lm_eval_tokenizer import save_hf_tokenizer
    from tokenloom.eval.multiple_choice import evaluate_mc, load_items
    from tokenloom.model_executor.sequence_forward import SequenceRunners

    llm = LLM("smollm2-135m", dtype="float32", max_model_len=2048)
    ours = evaluate_mc(llm, load_items(ITEMS)[:N_ITEMS])
    ids = llm.tokenizer.encode(PROMPT)
    model = llm.engine.model
    with torch.inference_mode():  # the reference: one plain causal forward, no paging or batching
        logits = model.compute_logits(SequenceRunners(model)[len(ids)].hidden(torch.tensor(ids)))
        ref = torch.log_softmax(logits.double(), -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
    tok_dir = save_hf_tokenizer(llm.tokenizer, tmp_path_factory.mktemp("tokenizer"))
    aengine = AsyncEngine(llm.engine).start()
    server = _Server(build_app(aengine, "smollm2-135m", api_key=None, max_queue=256))
    yield SimpleNamespace(url=server.url, ours=ours, ids=ids, ref=ref, tok_dir=tok_dir,
                          texts=[llm.tokenizer.decode([t]) for t in ids])
    server.stop()
    aengine.shutdown()


def _complete(served, **body):
    return httpx.post(f"{served.url}/v1/completions", json={"model": "smollm2-135m", "temperature": 0, **body},
                      timeout=120)


@slow
def test_echo_returns_prompt_logprobs(served):
    """lm-eval's request: echo, logprobs 1, max_tokens 1; the prompt's tokens come first, the first without a
    logprob, then the generated token."""
    r = _complete(served, prompt=PROMPT, max_tokens=1, logprobs=1, echo=True)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    n = len(served.ids)
    assert choice["text"].startswith(PROMPT) and len(lp["token_logprobs"]) == n + 1
    assert lp["tokens"][:n] == served.texts and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"][:3] == [0, len(served.texts[0]), len(served.texts[0]) + len(served.texts[1])]
    assert all(abs(a - b) < 1e-3 for a, b in zip(lp["token_logprobs"][1:n], served.ref))
    for tok, tlp, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert top[tok] == tlp and 1 <= len(top) <= 2 and max(top.values()) >= tlp  # chosen, plus the top 1
    assert r.json()["usage"]["completion_tokens"] == 1


@slow
def test_echo_only_with_max_tokens_zero(served):
    """max_tokens 0 with echo (vLLM's way to score a prompt): the prompt and its logprobs, nothing generated;
    token-id prompts and batches work too."""
    r = _complete(served, prompt=[served.ids, served.ids[:5]], max_tokens=0, logprobs=0, echo=True)
    assert r.status_code == 200, r.text
    body = r.json()
    first, second = sorted(body["choices"], key=lambda c: c["index"])
    assert first["text"] == PROMPT and len(first["logprobs"]["token_logprobs"]) == len(served.ids)
    assert all(abs(a - b) < 1e-3 for a, b in zip(first["logprobs"]["token_logprobs"][1:], served.ref))
    assert len(second["logprobs"]["tokens"]) == 5
    assert body["usage"]["completion_tokens"] == 0 and body["usage"]["prompt_tokens"] == len(served.ids) + 5


@slow
def test_echo_errors_are_400(served):
    r = _complete(served, prompt=PROMPT, max_tokens=0)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = _complete(served, prompt=PROMPT, max_tokens=1, echo=True, logprobs=1, stream=True)
    assert r.status_code == 400 and "stream" in r.json()["error"]["message"]
    r = _complete(served, prompt=PROMPT, max_tokens=-1, echo=True)
    assert r.status_code == 400


@slow
def test_lm_eval_local_completions_equals_our_eval(served, monkeypatch):
    """lm-eval (its local-completions model, offline, our task YAML over the same JSONL) against the server gives
    the accuracy `tokenloom eval mc` gives, item by item."""
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity", reason="lm-eval's API models need tenacity (lm-eval[api])")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    args = (f"model=smollm2-135m,base_url={served.url}/v1/completions,tokenizer={served.tok_dir},"
            "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1,batch_size=8")
    res = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=["tokenloom_mc"],
                                  task_manager=TaskManager(include_path=str(DATA / "lm_eval_tasks")),
                                  limit=N_ITEMS, log_samples=True)
    metrics = res["results"]["tokenloom_mc"]
    assert metrics["acc,none"] == pytest.approx(served.ours.acc)
    assert metrics["acc_norm,none"] == pytest.approx(served.ours.acc_norm)
    samples = sorted(res["samples"]["tokenloom_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == N_ITEMS
    for s in samples:
        theirs = [r[0] for r in s["filtered_resps"]]
        mine = served.ours.per_item[s["doc_id"]]["loglikelihoods"]
        assert all(abs(a - b) < 2e-3 for a, b in zip(theirs, mine)), (s["doc_id"], theirs, mine)
