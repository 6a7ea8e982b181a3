"""Text <-> token ids, chat templates and streaming detokenization.

    hf.py             Tokenizer: a HF `tokenizers` tokenizer + special tokens, from tokenizer.json or a GGUF file
    gguf_vocab.py     the GGUF vocabulary -> HF tokenizer conversion (llama.cpp's pre-tokenizers, BPE / SentencePiece)
    chat_template.py  Jinja chat templates rendered like transformers' apply_chat_template
    detokenizer.py    IncrementalDetokenizer: generated ids -> text deltas
"""
from tokenloom.tokenizer.detokenizer import IncrementalDetokenizer
from tokenloom.tokenizer.gguf_vocab import _bytes_to_unicode  # noqa: F401 (tests build byte-level vocabularies)
from tokenloom.tokenizer.hf import Tokenizer

__all__ = ["Tokenizer", "IncrementalDetokenizer"]
