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
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope scaling"),
])
def test_from_hf_config_rejects_what_it_cannot_represent(tmp_path, change, message):
    hf = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, **change}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(UserError, match=message):
        Config.from_hf_config(tmp_path / "config.json")
