import json

import pytest
import torch

from lit_gpt import GPT, Config
from lit_gpt.utils import UserError, num_parameters


# Published totals. "13.0B" and "65.2B" are rounded in the papers (0.12 % and 0.13 % off), so those two
# are pinned to their exact published counts instead (13,015,864,320 and 65,285,660,672).
@pytest.mark.parametrize(
    "name, published",
    [
        ("Llama-2-7b-hf", 6.74e9),
        ("Llama-2-13b-hf", 13_015_864_320),
        ("Llama-2-70b-hf", 68.98e9),
        ("Llama-2-70b-chat-hf", 68.98e9),
        ("SmolLM2-135M", 134.5e6),
        ("SmolLM2-135M-Instruct", 134.5e6),
        ("SmolLM2-360M", 361.8e6),
        ("SmolLM2-1.7B", 1.711e9),
        ("TinyLlama-1.1B", 1.1e9),
        ("llama-7b", 6.74e9),
        ("llama-65b", 65_285_660_672),
        # Exact totals of the published config.json shapes (the cards round them to 8.03B, 1.24B, 3.21B, ...).
        ("Llama-3.1-8B", 8_030_261_248),
        ("Llama-3.1-8B-Instruct", 8_030_261_248),
        ("Llama-3.2-1B", 1_235_814_400),  # tied: the 128256 x 2048 embedding counted once
        ("Llama-3.2-3B-Instruct", 3_212_749_824),
        ("Mistral-7B-v0.1", 7_241_732_096),
        ("Mistral-7B-v0.3", 7_248_023_552),  # vocabulary 32768
        ("Qwen2.5-0.5B", 494_032_768),  # q/k/v biases included
        ("Qwen2.5-1.5B-Instruct", 1_543_714_304),
        ("Qwen2.5-7B", 7_615_616_512),  # untied, vocabulary 152064
    ],
)
def test_parameter_counts_match_published(name, published):
    with torch.device("meta"):
        model = GPT(Config.from_name(name))
    assert num_parameters(model) == pytest.approx(published, rel=1e-3)


def test_presets_cover_the_named_families():
    for name in ["Llama-2-7b-chat-hf", "Llama-2-13b-chat-hf", "llama-13b", "llama-30b",
                 "SmolLM2-360M-Instruct", "SmolLM2-1.7B-Instruct", "TinyLlama-1.1B-Chat-v1.0"]:
        assert Config.from_name(name).name == name
    assert Config.from_name("Llama-2-70b-hf").n_query_groups == 8
    assert Config.from_name("meta-llama/Llama-2-7b-hf").name == "Llama-2-7b-hf"  # HF repo ids work too
    assert Config.from_name("huggyllama/llama-30b").n_head == 52


def test_from_name_applies_overrides_without_touching_the_preset():
    small = Config.from_name("Llama-2-7b-hf", n_layer=2, block_size=128)
    assert (small.n_layer, small.block_size, small.n_embd) == (2, 128, 4096)
    assert Config.from_name("Llama-2-7b-hf").n_layer == 32


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UserError, match="Llama-2-7b-hf"):
        Config.from_name("Llama-2-7b-h")


def test_lit_config_file_round_trip(tmp_path):
    config = Config.from_name("SmolLM2-135M-Instruct")
    config.save(tmp_path)
    assert Config.from_file(tmp_path / "lit_config.json") == config
    assert Config.from_checkpoint(tmp_path) == config


def test_from_hf_config_matches_the_preset(tmp_path):
    hf = {
        "model_type": "llama", "hidden_act": "silu", "vocab_size": 49152, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(hf))
    from_hf = Config.from_hf_config(tmp_path / "config.json", name="SmolLM2-135M")
    assert from_hf == Config.from_name("SmolLM2-135M", hf_repo_id="")


def test_from_hf_config_reads_transformers_5_rope_parameters(tmp_path):
    hf = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    config = Config.from_hf_config(tmp_path / "config.json")
    assert config.rope_base == 5e5 and config.n_query_groups == 4 and config.head_size == 16


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "not a LLaMA-style model"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 8.0}}, "rope scaling"),
])
def test_from_hf_config_rejects_what_it_cannot_represent(tmp_path, change, message):
    hf = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, **change}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(UserError, match=message):
        Config.from_hf_config(tmp_path / "config.json")


def test_new_family_presets_carry_what_sets_them_apart():
    llama31, llama32 = Config.from_name("meta-llama/Llama-3.1-8B-Instruct"), Config.from_name("Llama-3.2-1B")
    assert llama31.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert (llama32.rope_scaling["factor"], llama32.tie_embeddings, llama32.rope_base) == (32.0, True, 500000.0)
    assert Config.from_name("Mistral-7B-v0.1").sliding_window == 4096
    assert Config.from_name("Mistral-7B-Instruct-v0.2").sliding_window is None
    qwen = Config.from_name("Qwen/Qwen2.5-0.5B-Instruct")
    assert (qwen.bias, qwen.attn_bias, qwen.tie_embeddings, qwen.rope_base) == (False, True, True, 1e6)
    assert not Config.from_name("Qwen2.5-7B").tie_embeddings
    # Each config has its own copy of the scaling dict: changing one leaves the preset alone.
    llama32.rope_scaling["factor"] = 2.0
    assert Config.from_name("Llama-3.2-1B").rope_scaling["factor"] == 32.0


def test_rope_scaling_survives_the_lit_config_file(tmp_path):
    config = Config.from_name("Llama-3.2-3B", n_layer=2)
    config.save(tmp_path)
    assert Config.from_checkpoint(tmp_path) == config


@pytest.mark.parametrize("value, message", [
    ("llama3", "is not an object or null"),
    ({"rope_type": "yarn", "factor": 4.0}, "'yarn' is not supported"),
    ({"rope_type": "llama3", "factor": 8.0}, "positive number low_freq_factor"),
])
def test_lit_config_with_bad_rope_scaling_is_a_user_error(tmp_path, value, message):
    data = {"n_layer": 1, "n_head": 2, "n_embd": 8, "vocab_size": 8, "rope_scaling": value}
    (tmp_path / "lit_config.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=message):
        Config.from_checkpoint(tmp_path)


HF_SHAPE = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2}


def hf_config(tmp_path, **fields) -> Config:
    (tmp_path / "config.json").write_text(json.dumps({**HF_SHAPE, **fields}))
    return Config.from_hf_config(tmp_path / "config.json")


def test_from_hf_config_reads_llama3_rope_scaling_in_both_spellings(tmp_path):
    scaling = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    expected = {"rope_type": "llama3", **scaling}
    old = hf_config(tmp_path, rope_theta=5e5, rope_scaling={"rope_type": "llama3", **scaling})
    new = hf_config(tmp_path, rope_parameters={"rope_theta": 5e5, "rope_type": "llama3", **scaling})
    assert old.rope_scaling == new.rope_scaling == expected and old.rope_base == new.rope_base == 5e5


def test_from_hf_config_reads_mistral_and_qwen2(tmp_path):
    mistral = hf_config(tmp_path, model_type="mistral", sliding_window=4096, head_dim=None)
    assert (mistral.sliding_window, mistral.head_size, mistral.bias, mistral.attn_bias) == (4096, 16, False, False)
    assert hf_config(tmp_path, model_type="mistral", sliding_window=None).sliding_window is None
    # Qwen2 configs carry a sliding_window even when it is off; only use_sliding_window turns it on.
    qwen = hf_config(tmp_path, model_type="qwen2", sliding_window=32768, use_sliding_window=False)
    assert (qwen.sliding_window, qwen.bias, qwen.attn_bias) == (None, False, True)
    assert hf_config(tmp_path, attention_bias=True, mlp_bias=True).bias is True


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "only llama3"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "only llama3"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "sliding-window"),
    ({"attention_bias": True}, "attention_bias=True with mlp_bias=False"),
    ({"model_type": "qwen3"}, "supported: llama, mistral, qwen2"),
])
def test_from_hf_config_refuses_family_details_it_cannot_represent(tmp_path, change, message):
    with pytest.raises(UserError, match=message):
        hf_config(tmp_path, **change)
