"""`tokenloom show`: what a model is, read from its metadata without loading the weights."""
from __future__ import annotations

import json
from collections import Counter

from tokenloom.config import ModelConfig
from tokenloom.loader.sources import resolve_model


def describe_model(model: str) -> dict[str, str]:
    src = resolve_model(model)
    info: dict[str, str] = {"model": src.name, "path": str(src.path)}
    template = None
    if src.kind == "gguf":
        from tokenloom.gguf.loader import config_from_metadata, open_gguf_checked
        from tokenloom.gguf.reader import read_metadata

        reader = open_gguf_checked(str(src.path))
        meta = read_metadata(reader)
        cfg = config_from_metadata(meta, {t.name for t in reader.tensors})
        n_params = sum(int(t.n_elements) for t in reader.tensors)
        types = Counter(t.tensor_type.name for t in reader.tensors)
        quant = ", ".join(f"{k} x{v}" for k, v in types.most_common())
        template = meta.get("tokenizer.chat_template")
        info["format"] = "GGUF"
        size = src.path.stat().st_size
    else:
        from tokenloom.loader.safetensors import load_hf_config, safetensors_files

        raw = json.loads((src.path / "config.json").read_text())
        cfg = ModelConfig.from_hf(load_hf_config(src.path))
        files = safetensors_files(src.path)
        size = sum(f.stat().st_size for f in files)
        n_params = cfg.num_params
        qc = raw.get("quantization_config")
        quant = (f"{qc.get('quant_method')} {qc.get('bits', '')}-bit" if qc
                 else raw.get("torch_dtype") or raw.get("dtype") or "unknown")
        tc = src.path / "tokenizer_config.json"
        if tc.is_file():
            template = json.loads(tc.read_text()).get("chat_template")
        jinja = src.path / "chat_template.jinja"
        if template is None and jinja.is_file():
            template = jinja.read_text()
        info["format"] = "safetensors"
    info.update({
        "architecture": cfg.architecture,
        "parameters": f"{n_params / 1e6:.1f}M" if n_params < 1e9 else f"{n_params / 1e9:.2f}B",
        "quantization": quant,
        "file size": f"{size / 1e6:.1f} MB",
        "context length": str(cfg.max_position_embeddings),
        "layers": str(cfg.num_layers),
        "hidden size": str(cfg.hidden_size),
        "heads (q / kv)": f"{cfg.num_heads} / {cfg.num_kv_heads}",
        "head dim": str(cfg.head_dim),
        "vocab size": str(cfg.vocab_size),
        "rope theta": f"{cfg.rope_theta:g}",
        "tied embeddings": str(cfg.tie_word_embeddings).lower(),
    })
    if cfg.num_experts:
        info["experts"] = f"{cfg.num_experts} (top-{cfg.num_experts_per_tok})"
    info["chat template"] = template if isinstance(template, str) else "(none)"
    return info
