"""The one cost model (`lit_gpt/flops.py`) against closed-form counts of the branches and the paper's savings."""

import pytest
import torch

from lit_gpt.config import Config
from lit_gpt.flops import CostModel
from lit_gpt.lora import LoRAConfig, add_lora
from lit_gpt.model import GPT


def meta_model(config: Config, lora: bool = False) -> GPT:
    """Shapes only: the cost model never reads a weight, so even LLaMA-2-7B costs nothing to build."""
    with torch.device("meta"):
        model = GPT(config)
        if lora:
            add_lora(model, LoRAConfig(r=8))
    return model


C = Config(n_layer=3, n_head=8, n_query_groups=2, n_embd=64, intermediate_size=160, vocab_size=100)


def test_branch_backward_flops_of_full_finetuning_match_the_closed_form():
    T, D, hs = 32, 64, 8
    linear = 2 * T * D * ((8 + 2 * 2) * hs + 8 * hs)  # fused qkv and the output projection
    core = 2 * T * T * 8 * hs  # causal: half of QK^T and AV
    norm = 2 * T * D  # input and weight gradient, one FLOP per element each
    attention = 2 * linear + 2 * core + norm  # input and weight gradients of both linears; q, k, v from the core
    mlp = 2 * (2 * 3 * T * D * 160) + norm
    assert CostModel(meta_model(C)).branch_backward_flops(T) == [attention, mlp] * 3


def test_branch_backward_flops_of_lora_count_base_input_gradients_and_the_adapters():
    T, D, I, r = 32, 64, 160, 8
    adapters = sum(2 * (2 * T * n_in * r) + 2 * (2 * T * r * n_out) for n_in, n_out in ((D, I), (D, I), (I, D)))
    mlp = 2 * 3 * T * D * I + adapters + T * D  # frozen base: input gradients only; the norm's too
    flops = CostModel(meta_model(C, lora=True)).branch_backward_flops(T)
    assert flops[3] == mlp  # block 1's MLP: something below it trains, so its input gradient is needed
    assert flops[0] < flops[2]  # block 0's attention: nothing below trains, so its input gradient is saved for free


@pytest.mark.parametrize("lora, fraction", [(False, 2 / 3), (True, 1 / 2)])
def test_saving_tends_to_the_paper_figures_when_blocks_dominate(lora, fraction):
    # A tiny vocabulary and a short sequence make the head and the attention core negligible.
    model = meta_model(Config(n_layer=8, n_head=8, n_embd=1024, intermediate_size=4096, vocab_size=16), lora)
    for p in (0.5, 0.875):
        assert CostModel(model).theoretical_saving(8, p) == pytest.approx(fraction * p, rel=0.02)


def test_real_configs_save_less_than_the_block_only_figure():
    saving = CostModel(meta_model(Config.from_name("Llama-2-7b-hf"))).theoretical_saving(512, 0.875)
    assert 0.9 * (2 / 3 * 0.875) < saving < 2 / 3 * 0.875


def test_drop_rates_must_match_the_branches():
    with pytest.raises(ValueError, match="expected 6"):
        CostModel(meta_model(C)).theoretical_saving(8, [0.5] * 5)


def test_profiles_are_built_once_per_sequence_length():
    cost = CostModel(meta_model(C))
    assert cost.profile(16) is cost.profile(16) and cost.profile(16) is not cost.profile(32)


@pytest.mark.parametrize("lora", [False, True])
def test_branch_shares_add_up_to_the_backward_pass(lora):
    from lit_gpt.flops import backward_by_branch, training_flops

    ops = CostModel(meta_model(C, lora)).profile(24)
    shares = backward_by_branch(ops)
    assert sum(shares.values()) == pytest.approx(training_flops(ops)[1], rel=1e-12)
    assert set(shares) - {(None, None)} == {(b, name) for b in range(3) for name in ("attn", "mlp")}
