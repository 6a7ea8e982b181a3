"""tokenloom as a drop-in behind litellm, against a real `tokenloom serve` subprocess: the `ollama/` provider
(/api/generate, litellm's own "### User:" prompt), `ollama_chat/` (/api/chat), `openai/` with api_base (/v1),
embeddings, litellm.acompletion, litellm's /api/show model lookup, errors; and Ollama's README curl lines as written.

Each litellm answer is checked against the same request sent raw with httpx (the body litellm sent is captured with a
litellm callback and replayed), against a second route of the server where one computes the same thing (/api/chat
and /v1/chat/completions; /api/generate and /v1/completions on its prompt ids), and its token counts against the
model's tokenizer and chat template loaded here, outside the server. Greedy (temperature 0): the texts are exact.

The model is the tiny random Llama of tests/conftest.py with a small byte-level BPE tokenizer (320 tokens, the
model's vocabulary) and a ChatML template added, so text goes in and out; its replies are noise, but deterministic."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from types import SimpleNamespace

# Before litellm is imported anywhere: its model cost map is read from the package, never fetched from the internet.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

import httpx  # noqa: E402
import pytest  # noqa: E402
from test_server import start_serve  # noqa: E402

# litellm's own warnings (its TypedDicts, its pydantic use), not tokenloom's
pytestmark = [pytest.mark.filterwarnings(r"ignore:Items? .* on TypedDict class .* using the `ReadOnly`:UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning:litellm")]
NAME = "tiny-chat"  # `tokenloom serve DIR` serves the model under the directory's name
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2: the model config's bos 1 and eos 2
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Why is the sky blue?"}]
GREEDY = dict(max_tokens=12, temperature=0, seed=7)


def _add_tokenizer(path) -> None:
    """A byte-level BPE tokenizer trained to exactly the tiny model's 320 tokens, and a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = "The capital of France is Paris. Why is the sky blue? Hello world, the quick brown fox jumps over the dog."
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text] * 50, trainer)
    assert tok.get_vocab_size() == 320 and [tok.token_to_id(s) for s in SPECIAL] == [0, 1, 2]
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False}))


@pytest.fixture(scope="module")
def served(tiny_llama, tmp_path_factory):
    from tokenloom.tokenizer import Tokenizer

    src, _ = tiny_llama
    path = tmp_path_factory.mktemp("litellm") / NAME
    shutil.copytree(src, path)  # a copy: the session's tiny_llama directory stays as other tests expect it
    _add_tokenizer(path)
    proc, url = start_serve(str(path), "--dtype", "float32", "--max-model-len", "1024", "--kv-cache-memory", "16MiB")
    http = httpx.Client(base_url=url, timeout=120)
    try:
        yield SimpleNamespace(url=url, tok=Tokenizer.from_hf_dir(str(path)), http=http)
    finally:
        http.close()
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def litellm():
    import litellm

    return litellm


@pytest.fixture
def sent(litellm):
    """The requests litellm sends from now on, as (URL, JSON body), recorded by a callback before each is sent."""
    from litellm.integrations.custom_logger import CustomLogger

    requests: list[tuple[str, dict]] = []

    class Recorder(CustomLogger):
        def log_pre_api_call(self, model, messages, kwargs):
            extra = kwargs.get("additional_args") or {}
            requests.append((extra.get("api_base"), extra.get("complete_input_dict")))

    saved = litellm.callbacks
    litellm.callbacks = [Recorder()]
    yield requests
    litellm.callbacks = saved


def _chat_ids(served, messages) -> list[int]:
    """The prompt's token ids, rendered and tokenized here (not by the server)."""
    return served.tok.encode(served.tok.apply_chat_template(messages, add_generation_prompt=True),
                             add_special_tokens=False)


def _stream(chunks) -> tuple[str, str | None, object]:
    """The text, the last finish_reason and the usage of a litellm stream."""
    text, finish, usage = "", None, None
    for c in chunks:
        if c.choices:
            text += c.choices[0].delta.content or ""
            finish = c.choices[0].finish_reason or finish
        usage = getattr(c, "usage", None) or usage
    return text, finish, usage


def _usage(u) -> tuple[int, int, int]:
    return u.prompt_tokens, u.completion_tokens, u.total_tokens


def test_served_name_and_model_lookup(served, litellm, monkeypatch):
    """The name clients put after `ollama/` is the directory's; litellm's own model lookup (POST /api/show with
    {"name": ...}, what it does after each ollama call) reads the server's context window."""
    assert served.http.get("/v1/models").json()["data"][0]["id"] == NAME
    assert NAME in [m["name"] for m in served.http.get("/api/tags").json()["models"]]
    r = served.http.post("/api/show", content=json.dumps({"name": NAME}))  # as litellm sends it
    assert r.status_code == 200 and r.json()["model_info"]["llama.context_length"] == 1024, r.text
    monkeypatch.setenv("OLLAMA_API_BASE", served.url)
    info = litellm.get_model_info(f"ollama/{NAME}")
    assert info["max_input_tokens"] == 1024 and info["litellm_provider"] == "ollama"


# ---- ollama/: /api/generate ---------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_ollama_provider(served, litellm, sent, stream):
    kw = dict(stream=True, stream_options={"include_usage": True}) if stream else {}
    r = litellm.completion(model=f"ollama/{NAME}", api_base=served.url, messages=MESSAGES, **GREEDY, **kw)
    url, body = sent[-1]
    # what litellm sent: its own flat prompt (which the server then wraps as one user message), the options mapped
    assert url == served.url + "/api/generate" and body["model"] == NAME and body["stream"] is stream
    assert body["prompt"] == "### System:\nYou are terse.\n\n### User:\nWhy is the sky blue?\n\n", body
    assert body["options"] == {"num_predict": 12, "temperature": 0, "seed": 7}
    if stream:
        text, finish, usage = _stream(r)
    else:
        text, finish, usage = r.choices[0].message.content, r.choices[0].finish_reason, r.usage
        assert r.model == f"ollama/{NAME}"

    ref = served.http.post("/api/generate", json={**body, "stream": False}).json()  # the same request, raw
    prompt_ids = _chat_ids(served, [{"role": "user", "content": body["prompt"]}])
    assert ref["prompt_eval_count"] == len(prompt_ids) and ref["context"][:len(prompt_ids)] == prompt_ids
    assert ref["eval_count"] == 12 and ref["done_reason"] == "length"
    assert text == ref["response"] and len(text) > 0
    assert _usage(usage) == (len(prompt_ids), 12, len(prompt_ids) + 12)
    assert finish == "stop"  # litellm's ollama provider reports "stop" whatever done_reason says
    # the OpenAI completions route on the same prompt ids, greedy: the same text
    oai = served.http.post("/v1/completions", json={"model": NAME, "prompt": prompt_ids, "max_tokens": 12,
                                                    "temperature": 0}).json()
    assert oai["choices"][0]["text"] == text and oai["usage"]["prompt_tokens"] == len(prompt_ids)


# ---- ollama_chat/: /api/chat --------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_ollama_chat_provider(served, litellm, sent, stream):
    kw = dict(stream=True, stream_options={"include_usage": True}) if stream else {}
    r = litellm.completion(model=f"ollama_chat/{NAME}", api_base=served.url, messages=MESSAGES, **GREEDY, **kw)
    url, body = sent[-1]
    assert url == served.url + "/api/chat" and body["model"] == NAME and body["stream"] is stream
    assert [(m["role"], m["content"]) for m in body["messages"]] == [(m["role"], m["content"]) for m in MESSAGES]
    assert body["options"] == {"num_predict": 12, "temperature": 0, "seed": 7}
    if stream:
        text, finish, usage = _stream(r)
    else:
        text, finish, usage = r.choices[0].message.content, r.choices[0].finish_reason, r.usage
        assert r.choices[0].message.role == "assistant"

    ref = served.http.post("/api/chat", json={**body, "stream": False}).json()
    n_prompt = len(_chat_ids(served, MESSAGES))
    assert (ref["prompt_eval_count"], ref["eval_count"], ref["done_reason"]) == (n_prompt, 12, "length")
    assert text == ref["message"]["content"] and len(text) > 0
    assert _usage(usage) == (n_prompt, 12, n_prompt + 12) and finish == "length"
    # the OpenAI chat route on the same messages renders the same prompt: the same greedy text
    oai = served.http.post("/v1/chat/completions", json={"model": NAME, "messages": MESSAGES, **GREEDY}).json()
    assert oai["choices"][0]["message"]["content"] == text and oai["usage"]["prompt_tokens"] == n_prompt


# ---- openai/ with api_base ----------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_openai_provider(served, litellm, stream):
    kw = dict(stream=True, stream_options={"include_usage": True}) if stream else {}
    r = litellm.completion(model=f"openai/{NAME}", api_base=served.url + "/v1", api_key="x", messages=MESSAGES,
                           **GREEDY, **kw)
    if stream:
        text, finish, usage = _stream(r)
    else:
        text, finish, usage = r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    ref = served.http.post("/v1/chat/completions", json={"model": NAME, "messages": MESSAGES, **GREEDY}).json()
    n_prompt = len(_chat_ids(served, MESSAGES))
    assert ref["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 12, "total_tokens": n_prompt + 12}
    assert text == ref["choices"][0]["message"]["content"] and len(text) > 0
    assert _usage(usage) == (n_prompt, 12, n_prompt + 12) and finish == ref["choices"][0]["finish_reason"] == "length"


def test_openai_provider_tool_call(served, litellm):
    """A forced call (tool_choice "required", one call) comes back through litellm as a parsed tool call."""
    city = {"type": "string", "enum": ["Paris", "Rome"]}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": city}, "required": ["city"]}}}]
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    kw = dict(tools=tools, tool_choice="required", parallel_tool_calls=False, max_tokens=200, temperature=0)
    r = litellm.completion(model=f"openai/{NAME}", api_base=served.url + "/v1", api_key="x", messages=msgs, **kw)
    ref = served.http.post("/v1/chat/completions", json={"model": NAME, "messages": msgs, **kw}).json()["choices"][0]
    assert ref["finish_reason"] == "tool_calls" and len(ref["message"]["tool_calls"]) == 1
    assert r.choices[0].finish_reason == "tool_calls" and len(r.choices[0].message.tool_calls) == 1
    call, ref_call = r.choices[0].message.tool_calls[0], ref["message"]["tool_calls"][0]
    assert call.function.name == ref_call["function"]["name"] == "get_weather"
    assert json.loads(call.function.arguments) == json.loads(ref_call["function"]["arguments"])
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")


# ---- embeddings ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("provider", ["ollama", "openai"])
def test_embedding(served, litellm, provider):
    texts = ["hello world", "Why is the sky blue?"]
    if provider == "ollama":
        e = litellm.embedding(model=f"ollama/{NAME}", api_base=served.url, input=texts)
        ref = served.http.post("/api/embed", json={"model": NAME, "input": texts}).json()
        ref_vecs, ref_tokens = ref["embeddings"], ref["prompt_eval_count"]
    else:
        e = litellm.embedding(model=f"openai/{NAME}", api_base=served.url + "/v1", api_key="x", input=texts)
        ref = served.http.post("/v1/embeddings", json={"model": NAME, "input": texts}).json()
        ref_vecs, ref_tokens = [d["embedding"] for d in ref["data"]], ref["usage"]["prompt_tokens"]
    vecs = [d["embedding"] for d in e.data]
    assert len(vecs) == 2 and all(len(v) == 64 for v in vecs)  # the tiny model's hidden size
    for v, w in zip(vecs, ref_vecs):
        assert v == pytest.approx(w, abs=1e-6)
        assert sum(x * x for x in v) == pytest.approx(1.0, abs=1e-4)
    assert vecs[0] != pytest.approx(vecs[1], abs=1e-3)
    assert e.usage.prompt_tokens == ref_tokens == sum(len(served.tok.encode(t)) for t in texts)


# ---- async --------------------------------------------------------------------------------------------------
def test_acompletion(served, litellm, sent):
    async def main():
        whole = await litellm.acompletion(model=f"ollama_chat/{NAME}", api_base=served.url, messages=MESSAGES,
                                          **GREEDY)
        stream = await litellm.acompletion(model=f"ollama/{NAME}", api_base=served.url, messages=MESSAGES,
                                           stream=True, **GREEDY)
        return whole, [c async for c in stream]

    whole, chunks = asyncio.run(main())
    ref_chat = served.http.post("/api/chat", json={"model": NAME, "messages": MESSAGES, "stream": False,
                                                   "options": {"num_predict": 12, "temperature": 0}}).json()
    assert whole.choices[0].message.content == ref_chat["message"]["content"]
    assert _usage(whole.usage)[:2] == (ref_chat["prompt_eval_count"], 12)
    _, body = sent[-1]
    ref_gen = served.http.post("/api/generate", json={**body, "stream": False}).json()
    assert _stream(chunks)[0] == ref_gen["response"] and len(ref_gen["response"]) > 0


# ---- errors -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("provider", ["ollama", "ollama_chat", "openai"])
def test_unknown_model_is_not_found(served, litellm, provider):
    base = served.url + "/v1" if provider == "openai" else served.url
    with pytest.raises(litellm.NotFoundError) as err:
        litellm.completion(model=f"{provider}/llama3:8b", api_base=base, api_key="x", messages=MESSAGES,
                           max_tokens=2, num_retries=0)
    assert err.value.status_code == 404 and "llama3:8b" in str(err.value)


# ---- Ollama's README curl lines, as written (only the model name changed) ----------------------------------
README_CURL = {  # ollama/ollama README.md: "Generate a response" / "Chat with a model" (2024-25), and today's line
    "generate": """{
  "model": "llama3.2",
  "prompt":"Why is the sky blue?"
}""",
    "chat": """{
  "model": "llama3.2",
  "messages": [
    { "role": "user", "content": "why is the sky blue?" }
  ]
}""",
    "chat, stream false": """{
  "model": "gemma4",
  "messages": [{
    "role": "user",
    "content": "Why is the sky blue?"
  }],
  "stream": false
}""",
}


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
@pytest.mark.parametrize("which", list(README_CURL))
def test_ollama_readme_curl(served, which):
    body = README_CURL[which].replace('"llama3.2"', f'"{NAME}"').replace('"gemma4"', f'"{NAME}"')
    path = "/api/generate" if which == "generate" else "/api/chat"
    out = subprocess.run(["curl", "-s", "-S", "--fail-with-body", served.url + path, "-d", body],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    parsed = json.loads(body)
    key = "response" if which == "generate" else "message"
    if parsed.get("stream", True):  # newline-delimited JSON, the last object done with the counts
        assert len(lines) > 1 and [x["done"] for x in lines] == [False] * (len(lines) - 1) + [True]
        text = "".join(x[key] if which == "generate" else x[key]["content"] for x in lines)
    else:
        assert len(lines) == 1 and lines[0]["done"] and lines[0]["message"]["role"] == "assistant"
        text = lines[0]["message"]["content"]
    last = lines[-1]
    assert last["model"] == NAME and last["done_reason"] in ("stop", "length") and last["eval_count"] > 0
    # no num_predict: the reply (sampled, with Ollama's defaults) runs to EOS or to the end of the context window
    user = parsed["prompt"] if which == "generate" else parsed["messages"][0]["content"]
    n_prompt = len(_chat_ids(served, [{"role": "user", "content": user}]))
    assert last["prompt_eval_count"] == n_prompt and n_prompt + last["eval_count"] <= 1024
    if which == "generate":  # the context handed back: the prompt's ids, then the reply's, whose text was streamed
        ids = last["context"]
        assert len(ids) == n_prompt + last["eval_count"]
        assert ids[:n_prompt] == _chat_ids(served, [{"role": "user", "content": user}])
        assert text == served.tok.decode(ids[n_prompt:], skip_special_tokens=True)
    else:
        assert len(text) > 0
