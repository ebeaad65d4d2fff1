"""convert_lit_checkpoint's HF folder: shards with an index, config, tokenizer files, written atomically."""

import json
from pathlib import Path

import pytest
import torch

from conftest import add_sentencepiece_tokenizer, make_hf_llama, run_script, save_random_checkpoint, tiny_config
from lit_gpt.checkpoint import load_model
from lit_gpt.convert import convert_hf_checkpoint, convert_lit_checkpoint
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.utils import UserError

transformers = pytest.importorskip("transformers")


def converted_tiny_llama(folder: Path) -> Path:
    """A tiny random HF LLaMA saved in `folder` and converted there: a checkpoint folder with HF files beside it."""
    folder.mkdir(parents=True)
    make_hf_llama("llama2-mha").save_pretrained(folder)
    convert_hf_checkpoint(folder)
    return folder


def test_sharded_export_loads_with_from_pretrained_and_gives_the_lit_logits(tmp_path, one_thread):
    config = tiny_config(vocab_size=32000, padded_vocab_size=32000)  # the real SentencePiece tokenizer's vocabulary
    folder = save_random_checkpoint(add_sentencepiece_tokenizer(tmp_path / "tiny"), config)
    result = run_script("convert_lit_checkpoint.py", "--checkpoint_dir", str(folder), "--output_dir",
                        str(tmp_path / "hf"), "--max_shard_size", "2MB")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "hf"
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) >= 3 and sorted(set(index["weight_map"].values())) == shards
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 32000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf_model(ids).logits - load_model(folder).eval()(ids)).abs().max().item() <= 1e-5

    lit_tokenizer = Tokenizer(folder)
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (lit_tokenizer.bos_id, lit_tokenizer.eos_id)
    assert (hf_model.generation_config.bos_token_id, hf_model.generation_config.eos_token_id) == (1, 2)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "Llamas eat grass, hay and 12 kinds of shrubs."
    hf_ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert hf_ids == lit_tokenizer.encode(text, bos=False).tolist()
    assert hf_tokenizer.decode(hf_ids) == text


def test_export_replaces_an_earlier_export_but_never_other_files(tmp_path):
    folder = converted_tiny_llama(tmp_path / "m")
    with pytest.raises(UserError, match="already holds other files"):  # the source folder itself
        convert_lit_checkpoint(folder, folder)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(UserError, match=r"already holds other files \(todo.txt\)"):
        convert_lit_checkpoint(folder, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"

    index = convert_lit_checkpoint(folder, tmp_path / "hf", max_shard_size="20KB")
    out = index.parent
    assert index.name == "model.safetensors.index.json" and len(list(out.glob("*.safetensors"))) > 3
    assert convert_lit_checkpoint(folder, out) == out / "model.safetensors"  # one shard: the earlier ones go
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


def test_a_failed_export_leaves_the_earlier_one_and_no_partial_folder(tmp_path, monkeypatch):
    import huggingface_hub

    folder = converted_tiny_llama(tmp_path / "m")
    out = convert_lit_checkpoint(folder, tmp_path / "hf").parent
    before = (out / "model.safetensors").read_bytes()

    def disk_full(state_dict, save_directory, **kwargs):
        (Path(save_directory) / "model-00001-of-00002.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(huggingface_hub, "save_torch_state_dict", disk_full)
    with pytest.raises(OSError, match="No space left"):
        convert_lit_checkpoint(folder, out)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m"]


def test_max_shard_size_must_be_a_size(tmp_path):
    folder = converted_tiny_llama(tmp_path / "m")
    for size in ("lots", "0", "5 parsecs"):
        with pytest.raises(UserError, match=f"--max_shard_size '{size}' is not a size"):
            convert_lit_checkpoint(folder, tmp_path / "hf", max_shard_size=size)
    assert not (tmp_path / "hf").exists()
