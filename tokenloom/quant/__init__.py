"""Weight quantization: INT8, INT4, GPTQ, AWQ, NF4 and native GGUF blocks, swapped into a loaded model.

    from tokenloom.quant import quantize_model
    quantize_model(model, "int8")                         # W8A16, per output channel
    quantize_model(model, "int4", group_size=64)          # group-wise asymmetric RTN
    quantize_model(model, "gptq", tokenizer=tok)          # calibrated on the corpus (see calib.py)
    quantize_model(model, "gguf", gguf_path=path)         # keep the GGUF file's blocks quantized

Method strings may carry options: "int4-g64", "gptq-b3-g128", "nf4-dq" (double quantization).
Every nn.Linear of the decoder layers (fused q/k/v, o, fused gate/up, down) is replaced by a quantized module of
tokenloom.quant.linear; the LM head is quantized to INT8 per channel by default (`lm_head="int8"`; "same" uses the
method itself, "none" keeps it), and when it is tied to the token embedding the embedding reads its rows from the
quantized head, so the big vocabulary matrix exists once.

Kernels (see linear.py): tokenloom's AVX-512 GEMV kernels (cpu_kernels.py, compiled on first use) when they
build, else torch's aten._weight_int8pack_mm / _weight_int4pack_mm_for_cpu, else dequantize + F.linear; prefill
(64+ rows) dequantizes the weight once and uses the BLAS matmul. TOKENLOOM_QUANT_REFERENCE=1 forces the
reference path everywhere; TOKENLOOM_CPP_KERNELS=0 skips the compiled kernels.
"""
from tokenloom.quant.modules import quantize_lm_head
from tokenloom.quant.options import METHODS, QuantizeResult, QuantOptions, parse_method
from tokenloom.quant.quantize import quantize_model

__all__ = ["METHODS", "QuantOptions", "QuantizeResult", "parse_method", "quantize_lm_head", "quantize_model"]
