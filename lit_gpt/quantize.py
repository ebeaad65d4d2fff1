"""4-bit quantization of a model's frozen linear layers with bitsandbytes, for QLoRA.

Lightning's `BitsandbytesPrecision` plugin refuses CPU, so the model is quantized here instead, the same
way on every device: build and load the model in float, swap each targeted `nn.Linear` for a
`bnb.nn.Linear4bit` holding the same weights, and let `.to(device)` quantize them.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lit_gpt.utils import UserError

# "-dq" also quantizes the quantization constants (QLoRA's double quantization).
QUANTIZE_MODES = ("bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq")


def check_quantize_mode(mode: str) -> tuple[str, bool]:
    """(quant_type, double_quant) for a `--quantize` value."""
    if mode not in QUANTIZE_MODES:
        raise UserError(f"unknown --quantize {mode!r}: choose one of {', '.join(QUANTIZE_MODES)}")
    kind = mode.removeprefix("bnb.")
    return kind.removesuffix("-dq"), kind.endswith("-dq")


def quantize_linears(model: nn.Module, mode: str, compute_dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """Replace every plain `nn.Linear` in the blocks and the head with a 4-bit linear on `device`.

    The embedding and the norms stay in float. Quantized weights are frozen: train adapters on top.
    """
    quant_type, double_quant = check_quantize_mode(mode)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError("--quantize needs bitsandbytes: pip install bitsandbytes") from None
    targets = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear: nn.Linear = getattr(parent, child)
        quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=compute_dtype, quant_type=quant_type,
                                      compress_statistics=double_quant, device="meta")
        # On AVX512-BF16 CPUs, bitsandbytes repacks the weight for inference at the first eval forward, and then
        # serves training forwards from a kernel without autograd: the input gradient through the base is lost.
        quantized.support_avx512bf16_for_cpu = False
        quantized.weight = bnb.nn.Params4bit(linear.weight.data.to(compute_dtype), requires_grad=False,
                                             quant_type=quant_type, compress_statistics=double_quant)
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
        setattr(parent, child, quantized.to(device))  # `.to` is where bitsandbytes quantizes
    return model


def is_quantized(module: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, bnb.nn.Linear4bit)
