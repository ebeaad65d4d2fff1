"""HF <-> lit conversion: logit parity with transformers, exact round trips, and clear errors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_HF_CONFIGS, assert_one_line_error, make_hf_llama, run_script
from lit_gpt.checkpoint import load_model
from lit_gpt.config import Config
from lit_gpt.convert import convert_hf_checkpoint, convert_lit_checkpoint, fuse_qkv, split_qkv
from lit_gpt.utils import UserError

transformers = pytest.importorskip("transformers")


def save_hf(model, folder, shard_size="20KB", safetensors=True):
    folder.mkdir(parents=True, exist_ok=True)
    if safetensors:
        # Many small shards, so q, k and v of one layer land in different files.
        model.save_pretrained(folder, max_shard_size=shard_size)
    else:
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("name", sorted(TINY_HF_CONFIGS))
def test_converted_weights_give_the_hf_logits(tmp_path, name):
    hf_model = make_hf_llama(name)
    folder = save_hf(hf_model, tmp_path / name)
    assert len(list(folder.glob("*.safetensors"))) > 3
    config = convert_hf_checkpoint(folder)
    assert config.tie_embeddings == TINY_HF_CONFIGS[name]["tie_word_embeddings"]

    model = load_model(folder).eval()
    ids = torch.randint(0, 101, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(ids).logits
        actual = model(ids)
    assert (actual - expected).abs().max().item() <= 1e-4


def test_pytorch_bin_checkpoints_convert_too(tmp_path):
    hf_model = make_hf_llama("llama70b-gqa")
    folder = save_hf(hf_model, tmp_path / "bin", safetensors=False)
    convert_hf_checkpoint(folder)
    ids = torch.randint(0, 101, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(load_model(folder)(ids), hf_model(ids).logits, atol=1e-4, rtol=0)


def test_dtype_option_casts_the_weights(tmp_path):
    folder = save_hf(make_hf_llama("smollm2-tied"), tmp_path / "m")
    convert_hf_checkpoint(folder, dtype="bfloat16")
    state_dict = torch.load(folder / "lit_model.pth", weights_only=True)
    assert {t.dtype for t in state_dict.values()} == {torch.bfloat16}


@pytest.mark.parametrize("name", sorted(TINY_HF_CONFIGS))
def test_hf_to_lit_to_hf_is_exact(tmp_path, name):
    hf_model = make_hf_llama(name)
    folder = save_hf(hf_model, tmp_path / "hf")
    convert_hf_checkpoint(folder)
    out = convert_lit_checkpoint(folder, tmp_path / "back")

    original = {k: v for k, v in hf_model.state_dict().items()
                if not (k == "lm_head.weight" and hf_model.config.tie_word_embeddings)}
    round_tripped = load_file(str(out / "model.safetensors"))  # small enough for one shard
    assert round_tripped.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(round_tripped[key], value), key
    # The written config.json describes the same model to transformers.
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf_model(ids).logits)


def test_fuse_and_split_qkv_are_inverse():
    config = Config(n_embd=48, n_head=6, n_query_groups=3, n_layer=1, intermediate_size=8, vocab_size=8)
    q, k, v = torch.randn(48, 48), torch.randn(24, 48), torch.randn(24, 48)
    fused = fuse_qkv(q, k, v, config)
    # head_size 8, two q heads per group: group 1 is rows 32..63 = q heads 2-3, then k head 1, then v head 1.
    assert torch.equal(fused[32:48], q[16:32])
    assert torch.equal(fused[48:56], k[8:16])
    assert torch.equal(fused[56:64], v[8:16])
    for a, b in zip(split_qkv(fused, config), (q, k, v)):
        assert torch.equal(a, b)


def test_preset_name_from_the_folder_wins_over_config_json(tmp_path):
    folder = save_hf(make_hf_llama("llama2-mha"), tmp_path / "custom")
    (folder / "config.json").unlink()
    with pytest.raises(UserError, match="--model_name"):
        convert_hf_checkpoint(folder)
    with pytest.raises(UserError, match="do not fit config 'SmolLM2-135M'"):
        convert_hf_checkpoint(folder, model_name="SmolLM2-135M")


def test_conversion_writes_nothing_when_it_fails(tmp_path):
    folder = save_hf(make_hf_llama("llama2-mha"), tmp_path / "m")
    with pytest.raises(UserError):
        convert_hf_checkpoint(folder, model_name="SmolLM2-135M")
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith((".", "lit_"))) == []


# ---------------------------------------------------------------------- errors the user can cause
def test_missing_checkpoint_dir(tmp_path):
    result = run_script("convert_hf_checkpoint.py", "--checkpoint_dir", str(tmp_path / "nope"))
    assert_one_line_error(result, "does not exist", "download.py")


def test_dir_without_lit_model(tmp_path):
    (tmp_path / "lit_config.json").write_text(json.dumps({}))
    result = run_script("generate.py", "--checkpoint_dir", str(tmp_path))
    assert_one_line_error(result, "has no lit_model.pth", "convert_hf_checkpoint.py")


def test_unknown_model_name(tmp_path):
    folder = save_hf(make_hf_llama("llama2-mha"), tmp_path / "m")
    result = run_script("convert_hf_checkpoint.py", "--checkpoint_dir", str(folder), "--model_name", "Llama-2-7b")
    assert_one_line_error(result, "unknown model name 'Llama-2-7b'", "Did you mean")


def test_truncated_hf_shard(tmp_path):
    folder = save_hf(make_hf_llama("llama2-mha"), tmp_path / "m", shard_size="1GB")
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    result = run_script("convert_hf_checkpoint.py", "--checkpoint_dir", str(folder))
    assert_one_line_error(result, "truncated or corrupt", "download it again")
    assert not (folder / "lit_model.pth").exists()


def test_truncated_lit_model(tmp_path):
    folder = save_hf(make_hf_llama("llama2-mha"), tmp_path / "m")
    convert_hf_checkpoint(folder)
    weights = folder / "lit_model.pth"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = run_script("convert_lit_checkpoint.py", "--checkpoint_dir", str(folder),
                        "--output_dir", str(tmp_path / "o"))
    assert_one_line_error(result, "lit_model.pth", "truncated, corrupt", "convert or download it again")


def test_download_without_network_says_the_hub_is_unreachable(tmp_path):
    # Port 9 on loopback refuses connections: the same failure as no network, but instant and deterministic.
    result = run_script("download.py", "--repo_id", "meta-llama/Llama-2-7b-hf", "--checkpoint_root", str(tmp_path),
                        env={"HF_ENDPOINT": "http://127.0.0.1:9"}, timeout=60)
    assert_one_line_error(result, "could not reach the Hugging Face hub", "meta-llama/Llama-2-7b-hf")
    assert not any(tmp_path.iterdir())


def test_download_rejects_a_malformed_repo_id():
    assert_one_line_error(run_script("download.py", "--repo_id", "Llama-2-7b-hf"), "ORG/NAME")


# ---------------------------------------------------------------------- sharded HF export
def test_sharded_export_loads_with_from_pretrained_and_gives_the_lit_logits(tmp_path, one_thread):
    from conftest import add_sentencepiece_tokenizer, save_random_checkpoint, tiny_config
    from lit_gpt.tokenizer import Tokenizer

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
    folder = save_hf(make_hf_llama("llama2-mha"), tmp_path / "m")
    convert_hf_checkpoint(folder)
    with pytest.raises(UserError, match="already holds other files"):  # the source folder itself
        convert_lit_checkpoint(folder, folder)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(UserError, match=r"already holds other files \(todo.txt\)"):
        convert_lit_checkpoint(folder, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"

    out = convert_lit_checkpoint(folder, tmp_path / "hf", max_shard_size="20KB")
    assert len(list(out.glob("*.safetensors"))) > 3
    convert_lit_checkpoint(folder, out)  # one shard now: the earlier shards and their index go
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


def test_a_failed_export_leaves_the_earlier_one_and_no_partial_folder(tmp_path, monkeypatch):
    import huggingface_hub

    folder = save_hf(make_hf_llama("llama2-mha"), tmp_path / "m")
    convert_hf_checkpoint(folder)
    out = convert_lit_checkpoint(folder, tmp_path / "hf")
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
    folder = save_hf(make_hf_llama("llama2-mha"), tmp_path / "m")
    convert_hf_checkpoint(folder)
    for size in ("lots", "0", "5 parsecs"):
        with pytest.raises(UserError, match=f"--max_shard_size '{size}' is not a size"):
            convert_lit_checkpoint(folder, tmp_path / "hf", max_shard_size=size)
    assert not (tmp_path / "hf").exists()
