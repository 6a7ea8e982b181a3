"""`Tokenizer`: a HF `tokenizers.Tokenizer` (the fast Rust implementation) plus the model's special-token and
chat-template settings, built either from a transformers-style model directory (`tokenizer.json` +
`tokenizer_config.json`) or from the vocabulary embedded in a GGUF file (see `gguf_vocab`)."""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import Tokenizer as HFTokenizer

from tokenloom.config import TokenloomError
from tokenloom.tokenizer import gguf_vocab
from tokenloom.tokenizer.chat_template import render_chat, select_template


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


def _hf_dir_chat_templates(path: str, tcfg: dict) -> str | dict[str, str] | None:
    """The chat template(s) of a model directory: chat_template.jinja (+ additional_chat_templates/*.jinja)
    override tokenizer_config.json's chat_template, and the legacy chat_template.json fills in when neither has one."""
    templates: dict[str, str] = {}
    ct = tcfg.get("chat_template")
    if isinstance(ct, str):
        templates["default"] = ct
    elif isinstance(ct, list):
        for item in ct:
            if isinstance(item, dict) and "name" in item and "template" in item:
                templates[item["name"]] = item["template"]
    if not templates and os.path.isfile(os.path.join(path, "chat_template.json")):
        legacy = _read_json(os.path.join(path, "chat_template.json")).get("chat_template")
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
    if not templates:
        return None
    if list(templates) == ["default"]:
        return templates["default"]
    return templates


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

        return cls(hf, bos_token_id=bos, eos_token_ids=eos, add_bos=add_bos, add_eos=add_eos,
                   chat_template=_hf_dir_chat_templates(path, tcfg), special_tokens=special)

    @classmethod
    def from_gguf(cls, path: str) -> "Tokenizer":
        from tokenloom.gguf.reader import open_gguf, read_metadata

        return cls.from_gguf_metadata(read_metadata(open_gguf(path)))

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> "Tokenizer":
        """Build the tokenizer from a GGUF file's embedded vocabulary (metadata as from `read_metadata`)."""
        hf, kwargs = gguf_vocab.tokenizer_args(meta)
        return cls(hf, **kwargs)

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
        the template (e.g. ``enable_thinking=False``). `chat_template` picks one of the model's named templates
        or is a template source itself."""
        source = select_template(self._chat_template, chat_template, tools)
        return render_chat(source, messages, self._special_tokens, add_generation_prompt=add_generation_prompt,
                           tools=tools, documents=documents, continue_final_message=continue_final_message,
                           **kwargs)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self._bos}, eos={self._eos}, "
                f"add_bos={self._add_bos}, chat_template={'yes' if self._chat_template else 'no'})")

