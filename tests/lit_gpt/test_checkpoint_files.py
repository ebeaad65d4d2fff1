"""Fine-tuned and merged folders carry the base model's tokenizer files, so every script reads them directly."""

from __future__ import annotations

import pytest

from conftest import add_sentencepiece_tokenizer, run_script, save_random_checkpoint, tiny_config
from lit_gpt.checkpoint import load_model, save_finetuned
from lit_gpt.prompts import recorded_prompt_style
from lit_gpt.tokenizer import TOKENIZER_FILES, Tokenizer

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"


@pytest.fixture
def base(tmp_path):
    folder = save_random_checkpoint(add_sentencepiece_tokenizer(tmp_path / "base"), tiny_config(block_size=32))
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    (folder / "tokenizer_config.json").write_text('{"add_bos_token": true}')
    return folder


def test_final_folder_of_a_full_finetune_works_with_generate(base, tmp_path):
    final = save_finetuned(load_model(base), tmp_path / "out" / "final",
                           {"finetuning": "full", "checkpoint_dir": str(base)})
    for name in ("tokenizer.model", "tokenizer_config.json", "chat_template.jinja"):
        assert (final / name).read_bytes() == (base / name).read_bytes(), name
    assert Tokenizer(final).chat_template == TEMPLATE
    assert not list(final.glob(".*.tmp"))  # written atomically: no temporary files left behind
    result = run_script("generate.py", "--checkpoint_dir", str(final), "--max_new_tokens", "3",
                        "--temperature", "0", "--chat_template", "false")
    assert result.returncode == 0, result.stderr


def test_merge_and_download_carry_the_chat_template(base, tmp_path):
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("download", ROOT / "scripts" / "download.py")
    download = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(download)
    assert "chat_template.jinja" in download.TOKENIZER_FILES and "chat_template.jinja" in TOKENIZER_FILES

    from lit_gpt.lora import LoRAConfig, add_lora

    model = load_model(base)
    add_lora(model, LoRAConfig())
    hyperparameters = {"finetuning": "lora", "checkpoint_dir": str(base), "lora": vars(LoRAConfig()),
                       "prompt_style": "chatml"}
    lora_dir = save_finetuned(model, tmp_path / "lora" / "final", hyperparameters)
    assert (lora_dir / "chat_template.jinja").is_file()
    result = run_script("merge_lora.py", "--lora_path", str(lora_dir), "--out_dir", str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "merged" / "chat_template.jinja").read_text() == TEMPLATE
    assert recorded_prompt_style(tmp_path / "merged") == "chatml"  # prompt_style.yaml: prompted as it was trained
