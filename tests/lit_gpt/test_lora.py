import pytest
import torch

from lit_gpt.config import Config
from lit_gpt.lora import LoRAConfig, LoRALinear, add_lora, lora_state_dict, lora_targets, merge_lora, unmerge_lora
from lit_gpt.model import GPT

CONFIG = Config(n_layer=2, n_head=4, n_query_groups=2, n_embd=32, intermediate_size=64, vocab_size=50, block_size=16)


def base_model() -> GPT:
    torch.manual_seed(0)
    model = GPT(CONFIG)
    model.reset_parameters()
    return model


def lora_model(**kwargs) -> GPT:
    model = add_lora(base_model(), LoRAConfig(**kwargs))
    for m in model.modules():  # non-zero B, so the adapters change the output
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.05)
    return model


def test_adapters_start_as_the_identity_and_only_they_train():
    ids = torch.randint(0, 50, (2, 10))
    base = base_model()
    model = add_lora(base_model(), LoRAConfig())
    torch.testing.assert_close(model(ids), base(ids))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # every linear: qkv, proj, fc_1, fc_2, mlp.proj per layer, plus the head
    assert len(lora_targets(base_model(), LoRAConfig())) == 2 * 5 + 1


def test_switches_choose_the_projections():
    names = lora_targets(base_model(), LoRAConfig(qkv=True, projection=False, mlp=False, head=False))
    assert names == ["transformer.h.0.attn.attn", "transformer.h.1.attn.attn"]


def test_base_checkpoints_load_into_a_lora_model():
    base = base_model()
    model = add_lora(GPT(CONFIG), LoRAConfig())
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert unexpected == [] and all("lora_" in k for k in missing)
    torch.testing.assert_close(model.transformer.h[0].attn.attn.linear.weight, base.transformer.h[0].attn.attn.weight)


def test_merge_keeps_the_output_and_unmerge_restores_the_weights():
    model = lora_model()
    ids = torch.randint(0, 50, (2, 10))
    before = model(ids)
    weight = model.transformer.h[1].mlp.fc_1.linear.weight.clone()
    merge_lora(model)
    torch.testing.assert_close(model(ids), before, atol=1e-5, rtol=1e-5)
    assert not torch.equal(model.transformer.h[1].mlp.fc_1.linear.weight, weight)
    unmerge_lora(model)
    torch.testing.assert_close(model.transformer.h[1].mlp.fc_1.linear.weight, weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(ids), before, atol=1e-5, rtol=1e-5)


def test_lora_state_dict_holds_only_adapters():
    state = lora_state_dict(lora_model())
    assert state and all("lora_A" in k or "lora_B" in k for k in state)


def test_rank_must_be_positive():
    with pytest.raises(ValueError, match="rank"):
        add_lora(base_model(), LoRAConfig(r=0))


def test_a_qkv_bias_stays_with_its_base_weight_frozen_under_lora_and_trained_without():
    config = Config(**{**CONFIG.__dict__, "attn_bias": True})
    torch.manual_seed(0)
    base = GPT(config)
    with torch.no_grad():
        for block in base.transformer.h:
            block.attn.attn.bias.normal_()
    model = add_lora(GPT(config), LoRAConfig())
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert unexpected == [] and all("lora_" in k for k in missing)
    bias = model.transformer.h[0].attn.attn.linear.bias
    assert torch.equal(bias, base.transformer.h[0].attn.attn.bias) and not bias.requires_grad
    ids = torch.randint(0, 50, (2, 10))
    torch.testing.assert_close(model(ids), base(ids))  # the bias is applied through the LoRA wrapper
    model(ids).sum().backward()
    assert bias.grad is None and model.transformer.h[0].attn.attn.lora_A.grad is not None

    base(ids).sum().backward()  # full fine-tuning: the bias trains like the weights
    assert base.transformer.h[0].attn.attn.bias.grad.abs().sum() > 0
