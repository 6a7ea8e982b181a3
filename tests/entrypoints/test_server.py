"""The HTTP server, tested for real: uvicorn on 127.0.0.1 (a background thread, or a subprocess for SIGTERM),
driven by the official `openai` and `ollama` clients, raw httpx and curl."""
from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import pytest

from tokenloom.sampling_params import SamplingParams

MODEL = "smollm2-135m"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
GROUP_PROMPTS = ["Once upon a time", "The weather today is", "def fibonacci(n):", "In 1492, Columbus"]
slow = pytest.mark.slow


class RunningServer:
    """uvicorn serving `app` from a background thread on a free port."""

    def __init__(self, app):
        import uvicorn

        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="module")
def served():
    """The default model behind a real server. Greedy references come from LLM.generate on the same engine,
    computed before the engine thread takes it over."""
    from tokenloom import LLM
    from tokenloom.engine.async_engine import AsyncEngine
    from tokenloom.entrypoints.server import build_app

    llm = LLM(MODEL, dtype="float32", max_model_len=2048, kv_cache_memory=384 << 20)
    greedy12 = SamplingParams(temperature=0, max_tokens=12)
    greedy16 = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    chat_ids = llm.chat_prompt_ids(CHAT)
    ref_completion, ref_chat, *ref_group = llm.generate([PROMPT, chat_ids, *GROUP_PROMPTS],
                                                        [greedy12, greedy12] + [greedy16] * len(GROUP_PROMPTS))
    aengine = AsyncEngine(llm.engine).start()
    server = RunningServer(build_app(aengine, None, api_key=None, max_queue=256))
    yield SimpleNamespace(url=server.url, llm=llm, engine=aengine, ref_completion=ref_completion.outputs[0],
                          ref_chat=ref_chat.outputs[0], chat_ids=chat_ids,
                          ref_group=[o.outputs[0].text for o in ref_group])
    server.stop()
    aengine.shutdown()


@pytest.fixture(scope="module")
def oai(served):
    import openai

    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _metrics(url: str, headers=None) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", headers=headers, timeout=30).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + ("{le=" + s.labels["le"] + "}" if "le" in s.labels else "")
            if "finished_reason" in s.labels:
                key += "{" + s.labels["finished_reason"] + "}"
            if "path" in s.labels:
                key += "{" + s.labels["path"] + "," + s.labels["status"] + "}"
            elif "status" in s.labels:  # errors of one model
                key += "{" + s.labels["model_name"] + "," + s.labels["status"] + "}"
            out[key] = s.value
    return out


def _wait_idle(served, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = served.engine.stats()
        if st.num_blocks_used == 0 and st.num_running == 0 and st.num_waiting == 0:
            return st
        time.sleep(0.1)
    raise AssertionError(f"engine did not go idle: {served.engine.stats()}")


def _sse_frames(raw: str) -> list[str]:
    assert raw.endswith("\n\n"), raw[-200:]
    frames = raw[:-2].split("\n\n")
    for f in frames:
        assert f.startswith("data: ") and "\n" not in f, f
    assert frames[-1] == "data: [DONE]"
    return [json.loads(f[6:]) for f in frames[:-1]]


# ---- OpenAI API ------------------------------------------------------------------------------------------
@slow
def test_openai_completions(served, oai):
    ref = served.ref_completion
    r = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=2)
    c = r.choices[0]
    assert c.text == ref.text and c.finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(served.llm.tokenizer.encode(PROMPT))
    assert r.usage.completion_tokens == len(ref.token_ids) and r.usage.total_tokens == r.usage.prompt_tokens + 12
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 12
    assert "".join(lp.tokens) == c.text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and 1 <= len(top) <= 3
        assert chosen == pytest.approx(max(top.values()))  # greedy picks the most likely token

    # streaming, with usage in a last chunk of its own
    chunks = list(oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == ref.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == ref.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12

    # token-id prompt (as OpenAI accepts), and several prompts in one request
    r = oai.completions.create(model=MODEL, prompt=served.llm.tokenizer.encode(PROMPT), max_tokens=12, temperature=0)
    assert r.choices[0].text == ref.text
    r = oai.completions.create(model=MODEL, prompt=[PROMPT, "Hello"], max_tokens=12, temperature=0, echo=True)
    assert sorted(ch.index for ch in r.choices) == [0, 1]
    assert r.choices[0].text == PROMPT + ref.text and r.choices[1].text.startswith("Hello")


@slow
def test_openai_completions_n(served, oai):
    r = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=7, n=2,
                               extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens == 12 and all(c.finish_reason == "length" for c in r.choices)
    again = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=7, n=2,
                                   extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeded: reproducible
    texts = {0: "", 1: ""}
    finish = {}
    for ch in oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=7, n=2,
                                     stream=True, extra_body={"ignore_eos": True}):
        for c in ch.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert finish == {0: "length", 1: "length"}
    assert [texts[0], texts[1]] == [c.text for c in r.choices]


@slow
def test_openai_chat(served, oai):
    ref = served.ref_chat
    r = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0, logprobs=True,
                                    top_logprobs=3)
    m = r.choices[0]
    assert m.message.role == "assistant" and m.message.content == ref.text
    assert m.finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(served.chat_ids) and r.usage.completion_tokens == len(ref.token_ids)
    content = m.logprobs.content
    assert len(content) == len(ref.token_ids)  # the end-of-turn token that stopped it is an output token too
    assert "".join(t.token for t in content).removesuffix("<|im_end|>") == ref.text
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob)
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)

    chunks = list(oai.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=12, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref.text
    assert chunks[-1].usage.prompt_tokens == len(served.chat_ids) and chunks[-1].usage.completion_tokens == len(ref.token_ids)

    # n=2 streamed; vLLM-style extras pass through extra_body
    texts, finish = {0: "", 1: ""}, {}
    for ch in oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0.9, top_p=0.95, n=2,
                                          seed=3, stream=True,
                                          extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1,
                                                      "min_tokens": 5}):
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish.get(c.index)
    assert finish == {0: "length", 1: "length"} and all(texts.values())


@slow
def test_openai_models_and_embeddings(served, oai):
    assert [m.id for m in oai.models.list().data] == [MODEL]
    assert oai.models.retrieve(MODEL).id == MODEL
    r = oai.embeddings.create(model=MODEL, input=["hello world", "hello world", "quantum chromodynamics"])
    vecs = [d.embedding for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2] and len(vecs[0]) == served.llm.engine.model_config.hidden_size
    for v in vecs:
        assert math.sqrt(sum(x * x for x in v)) == pytest.approx(1.0, abs=1e-4)
    assert vecs[0] == pytest.approx(vecs[1], abs=1e-5)
    assert sum(a * b for a, b in zip(vecs[0], vecs[2])) < 0.999
    assert r.usage.prompt_tokens == sum(len(served.llm.tokenizer.encode(t)) for t in
                                        ["hello world", "hello world", "quantum chromodynamics"])
    b64 = httpx.post(served.url + "/v1/embeddings", json={"input": "hello world", "encoding_format": "base64"},
                     timeout=60).json()
    import base64
    import struct

    raw = base64.b64decode(b64["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(vecs[0], abs=1e-5)


# ---- Ollama API ------------------------------------------------------------------------------------------
@slow
def test_ollama_client(served):
    import ollama

    ref = served.ref_chat
    client = ollama.Client(host=served.url, timeout=120)
    opts = {"temperature": 0, "num_predict": 12}
    r = client.generate(model=MODEL, prompt=CHAT[0]["content"], options=opts)
    assert r.response == ref.text and r.done and r.done_reason == ref.finish_reason
    assert r.eval_count == len(ref.token_ids) and r.prompt_eval_count == len(served.chat_ids)
    assert r.total_duration > 0 and r.eval_duration > 0 and r.prompt_eval_duration > 0
    assert r.context == served.chat_ids + list(ref.token_ids)
    parts = list(client.generate(model=MODEL + ":latest", prompt=CHAT[0]["content"], options=opts, stream=True))
    assert "".join(p.response for p in parts) == ref.text
    assert parts[-1].done and not any(p.done for p in parts[:-1]) and parts[-1].eval_count == len(ref.token_ids)

    r = client.chat(model=MODEL, messages=CHAT, options=opts)
    assert r.message.role == "assistant" and r.message.content == ref.text and r.done_reason == ref.finish_reason
    parts = list(client.chat(model=MODEL, messages=CHAT, options=opts, stream=True))
    assert "".join(p.message.content for p in parts) == ref.text and parts[-1].done

    tags = client.list()
    assert tags.models[0].model == MODEL  # the served model first, then any other pulled catalogue models
    assert tags.models[0].details.family == "llama" and tags.models[0].size > 0
    show = client.show(MODEL)
    assert show.modelinfo["llama.context_length"] == 2048 and "<|im_start|>" in show.template
    assert client.ps().models[0].context_length == 2048
    assert httpx.get(served.url + "/api/version").json()["version"]
    emb = client.embed(model=MODEL, input=["hello world"])
    assert len(emb.embeddings[0]) == served.llm.engine.model_config.hidden_size

    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="llama3:8b", prompt="hi")
    assert err.value.status_code == 404 and "not found" in err.value.error


# ---- the wire format -------------------------------------------------------------------------------------
@slow
def test_sse_and_ndjson_wire_format(served):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stream": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    frames = _sse_frames(raw)
    assert all(f["object"] == "text_completion" for f in frames)
    assert "".join(f["choices"][0]["text"] for f in frames) == served.ref_completion.text
    assert frames[-1]["choices"][0]["finish_reason"] == "length"

    chat = {"model": MODEL, "messages": CHAT, "max_tokens": 12, "temperature": 0, "stream": True}
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=chat, timeout=60) as r:
        frames = _sse_frames(r.read().decode())
    assert all(f["object"] == "chat.completion.chunk" for f in frames)
    assert "".join(f["choices"][0]["delta"].get("content", "") for f in frames) == served.ref_chat.text

    ollama_body = {"model": MODEL, "messages": CHAT, "options": {"temperature": 0, "num_predict": 12}}
    with httpx.stream("POST", served.url + "/api/chat", json=ollama_body, timeout=60) as r:  # stream defaults on
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.read().decode().splitlines()]
    assert [x["done"] for x in lines] == [False] * (len(lines) - 1) + [True]
    assert "".join(x["message"]["content"] for x in lines) == served.ref_chat.text

    curl = shutil.which("curl")
    if curl:
        out = subprocess.run([curl, "-sN", "-X", "POST", served.url + "/v1/completions", "-H",
                              "Content-Type: application/json", "-d", json.dumps(body)],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        frames = _sse_frames(out)
        assert "".join(f["choices"][0]["text"] for f in frames) == served.ref_completion.text


# ---- load, batching, disconnects -------------------------------------------------------------------------
@slow
def test_64_concurrent_streams_share_batches(served):
    before = _metrics(served.url)

    async def client_run(http, k):
        body = {"model": MODEL, "prompt": GROUP_PROMPTS[k % 4], "max_tokens": 16, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        async with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            raw = (await r.aread()).decode()
        frames = _sse_frames(raw)
        text = "".join(f["choices"][0]["text"] for f in frames if f["choices"])
        finish = [f["choices"][0]["finish_reason"] for f in frames if f["choices"]][-1]
        return k, text, finish, frames[-1]["usage"]["completion_tokens"]

    async def main():
        limits = httpx.Limits(max_connections=80)
        async with httpx.AsyncClient(base_url=served.url, timeout=300, limits=limits) as http:
            running_seen = []

            async def poll():
                while True:
                    running_seen.append(_parse_gauge((await http.get("/metrics")).text,
                                                     "tokenloom_num_requests_running"))
                    await asyncio.sleep(0.25)

            poller = asyncio.create_task(poll())
            results = await asyncio.gather(*(client_run(http, k) for k in range(64)))
            poller.cancel()
            return results, running_seen

    results, running_seen = asyncio.run(main())
    assert len(results) == 64
    for k, text, finish, n_tokens in results:
        assert finish == "length" and n_tokens == 16
        assert text == served.ref_group[k % 4], (k, text)
    after = _metrics(served.url)
    steps = after["tokenloom_batch_size_count"] - before.get("tokenloom_batch_size_count", 0)
    single = after["tokenloom_batch_size_bucket{le=1.0}"] - before.get("tokenloom_batch_size_bucket{le=1.0}", 0)
    assert steps > 0 and single < steps  # some steps ran more than one sequence
    assert after["tokenloom_step_num_seqs_max"] > 1 and max(running_seen) > 1
    assert after["tokenloom_request_success_total{length}"] - before.get("tokenloom_request_success_total{length}", 0) >= 64
    assert after["tokenloom_time_to_first_token_seconds_count"] >= 64
    assert after["tokenloom_generation_tokens_total"] - before.get("tokenloom_generation_tokens_total", 0) >= 64 * 16
    deadline = time.time() + 10  # counted once each response has been sent in full
    while _metrics(served.url).get("tokenloom_http_requests_total{/v1/completions,200}", 0) < 64:
        assert time.time() < deadline
        time.sleep(0.1)
    _wait_idle(served)


def _parse_gauge(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@slow
def test_disconnects_abort_and_free_kv_blocks(served):
    aborted_before = _metrics(served.url).get("tokenloom_request_aborted_total", 0)

    async def drop_after_two(http, k):
        body = {"model": MODEL, "prompt": f"Story number {k}:", "max_tokens": 1000, "ignore_eos": True,
                "stream": True}
        async with http.stream("POST", "/v1/completions", json=body) as r:
            seen = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    seen += 1
                    if seen == 2:
                        return True  # leaving the block closes the connection mid-stream
        return False

    async def main():
        async with httpx.AsyncClient(base_url=served.url, timeout=120) as http:
            return await asyncio.gather(*(drop_after_two(http, k) for k in range(20)))

    assert all(asyncio.run(main()))
    # a non-streaming client that gives up (timeout) is aborted too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served.url + "/v1/completions", json={"prompt": "Long story:", "max_tokens": 1500,
                                                         "ignore_eos": True}, timeout=1.0)
    st = _wait_idle(served)
    assert st.num_blocks_used == 0
    deadline = time.time() + 10
    while _metrics(served.url).get("tokenloom_request_aborted_total", 0) - aborted_before < 21:
        assert time.time() < deadline, "aborts were not counted"
        time.sleep(0.1)
    assert httpx.get(served.url + "/health").status_code == 200


# ---- bad input -----------------------------------------------------------------------------------------------
LONG = "hello " * 2100  # > 2048 tokens
BAD_OPENAI = [
    # (path, body, status, param, message fragment, code)
    ("/v1/completions", b'{"prompt": "x",', 400, None, "malformed JSON", None),
    ("/v1/chat/completions", b"not json", 400, None, "malformed JSON", None),
    ("/v1/completions", b"", 400, None, "body is missing", None),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", "max_tokens", None),
    ("/v1/completions", {"prompt": 5}, 400, "prompt", "prompt", None),
    ("/v1/completions", {"prompt": "x", "stream": "maybe"}, 400, "stream", "stream", None),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", "messages", None),
    ("/v1/chat/completions", {}, 400, "messages", "messages", None),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model", "gpt-4", "model_not_found"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": CHAT}, 404, "model", "gpt-4", "model_not_found"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature", "temperature", None),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p", "top_p", None),
    ("/v1/completions", {"prompt": "x", "top_k": -5}, 400, "top_k", "top_k", None),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n", "n ", None),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "max_tokens", None),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs", "logprobs", None),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty", "presence_penalty", None),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty", "repetition", None),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias", "logit_bias", None),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999999": 1}}, 400, "logit_bias", "vocabulary", None),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options",
     "stream", None),
    ("/v1/completions", {"prompt": [1, 2, 10 ** 9]}, 400, None, "token ids", None),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs", "logprobs", None),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "empty", None),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "integer", "minimum": 3, "maximum": 1}}}}, 400, "response_format", "minimum",
     None),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"grammar": "start: undefined_rule"}}, 400,
     "structured_outputs", "undefined_rule", None),
    ("/v1/completions", {"prompt": LONG}, 400, None, "context window", "context_length_exceeded"),
    ("/v1/completions", {"prompt": LONG, "stream": True}, 400, None, "context window", "context_length_exceeded"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2048}, 400, None, "max_tokens", "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 5000}, 400, None, "context window",
     "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}], "stream": True}, 400, None,
     "context window", "context_length_exceeded"),
    ("/v1/embeddings", {"input": ""}, 400, "input", "empty", None),
    ("/v1/embeddings", {"input": LONG}, 400, "input", "context window", "context_length_exceeded"),
    ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"}, 404, "model", "does not exist",
     "model_not_found"),
]
BAD_OLLAMA = [
    ("/api/generate", b'{"model": ', 400, "malformed JSON"),
    ("/api/generate", {"model": "nope", "prompt": "x"}, 404, "model 'nope' not found"),
    ("/api/generate", {"prompt": "x"}, 400, "model"),
    ("/api/chat", {"model": MODEL, "messages": CHAT, "options": {"temperature": "hot"}}, 400, "temperature"),
    ("/api/chat", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("/api/generate", {"model": MODEL, "prompt": "x", "options": {"top_p": 2}}, 400, "top_p"),
    ("/api/generate", {"model": MODEL, "prompt": "x", "options": {"repeat_penalty": -1}}, 400, "repeat_penalty"),
    ("/api/generate", {"model": MODEL, "prompt": "x", "options": {"num_predict": 5000}}, 400, "context window"),
    ("/api/generate", {"model": MODEL, "prompt": LONG}, 400, "context window"),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": LONG}]}, 400, "context window"),
    ("/api/show", {"model": "nope"}, 404, "not found"),
    ("/api/generate", {"model": MODEL, "prompt": "x", "format": "yaml"}, 400, "format"),
    ("/api/generate", {"model": MODEL, "prompt": "x", "format": {"type": "foo"}}, 400, "foo"),
]


@slow
def test_bad_inputs_get_exact_errors(served):
    http = httpx.Client(base_url=served.url, timeout=60)
    for path, body, status, param, fragment, code in BAD_OPENAI:
        kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
            else {"json": body}
        r = http.post(path, **kw)
        assert r.status_code == status, (path, body if len(str(body)) < 200 else "...", r.text)
        err = r.json()["error"]
        assert set(r.json()) == {"error"} and set(err) == {"message", "type", "param", "code"}, r.text
        assert err["type"] in ("invalid_request_error", "not_found_error"), r.text
        assert err["param"] == param and err["code"] == code and fragment in err["message"], (path, r.text)
    for path, body, status, fragment in BAD_OLLAMA:
        kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
            else {"json": body}
        r = http.post(path, **kw)
        assert r.status_code == status, (path, r.text)
        assert list(r.json()) == ["error"] and isinstance(r.json()["error"], str) and fragment in r.json()["error"], \
            r.text
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = http.get("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
    # nothing leaked, and the server still serves
    _wait_idle(served)
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == served.ref_completion.text
    assert http.post("/api/generate", json={"model": MODEL, "prompt": ""}).json()["done_reason"] == "load"


# ---- API key, queue bound, OpenAPI -------------------------------------------------------------------------------
@slow
def test_api_key(served, monkeypatch):
    import ollama
    import openai

    from tokenloom.entrypoints.server import build_app

    server = RunningServer(build_app(served.engine, "tiny-alias", api_key="sekrit"))
    try:
        assert httpx.get(server.url + "/health").status_code == 200  # no key needed
        for path in ("/v1/models", "/metrics", "/openapi.json", "/api/tags"):
            r = httpx.get(server.url + path)
            assert r.status_code == 401, path
            if path.startswith("/api/"):
                assert list(r.json()) == ["error"]
            else:
                assert r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="sekrit", max_retries=0)
        assert [m.id for m in good.models.list().data] == ["tiny-alias"]
        r = good.chat.completions.create(model="tiny-alias", messages=CHAT, max_tokens=2)
        assert r.usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
        with pytest.raises(openai.NotFoundError):  # served under its alias only
            good.completions.create(model=MODEL, prompt="x", max_tokens=1)
        oc = ollama.Client(host=server.url, headers={"Authorization": "Bearer sekrit"})
        assert oc.list().models[0].model == "tiny-alias"  # then any pulled catalogue models
        schema = httpx.get(server.url + "/openapi.json", headers={"Authorization": "Bearer sekrit"}).json()
        assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    finally:
        server.stop()
    from tokenloom.cli.main import build_parser

    monkeypatch.setenv("TOKENLOOM_API_KEY", "from-env")
    assert build_parser().parse_args(["serve"]).api_key == "from-env"


@slow
def test_queue_bound_never_refuses_a_request_that_can_start(served):
    """--max-queue 0 bounds waiting requests, not running ones: on an idle server a request starts at once
    (the 503 path, with Retry-After, is in test_server_hardening.py)."""
    from tokenloom.entrypoints.server import build_app

    server = RunningServer(build_app(served.engine, None, max_queue=0))
    try:
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 200, r.text
        r = httpx.post(server.url + "/api/generate", json={"model": MODEL, "prompt": "x", "stream": False,
                                                          "options": {"num_predict": 2}})
        assert r.status_code == 200, r.text
    finally:
        server.stop()


@slow
def test_openapi_document(served):
    doc = httpx.get(served.url + "/openapi.json").json()
    paths = doc["paths"]
    for path, method in [("/v1/completions", "post"), ("/v1/chat/completions", "post"), ("/v1/embeddings", "post"),
                         ("/v1/models", "get"), ("/api/generate", "post"), ("/api/chat", "post"),
                         ("/api/tags", "get"), ("/api/show", "post"), ("/api/ps", "get"), ("/api/version", "get"),
                         ("/health", "get"), ("/metrics", "get")]:
        assert method in paths[path], path
    assert "422" not in json.dumps({p: {m: op["responses"] for m, op in ops.items()} for p, ops in paths.items()})
    body_ref = lambda p: paths[p]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert body_ref("/v1/completions").endswith("/CompletionRequest")
    assert body_ref("/v1/chat/completions").endswith("/ChatCompletionRequest")
    assert body_ref("/api/generate").endswith("/GenerateRequest")
    assert body_ref("/api/chat").endswith("/ChatRequest")
    op = paths["/v1/completions"]["post"]["responses"]
    assert op["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "text/event-stream" in op["200"]["content"]
    assert "application/x-ndjson" in paths["/api/chat"]["post"]["responses"]["200"]["content"]
    schemas = doc["components"]["schemas"]
    assert {"top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "logit_bias", "seed"} <= \
        set(schemas["CompletionRequest"]["properties"])


@slow
def test_bench_serve_smoke(served, capsys):
    from tokenloom.bench.serve import bench_serve

    args = SimpleNamespace(base_url=served.url, model=None, num_prompts=4, request_rate=float("inf"), concurrency=2,
                           input_len=16, output_len=4, dist="fixed", slo_ttft_ms=60000.0, slo_tpot_ms=60000.0,
                           api_key=None, seed=0)
    res = bench_serve(args)
    assert res["completed"] == 4 and res["failed"] == 0 and res["output_tokens"] == 16
    assert res["goodput_req_s"] > 0
    assert "TTFT ms" in capsys.readouterr().out


# ---- the `tokenloom serve` process: SIGTERM drains in-flight requests, then exits 0 ------------------------------
def run_schemathesis(doc: dict, url: str, method: str, path: str, mode: str, adjust=None) -> None:
    """schemathesis over one operation of the OpenAPI document, every check its default config enables (all);
    adjust(body) brings a positive case within what the document cannot state."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings

    op = schemathesis.openapi.from_dict(doc)[path][method]

    @settings(max_examples=25, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
    def check(case):
        if mode == "positive" and adjust is not None:
            case.body = adjust(case.body)
        case.call_and_validate(base_url=url, timeout=120)

    check()


def start_serve(*args: str, stderr=subprocess.DEVNULL) -> tuple[subprocess.Popen, str]:
    """`tokenloom serve ARGS --port 0` in a subprocess, and its URL once it says it is serving."""
    cmd = [sys.executable, "-m", "tokenloom", "serve", *args, "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True,
                            env={**os.environ, "TOKENLOOM_API_KEY": ""})
    deadline = time.time() + 120
    while True:
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError("server did not start")
        line = proc.stdout.readline()
        if "serving" in line:
            return proc, line.split(" at ")[1].split()[0]


def test_serve_sigterm_finishes_inflight_requests(tiny_llama):
    path, _ = tiny_llama
    proc, url = start_serve(str(path), "--dtype", "float32", "--max-model-len", "1024", "--kv-cache-memory", "16MiB")
    try:
        body = {"prompt": [1, 2, 3, 4], "max_tokens": 1000, "ignore_eos": True, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        raw = ""
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            it = r.iter_text()
            raw += next(it)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(httpx.ConnectError):  # no new connections once shutting down
                httpx.get(url + "/health", timeout=5)
            for piece in it:
                raw += piece
        frames = _sse_frames(raw)
        assert frames[-1]["usage"]["completion_tokens"] == 1000  # the in-flight request ran to the end
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@slow
def test_speculative_server_streams_and_reports():
    """A server speculating (n-gram drafts): greedy chat completions, streamed or not, equal the plain engine's,
    runs of several tokens a step reach the stream whole and in order, and /metrics reports drafts and acceptance."""
    from tokenloom import LLM
    from tokenloom.engine.async_engine import AsyncEngine
    from tokenloom.entrypoints.server import build_app

    chat = [{"role": "user", "content": "Repeat exactly: red fish, blue fish, one fish, two fish, old fish, new fish."}]
    plain = LLM(MODEL, max_model_len=2048)
    ref = plain.chat(chat, SamplingParams(temperature=0, max_tokens=40))[0].outputs[0].text
    llm = LLM(MODEL, max_model_len=2048, speculative_config='{"method": "ngram", "num_speculative_tokens": 6}')
    aengine = AsyncEngine(llm.engine).start()
    server = RunningServer(build_app(aengine, None, api_key=None, max_queue=64))
    try:
        body = {"model": MODEL, "messages": chat, "max_tokens": 40, "temperature": 0}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == ref
        raw = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60).text
        frames = [f for f in _sse_frames(raw) if f.get("choices")]
        assert "".join(f["choices"][0]["delta"].get("content") or "" for f in frames) == ref
        m = _metrics(server.url)
        drafts = m["tokenloom_spec_decode_num_draft_tokens"]
        accepted = m["tokenloom_spec_decode_num_accepted_tokens"]
        assert drafts > 0 and 0 < accepted <= drafts
        assert m["tokenloom_spec_decode_acceptance_rate"] == pytest.approx(accepted / drafts)
        assert m["tokenloom_spec_decode_mean_accepted_length"] > 1
    finally:
        server.stop()
        aengine.shutdown()
