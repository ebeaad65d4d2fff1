import pytest

from dropbp.flops import attention_flops, branch_flops, mlp_flops, step_flops, theoretical_saving
from lit_gpt.config import Config


def test_branch_formulas():
    c = Config(n_layer=2, n_head=8, n_query_groups=2, n_embd=64, intermediate_size=160, vocab_size=100)
    T = 32
    qkv_rows = (8 + 2 * 2) * 8
    assert attention_flops(c, T, "full").forward == 2 * T * 64 * (qkv_rows + 64) + 2 * T * T * 64
    assert mlp_flops(c, T, "full").forward == 6 * T * 64 * 160
    assert mlp_flops(c, T, "full").backward == 2 * mlp_flops(c, T, "full").forward  # input + weight grads
    assert mlp_flops(c, T, "lora").backward == mlp_flops(c, T, "lora").forward  # input grads only
    assert [f.forward for f in branch_flops(c, T)] == [attention_flops(c, T, "full").forward, mlp_flops(c, T, "full").forward] * 2


@pytest.mark.parametrize("method, fraction", [("full", 2 / 3), ("lora", 1 / 2)])
def test_saving_tends_to_the_paper_figures_when_blocks_dominate(method, fraction):
    # A tiny vocabulary and a short sequence make the head and the attention core negligible.
    c = Config(n_layer=8, n_head=8, n_embd=1024, intermediate_size=4096, vocab_size=16)
    for p in (0.5, 0.875):
        assert theoretical_saving(c, 8, method, p) == pytest.approx(fraction * p, rel=0.01)


def test_real_configs_save_less_than_the_block_only_figure():
    c = Config.from_name("Llama-2-7b-hf")
    saving = theoretical_saving(c, 512, "full", 0.875)
    assert 0.9 * (2 / 3 * 0.875) < saving < 2 / 3 * 0.875


def test_drop_rates_must_match_the_branches():
    c = Config(n_layer=2, n_head=2, n_embd=16, intermediate_size=32, vocab_size=10)
    with pytest.raises(ValueError, match="expected 4"):
        step_flops(c, 8, "full", [0.5] * 3)
    with pytest.raises(ValueError, match="unknown fine-tuning method"):
        mlp_flops(c, 8, "adapter")
