"""scripts/export_peft.py: lit LoRA adapters as PEFT ones that give the same logits as the merged lit model."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from conftest import run_script, save_random_checkpoint


@pytest.mark.parametrize("head", [True, False])
def test_exported_adapters_on_the_hf_base_give_the_merged_models_logits(tmp_path, head, one_thread):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lit_gpt.checkpoint import load_finetuned, save_finetuned
    from lit_gpt.config import Config
    from lit_gpt.convert import convert_lit_state_dict, hf_config_dict
    from lit_gpt.lora import LoRAConfig, add_lora
    from lit_gpt.model import GPT

    # GQA (4 query heads in 2 groups) and a padded vocabulary: both splits are exercised.
    config = Config(name="tiny", n_layer=2, n_head=4, n_query_groups=2, n_embd=64, intermediate_size=128,
                    vocab_size=101, padded_vocab_size=128, block_size=64)
    base_dir = save_random_checkpoint(tmp_path / "base", config)
    base_state = torch.load(base_dir / "lit_model.pth")
    model = GPT(config)
    model.load_state_dict(base_state)
    lora = LoRAConfig(r=4, alpha=8.0, head=head)
    add_lora(model, lora)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # trained-looking adapters (B starts at zero)
    lora_dir = save_finetuned(model, tmp_path / "lora" / "final",
                              {"finetuning": "lora", "checkpoint_dir": str(base_dir), "lora": asdict(lora)})

    result = run_script("export_peft.py", "--lora_path", str(lora_dir), "--out_dir", str(tmp_path / "peft"))
    assert result.returncode == 0, result.stderr
    adapter_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    expected = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} | ({"lm_head"} if head
                                                                                                 else set())
    assert set(adapter_config["target_modules"]) == expected

    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config_dict(config, torch.float32)))
    hf.load_state_dict(convert_lit_state_dict(base_state, config))
    peft_model = peft.PeftModel.from_pretrained(hf.eval(), str(tmp_path / "peft")).eval()
    merged = load_finetuned(lora_dir).eval()
    idx = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = merged(idx)[..., : config.vocab_size]
        theirs = peft_model(input_ids=idx).logits
    assert (ours - theirs).abs().max() <= 1e-4
    with torch.no_grad(), peft_model.disable_adapter():
        plain = peft_model(input_ids=idx).logits
    assert (ours - plain).abs().max() > 1e-3  # the adapters do change the output
