"""Every file the scripts read gives one `error: ...` line when it is missing, empty, truncated or of the wrong kind."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import (
    add_sentencepiece_tokenizer,
    assert_one_line_error,
    run_script,
    save_random_checkpoint,
    script_main,
    tiny_config,
)
from lit_gpt.checkpoint import load_model, save_finetuned
from lit_gpt.lora import LoRAConfig, add_lora
from lit_gpt.training import cli


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "empty": lambda p: p.write_bytes(b""),
    "truncated": truncate,
    "text": lambda p: p.write_text("this is not the right kind of file\n"),
    "binary": lambda p: p.write_bytes(b"\x80\xff\x00\x13" * 64),
}


def error_line(capsys, fn, *args) -> str:
    from lit_gpt.utils import run_cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(fn, args=list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("damaged") / "base"
    save_random_checkpoint(add_sentencepiece_tokenizer(folder), tiny_config(block_size=32))
    (folder / "tokenizer_config.json").write_text('{"add_bos_token": true}')
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    return folder


CHECKPOINT_CASES = [
    ("lit_model.pth", "empty", "is empty"),
    ("lit_model.pth", "truncated", "truncated"),
    ("lit_model.pth", "text", "not the right kind of file"),
    ("lit_config.json", "empty", "is empty"),
    ("lit_config.json", "truncated", "is not valid JSON"),
    ("lit_config.json", "binary", "UTF-8"),
    ("tokenizer.model", "empty", "tokenizer.model"),
    ("tokenizer.model", "text", "tokenizer.model"),
    ("tokenizer_config.json", "truncated", "is not valid JSON"),
    ("chat_template.jinja", "binary", "UTF-8"),
]


@pytest.mark.parametrize("name, damage, fragment", CHECKPOINT_CASES)
def test_damaged_checkpoint_file_is_one_error_line(base, tmp_path, capsys, name, damage, fragment):
    folder = shutil.copytree(base, tmp_path / "model")
    DAMAGE[damage](folder / name)
    line = error_line(capsys, script_main("generate").setup, "--checkpoint_dir", str(folder),
                      "--max_new_tokens", "2", "--chat_template", "true")
    assert name in line and fragment in line, line


def test_wrong_kind_of_config_and_tokenizer_json(base, tmp_path, capsys):
    folder = shutil.copytree(base, tmp_path / "model")
    (folder / "lit_config.json").write_text("[1, 2]")
    assert "not an object" in error_line(capsys, script_main("generate").setup, "--checkpoint_dir", str(folder))
    (folder / "lit_config.json").write_text('{"n_layer": "two"}')
    assert "n_layer = 'two' is not a whole number" in error_line(capsys, script_main("generate").setup,
                                                                 "--checkpoint_dir", str(folder))
    (folder / "lit_config.json").write_text('{"n_embd": 10, "n_head": 4}')
    assert "does not describe a model" in error_line(capsys, script_main("generate").setup,
                                                     "--checkpoint_dir", str(folder))
    shutil.copy(base / "lit_config.json", folder)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    assert "tokenizer.json" in error_line(capsys, script_main("generate").setup, "--checkpoint_dir", str(folder))


@pytest.mark.parametrize("damage", ["empty", "truncated", "text"])
def test_damaged_data_file_is_one_error_line(tiny, tmp_path, capsys, damage):
    data_dir = shutil.copytree(tiny["data_dir"], tmp_path / "data")
    DAMAGE[damage](data_dir / "train.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli("full", argv=["--checkpoint_dir", str(tiny["checkpoint_dir"]), "--data_dir", str(data_dir),
                          "--out_dir", str(tmp_path / "out")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "train.pt" in lines[0] and "prepare the data again" in lines[0], lines


def test_data_file_of_the_wrong_kind_is_one_error_line(tiny, tmp_path):
    data_dir = shutil.copytree(tiny["data_dir"], tmp_path / "data")
    torch.save({"weights": torch.zeros(2)}, data_dir / "test.pt")  # a torch file, but not prepared samples
    result = subprocess_finetune(tiny, data_dir, tmp_path / "out")
    assert_one_line_error(result, "test.pt does not hold prepared samples", "prepare the data again")


def subprocess_finetune(tiny, data_dir, out_dir):
    from conftest import run_finetune

    return run_finetune("full", "--checkpoint_dir", str(tiny["checkpoint_dir"]), "--data_dir", str(data_dir),
                        "--out_dir", str(out_dir))


@pytest.mark.parametrize("content, fragment", [("", "has no records"), ("\x80\xff", "not UTF-8"),
                                               ('[{"instruction": "a", "output"', "not valid JSON")])
def test_damaged_json_data_is_one_error_line(base, tmp_path, capsys, content, fragment):
    data_file = tmp_path / "data.json"
    data_file.write_bytes(content.encode("latin-1"))
    line = error_line(capsys, script_main("prepare_json").prepare, "--data_file", str(data_file),
                      "--checkpoint_dir", str(base), "--destination_path", str(tmp_path / "out"))
    assert fragment in line, line


@pytest.fixture
def lora_folder(base, tmp_path) -> Path:
    model = load_model(base)
    add_lora(model, LoRAConfig())
    return save_finetuned(model, tmp_path / "final",
                          {"finetuning": "lora", "checkpoint_dir": str(base), "lora": vars(LoRAConfig())})


@pytest.mark.parametrize("content, fragment", [("", "is empty"), ("finetuning: [lora\n", "not valid YAML"),
                                               ("- lora\n", "not a mapping"), ("seed: 1\n", "no finetuning method")])
def test_damaged_hyperparameters_are_one_error_line(lora_folder, tmp_path, capsys, content, fragment):
    (lora_folder / "hyperparameters.yaml").write_text(content)
    line = error_line(capsys, script_main("merge_lora").merge, "--lora_path", str(lora_folder),
                      "--out_dir", str(tmp_path / "merged"))
    assert "hyperparameters.yaml" in line and fragment in line, line


def test_damaged_adapters_are_one_error_line_from_a_real_process(lora_folder, tmp_path):
    truncate(lora_folder / "lit_model.pth")
    result = run_script("merge_lora.py", "--lora_path", str(lora_folder), "--out_dir", str(tmp_path / "merged"))
    assert_one_line_error(result, "lit_model.pth", "truncated")
