"""Tool calling (tokenloom.entrypoints.tool_calls): prompts, the grammar that keeps calls valid (checked against
llguidance with the default model's real tokenizer), and parsing calls out of whole and streamed outputs."""
from __future__ import annotations

import json
import random
import re

import pytest

from tokenloom.entrypoints.tool_calls import (
    ToolCallStreamParser,
    ToolError,
    format_tool_call,
    from_ollama_messages,
    parse_tool_calls,
    prepare_messages,
    template_supports_tools,
    to_ollama_tool_calls,
    tool_call_grammar,
    tool_constraint,
)
from tokenloom.sampling_params import StructuredOutputsParams
from tokenloom.tokenizer.chat_template import render_chat

slow = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city"], "additionalProperties": False}}}
FLIGHTS = {"type": "function", "function": {
    "name": "search_flights", "description": "Flights between two airports",
    "parameters": {"type": "object", "properties": {
        "origin": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "destination": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
        "nonstop": {"type": "boolean"}},
        "required": ["origin", "destination"], "additionalProperties": False}}}
EMAIL = {"type": "function", "function": {  # pydantic-style: local $refs into its own $defs
    "name": "send_email",
    "parameters": {"type": "object", "properties": {
        "to": {"type": "array", "items": {"$ref": "#/$defs/Address"}, "minItems": 1, "maxItems": 2},
        "subject": {"type": "string", "maxLength": 16}},
        "required": ["to", "subject"], "additionalProperties": False,
        "$defs": {"Address": {"type": "string", "maxLength": 10}}}}}
NOW = {"type": "function", "function": {"name": "now"}}  # no parameters: an empty parameter list
TOOLS = [WEATHER, FLIGHTS, EMAIL]
ID = re.compile(r"^call_[0-9a-f]{24}$")

SMOLLM2_TEMPLATE = (  # the default model's template (no tool support)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QWEN_LIKE_TEMPLATE = (  # the shape of Qwen2.5's: tools listed, arguments rendered with tojson (so a mapping)
    "{%- if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}{% if m.tool_calls %}<|im_start|>assistant\n{% for tc in m.tool_calls %}"
    '<tool_call>\n{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}\n'
    "</tool_call>{% endfor %}<|im_end|>\n{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n"
    "{{ m.content }}\n</tool_response><|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

ROUND_TRIP = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
    {"role": "tool", "tool_call_id": "call_2", "name": "get_weather", "content": "24C, cloudy"},
    {"role": "user", "content": "Thanks. And Oslo?"},
]


def call_text(name, arguments):
    return format_tool_call(name, arguments)


def strip_ids(calls):
    return [{k: v for k, v in c.items() if k != "id"} for c in calls]


# -- templates and prompts ------------------------------------------------------------------------------------------

def test_template_supports_tools():
    assert not template_supports_tools(SMOLLM2_TEMPLATE)
    assert not template_supports_tools(None) and not template_supports_tools("")
    assert template_supports_tools(QWEN_LIKE_TEMPLATE)
    assert template_supports_tools("{% for t in tools %}{{ t.function.name }}{% endfor %}")
    assert not template_supports_tools("{{ 'I have no tools.' }}{{ messages[0].content }}")  # prose, not the variable
    # a tag a plain Jinja environment does not know: the text decides
    assert template_supports_tools("{% generation %}{{ tools }}{% endgeneration %}")
    assert not template_supports_tools("{% generation %}{{ x }}{% endgeneration %}")


@pytest.mark.parametrize("tools, msg", [
    ({"type": "function"}, "must be a list"),
    ([{"function": {"name": "f"}}], "type 'function'"),
    ([{"type": "code_interpreter"}], "type 'function'"),
    ([{"type": "function"}], "'function' must be an object"),
    ([{"type": "function", "function": {"name": ""}}], "non-empty string"),
    ([{"type": "function", "function": {"name": 3}}], "non-empty string"),
    ([{"type": "function", "function": {"name": "f", "parameters": "{}"}}], "JSON schema object"),
    ([{"type": "function", "function": {"name": "f", "description": 1}}], "description"),
    ([NOW, NOW], "given twice"),
])
def test_invalid_tools(tools, msg):
    for native in (True, False):
        with pytest.raises(ValueError, match=re.escape(msg)) as exc:
            prepare_messages([{"role": "user", "content": "hi"}], tools, native)
        assert isinstance(exc.value, ToolError) and exc.value.param == "tools"
    with pytest.raises(ToolError, match=re.escape(msg)):
        tool_constraint(tools, "auto")


def test_prepare_native_parses_arguments():
    messages = json.loads(json.dumps(ROUND_TRIP))
    messages[2]["tool_calls"][1]["function"]["arguments"] = "not json"
    out, tools = prepare_messages(messages, TOOLS, native=True)
    assert tools == TOOLS
    assert messages == ROUND_TRIP[:2] + [messages[2]] + ROUND_TRIP[3:]  # the input is left alone
    calls = out[2]["tool_calls"]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert calls[1]["function"]["arguments"] == "not json"  # kept as it was
    assert calls[0]["id"] == "call_1" and out[3] == ROUND_TRIP[3] and out[4] == ROUND_TRIP[4]
    assert prepare_messages(ROUND_TRIP, None, native=True)[1] is None
    text = render_chat(QWEN_LIKE_TEMPLATE, out, {}, tools=tools)
    assert '"arguments": {"city": "Paris"}}' in text  # a mapping, not a JSON string inside JSON
    assert '"name": "search_flights"' in text and "<tool_response>\n24C, cloudy\n</tool_response>" in text


def test_prepare_text_tools():
    out, tools = prepare_messages(ROUND_TRIP, TOOLS, native=False)
    assert tools is None
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user", "user"]
    system = out[0]["content"]
    assert system.startswith("Be brief.\n\n# Tools")  # merged into the existing system message
    for tool in TOOLS:
        assert json.dumps({"type": "function", "function": tool["function"]}) in system
    assert "<tool_call>" in system and "</tool_call>" in system
    assert out[2] == {"role": "assistant", "content": call_text("get_weather", {"city": "Paris"}) + "\n"
                      + call_text("get_weather", {"city": "Rome"})}
    # both results of the turn in one user message
    assert out[3] == {"role": "user", "content": "<tool_response>\n18C, sunny\n</tool_response>\n"
                                                "<tool_response>\n24C, cloudy\n</tool_response>"}
    assert out[4] == ROUND_TRIP[5]

    out, _ = prepare_messages(ROUND_TRIP[1:], [NOW], native=False)  # no system message: one is prepended
    assert out[0]["role"] == "system" and out[0]["content"].startswith("# Tools")
    assert '{"type": "function", "function": {"name": "now"}}' in out[0]["content"]
    assert out[1] == ROUND_TRIP[1]


def test_prepare_text_history_without_tools():
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": "Let me look.", "tool_calls": [
                   {"id": "c", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "c", "content": [{"type": "text", "text": "12:00"}]},
               {"role": "tool", "tool_call_id": "d", "content": {"ok": True}},
               {"role": "assistant", "content": "It is noon."}]
    out, tools = prepare_messages(history, None, native=False)
    assert tools is None and [m["role"] for m in out] == ["user", "assistant", "user", "assistant"]
    assert out[1]["content"] == "Let me look.\n" + call_text("now", {})
    assert out[2]["content"] == ('<tool_response>\n12:00\n</tool_response>\n'
                                 '<tool_response>\n{"ok": true}\n</tool_response>')
    with pytest.raises(ToolError, match="function with a name") as exc:
        prepare_messages([{"role": "assistant", "tool_calls": [{"id": "x"}]}], None, native=False)
    assert exc.value.param == "messages"


# -- the constraint -------------------------------------------------------------------------------------------------

def test_tool_constraint_modes():
    assert tool_constraint(None, None) is None and tool_constraint([], "auto") is None
    assert tool_constraint(TOOLS, "none") is None
    for choice in (None, "auto", "required", {"type": "function", "function": {"name": "search_flights"}}):
        params = tool_constraint(TOOLS, choice)
        assert isinstance(params, StructuredOutputsParams) and params.kind == "grammar"
    assert tool_constraint(TOOLS, None).grammar == tool_constraint(TOOLS, "auto").grammar
    named = tool_constraint(TOOLS, {"type": "function", "function": {"name": "search_flights"}}).grammar
    assert '"search_flights"' in named and '"get_weather"' not in named
    assert named == tool_call_grammar([FLIGHTS], "required", parallel=False)
    with pytest.raises(ToolError, match="'nope' is not among the tools") as exc:
        tool_constraint(TOOLS, {"type": "function", "function": {"name": "nope"}})
    assert exc.value.param == "tool_choice"
    for bad in ("always", {"type": "function"}, {"function": {"name": "now"}}, 3):
        with pytest.raises(ToolError) as exc:
            tool_constraint(TOOLS, bad)
        assert exc.value.param == "tool_choice"


def test_tool_constraint_schema_errors():
    lookaround = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(?=x)y"}}}}}
    with pytest.raises(ToolError, match="cannot be used as a constraint") as exc:
        tool_constraint([lookaround], "required")
    assert exc.value.param == "tools"
    # keywords llguidance does not implement are ignored (lenient), not fatal
    loose = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "format": "made-up"}},
        "if": {"required": ["a"]}, "then": {"required": ["a"]}}}}
    assert tool_constraint([loose], "required") is not None


def test_grammar_whitespace_is_bounded():
    from tokenloom.structured_output.backend import BOUNDED_JSON_WHITESPACE

    schema = json.loads(tool_call_grammar(TOOLS, "auto").split("args: %json ", 1)[1].split("\n")[0])
    assert schema["x-guidance"]["whitespace_pattern"] == BOUNDED_JSON_WHITESPACE
    assert schema["$defs"]["tool_2"]["properties"]["to"]["items"] == {"$ref": "#/$defs/tool_2/$defs/Address"}


# -- parsing --------------------------------------------------------------------------------------------------------

PARIS = call_text("get_weather", {"city": "Paris"})
ROME = call_text("get_weather", {"city": "Rome", "unit": "celsius"})


def fn(name, args):
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


@pytest.mark.parametrize("text, content, calls", [
    ("Hello there!", "Hello there!", []),
    ("", "", []),
    ("  spaced out \n", "  spaced out \n", []),
    (PARIS, None, [fn("get_weather", {"city": "Paris"})]),
    (PARIS + "\n" + ROME + "\n", None, [fn("get_weather", {"city": "Paris"}),
                                        fn("get_weather", {"city": "Rome", "unit": "celsius"})]),
    ("Let me check.\n" + PARIS, "Let me check.", [fn("get_weather", {"city": "Paris"})]),
    ("\n \n" + PARIS + "\n\n", None, [fn("get_weather", {"city": "Paris"})]),
    # tolerated: no closing tag at the end, a cut closing tag, whitespace, "parameters", arguments as a string
    ('<tool_call>\n{"name": "now", "arguments": {}}', None, [fn("now", {})]),
    ('<tool_call>{"name": "now", "arguments": {}}\n</tool_', None, [fn("now", {})]),
    ('<tool_call>\n\n  {"name":"now","parameters":{"a":1}}  \n\n</tool_call>', None, [fn("now", {"a": 1})]),
    ('<tool_call>{"name": "now", "arguments": "{\\"a\\": 1}"}</tool_call>', None, [fn("now", {"a": 1})]),
    ('<tool_call>{"name": "now"}</tool_call>', None, [fn("now", {})]),
    ('<tool_call>[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]</tool_call>', None,
     [fn("a", {}), fn("b", {})]),
    # a closing tag inside an argument's text does not end the block
    ('<tool_call>{"name": "say", "arguments": {"t": "a </tool_call> b"}}</tool_call>', None,
     [fn("say", {"t": "a </tool_call> b"})]),
    # not calls: left in the content as written
    ("<tool_call>\nnot json\n</tool_call>", "<tool_call>\nnot json\n</tool_call>", []),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    ('<tool_call>{"name": "x", "arguments": [1]}', '<tool_call>{"name": "x", "arguments": [1]}', []),
    ("<tool_call>\n{broken\n</tool_call>\n" + PARIS, "<tool_call>\n{broken\n</tool_call>",
     [fn("get_weather", {"city": "Paris"})]),
    ("a <b>tag</b> and <tool_ca", "a <b>tag</b> and <tool_ca", []),
    (PARIS + "\nDone.", "\nDone.", [fn("get_weather", {"city": "Paris"})]),
    # bare JSON (Llama 3.1 style), a call or a list of them; JSON that is not a call stays content
    ('{"name": "get_weather", "parameters": {"city": "Oslo"}}', None, [fn("get_weather", {"city": "Oslo"})]),
    (' [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": null}}] ', None,
     [fn("a", {}), fn("b", {"x": None})]),
    ('{"name": "Ada", "age": 36}', '{"name": "Ada", "age": 36}', []),
    ("[1, 2, 3]", "[1, 2, 3]", []),
    ("{not json} " + PARIS, "{not json}", [fn("get_weather", {"city": "Paris"})]),
])
def test_parse_tool_calls(text, content, calls):
    got_content, got_calls = parse_tool_calls(text)
    assert got_content == content
    assert strip_ids(got_calls) == calls
    assert all(ID.match(c["id"]) for c in got_calls)
    assert len({c["id"] for c in got_calls}) == len(got_calls)
    for c in got_calls:
        assert isinstance(json.loads(c["function"]["arguments"]), dict)


def test_parse_tool_names_filter():
    text = PARIS + "\n" + call_text("rm_rf", {})
    content, calls = parse_tool_calls(text, tool_names={"get_weather"})
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert content == "\n" + call_text("rm_rf", {})  # whitespace is only dropped before a call
    assert parse_tool_calls('{"name": "rm_rf", "arguments": {}}', tool_names=["now"])[1] == []


STREAM_TEXTS = [
    "Hello there! Nothing to call here.\n\nBye  ",
    "Let me check.\n" + PARIS + "\n" + ROME + "\n",
    "<tool_call>\nbad\n</tool_call> then " + PARIS + " and <tool_c",
    "a < b <tool <tool_call" + "_call>" + '{"name": "say", "arguments": {"t": "</tool_call>\\" x"}}</tool_call>',
    '  {"name": "get_weather", "arguments": {"city": "Oslo"}}',
    '[{"name": "a", "arguments": {}}]  ' + PARIS,
    '{"answer": 42}',
    PARIS + "\nDone. <tool_call>\n" + '{"name": "now", "arguments": {}}\n</tool_',
    "\n\n  \n",
    "<tool_call><tool_call>" + PARIS,
    " [1] cited, see [2]. " + PARIS,
    '{ "not": "a call" } then ' + PARIS,
    "{x} and " + PARIS,
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_matches_whole(text):
    want_content, want_calls = parse_tool_calls(text)
    rng = random.Random(text)
    splits = [[text], list(text)] + [None] * 150
    for pieces in splits:
        if pieces is None:
            cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
            pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        parser = ToolCallStreamParser()
        content, calls = "", []
        for piece in pieces:
            c, k = parser.feed(piece)
            assert "<tool_call>" not in c or "<tool_call>" in (want_content or "")
            content += c
            calls += k
        c, k = parser.finish()
        content += c
        calls += k
        assert content == (want_content or "")
        assert [d["index"] for d in calls] == list(range(len(calls)))
        assert [{k: v for k, v in d.items() if k not in ("id", "index")} for d in calls] == strip_ids(want_calls)
        assert all(ID.match(d["id"]) for d in calls)


def test_stream_holds_back_only_what_it_must():
    parser = ToolCallStreamParser()
    assert parser.feed("Sure, ") == ("Sure,", [])  # trailing space held until something follows
    assert parser.feed("here <tool") == (" here", [])  # "<tool" could begin a tag
    assert parser.feed("_call>\n{\"name\": \"now\", ") == ("", [])
    content, calls = parser.feed('"arguments": {}}\n</tool_call>')
    assert content == "" and calls[0]["function"] == {"name": "now", "arguments": "{}"} and calls[0]["index"] == 0
    assert parser.feed("\n") == ("", [])
    assert parser.finish() == ("", [])

    parser = ToolCallStreamParser()
    assert parser.feed("{") == ("", [])  # maybe bare JSON: held to the end
    assert parser.feed('"a": 1}') == ("", [])
    assert parser.finish() == ('{"a": 1}', [])

    parser = ToolCallStreamParser()
    assert parser.feed(" [") == ("", [])
    assert parser.feed("1] and more ") == (" [1] and more", [])  # not '[{': cannot be calls, streams at once


# -- Ollama ---------------------------------------------------------------------------------------------------------

def test_ollama_shapes():
    _, calls = parse_tool_calls(PARIS + "\n" + call_text("now", {}))
    assert to_ollama_tool_calls(calls) == [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                                           {"function": {"name": "now", "arguments": {}}}]
    messages = [
        {"role": "user", "content": "Weather in Paris? And the time?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"function": {"name": "now", "arguments": {}}}]},
        {"role": "tool", "content": "12:00", "tool_name": "now"},
        {"role": "tool", "content": "18C"},
        {"role": "user", "content": "thanks"},
    ]
    out = from_ollama_messages(messages)
    a = out[1]
    assert [c["function"] for c in a["tool_calls"]] == [{"name": "get_weather", "arguments": '{"city": "Paris"}'},
                                                        {"name": "now", "arguments": "{}"}]
    assert all(ID.match(c["id"]) and c["type"] == "function" for c in a["tool_calls"])
    ids = {c["function"]["name"]: c["id"] for c in a["tool_calls"]}
    assert out[2] == {"role": "tool", "content": "12:00", "tool_call_id": ids["now"], "name": "now"}
    assert out[3] == {"role": "tool", "content": "18C", "tool_call_id": ids["get_weather"], "name": "get_weather"}
    assert out[0] == messages[0] and out[4] == messages[4]
    assert "tool_name" in messages[2]  # the input is left alone
    text, _ = prepare_messages(out, None, native=False)
    assert text[1]["content"] == PARIS + "\n" + call_text("now", {})


# -- with llguidance and the default model's tokenizer --------------------------------------------------------------

@pytest.fixture(scope="module")
def guidance(default_gguf):
    from tokenloom.structured_output.llguidance_backend import LLGuidanceBackend
    from tokenloom.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(default_gguf)
    return tok, LLGuidanceBackend(tok.hf_tokenizer.to_str(), 49152, [2, 0])


def compiled(guidance, tools, choice, parallel=True):
    from tokenloom.structured_output.backend import StructuredOutputSpec

    return guidance[1].compile(StructuredOutputSpec(*tool_constraint(tools, choice, parallel).key()))


def accepts(guidance, grammar, text):
    """(all tokens accepted, may end here: EOS allowed or the grammar complete)."""
    m = grammar.matcher()
    ok = m.accept_tokens(guidance[0].encode(text, add_special_tokens=False))
    return ok, ok and (m.is_terminated() or m.validate_tokens([2]) == 1)


FLIGHT = call_text("search_flights", {"origin": "CDG", "destination": "FCO", "passengers": 2})
BAD = [
    call_text("get_weather", {"town": "Paris"}),  # unknown argument
    call_text("get_weather", {"unit": "celsius"}),  # a required one missing
    call_text("search_flights", {"origin": "cdg", "destination": "FCO"}),  # the pattern
    call_text("launch", {}),  # not a tool
    '<tool_call>\n{"arguments": {"city": "Paris"}, "name": "get_weather"}\n</tool_call>',  # name comes first
    '<tool_call>\n{"name": "get_weather", "arguments": {"city":' + " " * 40 + '"Paris"}}\n</tool_call>',  # spinning
    PARIS + "\n\n" + PARIS,
]


@slow
def test_grammar_required(guidance):
    g = compiled(guidance, TOOLS + [NOW], "required")
    for text in (PARIS, FLIGHT, PARIS + "\n" + FLIGHT, PARIS + "\n", call_text("now", {}),
                 '<tool_call>\n{"name":"now","arguments":{}}\n</tool_call>',
                 '<tool_call>\n{\n  "name": "get_weather",\n  "arguments": {"city": "Paris"}\n}\n</tool_call>',
                 call_text("send_email", {"to": ["ann@x.io"], "subject": "Hi"})):
        assert accepts(guidance, g, text) == (True, True), text
    for text in BAD + ["Sure.", "Sure.\n" + PARIS, call_text("now", {"a": 1})]:
        assert not accepts(guidance, g, text)[0], text
    assert accepts(guidance, g, "") == (True, False)  # a call is required
    assert accepts(guidance, g, PARIS[:-3]) == (True, False)

    single = compiled(guidance, TOOLS, "required", parallel=False)
    m = single.matcher()
    assert m.accept_tokens(guidance[0].encode(PARIS, add_special_tokens=False)) and m.is_terminated()
    assert not accepts(guidance, single, PARIS + "\n" + PARIS)[0]


@slow
def test_grammar_named(guidance):
    g = compiled(guidance, TOOLS, {"type": "function", "function": {"name": "search_flights"}})
    m = g.matcher()
    assert m.accept_tokens(guidance[0].encode(FLIGHT, add_special_tokens=False)) and m.is_terminated()
    for text in (PARIS, FLIGHT + "\n" + FLIGHT, "Sure. " + FLIGHT, ""):
        assert accepts(guidance, g, text) != (True, True), text


@slow
def test_grammar_auto(guidance):
    g = compiled(guidance, TOOLS, "auto")
    for text in ("", "Hello!", "The weather is fine.\nReally: 3 < 4 and {x}.", PARIS, PARIS + "\n" + FLIGHT,
                 "Let me check.\n" + PARIS, "Let me check. " + PARIS + "\n" + FLIGHT + "\n",
                 "I would write <tool_call> here but not now."):
        assert accepts(guidance, g, text) == (True, True), text
    for text in BAD + ["<b>bold</b>", "Let me check.\n" + BAD[0], PARIS + "\nDone."]:
        assert not accepts(guidance, g, text)[0], text
    single = compiled(guidance, TOOLS, "auto", parallel=False)
    assert accepts(guidance, single, "Let me check.\n" + PARIS) == (True, True)
    assert not accepts(guidance, single, PARIS + "\n" + PARIS)[0]


def sample_constrained(guidance, grammar, seed, max_steps=800):
    """Random logits through the grammar's mask until EOS or the grammar completes: the text produced."""
    import torch

    from tokenloom.sample.logits_processors import apply_token_bitmask
    from tokenloom.structured_output.backend import allocate_token_bitmask

    tok, backend = guidance
    gen = torch.Generator().manual_seed(seed)
    m, ids = grammar.matcher(), []
    bitmask = allocate_token_bitmask(1, 49152)
    for _ in range(max_steps):
        bitmask.fill_(-1)
        backend.fill_bitmask(bitmask, [(m, 0, [])])
        logits = torch.randn(1, 49152, generator=gen)
        apply_token_bitmask(logits, bitmask)
        token = int(logits.argmax())
        if token in (0, 2):
            break
        assert m.accept_tokens([token]), m.error()
        ids.append(token)
        if m.is_terminated():
            break
    else:
        pytest.fail("the constrained output did not end")
    return tok.decode(ids)


@slow
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "send_email"}}])
def test_sampled_calls_are_valid(guidance, choice):
    jsonschema = pytest.importorskip("jsonschema")
    g = compiled(guidance, TOOLS, choice)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    names = set()
    for seed in range(6):
        text = sample_constrained(guidance, g, seed)
        content, calls = parse_tool_calls(text)
        assert content is None and calls, text
        if isinstance(choice, dict):
            assert len(calls) == 1 and calls[0]["function"]["name"] == "send_email"
        for call in calls:
            args = json.loads(call["function"]["arguments"])
            jsonschema.validate(args, schemas[call["function"]["name"]])
            names.add(call["function"]["name"])
    assert len(names) >= (1 if isinstance(choice, dict) else 2)  # the draws reach several tools


@slow
def test_render_round_trip_with_default_template(default_gguf):
    from tokenloom.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(default_gguf)
    assert not template_supports_tools(tok.chat_template)
    messages, tools = prepare_messages(ROUND_TRIP, TOOLS, template_supports_tools(tok.chat_template))
    text = tok.apply_chat_template(messages, tools=tools)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert '"name": "send_email"' in text and '"description": "Current weather in a city"' in text
    assert "<|im_start|>assistant\n" + PARIS + "\n" in text
    assert "<|im_start|>user\n<tool_response>\n18C, sunny\n</tool_response>\n<tool_response>\n24C" in text
    assert text.endswith("<|im_start|>user\nThanks. And Oslo?<|im_end|>\n<|im_start|>assistant\n")
