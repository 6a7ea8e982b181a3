"""Chat templates: the model's Jinja templates rendered like transformers'
``apply_chat_template(..., tokenize=False)`` in a sandbox, and the choice among a model's named templates."""
from __future__ import annotations

import dataclasses
import functools
import json
from datetime import datetime
from typing import Any, Mapping, Sequence

from tokenloom.config import TokenloomError

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _plain(value: Any) -> Any:
    """A copy of `value` made of plain JSON-like types only (what transformers hands the sandbox)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    item = getattr(value, "item", None)
    if callable(item) and type(value).__module__ == "numpy":
        return _plain(item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return _plain(dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(chat: list[dict]) -> list[dict]:
    out = []
    for message in chat:
        if isinstance(message, dict):
            reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


@functools.lru_cache(maxsize=16)
def _compile_template(source: str):
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for transformers' training masks;
        # rendering just emits the body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # like transformers: no HTML escaping (jinja's own tojson escapes <, >, &, ')
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace ({name!r})"
                )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise TokenloomError(f"the model's chat template is not valid Jinja: {exc} (line {exc.lineno})") from None


def select_template(templates: str | dict[str, str] | None, chat_template: str | None, tools) -> str:
    """The template source to render: `chat_template` (one of the model's named templates, or a template source),
    else the model's tool_use template when there are tools, else its default."""
    t = templates
    if chat_template is not None:
        if isinstance(t, dict) and chat_template in t:
            return t[chat_template]
        return chat_template
    if t is None:
        raise TokenloomError(
            "this model has no chat template; use a plain-text prompt (completion mode) "
            "or pass a template explicitly"
        )
    if isinstance(t, dict):
        if tools is not None and "tool_use" in t:
            return t["tool_use"]
        if "default" in t:
            return t["default"]
        raise TokenloomError(f"the model has several chat templates and no default: {sorted(t)}")
    return t


def render_chat(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    special_tokens: Mapping[str, str],
    /,
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    continue_final_message: bool | str = False,
    **kwargs: Any,
) -> str:
    """Render a conversation with the template `source` (special tokens such as bos_token and the extra keyword
    arguments are template variables), as transformers' ``apply_chat_template(messages, tokenize=False, ...)``."""
    import jinja2

    if hasattr(messages, "messages"):
        messages = messages.messages
    if not messages:
        raise TokenloomError("cannot apply the chat template to an empty conversation")
    if continue_final_message and add_generation_prompt:
        raise TokenloomError("continue_final_message and add_generation_prompt cannot be used together")
    if tools is not None:
        for tool in tools:
            if not isinstance(tool, Mapping):
                raise TokenloomError("tools must be JSON-schema dicts")
    if documents is not None:
        for doc in documents:
            if not isinstance(doc, Mapping):
                raise TokenloomError("documents must be dicts with 'title' and 'text' keys")

    chat = []
    for msg in messages:
        if not isinstance(msg, Mapping):
            if dataclasses.is_dataclass(msg) or callable(getattr(msg, "model_dump", None)):
                msg = _plain(msg)
            else:
                raise TokenloomError(f"chat messages must be dicts, got {type(msg).__name__}")
        # like transformers: keys whose value is None are dropped (OpenAI clients send content=None)
        chat.append({k: v for k, v in msg.items() if v is not None})
    chat = _alias_reasoning(_plain(chat))

    final_text = None
    if continue_final_message:
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        final = chat[-1].get(field)
        if final is None:
            raise TokenloomError(f'continue_final_message: the final message has no "{field}" to continue')
        fields = [field]
        if field in _REASONING_FIELDS:
            fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final]
        if not any(f in source for f in fields):
            raise TokenloomError(f'continue_final_message: "{field}" is not used by the chat template')
        if isinstance(final, (list, tuple)):
            for block in reversed(final):
                if isinstance(block, dict) and "text" in block:
                    final_text = block["text"]
                    block["text"] = block["text"] + _CONTINUE_TAG
                    break
            else:
                raise TokenloomError("continue_final_message: no text to continue in the final message")
        else:
            final_text = final
            for f in fields:
                chat[-1][f] = chat[-1][f] + _CONTINUE_TAG

    variables = {**special_tokens, **kwargs}
    template = _compile_template(source)
    try:
        rendered = template.render(
            messages=chat,
            tools=_plain(list(tools)) if tools is not None else None,
            documents=_plain(list(documents)) if documents is not None else None,
            add_generation_prompt=add_generation_prompt,
            **_plain(variables),
        )
    except jinja2.exceptions.TemplateError as exc:
        raise TokenloomError(f"chat template error: {exc}") from None

    if continue_final_message:
        tag = _CONTINUE_TAG.strip()
        if final_text.strip() not in rendered or tag not in rendered:
            raise TokenloomError("continue_final_message: the template dropped part of the final message")
        loc = rendered.rindex(tag)
        if rendered[loc: loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            rendered = rendered[:loc]
        else:
            rendered = rendered[:loc].rstrip()
    return rendered
