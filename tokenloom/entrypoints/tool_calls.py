"""Tool calling in one format for every model, the Hermes/Qwen one (what Qwen2.5, Hermes and SmolLM3 are trained on):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Pure helpers: turn OpenAI-style messages and tools into what a chat template takes (natively, or spelled out as text
for templates without tool support), build the grammar that keeps generated calls valid, and parse calls back out
of the output, whole or streamed. Ollama's shapes are converted at the edges."""
from __future__ import annotations

import functools
import json
import re
import uuid
from collections.abc import Collection, Mapping
from typing import Any

from tokenloom.sampling_params import SamplingParamsError, StructuredOutputsParams
from tokenloom.structured_output.backend import BOUNDED_JSON_WHITESPACE

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

_TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>
You may make several calls, one block each. If no function is needed, reply normally."""


class ToolError(SamplingParamsError):
    """An invalid tools, tool_choice or messages field (a ValueError whose .param names it, for an HTTP 400)."""

    def __init__(self, message: str, param: str = "tools"):
        super().__init__(message, param)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


# -- the prompt -----------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def template_supports_tools(chat_template: str | None) -> bool:
    """Whether a Jinja chat template reads the `tools` variable (and so renders tools itself)."""
    if not chat_template:
        return False
    try:
        import jinja2
        import jinja2.meta

        # Parsing, not a text search: "tools" may appear in a template's prose without the variable being read.
        env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols", "jinja2.ext.do"])
        return "tools" in jinja2.meta.find_undeclared_variables(env.parse(chat_template))
    except Exception:  # a tag this plain environment lacks (e.g. {% generation %}): fall back to the text
        return re.search(r"\btools\b", chat_template) is not None


def validate_tools(tools: Any) -> list[dict] | None:
    """The tools as a list of plain dicts (None when none are given); ToolError for a malformed one."""
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)):
        raise ToolError("tools must be a list of {'type': 'function', 'function': {...}} objects")
    seen = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            raise ToolError(f"{where}: must be an object with type 'function'")
        fn = tool.get("function")
        if not isinstance(fn, Mapping):
            raise ToolError(f"{where}: 'function' must be an object with a name")
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ToolError(f"{where}.function.name must be a non-empty string")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise ToolError(f"{where}.function.description must be a string")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], Mapping):
            raise ToolError(f"{where}.function.parameters must be a JSON schema object")
        if name in seen:
            raise ToolError(f"{where}: the function name '{name}' is given twice")
        seen.add(name)
    return [dict(t) for t in tools] or None


def _plain_message(message: Any, k: int) -> dict:
    if isinstance(message, Mapping):
        return dict(message)
    dump = getattr(message, "model_dump", None)
    if callable(dump):
        return dump(exclude_none=True)
    raise ToolError(f"messages[{k}] must be an object", "messages")


def _text(content: Any) -> str:
    """A message's content as text: OpenAI content parts joined, other JSON values serialised."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, Mapping) for p in content):
        return "\n".join(str(p.get("text", "")) for p in content if p.get("text") is not None)
    return json.dumps(content, ensure_ascii=False)


def _arguments_value(arguments: Any) -> Any:
    """A call's arguments as a mapping where they are a JSON object's text (templates index into them)."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return {} if arguments is None else arguments


def _call_parts(call: Any, where: str) -> tuple[str, Any]:
    fn = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ToolError(f"{where}: each tool call needs a function with a name", "messages")
    return fn["name"], _arguments_value(fn.get("arguments"))


def format_tool_call(name: str, arguments: Any) -> str:
    """One call as the model writes it."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def tools_system_prompt(tools: list[dict]) -> str:
    """The system text that describes the tools and the call format, for templates that cannot."""
    lines = []
    for tool in tools:
        fn = tool["function"]
        spec = {k: fn[k] for k in ("name", "description", "parameters") if fn.get(k) is not None}
        lines.append(json.dumps({"type": "function", "function": spec}, ensure_ascii=False))
    return _TOOLS_PROMPT.format(tools="\n".join(lines))


def prepare_messages(messages: list[dict], tools: list[dict] | None,
                     native: bool) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) to render with the chat template: passed on when it supports tools (`native`), else the
    tools, calls and results spelled out as text in system/user/assistant messages."""
    tools = validate_tools(tools)
    msgs = [_plain_message(m, k) for k, m in enumerate(messages)]
    if native:
        out = []
        for k, m in enumerate(msgs):
            if m.get("role") == "assistant" and m.get("tool_calls"):
                calls = []
                for call in m["tool_calls"]:
                    _call_parts(call, f"messages[{k}]")
                    fn = dict(call["function"], arguments=_arguments_value(call["function"].get("arguments")))
                    calls.append(dict(call, function=fn))
                m = dict(m, tool_calls=calls)
            out.append(m)
        return out, tools

    out: list[dict] = []
    for k, m in enumerate(msgs):
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            blocks = [format_tool_call(*_call_parts(c, f"messages[{k}]")) for c in m["tool_calls"]]
            text = _text(m.get("content"))
            rest = {key: v for key, v in m.items() if key not in ("tool_calls", "content")}
            out.append({**rest, "content": "\n".join(([text] if text.strip() else []) + blocks)})
        elif role == "tool":
            response = f"<tool_response>\n{_text(m.get('content'))}\n</tool_response>"
            # Templates without tools know system/user/assistant only; results of one turn share a user message
            # (as Qwen's template does), which also keeps user/assistant alternation for templates that check it.
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response, "_tool_results": True})
        else:
            out.append(m)
    for m in out:
        m.pop("_tool_results", None)
    if tools:
        prompt = tools_system_prompt(tools)
        if out and out[0].get("role") == "system":
            system = _text(out[0].get("content"))
            out[0] = dict(out[0], content=f"{system}\n\n{prompt}" if system.strip() else prompt)
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None


# -- the constraint -------------------------------------------------------------------------------------------------

def _rebase_refs(schema: Any, base: str) -> Any:
    """The schema with its local $refs ("#", "#/...") pointing under `base`, where it is moved to."""
    if isinstance(schema, Mapping):
        out = {}
        for k, v in schema.items():
            if k == "$ref" and isinstance(v, str) and (v == "#" or v.startswith("#/")):
                out[k] = base + v[1:]
            else:
                out[k] = _rebase_refs(v, base)
        return out
    if isinstance(schema, list):
        return [_rebase_refs(v, base) for v in schema]
    return schema


def _calls_schema(tools: list[dict]) -> dict:
    """The JSON schema of one call to any of `tools`: name first, then the arguments of that function."""
    defs, branches = {}, []
    for i, tool in enumerate(tools):
        fn = tool["function"]
        params = fn.get("parameters")
        if params is None:  # OpenAI: no parameters = an empty parameter list (and nothing to ramble in)
            params = {"type": "object", "properties": {}, "additionalProperties": False}
        # Each tool's schema lives under $defs so its own local $refs (pydantic's "#/$defs/X") still resolve.
        defs[f"tool_{i}"] = _rebase_refs(params, f"#/$defs/tool_{i}")
        branches.append({"type": "object", "properties": {"name": {"const": fn["name"]},
                                                          "arguments": {"$ref": f"#/$defs/tool_{i}"}},
                         "required": ["name", "arguments"], "additionalProperties": False})
    # Bounded whitespace, as for response_format: a model drawn to blank space cannot spin inside a call.
    # lenient: keywords llguidance does not implement (if/then, some formats) are ignored, not fatal; tool schemas
    # are written as documentation and should not fail the request.
    return {"anyOf": branches, "$defs": defs,
            "x-guidance": {"whitespace_pattern": BOUNDED_JSON_WHITESPACE, "lenient": True}}


def tool_call_grammar(tools: list[dict], mode: str, parallel: bool = True) -> str:
    """The Lark grammar (llguidance) of an output in `mode`: "required" (calls only) or "auto" (calls, or text
    that does not start with "<", or text then calls). parallel=False: one call at most."""
    schema = json.dumps(_calls_schema(tools), ensure_ascii=True)  # ASCII: no odd characters in the Lark source
    more = ' ("\\n" call)* "\\n"?' if parallel else ""  # after the last call: an optional newline, then EOS
    lines = [
        'start: calls' if mode == "required" else
        # prefix is lazy, so it ends at the first "<tool_call>\n" in the text: a call after prose is held to the
        # schema too (TEXT alone would let it through unchecked).
        'start: TEXT? | calls | prefix args "\\n</tool_call>"' + more,
        "calls: call" + more,
        'call: "<tool_call>\\n" args "\\n</tool_call>"',
        "args: %json " + schema,
    ]
    if mode != "required":
        lines += ["TEXT: /[^<](.|\\n)*/", "prefix[lazy]: /[^<](.|\\n)*<tool_call>\\n/"]
    return "\n".join(lines) + "\n"


def tool_constraint(tools: list[dict] | None, tool_choice: Any = None,
                    parallel: bool = True) -> StructuredOutputsParams | None:
    """The output constraint for tools and tool_choice (None, "none", "auto", "required" or {"type": "function",
    "function": {"name": ...}}), or None when the output is free. parallel=False (parallel_tool_calls): at most one
    call."""
    tools = validate_tools(tools)
    if isinstance(tool_choice, Mapping):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ToolError("tool_choice must be 'none', 'auto', 'required' or "
                            "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
        chosen = [t for t in tools or [] if t["function"]["name"] == name]
        if not chosen:
            raise ToolError(f"tool_choice: the function '{name}' is not among the tools", "tool_choice")
        grammar = tool_call_grammar(chosen, "required", parallel=False)
    elif tool_choice not in (None, "none", "auto", "required"):
        raise ToolError(f"tool_choice must be 'none', 'auto', 'required' or a function, got {tool_choice!r}",
                        "tool_choice")
    elif not tools or tool_choice == "none":
        return None
    else:
        grammar = tool_call_grammar(tools, "required" if tool_choice == "required" else "auto", parallel)
    _check_grammar(grammar)
    return StructuredOutputsParams(grammar=grammar)


def _check_grammar(grammar: str) -> None:
    """A schema llguidance cannot compile even leniently (e.g. a lookaround in a pattern) is the request's error."""
    import llguidance

    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        detail = next((line.strip() for m in messages for line in str(m).splitlines() if line.strip()), "")
        detail = re.sub(r"^at \d+\(\d+\): ", "", detail)
        raise ToolError(f"tools: a function's parameters cannot be used as a constraint: {detail}")


# -- parsing the output ---------------------------------------------------------------------------------------------

def _calls_of(value: Any, bare: bool, names: Collection[str] | None) -> list[tuple[str, str]] | None:
    """(name, arguments JSON) of each call in a parsed JSON value (an object or a list of them), or None if it is
    not calls. Bare JSON (no tags) must also carry "arguments" or "parameters", or any JSON answer with a "name"
    key would pass for a call."""
    items = value if isinstance(value, list) and value else [value]
    out = []
    for item in items:
        if not isinstance(item, dict):
            return None
        name = item.get("name")
        if not isinstance(name, str) or not name or (names is not None and name not in names):
            return None
        key = "arguments" if "arguments" in item else "parameters" if "parameters" in item else None
        if key is None and bare:
            return None
        args = item.get(key) if key else {}
        if isinstance(args, str):  # some models write the arguments as a JSON string, as OpenAI returns them
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if args is None:
            args = {}
        if not isinstance(args, dict):
            return None
        out.append((name, json.dumps(args, ensure_ascii=False)))
    return out


def _load(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _in_json_string(text: str) -> bool:
    """Whether JSON text ends inside a string (an odd number of unescaped quotes)."""
    inside = escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = inside
        elif ch == '"':
            inside = not inside
    return inside


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (and could become it with more text)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ToolCallStreamParser:
    """Splits output text, fed piece by piece, into content and tool calls. Content that could still be the start
    of a <tool_call> tag is held back, as is trailing whitespace (whitespace just before a call, or at the end
    when there were calls, is dropped). An output that starts '{"' or '[{' may be bare JSON calls (Llama 3.1
    style) and is held until finish(). The pieces joined equal parse_tool_calls(the whole text)."""

    def __init__(self, tool_names: Collection[str] | None = None, *, _bare_json: bool = True):
        self.names = set(tool_names) if tool_names is not None else None
        self.buf = ""  # text not yet decided
        self.ws = ""  # trailing whitespace of the content, held back
        self.in_call = False  # buf is inside a <tool_call> block
        self.bare = _bare_json  # still deciding whether the output is bare JSON
        self.raw: str | None = None  # the whole output, once it may be bare JSON
        self.n_calls = 0
        self.done = False

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        """(content to emit now, tool-call deltas completed by this piece)."""
        if self.done:
            raise RuntimeError("ToolCallStreamParser: feed() after finish()")
        if self.raw is not None:
            self.raw += delta
            if not self._release_raw():
                return "", []
        else:
            self.buf += delta
        if self.bare:
            head = self.buf.lstrip()
            if not head:
                return "", []
            self.bare = False
            if head[0] in "{[":
                self.raw, self.buf = self.buf, ""
                if not self._release_raw():
                    return "", []
        return self._scan(final=False)

    def _release_raw(self) -> bool:
        """Whether text held as possible bare JSON cannot be calls after all (it does not start '{"' or '[{'),
        so that a reply such as "[1] ..." streams at once; it then goes back to being scanned for tags."""
        head = self.raw.lstrip()
        second = head[1:].lstrip()[:1]
        if not second or (head[0], second) in (("{", '"'), ("[", "{")):
            return False
        self.buf, self.raw = self.raw, None
        return True

    def finish(self) -> tuple[str, list[dict]]:
        """(the rest of the content, the calls completed at the end)."""
        if self.done:
            return "", []
        self.done = True
        if self.raw is not None:
            text = self.raw
            found = _calls_of(_load(text.strip()), True, self.names)
            if found:
                return "", [self._delta(name, args) for name, args in found]
            inner = ToolCallStreamParser(self.names, _bare_json=False)
            inner.n_calls = self.n_calls
            content, calls = inner.feed(text)
            rest, more = inner.finish()
            return content + rest, calls + more
        content, calls = self._scan(final=True)
        if self.in_call:  # an unclosed block at the end (output cut short, or no closing tag written)
            body = self.buf
            cut = _partial_suffix(body, TOOL_CALL_CLOSE)
            found = _calls_of(_load(body[:len(body) - cut].strip()), False, self.names)
            if found:
                self.ws = ""
                calls += [self._delta(name, args) for name, args in found]
            else:
                content += self._content(TOOL_CALL_OPEN + body)
        else:
            content += self._content(self.buf)
        self.buf = ""
        if not self.n_calls:
            content += self.ws
        self.ws = ""
        return content, calls

    def _scan(self, final: bool) -> tuple[str, list[dict]]:
        content, calls = "", []
        while True:
            if self.in_call:
                end = self.buf.find(TOOL_CALL_CLOSE)
                while end >= 0 and _in_json_string(self.buf[:end]):  # "</tool_call>" inside an argument's text
                    end = self.buf.find(TOOL_CALL_CLOSE, end + 1)
                if end < 0:
                    break
                body, self.buf = self.buf[:end], self.buf[end + len(TOOL_CALL_CLOSE):]
                self.in_call = False
                found = _calls_of(_load(body.strip()), False, self.names)
                if found:
                    self.ws = ""
                    calls += [self._delta(name, args) for name, args in found]
                else:  # not a call after all: the block stays in the content, as written
                    content += self._content(TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE)
            else:
                start = self.buf.find(TOOL_CALL_OPEN)
                if start < 0:
                    if not final:
                        keep = _partial_suffix(self.buf, TOOL_CALL_OPEN)
                        content += self._content(self.buf[:len(self.buf) - keep])
                        self.buf = self.buf[len(self.buf) - keep:]
                    break
                content += self._content(self.buf[:start])
                self.buf = self.buf[start + len(TOOL_CALL_OPEN):]
                self.in_call = True
        return content, calls

    def _content(self, text: str) -> str:
        """Content to emit, its trailing whitespace held back until something follows it."""
        text = self.ws + text
        body = text.rstrip()
        self.ws = text[len(body):]
        return body

    def _delta(self, name: str, arguments: str) -> dict:
        delta = {"index": self.n_calls, "id": new_call_id(), "type": "function",
                 "function": {"name": name, "arguments": arguments}}
        self.n_calls += 1
        return delta


def parse_tool_calls(text: str, tool_names: Collection[str] | None = None) -> tuple[str | None, list[dict]]:
    """(content, calls) of a whole output: the <tool_call> blocks (or a bare JSON call, or list of calls) become
    OpenAI tool calls; the rest is the content (None when only whitespace is left besides calls). A block that
    does not parse as a call, or names a function not in tool_names (when given), stays in the content."""
    parser = ToolCallStreamParser(tool_names)
    content, deltas = parser.feed(text)
    rest, more = parser.finish()
    content += rest
    calls = [{k: v for k, v in d.items() if k != "index"} for d in deltas + more]
    if calls and not content.strip():
        return None, calls
    return content, calls


# -- Ollama ---------------------------------------------------------------------------------------------------------

def to_ollama_tool_calls(calls: list[dict]) -> list[dict]:
    """OpenAI tool calls in Ollama's shape: the arguments as an object."""
    out = []
    for call in calls:
        fn = call["function"]
        args = _arguments_value(fn.get("arguments"))
        out.append({"function": {"name": fn["name"], "arguments": args if isinstance(args, dict) else {}}})
    return out


def from_ollama_messages(messages: list[dict]) -> list[dict]:
    """Ollama chat messages as the OpenAI-style ones prepare_messages takes: assistant tool calls get ids and
    JSON-text arguments, and each tool result the id of the call it answers (by tool_name, else in order)."""
    out: list[dict] = []
    pending: list[tuple[str, str]] = []  # (id, name) of the last assistant turn's calls not yet answered
    for k, message in enumerate(messages):
        m = _plain_message(message, k)
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                name, args = _call_parts(call, f"messages[{k}]")
                cid = call.get("id") or new_call_id()
                arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
                calls.append({"id": cid, "type": "function", "function": {"name": name, "arguments": arguments}})
            pending = [(c["id"], c["function"]["name"]) for c in calls]
            out.append({**m, "tool_calls": calls})
        elif role == "tool":
            name = m.pop("tool_name", None) or m.get("name")
            match = next((p for p in pending if p[1] == name), None) if name else None
            match = match or (pending[0] if pending else None)
            if match:
                pending.remove(match)
            m.setdefault("tool_call_id", match[0] if match else new_call_id())
            if name or match:
                m["name"] = name or match[1]
            out.append(m)
        else:
            out.append(m)
    return out
