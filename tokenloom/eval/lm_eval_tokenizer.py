"""A model's own tokenizer saved as a transformers tokenizer folder, for lm-evaluation-harness's
`local-completions` model against `tokenloom serve`: lm-eval tokenizes the (context, continuation) pairs itself
and sends token ids, so its tokenizer must be exactly the server's (a GGUF model has no tokenizer.json to point
it at)."""
from __future__ import annotations

from pathlib import Path

from tokenloom.config import TokenloomError


def load_tokenizer(model: str):
    """The tokenloom Tokenizer of a model name, .gguf file or HF folder, without loading its weights."""
    from tokenloom.loader.sources import resolve_model
    from tokenloom.tokenizer import Tokenizer

    source = resolve_model(model)
    if source.kind == "gguf":
        return Tokenizer.from_gguf(str(source.path))
    return Tokenizer.from_hf_dir(str(source.path))


def save_hf_tokenizer(tokenizer, out_dir: str | Path) -> Path:
    """Write `tokenizer` (a tokenloom Tokenizer) as a PreTrainedTokenizerFast folder (tokenizer.json and its
    configs) that transformers.AutoTokenizer loads offline, encoding exactly as tokenloom does."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        raise TokenloomError("saving a transformers tokenizer needs the transformers package") from None
    special = tokenizer.special_tokens
    kwargs = {k: special[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if special.get(k)}
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer.hf_tokenizer, **kwargs)
    if tokenizer.chat_template:
        fast.chat_template = tokenizer.chat_template
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out
