"""Text <-> token ids, chat templates and streaming detokenization.

`Tokenizer` wraps a HF `tokenizers.Tokenizer` (the fast Rust implementation) built either from a
transformers-style model directory (`tokenizer.json` + `tokenizer_config.json`) or from the vocabulary
embedded in a GGUF file. For GGUF files the tokenizer is rebuilt the way llama.cpp interprets the
metadata:

* ``tokenizer.ggml.model == "gpt2"``: byte-level BPE from ``tokens`` + ``merges``; the pre-tokenizer
  (the regexes that cut text into words before BPE) is chosen from ``tokenizer.ggml.pre`` with the
  same table as llama.cpp's ``llama-vocab.cpp``.
* ``tokenizer.ggml.model == "llama"``: SentencePiece-style BPE from ``tokens`` + ``scores`` with
  ``<0xXX>`` byte fallback, ``'▁'`` as the space and an optional leading space (``add_space_prefix``).

Control (type 3) and user-defined (type 4) tokens become added tokens, so ``"<|im_start|>"`` written
in a prompt encodes to its single id.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from datetime import datetime
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from tokenloom.config import TokenloomError

logger = logging.getLogger(__name__)

__all__ = ["Tokenizer", "IncrementalDetokenizer"]

# GGUF token types (llama.cpp's llama_token_type)
TOKEN_TYPE_UNDEFINED = 0
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

# ---------------------------------------------------------------------------------------------------------
# Pre-tokenizer regexes, after llama.cpp's llama-vocab.cpp (llm_tokenizer_bpe). Each entry is a list of
# regexes applied one after another; every regex splits every fragment left by the previous one, keeping both
# the matches and the text between them (HF `Split(..., behavior="isolated")`). Where llama.cpp rewrote a
# `(?i:...)` group into character classes for its own regex engine, the original tokenizer.json spelling is
# used (the HF engine supports it), like transformers does.
# ---------------------------------------------------------------------------------------------------------
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK3 = [
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
]
_DEEPSEEK_CODER = [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"]
_FALCON = [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"]


@dataclasses.dataclass(frozen=True)
class _PreType:
    regexes: tuple[str, ...]
    ignore_merges: bool = False  # whole words found in the vocab skip the merges (llama.cpp ignore_merges)
    add_bos: bool = False  # llama.cpp's default when the GGUF has no tokenizer.ggml.add_bos_token


def _pre_table() -> dict[str, _PreType]:
    table: dict[str, _PreType] = {}

    def put(names: Iterable[str], pre: _PreType) -> None:
        for n in names:
            table[n] = pre

    put(["default", "gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de",
         "jina-v1-en", "jina-v2-code", "roberta-bpe", "gigachat", "a.x-4.0", "mellum", "modern-bert", "exaone4",
         "trillion", "granite-docling"], _PreType((_GPT2,)))
    # digits split one by one, then the GPT-2 regex
    put(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"],
        _PreType((r"\p{N}", _GPT2)))
    put(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"],
        _PreType((_LLAMA3,), ignore_merges=True, add_bos=True))
    put(["dbrx", "smaug-bpe", "chatglm-bpe"], _PreType((_LLAMA3,)))
    put(["glm4", "glm5"], _PreType((_LLAMA3,), ignore_merges=True))
    put(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "grok-2"],
        _PreType((_QWEN2,)))
    put(["qwen35"], _PreType((_QWEN35,)))
    put(["tekken"], _PreType((_TEKKEN,), ignore_merges=True, add_bos=True))
    put(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _PreType((_GPT4O,)))
    put(["deepseek-v3", "hunyuan-dense", "joyai-llm"], _PreType(tuple(_DEEPSEEK3)))
    put(["deepseek-coder"], _PreType(tuple(_DEEPSEEK_CODER)))
    put(["falcon"], _PreType(tuple(_FALCON)))
    return table


_PRE_TYPES = _pre_table()

# Token texts llama.cpp treats as end-of-generation (llama-vocab.cpp, special_eog_ids).
_EOG_TEXTS = frozenset([
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>", "<end_of_utterance>",
    "<eos>", "<turn|>", "<｜end▁of▁sentence｜>",
])


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _split_merge(merge: str) -> tuple[str, str] | None:
    # as llama.cpp: the separator is the first space after the first character (a left part may be " ")
    pos = merge.find(" ", 1)
    if pos <= 0:
        return None
    return merge[:pos], merge[pos + 1:]


def _spm_merges(tokens: Sequence[str], scores: Sequence[float], usable: Sequence[bool]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-driven merging (transformers' `generate_merges`).

    Every usable token that can be cut into two vocabulary pieces yields a merge; merges are ordered by the
    score of the merged token (highest first), ties by the longer left then right piece.
    """
    vocab = {}
    for i, t in enumerate(tokens):
        if usable[i]:
            vocab[t] = i
    merges = []
    for tok, i in vocab.items():
        score = scores[i]
        local = []
        for k in range(1, len(tok)):
            left, right = tok[:k], tok[k:]
            li = vocab.get(left)
            if li is None:
                continue
            ri = vocab.get(right)
            if ri is None:
                continue
            local.append((li, ri, left, right, score))
        local.sort(key=lambda m: (m[0], m[1]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[4], len(m[2]), len(m[3])), reverse=True)
    return [(m[2], m[3]) for m in merges]


def _token_content(tok: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or a serialized AddedToken dict."""
    if tok is None:
        return None
    if isinstance(tok, str):
        return tok
    if isinstance(tok, Mapping):
        c = tok.get("content")
        return c if isinstance(c, str) else None
    return str(tok)


def _as_id_list(v: Any) -> list[int]:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v if x is not None]
    return [int(v)]


def _dedup(ids: Iterable[int]) -> list[int]:
    out: list[int] = []
    for i in ids:
        if i is not None and i >= 0 and i not in out:
            out.append(i)
    return out


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise TokenloomError(f"cannot read '{path}': {exc}") from None
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------------------------------------------------
# Chat templates (rendered like transformers' apply_chat_template(..., tokenize=False))
# ---------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------
class Tokenizer:
    """A fast tokenizer plus the model's special-token and chat-template settings.

    Build it with `Tokenizer.from_hf_dir(path)`, `Tokenizer.from_gguf(path)` or
    `Tokenizer.from_gguf_metadata(meta)`.
    """

    def __init__(
        self,
        hf: HFTokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
        add_bos: bool = False,
        add_eos: bool = False,
        chat_template: str | dict[str, str] | None = None,
        special_tokens: Mapping[str, str] | None = None,
        vocab_size: int | None = None,
    ):
        self._hf = hf
        self._bos = bos_token_id
        self._eos = _dedup(eos_token_ids)
        self._add_bos = bool(add_bos) and bos_token_id is not None
        self._add_eos = bool(add_eos) and bool(self._eos)
        if isinstance(chat_template, dict) and len(chat_template) == 1 and "default" in chat_template:
            chat_template = chat_template["default"]
        self._chat_template = chat_template or None
        # bos_token / eos_token / unk_token / pad_token ... strings, passed to chat templates
        self._special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self._vocab_size = vocab_size if vocab_size is not None else hf.get_vocab_size(with_added_tokens=True)
        self._special_ids = frozenset(i for i, t in hf.get_added_tokens_decoder().items() if t.special)

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_hf_dir(cls, path: str) -> "Tokenizer":
        """Load `tokenizer.json` (+ `tokenizer_config.json`, `chat_template.jinja`, `generation_config.json`,
        `config.json` when present) from a transformers-style model directory."""
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise TokenloomError(
                f"no tokenizer.json in '{path}' (only fast tokenizers are supported; "
                "re-save the tokenizer with transformers to create one)"
            )
        try:
            hf = HFTokenizer.from_file(tj)
        except Exception as exc:  # tokenizers raises a bare Exception on bad json
            raise TokenloomError(f"cannot load '{tj}': {exc}") from None

        def opt_json(name: str) -> dict:
            p = os.path.join(path, name)
            return _read_json(p) if os.path.isfile(p) else {}

        tcfg = opt_json("tokenizer_config.json")
        gcfg = opt_json("generation_config.json")
        mcfg = opt_json("config.json")

        special = {}
        for name in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
            content = _token_content(tcfg.get(name))
            if content is not None:
                special[name] = content

        def tid(name: str) -> int | None:
            c = special.get(name)
            return hf.token_to_id(c) if c is not None else None

        bos = tid("bos_token")
        if bos is None:
            ids = _as_id_list(gcfg.get("bos_token_id")) or _as_id_list(mcfg.get("bos_token_id"))
            bos = ids[0] if ids else None
        # the tokenizer's own EOS first (it is the one appended by add_eos), then every stop id the model declares
        eos_tok = tid("eos_token")
        eos = ([eos_tok] if eos_tok is not None else []) + _as_id_list(gcfg.get("eos_token_id")) \
            + _as_id_list(mcfg.get("eos_token_id"))

        # What the post-processor adds around a single sequence tells whether the model wants BOS/EOS.
        with_sp = hf.encode("a", add_special_tokens=True).ids
        without = hf.encode("a", add_special_tokens=False).ids
        pp_bos = bos is not None and len(with_sp) > len(without) and with_sp[0] == bos
        pp_eos = len(with_sp) > len(without) and eos_tok is not None and with_sp[-1] == eos_tok
        add_bos = tcfg["add_bos_token"] if isinstance(tcfg.get("add_bos_token"), bool) else pp_bos
        add_eos = tcfg["add_eos_token"] if isinstance(tcfg.get("add_eos_token"), bool) else pp_eos

        # chat templates: chat_template.jinja (+ additional_chat_templates/*.jinja) override tokenizer_config
        templates: dict[str, str] = {}
        ct = tcfg.get("chat_template")
        if isinstance(ct, str):
            templates["default"] = ct
        elif isinstance(ct, list):
            for item in ct:
                if isinstance(item, dict) and "name" in item and "template" in item:
                    templates[item["name"]] = item["template"]
        if not templates and os.path.isfile(os.path.join(path, "chat_template.json")):
            legacy = opt_json("chat_template.json").get("chat_template")
            if isinstance(legacy, str):
                templates["default"] = legacy
        jinja_file = os.path.join(path, "chat_template.jinja")
        extra_dir = os.path.join(path, "additional_chat_templates")
        if os.path.isfile(jinja_file) or os.path.isdir(extra_dir):
            templates = {}
            if os.path.isfile(jinja_file):
                with open(jinja_file, encoding="utf-8") as f:
                    templates["default"] = f.read()
            if os.path.isdir(extra_dir):
                for name in sorted(os.listdir(extra_dir)):
                    if name.endswith(".jinja"):
                        with open(os.path.join(extra_dir, name), encoding="utf-8") as f:
                            templates[name[: -len(".jinja")]] = f.read()
        chat_template: str | dict[str, str] | None
        if not templates:
            chat_template = None
        elif list(templates) == ["default"]:
            chat_template = templates["default"]
        else:
            chat_template = templates

        return cls(hf, bos_token_id=bos, eos_token_ids=eos, add_bos=add_bos, add_eos=add_eos,
                   chat_template=chat_template, special_tokens=special)

    @classmethod
    def from_gguf(cls, path: str) -> "Tokenizer":
        from tokenloom.gguf.reader import open_gguf, read_metadata

        return cls.from_gguf_metadata(read_metadata(open_gguf(path)))

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> "Tokenizer":
        """Build the tokenizer from a GGUF file's embedded vocabulary (metadata as from `read_metadata`)."""
        model = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not model or not tokens:
            raise TokenloomError("the GGUF file has no embedded tokenizer (tokenizer.ggml.model/tokens missing)")
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]  # as llama.cpp
        n = len(tokens)
        types = list(meta.get("tokenizer.ggml.token_type") or [])
        if len(types) < n:
            types += [TOKEN_TYPE_NORMAL] * (n - len(types))

        def meta_id(key: str) -> int | None:
            v = meta.get(key)
            if v is None:
                return None
            v = int(v)
            return v if 0 <= v < n else None

        bos = meta_id("tokenizer.ggml.bos_token_id")
        eos = meta_id("tokenizer.ggml.eos_token_id")
        unk = meta_id("tokenizer.ggml.unknown_token_id")
        pad = meta_id("tokenizer.ggml.padding_token_id")

        if model == "gpt2":
            pre_name = meta.get("tokenizer.ggml.pre") or "default"
            pre = _PRE_TYPES.get(pre_name)
            if pre is None:
                logger.warning("unknown GGUF pre-tokenizer '%s'; splitting words with the GPT-2 regex, "
                               "tokenization may differ slightly from the original model", pre_name)
                pre = _PRE_TYPES["gpt2"]
            hf = cls._gguf_byte_level(tokens, meta.get("tokenizer.ggml.merges") or [], pre)
            default_add_bos = pre.add_bos
        elif model == "llama":
            scores = meta.get("tokenizer.ggml.scores") or [0.0] * n
            add_prefix = meta.get("tokenizer.ggml.add_space_prefix")
            add_prefix = True if add_prefix is None else bool(add_prefix)
            hf = cls._gguf_sentencepiece(tokens, scores, types, meta.get("tokenizer.ggml.merges"),
                                         unk, add_prefix)
            default_add_bos = True
        else:
            raise TokenloomError(f"unsupported GGUF tokenizer model '{model}' (supported: gpt2, llama)")

        # control / user-defined tokens are matched whole in the text
        control = [AddedToken(tokens[i], special=True, normalized=False)
                   for i in range(n) if types[i] == TOKEN_TYPE_CONTROL]
        user = [AddedToken(tokens[i], special=False, normalized=False)
                for i in range(n) if types[i] == TOKEN_TYPE_USER_DEFINED]
        if control:
            hf.add_special_tokens(control)
        if user:
            hf.add_tokens(user)

        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        add_bos = default_add_bos if add_bos is None else bool(add_bos)
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token") or False)

        eos_ids = [eos] if eos is not None else []
        for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            i = meta_id(key)
            if i is not None:
                eos_ids.append(i)
        for i, t in enumerate(tokens):
            if t in _EOG_TEXTS and types[i] in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED):
                eos_ids.append(i)

        templates: dict[str, str] = {}
        if isinstance(meta.get("tokenizer.chat_template"), str):
            templates["default"] = meta["tokenizer.chat_template"]
        for name in meta.get("tokenizer.chat_templates") or []:
            t = meta.get(f"tokenizer.chat_template.{name}")
            if isinstance(t, str):
                templates[name] = t

        special = {
            "bos_token": tokens[bos] if bos is not None else None,
            "eos_token": tokens[eos] if eos is not None else None,
            "unk_token": tokens[unk] if unk is not None else None,
            "pad_token": tokens[pad] if pad is not None else None,
        }
        return cls(hf, bos_token_id=bos, eos_token_ids=eos_ids, add_bos=add_bos, add_eos=add_eos,
                   chat_template=templates or None, special_tokens=special, vocab_size=n)

    @staticmethod
    def _gguf_byte_level(tokens: list[str], merges: Sequence[str], pre: _PreType) -> HFTokenizer:
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = []
        for m in merges:
            p = _split_merge(m)
            # llama.cpp silently ignores merges that name tokens it does not have; tokenizers refuses them
            if p is not None and p[0] in vocab and p[1] in vocab and (p[0] + p[1]) in vocab:
                pairs.append(p)
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False,
                                    ignore_merges=pre.ignore_merges))
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)]
        )
        hf.decoder = decoders.ByteLevel()
        return hf

    @staticmethod
    def _gguf_sentencepiece(tokens: list[str], scores: Sequence[float], types: Sequence[int],
                            merges: Sequence[str] | None, unk: int | None, add_prefix: bool) -> HFTokenizer:
        vocab = {t: i for i, t in enumerate(tokens)}
        if merges:
            pairs = [p for p in map(_split_merge, merges)
                     if p is not None and p[0] in vocab and p[1] in vocab and (p[0] + p[1]) in vocab]
        else:
            # SentencePiece merges only ever produce normal tokens: control, byte and unknown pieces are not
            # reachable from text by merging.
            usable = [t in (TOKEN_TYPE_NORMAL, TOKEN_TYPE_UNDEFINED) for t in types]
            pairs = _spm_merges(tokens, scores, usable)
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=tokens[unk] if unk is not None else None,
                                    fuse_unk=True, byte_fallback=True))
        # llama.cpp prepends the space to every run of text (also after a special token), like the Llama
        # tokenizer.json's Prepend normalizer
        steps = [normalizers.Prepend("▁")] if add_prefix else []
        hf.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
        dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_prefix:
            dec.append(decoders.Strip(content=" ", left=1, right=0))
        hf.decoder = decoders.Sequence(dec)
        return hf

    # -- properties ---------------------------------------------------------------------------------------
    @property
    def hf_tokenizer(self) -> HFTokenizer:
        return self._hf

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def __len__(self) -> int:
        return self._vocab_size

    @property
    def bos_token_id(self) -> int | None:
        return self._bos

    @property
    def eos_token_id(self) -> int | None:
        return self._eos[0] if self._eos else None

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._eos)

    @property
    def add_bos(self) -> bool:
        return self._add_bos

    @property
    def add_eos(self) -> bool:
        return self._add_eos

    @property
    def special_tokens(self) -> dict[str, str]:
        """Named special tokens as strings (bos_token, eos_token, ...), as seen by chat templates."""
        return dict(self._special_tokens)

    @property
    def chat_template(self) -> str | None:
        t = self._chat_template
        if isinstance(t, dict):
            return t.get("default")
        return t

    @property
    def chat_templates(self) -> dict[str, str]:
        t = self._chat_template
        if t is None:
            return {}
        return dict(t) if isinstance(t, dict) else {"default": t}

    # -- encode / decode ----------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (``<|im_start|>``) become their ids;
        with `add_special_tokens` the model's BOS (and EOS, rarely) is added when the model asks for it."""
        ids = self._hf.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self._add_bos:
                ids.insert(0, self._bos)
            if self._add_eos:
                ids.append(self._eos[0])
        return ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        out = [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]
        if add_special_tokens:
            for ids in out:
                if self._add_bos:
                    ids.insert(0, self._bos)
                if self._add_eos:
                    ids.append(self._eos[0])
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._hf.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self._hf.id_to_token(ids)
        return [self._hf.id_to_token(int(i)) for i in ids]

    def is_special(self, token_id: int) -> bool:
        """Whether the id is a special (control) token, i.e. one `skip_special_tokens` drops."""
        return int(token_id) in self._special_ids

    @property
    def special_token_ids(self) -> frozenset[int]:
        return self._special_ids

    # -- chat ---------------------------------------------------------------------------------------------
    def _select_template(self, chat_template: str | None, tools) -> str:
        t = self._chat_template
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

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        continue_final_message: bool | str = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a conversation to the prompt text, exactly as transformers'
        ``apply_chat_template(messages, tokenize=False, ...)`` does. Extra keyword arguments are passed to
        the template (e.g. ``enable_thinking=False``)."""
        import jinja2

        source = self._select_template(chat_template, tools)
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

        variables = {**self._special_tokens, **kwargs}
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

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self._bos}, eos={self._eos}, "
                f"add_bos={self._add_bos}, chat_template={'yes' if self._chat_template else 'no'})")


# ---------------------------------------------------------------------------------------------------------
# Streaming detokenization
# ---------------------------------------------------------------------------------------------------------
_PROMPT_CONTEXT = 5  # prompt tokens kept as decoding context (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas as they arrive (vLLM's prefix/read-offset scheme).

    `add(ids)` returns only the newly completed text; text is held back while the decoded tail ends in
    U+FFFD (a multi-byte character split across byte tokens). Each step decodes only the few tokens since
    the last emitted boundary, so the cost per token is O(1) amortized.

    Without `prompt_ids` the concatenated deltas equal ``tokenizer.decode(generated, skip_special_tokens)``.
    With `prompt_ids`, the last few prompt tokens are decoding context, so the first token is rendered as a
    continuation of the prompt (for SentencePiece models a leading ``'▁'`` then stays a space instead of being
    stripped as at the start of a sequence); for byte-level BPE the result is the same.
    Call `flush()` at the end to get text still held back (only when generation stopped mid-character).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None,
                 skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._pieces: list[str] = []
        self._text_cache: str | None = ""
        self._num_generated = 0
        if prompt_ids:
            ctx = list(prompt_ids[-_PROMPT_CONTEXT:])
            ctx_text = self._decode(ctx)
            # a prompt ending mid-character would make the first delta ambiguous: decode without context then
            if not ctx_text.endswith("\ufffd"):
                self._ids = ctx
                self._read = len(ctx)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_ids: int | Iterable[int]) -> str:
        """Append generated token id(s); return the text they completed ('' while a character is pending)."""
        try:
            new = [int(t) for t in token_ids]
        except TypeError:  # a single id (int, numpy/torch scalar)
            new = [int(token_ids)]
        if not new:
            return ""
        self._ids.extend(new)
        self._num_generated += len(new)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix = self._read
        self._read = len(self._ids)
        self._pieces.append(delta)
        self._text_cache = None
        return delta

    def flush(self) -> str:
        """Emit whatever is still held back (a trailing incomplete character decodes to U+FFFD)."""
        if self._read >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read
        self._read = len(self._ids)
        if len(new_text) <= len(prefix_text):
            return ""
        delta = new_text[len(prefix_text):]
        self._pieces.append(delta)
        self._text_cache = None
        return delta

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if self._text_cache is None:
            self._text_cache = "".join(self._pieces)
            self._pieces = [self._text_cache]
        return self._text_cache

    @property
    def num_tokens(self) -> int:
        """Generated tokens seen so far."""
        return self._num_generated
