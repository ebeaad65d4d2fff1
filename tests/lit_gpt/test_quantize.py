"""QLoRA's 4-bit base (lit_gpt/quantize.py): adapters under it get gradients, also after an evaluation forward."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_shape
from lit_gpt import GPT, Config
from lit_gpt.lora import LoRAConfig, LoRALinear, add_lora

bnb = pytest.importorskip("bitsandbytes")

# in_features a multiple of bitsandbytes' 4-bit block size (64)
TINY = tiny_shape(vocab_size=128, block_size=32)


@pytest.fixture
def pretend_avx512bf16(monkeypatch):
    """Make bitsandbytes believe this CPU has AVX512-BF16, so every Linear4bit would repack its weight at the first
    eval forward (a kernel without autograd) whatever CPU runs the test."""
    import bitsandbytes.nn.modules as modules

    monkeypatch.setattr(modules, "has_avx512bf16", lambda: True)
    assert bnb.nn.Linear4bit(64, 64, device="meta").support_avx512bf16_for_cpu  # the patch took


@pytest.mark.parametrize("mode", ["bnb.nf4", "bnb.fp4-dq"])
def test_every_adapter_gets_a_gradient_after_an_eval_forward(pretend_avx512bf16, mode):
    from lit_gpt.quantize import is_quantized, quantize_linears

    torch.manual_seed(0)
    model = GPT(Config(**TINY))
    model.reset_parameters()
    quantize_linears(model, mode, torch.float32, "cpu")
    add_lora(model, LoRAConfig(r=4))
    adapters = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert len(adapters) == 2 * 5 + 1 and all(is_quantized(m.linear) for m in adapters.values())
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


    def train_step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.train()
        model.zero_grad(set_to_none=True)
        logits = model(ids)
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1)).backward()
        grads = {name: m.lora_B.grad.clone() for name, m in adapters.items() if m.lora_B.grad is not None}
        return logits.detach(), grads

    fresh_logits, fresh_grads = train_step()
    model.eval()
    with torch.no_grad():  # validation, or the sample generated at each evaluation
        eval_logits = model(ids)
    logits, grads = train_step()

    # lora_B starts at zero, so every input gradient below the head flows through the 4-bit base weights: if
    # bitsandbytes served the training forward from its repacked inference kernel (no autograd on AVX512-BF16
    # CPUs, a wrongly read layout elsewhere), adapters would lose their gradient or get a wrong one.
    no_grad = [name for name in adapters if name not in grads or not grads[name].abs().sum() > 0]
    assert not no_grad, no_grad
    torch.testing.assert_close(eval_logits, fresh_logits, rtol=0, atol=0)
    torch.testing.assert_close(logits, fresh_logits, rtol=0, atol=0)
    for name in adapters:
        torch.testing.assert_close(grads[name], fresh_grads[name], rtol=0, atol=0, msg=name)
