"""Structured output and tool calling through a real server, driven by the official `openai` and `ollama`
clients: JSON schemas, regex, choice and grammars; forced, named and automatic tool calls; a tool round trip,
streamed and not; bad constraints answered with 400s that name the problem and leave nothing behind."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest
from test_server import MODEL, RunningServer

pytestmark = pytest.mark.slow

S, I, N, B = ({"type": "string", "maxLength": 24}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"})


def _obj(props: dict, required=None) -> dict:
    return {"type": "object", "properties": props, "required": list(required or props), "additionalProperties": False}


SCHEMAS = [
    _obj({"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    _obj({"city": S, "country": S, "population": {"type": "integer", "minimum": 1}}),
    _obj({"title": S, "tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}}),
    _obj({"answer": {"enum": ["yes", "no", "maybe"]}, "confidence": {"type": "number", "minimum": 0, "maximum": 1}}),
    _obj({"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}, "event": S}),
    _obj({"user": _obj({"id": I, "email": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.com$"}}),
          "active": B}),
    _obj({"items": {"type": "array", "minItems": 2, "maxItems": 2, "items": _obj({"sku": S, "qty": I})}}),
    _obj({"color": {"enum": ["red", "green", "blue"]}, "hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}}),
    _obj({"x": N, "y": N, "label": {"type": ["string", "null"], "maxLength": 12}}),
    _obj({"word": {"type": "string", "minLength": 3, "maxLength": 8}, "letters": {"type": "integer", "minimum": 3}}),
    _obj({"book": _obj({"title": S, "author": S, "year": {"type": "integer", "minimum": 1400, "maximum": 2030}})}),
    _obj({"scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 10}, "maxItems": 4}}),
    _obj({"status": {"const": "ok"}, "code": {"type": "integer", "exclusiveMinimum": 99, "exclusiveMaximum": 600}}),
    _obj({"first": S, "last": S, "nickname": S}, required=["first", "last"]),
    _obj({"matrix": {"type": "array", "minItems": 2, "maxItems": 2,
                     "items": {"type": "array", "minItems": 2, "maxItems": 2, "items": I}}}),
    _obj({"recipe": S, "vegan": B, "steps": {"type": "array", "items": S, "minItems": 1, "maxItems": 2}}),
    _obj({"temperature": {"type": "number", "minimum": -50, "maximum": 60}, "unit": {"enum": ["C", "F"]}}),
    _obj({"planet": {"enum": ["Mercury", "Venus", "Earth", "Mars"]}, "moons": {"type": "integer", "minimum": 0}}),
    {"anyOf": [_obj({"kind": {"const": "cat"}, "lives": I}), _obj({"kind": {"const": "dog"}, "good": B})]},
    _obj({"ok": B, "note": {"type": "string", "maxLength": 16}, "count": {"type": "integer", "maximum": 99}}),
]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                      "parameters": _obj({"city": {"type": "string", "maxLength": 30},
                                                          "unit": {"enum": ["celsius", "fahrenheit"]}})}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers",
                                      "parameters": _obj({"a": I, "b": I})}},
]
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def served():
    from tokenloom import LLM
    from tokenloom.engine.async_engine import AsyncEngine
    from tokenloom.entrypoints.server import build_app

    llm = LLM(MODEL, max_model_len=2048, kv_cache_memory=384 << 20)
    aengine = AsyncEngine(llm.engine).start()
    server = RunningServer(build_app(aengine, None, api_key=None, max_queue=256))
    yield server, aengine
    server.stop()
    aengine.shutdown()


@pytest.fixture(scope="module")
def oai(served):
    import openai

    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _check_call(call, tools=TOOLS):
    """An OpenAI tool call naming one of the tools, its arguments valid against that tool's parameters."""
    spec = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in spec
    jsonschema.validate(json.loads(call.function.arguments), spec[call.function.name])


def test_json_schemas_through_openai_and_ollama(served, oai):
    """20 schemas at temperature 0.7: every output validates and ends with finish_reason stop (openai for the
    even ones, ollama's format for the odd ones), all at once."""
    import ollama

    client = ollama.Client(host=served[0].url)

    def one(k: int):
        ask = [{"role": "user", "content": f"Reply with a JSON object. Example {k}."}]
        if k % 2 == 0:
            r = oai.chat.completions.create(
                model=MODEL, messages=ask, temperature=0.7, max_tokens=400, seed=k,
                response_format={"type": "json_schema", "json_schema": {"name": f"s{k}", "schema": SCHEMAS[k]}})
            return r.choices[0].message.content, r.choices[0].finish_reason
        r = client.chat(model=MODEL, messages=ask, format=SCHEMAS[k],
                        options={"temperature": 0.7, "num_predict": 400, "seed": k})
        return r.message.content, r.done_reason

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(one, range(len(SCHEMAS))))
    for k, (text, finish) in enumerate(results):
        assert finish == "stop", (k, text)
        jsonschema.validate(json.loads(text), SCHEMAS[k])


def test_json_object_regex_choice_and_grammars(served, oai):
    # any JSON object may nest without end (a small model does, given nothing to say): ask for a plain one
    ask = "Return a JSON object with the keys \"name\" and \"age\" for a person called Ann, aged 30."
    r = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ask}],
                                    response_format={"type": "json_object"}, max_tokens=400, temperature=0)
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
    pattern = r"\(\d{3}\) \d{3}-\d{4}"
    r = oai.completions.create(model=MODEL, prompt="Call us at", max_tokens=30, temperature=1.0, seed=2,
                               extra_body={"structured_outputs": {"regex": pattern}})
    assert re.fullmatch(pattern, r.choices[0].text) and r.choices[0].finish_reason == "stop"
    choices = ["positive", "negative", "neutral"]
    r = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "I love it! Sentiment?"}],
                                    extra_body={"guided_choice": choices}, max_tokens=10, n=3, temperature=1.0,
                                    seed=5)
    assert all(c.message.content in choices for c in r.choices)
    lark = 'start: expr\nexpr: NUM | expr OP expr | "(" expr ")"\nNUM: /[0-9]{1,3}/\nOP: "+" | "-" | "*"'
    gbnf = 'root ::= "[" item ("," item)? ("," item)? "]"\nitem ::= [a-z]{1,6}'  # bounded: it must close
    checks = ((lark, re.compile(r"[0-9()+\-*]+")), (gbnf, re.compile(r"\[[a-z]{1,6}(,[a-z]{1,6}){0,2}\]")))
    for grammar, check in checks:
        r = oai.completions.create(model=MODEL, prompt="Answer:", max_tokens=60, temperature=0.8, seed=3,
                                   extra_body={"structured_outputs": {"grammar": grammar}})
        text = r.choices[0].text
        assert check.fullmatch(text), text
        if grammar is lark and r.choices[0].finish_reason == "stop":
            eval(compile(text, "<expr>", "eval"), {})  # a well-formed arithmetic expression


@pytest.mark.parametrize("stream", [False, True])
def test_forced_and_named_tool_calls(oai, stream):
    for choice in ("required", {"type": "function", "function": {"name": "add"}}):
        r = oai.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=TOOLS, tool_choice=choice,
                                        max_tokens=120, temperature=0.7, seed=5, parallel_tool_calls=False,
                                        stream=stream)
        if stream:
            chunks = [c for c in r if c.choices]
            deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
            assert len(deltas) == 1 and chunks[-1].choices[0].finish_reason == "tool_calls"
            calls = deltas
        else:
            assert r.choices[0].finish_reason == "tool_calls"
            calls = r.choices[0].message.tool_calls
        assert len(calls) == 1
        _check_call(calls[0])
        if isinstance(choice, dict):
            assert calls[0].function.name == "add"


@pytest.mark.parametrize("stream", [False, True])
def test_tool_round_trip(oai, stream):
    """call -> tool result -> final answer: the result is rendered into the prompt (which grows by it) and the
    model answers in text."""
    first = oai.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=TOOLS, tool_choice="required",
                                        parallel_tool_calls=False, max_tokens=120, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    _check_call(call)
    result = json.dumps({"temperature": 18, "conditions": "sunny"})
    history = ASK_WEATHER + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                             {"role": "tool", "tool_call_id": call.id, "content": result}]
    r = oai.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none", max_tokens=60,
                                    temperature=0, stream=stream, **({"stream_options": {"include_usage": True}}
                                                                     if stream else {}))
    if stream:
        chunks = list(r)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
        assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
    else:
        text, usage = r.choices[0].message.content, r.usage
        assert r.choices[0].message.tool_calls is None
    assert text.strip()
    assert usage.prompt_tokens > first.usage.prompt_tokens + 10  # the call and its result are in the prompt


def test_ollama_tools_and_round_trip(served):
    """Ollama's /api/chat: tools in, any tool call out valid; a history with a call (arguments as an object)
    and its result renders and is answered."""
    import ollama

    client = ollama.Client(host=served[0].url)
    for seed in range(3):
        r = client.chat(model=MODEL, messages=ASK_WEATHER, tools=TOOLS,
                        options={"temperature": 0.9, "seed": seed, "num_predict": 120})
        for call in r.message.tool_calls or []:
            spec = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
            jsonschema.validate(dict(call.function.arguments), spec[call.function.name])
    history = ASK_WEATHER + [
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                          "arguments": {"city": "Paris",
                                                                                        "unit": "celsius"}}}]},
        {"role": "tool", "content": '{"temperature": 18}', "tool_name": "get_weather"}]
    r = client.chat(model=MODEL, messages=history, options={"temperature": 0, "num_predict": 40})
    assert r.message.content.strip() and r.done


def test_bad_constraints_are_400s_and_leak_nothing(served):
    server, aengine = served
    url = server.url
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    cases = [
        ({**chat, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
         "response_format", "foo"),
        ({**chat, "structured_outputs": {"regex": "[a-"}}, "structured_outputs", "regex"),
        ({**chat, "structured_outputs": {"grammar": "start: foo bar"}}, "structured_outputs", "foo"),
        ({**chat, "structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
        ({**chat, "response_format": {"type": "json_schema"}}, "response_format", "schema"),
        ({**chat, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice", "nope"),
        ({**chat, "tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools", "name"),
        ({**chat, "tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
         "tool_choice", "response format"),
    ]
    for body, param, words in cases:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"], err
    r = httpx.post(url + "/api/chat", json={"model": MODEL, "messages": chat["messages"], "format": "yaml",
                                           "stream": False}, timeout=60)
    assert r.status_code == 400 and "format" in r.json()["error"]
    st = aengine.stats()
    assert st.num_running == 0 and st.num_waiting == 0 and st.num_blocks_used == 0
    metrics = httpx.get(url + "/metrics", timeout=30).text
    compiles = re.search(r'^tokenloom_grammar_compiles\{[^}]*\} (\S+)', metrics, re.M)
    assert compiles and float(compiles.group(1)) >= 1
