"""A tokenizer rebuilt from the vocabulary embedded in a GGUF file, the way llama.cpp interprets the metadata.

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
import logging
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from tokenloom.config import TokenloomError

logger = logging.getLogger(__name__)

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


_GEMMA_ARCHS = frozenset({"gemma", "gemma2", "gemma3"})


def _gemma_vocab(tokens: list[str], types: list[int]) -> tuple[list[str], list[int], list[float], list[bool]]:
    """A Gemma file's vocabulary as transformers reads it (integrations/gguf, gemma_tokenizer): a token of spaces
    is stored as real spaces, user-defined, but is the vocabulary's run of '▁', reached by merging, not matched
    whole; and the merges follow the tokens' order in the file, which their scores do not (the user-defined ones
    all score -1000), over the whole vocabulary. Returns (tokens, types, scores, usable) for sentencepiece_bpe."""
    spaces = [" " in t and not t.strip() for t in tokens]
    tokens = ["▁" * len(t) if s else t for t, s in zip(tokens, spaces)]
    types = [TOKEN_TYPE_NORMAL if s else ty for ty, s in zip(types, spaces)]
    return tokens, types, [-float(i) for i in range(len(tokens))], [True] * len(tokens)


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


def tokenizer_args(meta: Mapping[str, Any]) -> tuple[HFTokenizer, dict[str, Any]]:
    """The HF tokenizer and the `Tokenizer` keyword arguments (special ids, add_bos/eos, chat templates) of a
    GGUF file's embedded vocabulary (metadata as from `read_metadata`)."""
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
        hf = byte_level_bpe(tokens, meta.get("tokenizer.ggml.merges") or [], pre)
        default_add_bos = pre.add_bos
    elif model == "llama":
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * n
        usable = None
        if meta.get("general.architecture") in _GEMMA_ARCHS:
            tokens, types, scores, usable = _gemma_vocab(tokens, types)
        add_prefix = meta.get("tokenizer.ggml.add_space_prefix")
        add_prefix = True if add_prefix is None else bool(add_prefix)
        hf = sentencepiece_bpe(tokens, scores, types, meta.get("tokenizer.ggml.merges"), unk, add_prefix, usable)
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
    return hf, dict(bos_token_id=bos, eos_token_ids=eos_ids, add_bos=add_bos, add_eos=add_eos,
                    chat_template=templates or None, special_tokens=special, vocab_size=n)


def byte_level_bpe(tokens: list[str], merges: Sequence[str], pre: _PreType) -> HFTokenizer:
    """GPT-2-style byte-level BPE (tokenizer.ggml.model "gpt2") with the pre-tokenizer `pre`."""
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


def sentencepiece_bpe(tokens: list[str], scores: Sequence[float], types: Sequence[int],
                      merges: Sequence[str] | None, unk: int | None, add_prefix: bool,
                      usable: Sequence[bool] | None = None) -> HFTokenizer:
    """SentencePiece-style BPE (tokenizer.ggml.model "llama"): merges from the scores when the file has none
    (`usable`: the tokens they may produce and use), <0xXX> byte fallback, '▁' as the space."""
    vocab = {t: i for i, t in enumerate(tokens)}
    if merges:
        pairs = [p for p in map(_split_merge, merges)
                 if p is not None and p[0] in vocab and p[1] in vocab and (p[0] + p[1]) in vocab]
    else:
        # SentencePiece merges only ever produce normal tokens: control, byte and unknown pieces are not
        # reachable from text by merging.
        if usable is None:
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

