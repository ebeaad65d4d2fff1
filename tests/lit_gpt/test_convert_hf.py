"""HF <-> lit conversion: logit parity with transformers, exact round trips, and clear errors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import (
    TINY_HF_CONFIGS,
    TINY_HF_FAMILIES,
    assert_one_line_error,
    make_hf_family,
    make_hf_llama,
    run_script,
    save_random_checkpoint,
    script_main,
)
from lit_gpt.checkpoint import load_model
from lit_gpt.config import Config
from lit_gpt.convert import convert_hf_checkpoint, convert_lit_checkpoint, fuse_qkv, split_qkv
from lit_gpt.model import GPT
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
    round_tripped = load_file(str(out))
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



# ---------------------------------------------------------------------- a conversion that dies midway
def leftovers(folder) -> list[str]:
    """What a conversion may have written into `folder`: lit_* outputs, HF outputs and hidden temporary files."""
    names = ("lit_model.pth", "lit_config.json", "model.safetensors", "config.json")
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.name in names)


def run_setup(script: str, *args: str) -> None:
    """`scripts/<script>.py ARGS` in this process (through `run_cli`), so that a test can patch what it calls."""
    from lit_gpt.utils import run_cli

    run_cli(script_main(script).setup, args=list(args))


def write_half_then_fail(path) -> None:
    """What a full disk does to a write: part of the file lands, then the write fails."""
    with open(path, "wb") as f:
        f.write(b"\0" * 4096)
    raise OSError(28, "No space left on device")


def assert_converted(folder, hf_model) -> None:
    ids = torch.randint(0, 101, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_model(folder)(ids), hf_model(ids).logits, atol=1e-4, rtol=0)


def test_hf_conversion_that_fails_reading_a_shard_midway_leaves_nothing_and_a_rerun_succeeds(tmp_path, monkeypatch,
                                                                                             capsys):
    import lit_gpt.convert

    hf_model = make_hf_llama("llama2-mha")
    folder = save_hf(hf_model, tmp_path / "m")
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 3
    true_safe_open, failing_shard = lit_gpt.convert.safe_open, str(shards[len(shards) // 2])

    class FailingHandle:  # the middle shard's tensors fail to read (an I/O error on a bad disk sector, say)
        def __init__(self, handle):
            self.handle = handle

        def keys(self):
            return self.handle.keys()

        def get_tensor(self, name):
            raise OSError(5, "Input/output error")

    def safe_open(path, framework):
        handle = true_safe_open(path, framework=framework)
        return FailingHandle(handle) if path == failing_shard else handle

    with monkeypatch.context() as patch:
        patch.setattr(lit_gpt.convert, "safe_open", safe_open)
        with pytest.raises(SystemExit) as exit_info:
            run_setup("convert_hf_checkpoint", "--checkpoint_dir", str(folder))
    assert exit_info.value.code == 2
    assert f"error: could not read {failing_shard}" in capsys.readouterr().err
    assert leftovers(folder) == ["config.json"]  # the HF folder's own config.json, nothing written
    run_setup("convert_hf_checkpoint", "--checkpoint_dir", str(folder))
    assert leftovers(folder) == ["config.json", "lit_config.json", "lit_model.pth"]
    assert_converted(folder, hf_model)


def test_hf_conversion_that_fails_writing_keeps_the_previous_output_whole(tmp_path, monkeypatch):
    hf_model = make_hf_llama("llama2-mha")
    folder = save_hf(hf_model, tmp_path / "m")
    run_setup("convert_hf_checkpoint", "--checkpoint_dir", str(folder))
    before = (folder / "lit_model.pth").read_bytes()
    with monkeypatch.context() as patch:  # the disk fills up while converting again, to bfloat16
        patch.setattr(torch, "save", lambda obj, path, *args, **kwargs: write_half_then_fail(path))
        with pytest.raises(OSError, match="No space left"):
            run_setup("convert_hf_checkpoint", "--checkpoint_dir", str(folder), "--dtype", "bfloat16")
    assert leftovers(folder) == ["config.json", "lit_config.json", "lit_model.pth"]  # no temporary file left
    assert (folder / "lit_model.pth").read_bytes() == before  # the float32 conversion, not half a bfloat16 one
    assert_converted(folder, hf_model)
    run_setup("convert_hf_checkpoint", "--checkpoint_dir", str(folder), "--dtype", "bfloat16")
    assert {t.dtype for t in torch.load(folder / "lit_model.pth", weights_only=True).values()} == {torch.bfloat16}


def test_lit_conversion_that_fails_writing_leaves_nothing_and_keeps_the_previous_export(tmp_path, monkeypatch):
    import huggingface_hub

    hf_model = make_hf_llama("llama70b-gqa")
    folder = save_hf(hf_model, tmp_path / "m")
    convert_hf_checkpoint(folder)
    out = tmp_path / "exports" / "back"

    def write_a_shard_then_fail(state_dict, save_directory, **kwargs):
        write_half_then_fail(Path(save_directory) / "model.safetensors")

    def export() -> None:
        run_setup("convert_lit_checkpoint", "--checkpoint_dir", str(folder), "--output_dir", str(out))

    with monkeypatch.context() as patch:  # the disk fills up while the first shard is written
        patch.setattr(huggingface_hub, "save_torch_state_dict", write_a_shard_then_fail)
        with pytest.raises(OSError, match="No space left"):
            export()
    assert sorted(p.name for p in out.parent.iterdir()) == []  # no half-written folder, visible or hidden
    export()
    exported = (out / "model.safetensors").read_bytes()
    with monkeypatch.context() as patch:  # an export over an earlier one fails: the earlier one stays whole
        patch.setattr(huggingface_hub, "save_torch_state_dict", write_a_shard_then_fail)
        with pytest.raises(OSError, match="No space left"):
            export()
    assert sorted(p.name for p in out.parent.iterdir()) == ["back"]
    assert (out / "model.safetensors").read_bytes() == exported
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf_model(ids).logits)


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


# ---------------------------------------------------------------------- Llama 3, Mistral, Qwen2
def family_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("name", sorted(TINY_HF_FAMILIES))
def test_families_convert_both_ways_with_hf_logits(tmp_path, name):
    hf_model = make_hf_family(name)
    folder = save_hf(hf_model, tmp_path / name)
    config = convert_hf_checkpoint(folder)
    ids = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(1))  # 40 > the window of 8
    expected = family_logits(hf_model, ids)
    assert expected.abs().max() > 1.0  # the comparison is not vacuous
    assert (family_logits(load_model(folder).eval(), ids) - expected).abs().max().item() <= 1e-4

    # Back to HF: the same tensors, and a config.json that from_pretrained reads as the same model.
    out = convert_lit_checkpoint(folder, tmp_path / "back")
    original = {k: v for k, v in hf_model.state_dict().items()
                if not (k == "lm_head.weight" and hf_model.config.tie_word_embeddings)}
    round_tripped = load_file(str(out))
    assert round_tripped.keys() == original.keys()
    assert all(torch.equal(round_tripped[k], v) for k, v in original.items())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(reloaded) is type(hf_model)
    assert (family_logits(reloaded, ids) - expected).abs().max().item() <= 1e-4
    assert Config.from_hf_config(tmp_path / "back" / "config.json", name=config.name) == config


@pytest.mark.parametrize("name, ignore", [
    ("llama3.1-scaled", dict(rope_scaling=None)),
    ("llama3.2-tied", dict(rope_scaling=None)),
    ("mistral-window", dict(sliding_window=None)),
])
def test_what_sets_a_family_apart_changes_the_logits(tmp_path, name, ignore):
    """The parity above would pass for a model that ignored the feature if the feature did not matter."""
    hf_model = make_hf_family(name)
    folder = save_hf(hf_model, tmp_path / name)
    convert_hf_checkpoint(folder)
    ids = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(1))
    config = Config.from_checkpoint(folder, **ignore)
    model = GPT(config).eval()
    model.load_state_dict(torch.load(folder / "lit_model.pth", weights_only=True))
    assert (family_logits(model, ids) - family_logits(hf_model, ids)).abs().max().item() > 1e-2


def test_qwen2_biases_matter_and_split_per_query_group(tmp_path):
    hf_model = make_hf_family("qwen2-gqa")
    folder = save_hf(hf_model, tmp_path / "qwen")
    convert_hf_checkpoint(folder)
    state_dict = torch.load(folder / "lit_model.pth", weights_only=True)
    config = Config.from_checkpoint(folder)
    assert (config.bias, config.attn_bias) == (False, True)
    assert {k for k in state_dict if k.endswith(".bias")} == {f"transformer.h.{i}.attn.attn.bias" for i in range(2)}
    # head_size 16, 4 q heads per group: group 1's k bias is rows 16*(6+4)..16*(6+5) of the fused vector.
    layer = hf_model.model.layers[0].self_attn
    fused = state_dict["transformer.h.0.attn.attn.bias"]
    assert torch.equal(fused[160:176], layer.k_proj.bias[16:32].detach())
    assert torch.equal(fused[96:160], layer.q_proj.bias[64:128].detach())

    state_dict = {k: torch.zeros_like(v) if k.endswith(".bias") else v for k, v in state_dict.items()}
    model = GPT(config).eval()
    model.load_state_dict(state_dict)
    ids = torch.randint(0, 101, (1, 16))
    assert (family_logits(model, ids) - family_logits(hf_model, ids)).abs().max().item() > 1e-2


@pytest.mark.parametrize("fields, family", [
    (dict(attn_bias=True), "Qwen2"),
    (dict(sliding_window=6), "Mistral"),
    (dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=32)), "Llama"),
    (dict(bias=True), "Llama"),
])
def test_lit_checkpoints_export_to_the_matching_transformers_model(tmp_path, fields, family):
    """Starting from lit weights (random, biases included): transformers computes the same logits."""
    config = Config(name="tiny", n_layer=2, n_head=4, n_query_groups=2, n_embd=64, intermediate_size=96,
                    vocab_size=97, block_size=64, **fields)
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    folder = tmp_path / "lit"
    folder.mkdir()
    config.save(folder)
    torch.save(model.state_dict(), folder / "lit_model.pth")

    convert_lit_checkpoint(folder, tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf_model).__name__ == f"{family}ForCausalLM"
    ids = torch.randint(0, 97, (2, 24))
    expected = family_logits(model.eval(), ids)
    assert expected.abs().max() > 1.0
    assert (family_logits(hf_model, ids) - expected).abs().max().item() <= 1e-4


def test_configs_transformers_cannot_hold_are_refused_on_export(tmp_path):
    config = Config(name="odd", n_layer=1, n_head=2, n_embd=16, intermediate_size=8, vocab_size=8, block_size=8,
                    attn_bias=True, sliding_window=4)
    save_random_checkpoint(tmp_path / "odd", config)
    with pytest.raises(UserError, match="qkv-only bias and a sliding window"):
        convert_lit_checkpoint(tmp_path / "odd", tmp_path / "out")
