"""Prompt styles: rendering, chat records with loss on the assistant's turns, and the style travelling from the
prepared data through fine-tuning into generate.py."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import add_sentencepiece_tokenizer, run_finetune, run_script, save_random_checkpoint, tiny_config
from lit_gpt.data import IGNORE_INDEX, load_records, tokenize_example
from lit_gpt.prompts import recorded_prompt_style, render_instruction, render_messages
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.utils import UserError

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"}]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_random_checkpoint(add_sentencepiece_tokenizer(tmp_path_factory.mktemp("styles") / "tiny"),
                                  tiny_config())


def test_styles_render_as_documented():
    user = [{"role": "user", "content": "Hi"}]
    assert render_messages("chatml", user) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render_messages("llama2", CHAT[:2]) == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"
    assert render_messages("plain", user) == "Hi"
    assert render_instruction("alpaca", {"instruction": "Hi"}).endswith("### Instruction:\nHi\n\n### Response:\n")
    assert render_instruction("chatml", {"instruction": "Hi", "input": "x"}).startswith("<|im_start|>user\nHi\n\nx")


def test_chat_records_learn_only_the_assistant_turns_with_mask_inputs(base, tmp_path):
    data_file = tmp_path / "chat.jsonl"
    data_file.write_text(json.dumps({"messages": CHAT}) + "\n")
    (record,) = load_records(data_file)
    tokenizer = Tokenizer(base)
    masked = tokenize_example(record, tokenizer, 400, mask_inputs=True, prompt_style="chatml")
    learnt = tokenizer.decode(masked["input_ids"][masked["labels"] != IGNORE_INDEX])
    assert "Hello" in learnt and "Goodbye" in learnt
    assert "Hi" not in learnt and "Bye" not in learnt.replace("Goodbye", "") and "brief" not in learnt
    assert masked["labels"][-1] == tokenizer.eos_id
    unmasked = tokenize_example(record, tokenizer, 400, mask_inputs=False, prompt_style="chatml")
    assert (unmasked["labels"] == unmasked["input_ids"]).all()
    data_file.write_text(json.dumps({"messages": CHAT[:2]}) + "\n")
    with pytest.raises(UserError, match="no assistant reply"):
        load_records(data_file)


def test_a_fine_tuned_model_answers_its_prompt_through_generate_with_no_flags(base, tmp_path):
    records = [{"instruction": "What is the secret word?", "output": "banana banana banana"}] * 12
    data_file = tmp_path / "secret.json"
    data_file.write_text(json.dumps(records))
    data_dir = tmp_path / "data"
    result = run_script("prepare_json.py", "--data_file", str(data_file), "--checkpoint_dir", str(base),
                        "--destination_path", str(data_dir), "--test_size", "2", "--prompt_style", "chatml",
                        "--mask_inputs", "true")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load((data_dir / "prepare.yaml").read_text())["prompt_style"] == "chatml"

    out_dir = tmp_path / "out"
    result = run_finetune("full", "--checkpoint_dir", str(base), "--data_dir", str(data_dir), "--out_dir",
                          str(out_dir), "--train.global_batch_size", "2", "--train.micro_batch_size", "2",
                          "--train.max_steps", "30", "--train.warmup_steps", "2", "--train.learning_rate", "1e-2",
                          "--train.eval_interval", "100", "--train.eval_iters", "1", "--train.sample_tokens", "0",
                          "--train.save_interval", "null")
    assert result.returncode == 0, result.stderr[-3000:]
    final = out_dir / "final"
    assert recorded_prompt_style(final) == "chatml"

    result = run_script("generate.py", "--checkpoint_dir", str(final), "--prompt", "What is the secret word?")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("banana banana"), result.stdout  # sampled at the default 0.8
