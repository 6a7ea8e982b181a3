"""Ollama Modelfiles: the parser (FROM, PARAMETER, SYSTEM, TEMPLATE, MESSAGE, LICENSE, ADAPTER, ...), the
PARAMETER names Ollama knows with their value types, and the writer `ollama show` style.

Syntax, as Ollama reads it: one instruction a line, its name case-insensitive; `#` starts a comment line; a value
runs to the end of its line, or is quoted: "..." or \"\"\"...\"\"\", either of which may span lines.

    FROM llama3.2
    # comments are skipped
    PARAMETER temperature 0.2
    PARAMETER stop "<|eot_id|>"
    SYSTEM \"\"\"You are Mario
    from Super Mario Bros.\"\"\"
    MESSAGE user Is Toronto in Canada?
    MESSAGE assistant yes
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tokenloom.config import TokenloomError


class ModelfileError(TokenloomError):
    """A Modelfile that cannot be read, or parameters Ollama does not know (the message says which)."""


# PARAMETER names Ollama accepts, with their value types ("float", "int", "bool", "list" of strings). Sampling
# ones become the created model's defaults; the others (runner and deprecated ones) are kept and reported only.
PARAMETER_TYPES: dict[str, str] = {
    "temperature": "float", "top_k": "int", "top_p": "float", "min_p": "float", "typical_p": "float",
    "num_predict": "int", "stop": "list", "seed": "int", "repeat_penalty": "float", "repeat_last_n": "int",
    "presence_penalty": "float", "frequency_penalty": "float", "num_keep": "int",
    "num_ctx": "int", "num_batch": "int", "num_gpu": "int", "main_gpu": "int", "num_thread": "int",
    "use_mmap": "bool", "draft_num_predict": "int",
    # deprecated by Ollama, still accepted
    "penalize_newline": "bool", "low_vram": "bool", "f16_kv": "bool", "logits_all": "bool", "vocab_only": "bool",
    "use_mlock": "bool", "mirostat": "int", "mirostat_tau": "float", "mirostat_eta": "float", "numa": "bool",
    "tfs_z": "float",
}
MESSAGE_ROLES = ("system", "user", "assistant")
_COMMANDS = ("from", "parameter", "system", "template", "message", "license", "adapter", "draft", "renderer",
             "parser", "requires")
_TRUE, _FALSE = ("1", "t", "T", "TRUE", "true", "True"), ("0", "f", "F", "FALSE", "false", "False")


@dataclass
class Modelfile:
    """What a Modelfile says (instructions not listed here are refused by parse_modelfile)."""
    from_: str | None = None
    system: str | None = None
    template: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, str]] = field(default_factory=list)
    license: list[str] = field(default_factory=list)


def parse_modelfile(text: str) -> Modelfile:
    """Parse a Modelfile; ModelfileError names the line of anything it cannot take."""
    mf = Modelfile()
    params: dict[str, list[str]] = {}
    for lineno, name, head, raw in _instructions(text.lstrip("\ufeff")):
        where = f"(line {lineno})"
        if name in ("parameter", "message") and (not head or not raw):
            raise ModelfileError(f"{where}: {name.upper()} needs a {'name' if name == 'parameter' else 'role'} "
                                 "and a value")
        if not raw and name != "license":
            raise ModelfileError(f"{where}: {name.upper()} needs a value")
        value = _unquote(raw, where)
        if name == "from":
            mf.from_ = value
        elif name == "parameter":
            params.setdefault(head.lower(), []).append(value)
        elif name == "message":
            if head not in MESSAGE_ROLES:
                raise ModelfileError(f"{where}: message role must be one of {', '.join(map(repr, MESSAGE_ROLES))}")
            mf.messages.append({"role": head, "content": value})
        elif name in ("system", "template"):
            setattr(mf, name, value)
        elif name == "license":
            mf.license.append(value)
        else:
            raise ModelfileError(f"{where}: {name.upper()} is not supported by tokenloom")
    if mf.from_ is None:
        raise ModelfileError("no FROM line")
    mf.parameters = parse_parameters(params)
    return mf


def _instructions(text: str):
    """(line number, lower-case instruction, its first word for PARAMETER / MESSAGE else "", raw value) for each
    instruction; a value that opens a quote (\" or \"\"\") runs on over the next lines until it closes."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        lineno, line = i + 1, lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        word, *rest = line.split(None, 1)
        name = word.lower()
        if name not in _COMMANDS:
            raise ModelfileError(f"(line {lineno}): unknown instruction {word!r} (one of "
                                 f"{', '.join(c.upper() for c in _COMMANDS)})")
        head, value = "", rest[0] if rest else ""
        if name in ("parameter", "message"):
            head, *rest = value.split(None, 1)
            value = rest[0] if rest else ""
        while _open_quote(value) and i < len(lines):
            value += "\n" + lines[i]
            i += 1
        if _open_quote(value):
            raise ModelfileError(f"(line {lineno}): unterminated quoted value")
        yield lineno, name, head, value.strip()


def _open_quote(value: str) -> bool:
    """Whether a value starting with a quote (\" or \"\"\") has not closed it yet."""
    v = value.strip()
    if v.startswith('"""'):
        return not (len(v) >= 6 and v.endswith('"""'))
    if v.startswith('"'):
        return not (len(v) >= 2 and v.endswith('"'))
    return False


def _unquote(value: str, where: str) -> str:
    if value.startswith('"""'):
        if len(value) >= 6 and value.endswith('"""'):
            return value[3:-3]
        raise ModelfileError(f"{where}: unterminated \"\"\" value")
    if value.startswith('"'):
        if len(value) >= 2 and value.endswith('"'):
            return value[1:-1]
        raise ModelfileError(f"{where}: unterminated quoted value")
    return value


def parse_parameters(params: dict[str, list[str]]) -> dict[str, Any]:
    """PARAMETER lines' texts (name -> values, in order) as typed values; ModelfileError names every unknown
    name, or a value of the wrong type."""
    unknown = sorted(n for n in params if n not in PARAMETER_TYPES)
    if unknown:
        raise ModelfileError(_unknown(unknown))
    out: dict[str, Any] = {}
    for name, values in params.items():
        kind = PARAMETER_TYPES[name]
        if kind == "list":
            out[name] = list(values)
            continue
        text = values[-1]
        try:
            if kind == "float":
                out[name] = float(text)
            elif kind == "int":
                out[name] = int(text)
            elif text in _TRUE + _FALSE:
                out[name] = text in _TRUE
            else:
                raise ValueError(text)
        except ValueError:
            raise ModelfileError(f"invalid {kind} value for parameter {name}: {text!r}") from None
    return out


def check_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """JSON `parameters` (the create API's) checked against PARAMETER_TYPES; stop made a list."""
    unknown = sorted(n for n in params if n not in PARAMETER_TYPES)
    if unknown:
        raise ModelfileError(_unknown(unknown))
    out = {}
    for name, value in params.items():
        kind = PARAMETER_TYPES[name]
        ok = {"float": isinstance(value, (int, float)) and not isinstance(value, bool),
              "int": isinstance(value, int) and not isinstance(value, bool),
              "bool": isinstance(value, bool),
              "list": isinstance(value, str) or isinstance(value, list) and all(isinstance(v, str) for v in value),
              }[kind]
        if not ok:
            raise ModelfileError(f"invalid {kind} value for parameter {name}: {json.dumps(value)}")
        out[name] = [value] if kind == "list" and isinstance(value, str) else value
    return out


def _unknown(names: list[str]) -> str:
    return (f"unknown parameter{'s' if len(names) > 1 else ''} {', '.join(map(repr, names))} (Ollama's are: "
            f"{', '.join(PARAMETER_TYPES)})")


def quote(value: str) -> str:
    """A value as Ollama writes it in a Modelfile: quoted when it has a newline or edge spaces."""
    if "\n" in value or value.startswith(" ") or value.endswith(" ") or value.startswith('"'):
        return f'"""{value}"""'
    return value or '""'


def format_parameters(params: dict[str, Any]) -> str:
    """/api/show's `parameters`: one `name value` line per value, names padded as Ollama pads them."""
    lines = []
    for name, value in params.items():
        for v in value if isinstance(value, list) else [value]:
            lines.append(f"{name:<30} {json.dumps(v, ensure_ascii=False) if isinstance(v, str) else _scalar(v)}")
    return "\n".join(lines)


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, float) else str(v)


def write_modelfile(from_: str, template: str | None = None, system: str | None = None,
                    parameters: dict[str, Any] | None = None, messages: list[dict] | None = None,
                    license: list[str] | None = None, name: str | None = None) -> str:
    """A Modelfile that parse_modelfile reads back to the same model (as `ollama show --modelfile` writes)."""
    out = ['# Modelfile generated by "tokenloom show"']
    if name:
        out += ["# To build a new Modelfile based on this, replace FROM with:", f"# FROM {name}", ""]
    out.append(f"FROM {from_}")
    if template and '"""' not in template:
        out.append(f'TEMPLATE """{template}"""')
    for pname, value in (parameters or {}).items():
        for v in value if isinstance(value, list) else [value]:
            out.append(f"PARAMETER {pname} {quote(v) if isinstance(v, str) else _scalar(v)}")
    if system and '"""' not in system:
        out.append(f"SYSTEM {quote(system)}")
    for m in messages or []:
        if '"""' not in m["content"]:
            out.append(f"MESSAGE {m['role']} {quote(m['content'])}")
    for text in license or []:
        if '"""' not in text:
            out.append(f'LICENSE """{text}"""')
    return "\n".join(out) + "\n"
