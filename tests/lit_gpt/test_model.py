import math

import pytest
import torch
import torch.nn.functional as F

from lit_gpt import GPT, Config
from lit_gpt.model import apply_rope, build_rope_cache, rope_frequencies

TINY = dict(n_layer=2, n_embd=64, intermediate_size=96, vocab_size=97, block_size=48)


def tiny_model(**overrides) -> GPT:
    torch.manual_seed(0)
    model = GPT(Config(**{**TINY, "n_head": 4, **overrides}))
    model.reset_parameters()
    return model.eval()


@pytest.mark.parametrize("n_query_groups", [4, 2, 1])  # MHA, GQA, MQA
def test_kv_cache_decoding_matches_the_full_forward(n_query_groups):
    model = tiny_model(n_query_groups=n_query_groups)
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = model(ids)
        model.set_kv_cache(batch_size=2, max_seq_length=24)
        steps = [model(ids[:, :12], torch.arange(12))]
        steps += [model(ids[:, t : t + 1], torch.tensor([t])) for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_gqa_equals_attention_with_repeated_kv_heads():
    """The fused layout groups each k/v head with its q heads; compare with an explicit computation."""
    model = tiny_model(n_query_groups=2)
    c = model.config
    attn = model.transformer.h[0].attn
    x = torch.randn(1, 10, c.n_embd)
    cos, sin = build_rope_cache(10, c.head_size, c.rope_base)
    w = attn.attn.weight.view(c.n_query_groups, c.q_per_kv + 2, c.head_size, c.n_embd)
    q_w = w[:, : c.q_per_kv].reshape(-1, c.n_embd)
    k_w, v_w = w[:, -2].reshape(-1, c.n_embd), w[:, -1].reshape(-1, c.n_embd)

    def heads(t, n):
        return t.view(1, 10, n, c.head_size).transpose(1, 2)

    q = apply_rope(heads(x @ q_w.T, c.n_head), cos, sin)
    k = apply_rope(heads(x @ k_w.T, c.n_query_groups), cos, sin).repeat_interleave(c.q_per_kv, dim=1)
    v = heads(x @ v_w.T, c.n_query_groups).repeat_interleave(c.q_per_kv, dim=1)
    expected = attn.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(1, 10, -1))
    torch.testing.assert_close(attn(x, cos, sin), expected, atol=1e-5, rtol=1e-5)


def test_forward_is_causal():
    model = tiny_model(n_query_groups=2)
    ids = torch.randint(0, 97, (1, 16))
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 97
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[:, :10], model(changed)[:, :10])


def test_parallel_residual_block_adds_both_branches_to_the_input():
    model = tiny_model(parallel_residual=True)
    block = model.transformer.h[0]
    x = torch.randn(2, 8, 64)
    cos, sin = build_rope_cache(8, 16, 10000.0)
    expected = x + block.attn(block.norm_1(x), cos, sin) + block.mlp(block.norm_2(x))
    torch.testing.assert_close(block(x, cos, sin), expected)


def test_sequential_block_feeds_the_attention_output_to_the_mlp():
    model = tiny_model()
    block = model.transformer.h[0]
    x = torch.randn(2, 8, 64)
    cos, sin = build_rope_cache(8, 16, 10000.0)
    h = x + block.attn(block.norm_1(x), cos, sin)
    torch.testing.assert_close(block(x, cos, sin), h + block.mlp(block.norm_2(h)))


def test_tied_embeddings_share_one_matrix():
    model = tiny_model(tie_embeddings=True)
    assert model.lm_head is None and "lm_head.weight" not in model.state_dict()
    model(torch.randint(0, 5, (1, 6))).logsumexp(-1).sum().backward()
    # Rows 5.. are never looked up, so their gradient can only come from the head's use of the matrix.
    assert model.transformer.wte.weight.grad[5:].abs().sum() > 0


def test_padded_vocab_adds_rows():
    model = tiny_model(padded_vocab_size=128)
    assert model(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 128)


def test_sequence_longer_than_block_size_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="block_size 48"):
        model(torch.zeros(1, 49, dtype=torch.long))


def test_gradients_reach_every_parameter():
    model = tiny_model(n_query_groups=2).train()
    logits = model(torch.randint(0, 97, (2, 12)))
    F.cross_entropy(logits.flatten(0, 1), torch.randint(0, 97, (24,))).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_rope_cache_follows_the_device_not_the_dtype():
    model = tiny_model().to(torch.bfloat16)
    cos, _ = model.rope_cache(torch.device("cpu"))
    assert cos.dtype == torch.float32


def test_llama3_rope_frequencies_follow_meta_s_piecewise_rule():
    """Against the rule as Meta states it, one frequency at a time (the code under test works on whole tensors)."""
    scaling = Config.from_name("Llama-3.1-8B").rope_scaling
    factor, low, high, context = (scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                       "original_max_position_embeddings"))
    expected = []
    for i in range(64):
        freq = 1.0 / 500000.0 ** (2 * i / 128)
        wavelength = 2 * math.pi / freq
        if wavelength < context / high:
            expected.append(freq)
        elif wavelength > context / low:
            expected.append(freq / factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            expected.append((1 - smooth) * freq / factor + smooth * freq)
    actual = rope_frequencies(128, 500000.0, scaling)
    torch.testing.assert_close(actual, torch.tensor(expected), rtol=1e-5, atol=0)
    plain = rope_frequencies(128, 500000.0)
    assert torch.equal(actual[:20], plain[:20])  # short wavelengths untouched
    torch.testing.assert_close(actual[-10:], plain[-10:] / 8)  # long ones slowed by the factor
    assert ((actual != plain) & (actual != plain / 8)).sum() >= 5  # and some blended in between


def test_sliding_window_limits_how_far_back_a_token_can_see():
    """With window 4, each layer looks back 3 positions: after 2 layers, token 0 reaches positions 0..6 only."""
    model = tiny_model(n_query_groups=2, sliding_window=4)
    ids = torch.randint(1, 97, (1, 16))
    changed = ids.clone()
    changed[0, 0] = 0
    with torch.no_grad():
        difference = (model(ids) - model(changed)).abs().amax(dim=-1)[0]
    assert (difference[:7] > 1e-4).all()
    assert (difference[7:] == 0).all()


def test_kv_cache_decoding_with_a_sliding_window_matches_the_full_forward():
    model = tiny_model(n_query_groups=2, sliding_window=5)
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = model(ids)
        model.set_kv_cache(batch_size=2, max_seq_length=24)
        steps = [model(ids[:, :7], torch.arange(7))]  # the prompt alone is longer than the window
        steps += [model(ids[:, t : t + 1], torch.tensor([t])) for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert (full - tiny_model(n_query_groups=2)(ids)).abs().max() > 1e-3  # the window changed something


def test_attn_bias_puts_a_bias_on_the_qkv_projection_only():
    model = tiny_model(n_query_groups=2, attn_bias=True)
    biases = sorted(name for name, _ in model.named_parameters() if name.endswith(".bias"))
    assert biases == ["transformer.h.0.attn.attn.bias", "transformer.h.1.attn.attn.bias"]
    assert model.transformer.h[0].attn.attn.bias.shape == (model.config.qkv_size,)
