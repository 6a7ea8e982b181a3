"""Drop-in fixes of issue 17 against a real server: the legacy Ollama /api/embeddings, and an OpenAPI document that
states what the server accepts (non-empty model / prompt / input / messages, strict non-negative token ids, n and
best_of at most 128). Each rejected request is checked twice: the server answers 400 naming the field, and the
request body fails the published schema (jsonschema), so a client generated from the document agrees."""
from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import jsonschema
import pytest
from test_server import MODEL, RunningServer, run_schemathesis

slow = pytest.mark.slow
CHAT = [{"role": "user", "content": "Hi"}]
TEXT = "hello world"


@pytest.fixture(scope="module")
def served():
    from tokenloom import LLM
    from tokenloom.engine.async_engine import AsyncEngine
    from tokenloom.entrypoints.server import build_app

    llm = LLM(MODEL, max_model_len=2048, kv_cache_memory=256 << 20)
    aengine = AsyncEngine(llm.engine).start()
    server = RunningServer(build_app(aengine, None, api_key=None, max_queue=256))
    doc = httpx.get(server.url + "/openapi.json", timeout=30).json()
    cfg = llm.engine.model_config
    yield SimpleNamespace(url=server.url, doc=doc, hidden=cfg.hidden_size, vocab=cfg.vocab_size,
                          http=httpx.Client(base_url=server.url, timeout=120))
    server.stop()
    aengine.shutdown()


def _schema_of(doc: dict, name: str) -> dict:
    """Component `name` as a standalone JSON schema (its $refs resolve against the document's components)."""
    return {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}


def _schema_accepts(doc: dict, name: str, body: dict) -> bool:
    return jsonschema.Draft202012Validator(_schema_of(doc, name)).is_valid(body)


def _error(path: str, r: httpx.Response) -> tuple[str, str | None]:
    """The error message and (OpenAI only) param of a response."""
    err = r.json()["error"]
    return (err, None) if path.startswith("/api/") else (err["message"], err["param"])


# ---- /api/embeddings ---------------------------------------------------------------------------------------
@slow
def test_ollama_client_embeddings_match_api_embed(served):
    import ollama

    client = ollama.Client(host=served.url, timeout=120)
    vec = client.embeddings(model=MODEL, prompt=TEXT).embedding
    ref = client.embed(model=MODEL, input=TEXT).embeddings[0]
    assert len(vec) == served.hidden
    assert list(vec) == pytest.approx(list(ref), abs=1e-5)
    assert list(client.embeddings(model=MODEL + ":latest", prompt=TEXT).embedding) == pytest.approx(list(ref), abs=1e-5)
    other = client.embeddings(model=MODEL, prompt="quantum chromodynamics").embedding
    assert sum(a * b for a, b in zip(vec, other)) < 0.999
    # Ollama answers an empty (or missing) prompt with an empty embedding
    assert list(client.embeddings(model=MODEL, prompt="").embedding) == []
    assert served.http.post("/api/embeddings", json={"model": MODEL}).json() == {"embedding": []}
    with pytest.raises(ollama.ResponseError) as err:
        client.embeddings(model="llama3:8b", prompt=TEXT)
    assert err.value.status_code == 404 and "not found" in err.value.error


@slow
def test_api_embeddings_errors(served):
    r = served.http.post("/api/embeddings", json={"model": MODEL, "prompt": "word " * 3000})
    assert r.status_code == 400 and list(r.json()) == ["error"], r.text
    assert "context window" in r.json()["error"] and "/api/embed" in r.json()["error"]
    r = served.http.post("/api/embeddings", json={"model": "", "prompt": TEXT})
    assert r.status_code == 400 and "model" in r.json()["error"], r.text
    r = served.http.post("/api/embeddings", json={"prompt": TEXT})
    assert r.status_code == 400 and "model" in r.json()["error"], r.text
    # the server is still fine, and the document lists the route with its bodies
    assert len(served.http.post("/api/embeddings", json={"model": MODEL, "prompt": TEXT}).json()["embedding"]) \
        == served.hidden
    op = served.doc["paths"]["/api/embeddings"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/EmbeddingsRequest")
    assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/EmbeddingsResponse")
    assert {"400", "404"} <= set(op["responses"]) and "422" not in op["responses"]


# ---- what the server rejects, the schema rejects ------------------------------------------------------------
# (path, request schema, body, param, message fragment)
REJECTED = [
    ("/v1/completions", "CompletionRequest", {"model": "", "prompt": "x"}, "model", "must not be empty"),
    ("/v1/chat/completions", "ChatCompletionRequest", {"model": "", "messages": CHAT}, "model", "must not be empty"),
    ("/v1/embeddings", "EmbeddingRequest", {"model": "", "input": "x"}, "model", "must not be empty"),
    ("/v1/completions", "CompletionRequest", {"prompt": ""}, "prompt", "must not be empty"),
    ("/v1/completions", "CompletionRequest", {"prompt": []}, "prompt", "must not be empty"),
    ("/v1/completions", "CompletionRequest", {"prompt": ["a", ""]}, "prompt", "item 1 is empty"),
    ("/v1/completions", "CompletionRequest", {"prompt": [[]]}, "prompt", "item 0 is empty"),
    ("/v1/chat/completions", "ChatCompletionRequest", {"messages": []}, "messages", "must not be empty"),
    ("/v1/embeddings", "EmbeddingRequest", {"input": ""}, "input", "must not be empty"),
    ("/v1/embeddings", "EmbeddingRequest", {"input": []}, "input", "must not be empty"),
    ("/v1/embeddings", "EmbeddingRequest", {"input": [[1], []]}, "input", "item 1 is empty"),
    ("/v1/completions", "CompletionRequest", {"prompt": [[False]]}, "prompt", "integers >= 0, got false"),
    ("/v1/completions", "CompletionRequest", {"prompt": [True, 2]}, "prompt", "integers >= 0, got true"),
    ("/v1/completions", "CompletionRequest", {"prompt": [[5, -1]]}, "prompt", "integers >= 0, got -1"),
    ("/v1/embeddings", "EmbeddingRequest", {"input": [[False]]}, "input", "integers >= 0, got false"),
    ("/v1/embeddings", "EmbeddingRequest", {"input": [True]}, "input", "integers >= 0, got true"),
    ("/v1/completions", "CompletionRequest", {"prompt": "x", "stop_token_ids": [True]}, "stop_token_ids",
     "integers >= 0, got true"),
    ("/v1/completions", "CompletionRequest", {"prompt": "x", "n": 2000}, "n", "[1, 128]"),
    ("/v1/completions", "CompletionRequest", {"prompt": "x", "n": 129, "best_of": 129}, "n", "[1, 128]"),
    ("/v1/completions", "CompletionRequest", {"prompt": "x", "best_of": 2000}, "best_of", "[1, 128]"),
    ("/v1/chat/completions", "ChatCompletionRequest", {"messages": CHAT, "n": 2000}, "n", "[1, 128]"),
    ("/v1/completions", "CompletionRequest", {"prompt": "x", "n": 0}, "n", "[1, 128]"),
    ("/api/generate", "GenerateRequest", {"model": "", "prompt": "x"}, None, "model: must not be empty"),
    ("/api/chat", "ChatRequest", {"model": "", "messages": CHAT}, None, "model: must not be empty"),
    ("/api/generate", "GenerateRequest", {"model": MODEL, "prompt": "x", "context": [False, 1]}, None,
     "context: token ids must be integers >= 0, got false"),
    ("/api/generate", "GenerateRequest", {"model": MODEL, "prompt": "x", "context": [-3]}, None,
     "context: token ids must be integers >= 0, got -3"),
    ("/api/embed", "EmbedRequest", {"model": MODEL, "input": ""}, None, "input: must not be empty"),
    ("/api/embed", "EmbedRequest", {"model": MODEL, "input": []}, None, "input: must not be empty"),
    ("/api/embed", "EmbedRequest", {"model": MODEL, "input": ["a", ""]}, None, "input: item 1 is empty"),
    ("/api/embed", "EmbedRequest", {"model": "", "input": "x"}, None, "model: must not be empty"),
    ("/api/embeddings", "EmbeddingsRequest", {"model": "", "prompt": "x"}, None, "model: must not be empty"),
]


@slow
@pytest.mark.parametrize("path,schema,body,param,fragment", REJECTED,
                         ids=[f"{p} {json.dumps(b)}" for p, _, b, *_ in REJECTED])
def test_rejected_by_server_and_schema(served, path, schema, body, param, fragment):
    body = {**body, "max_tokens": 1} if path.startswith("/v1/c") else {**body, "stream": False} \
        if path in ("/api/generate", "/api/chat") else body
    r = served.http.post(path, json=body)
    assert r.status_code == 400, r.text
    message, got_param = _error(path, r)
    assert fragment in message and got_param == param, r.text
    assert not _schema_accepts(served.doc, schema, body), f"the OpenAPI schema {schema} accepts {body}"


# (request schema, body): accepted by the schema and, where the server answers cheaply, by the server too
ACCEPTED = [
    ("CompletionRequest", {"prompt": "x", "n": 128, "best_of": 128}),
    ("CompletionRequest", {"prompt": [[0], [1, 2]], "stop_token_ids": [0]}),
    ("CompletionRequest", {"model": MODEL, "prompt": [0, 5]}),
    ("ChatCompletionRequest", {"messages": CHAT}),
    ("EmbeddingRequest", {"input": [[0, 1], [2]]}),
    ("EmbeddingRequest", {"model": None, "input": ["a", "b"]}),
    ("GenerateRequest", {"model": MODEL, "prompt": "", "context": [0, 1]}),
    ("ChatRequest", {"model": MODEL, "messages": []}),
    ("EmbedRequest", {"model": MODEL, "input": ["a"]}),
    ("EmbeddingsRequest", {"model": MODEL, "prompt": ""}),
]


@slow
def test_schema_still_accepts_valid_requests(served):
    for schema, body in ACCEPTED:
        assert _schema_accepts(served.doc, schema, body), (schema, body)
    for path, body in [("/v1/completions", {"model": MODEL, "prompt": [[0], [1, 2]], "max_tokens": 1}),
                       ("/v1/completions", {"prompt": "x", "n": 3, "best_of": 3, "max_tokens": 1}),
                       ("/v1/embeddings", {"input": [[0, 1], [2]]}),
                       ("/api/generate", {"model": MODEL, "prompt": "x", "context": [0, 1], "stream": False,
                                          "options": {"num_predict": 1}})]:
        r = served.http.post(path, json=body)
        assert r.status_code == 200, (path, r.text)


@slow
def test_openapi_states_the_limits(served):
    schemas = served.doc["components"]["schemas"]
    token_id = {"type": "integer", "minimum": 0}
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = schemas[name]["properties"]
        assert props["n"]["minimum"] == 1 and props["n"]["maximum"] == 128 and "128" in props["n"]["description"]
        assert props["model"]["anyOf"] == [{"type": "string", "minLength": 1}, {"type": "null"}]
        assert "model" not in schemas[name].get("required", [])  # still optional: the served model
        assert props["stop_token_ids"]["anyOf"][0]["items"] == token_id
    best_of = schemas["CompletionRequest"]["properties"]["best_of"]["anyOf"][0]
    assert best_of["maximum"] == 128 and best_of["minimum"] == 1
    assert schemas["ChatCompletionRequest"]["properties"]["messages"]["minItems"] == 1
    for name, field in [("CompletionRequest", "prompt"), ("EmbeddingRequest", "input")]:
        text, texts, ids, id_lists = schemas[name]["properties"][field]["anyOf"]
        assert text == {"type": "string", "minLength": 1}
        assert texts["minItems"] == 1 and texts["items"] == {"type": "string", "minLength": 1}
        assert ids["minItems"] == 1 and ids["items"] == token_id
        assert id_lists["minItems"] == 1 and id_lists["items"] == {"type": "array", "minItems": 1, "items": token_id}
    assert schemas["EmbeddingRequest"]["properties"]["model"]["anyOf"][0]["minLength"] == 1
    assert schemas["GenerateRequest"]["properties"]["context"]["anyOf"][0]["items"] == token_id
    for name in ("GenerateRequest", "ChatRequest", "EmbedRequest", "EmbeddingsRequest"):
        assert schemas[name]["properties"]["model"]["minLength"] == 1 and "model" in schemas[name]["required"]
    text, texts = schemas["EmbedRequest"]["properties"]["input"]["anyOf"]
    assert text["minLength"] == 1 and texts["minItems"] == 1 and texts["items"]["minLength"] == 1
    assert schemas["EmbeddingsResponse"]["properties"]["embedding"]["items"] == {"type": "number"}


# ---- schemathesis: generated requests against the document, every check --------------------------------------
GENERATING = ["/v1/completions", "/v1/chat/completions", "/api/generate", "/api/chat"]
FUZZED = [("POST", "/v1/embeddings", "positive"), ("POST", "/v1/embeddings", "negative"),
          ("POST", "/api/embed", "positive"), ("POST", "/api/embed", "negative"),
          ("POST", "/api/embeddings", "positive"), ("POST", "/api/embeddings", "negative"),
          ("GET", "/v1/models", "positive"), ("GET", "/api/tags", "positive"), ("GET", "/api/ps", "positive"),
          ("GET", "/api/version", "positive"), ("GET", "/health", "positive")] + [
          ("POST", path, mode) for path in GENERATING for mode in ("positive", "negative")]
MAX_FUZZ_TOKENS = 4
# What a model-independent document cannot state: a valid JSON schema or grammar in the constraint fields
_CONSTRAINTS = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                "guided_grammar", "tools", "tool_choice", "format")


def _ids(x, vocab: int):
    return [_ids(t, vocab) for t in x] if isinstance(x, list) else int(x) % vocab


def _within_model(body, path: str, vocab: int, hidden: int):
    """A schema-valid body brought within what a model-independent document cannot state: token ids inside the
    vocabulary, dimensions equal to the hidden size, valid schemas in the constraint fields (dropped), and
    cross-field rules (best_of == n, min_tokens <= max_tokens, stream_options only when streaming); plus a short
    output (MAX_FUZZ_TOKENS, at most 2 choices), so the test stays quick."""
    if not isinstance(body, dict):
        return body
    if body.get("dimensions") is not None:
        body["dimensions"] = hidden
    for key in ("input", "prompt"):
        inp = body.get(key)
        if isinstance(inp, list) and inp and not isinstance(inp[0], str):
            body[key] = _ids(inp, vocab)
    if path == "/v1/completions":  # a text may hold no token of this vocabulary (then "prompt is empty", a 400)
        prompt = body.get("prompt")
        body["prompt"] = prompt + " x" if isinstance(prompt, str) else [
            p + " x" if isinstance(p, str) else p for p in prompt] if isinstance(prompt, list) else prompt
    for key in ("stop_token_ids", "context"):
        if body.get(key):
            body[key] = _ids(body[key], vocab)
    if body.get("logit_bias"):
        body["logit_bias"] = {str(int(k) % vocab): v for k, v in body["logit_bias"].items()}
    for key in _CONSTRAINTS:
        body.pop(key, None)
    if path in ("/v1/completions", "/v1/chat/completions"):
        body["n"] = min(int(body.get("n") or 1), 2)
        for key in ("best_of", "scorer", "self_consistency"):  # many candidates or a judge each (test_ttc.py)
            body.pop(key, None)
        for key in ("max_tokens", "max_completion_tokens"):
            body[key] = min(int(body.get(key) or MAX_FUZZ_TOKENS), MAX_FUZZ_TOKENS)
        body["min_tokens"] = min(int(body.get("min_tokens") or 0), body["max_tokens"], body["max_completion_tokens"])
        if not body.get("stream"):
            body.pop("stream_options", None)
        if body.get("top_logprobs") is not None and path == "/v1/chat/completions":
            body["logprobs"] = True
        if body.get("continue_final_message"):
            body["add_generation_prompt"] = False
    if path in ("/api/generate", "/api/chat"):
        opts = body["options"] if isinstance(body.get("options"), dict) else {}
        num = opts.get("num_predict")
        opts["num_predict"] = MAX_FUZZ_TOKENS if num is None or num < 0 else min(int(num), MAX_FUZZ_TOKENS)
        body["options"] = opts
    return body


@slow
@pytest.mark.parametrize("method,path,mode", FUZZED, ids=[" ".join(f) for f in FUZZED])
def test_schemathesis(served, method, path, mode):
    run_schemathesis(served.doc, served.url, method, path, mode,
                     lambda body: _within_model(body, path, served.vocab, served.hidden))
