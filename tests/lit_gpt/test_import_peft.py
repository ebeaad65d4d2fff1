"""scripts/import_peft.py: PEFT adapters as lit LoRA folders, exact round trips, PEFT's logits, clear refusals."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict

import pytest
import torch
import yaml

from conftest import ROOT, assert_one_line_error, run_script, save_random_checkpoint

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lit_gpt.checkpoint import load_finetuned, load_model, save_finetuned  # noqa: E402
from lit_gpt.config import Config  # noqa: E402
from lit_gpt.lora import LoRAConfig, add_lora  # noqa: E402
from lit_gpt.model import GPT  # noqa: E402

# GQA: 4 query heads in 2 groups, so the fused q/k/v rows interleave unevenly.
SHAPE = dict(name="tiny", n_layer=2, n_head=4, n_query_groups=2, n_embd=64, intermediate_size=128, block_size=64)


def trained_lora_folder(root, config: Config, lora: LoRAConfig):
    """A base checkpoint and a LoRA folder over it whose adapters are all non-zero, as after training."""
    base_dir = save_random_checkpoint(root / "base", config)
    model = GPT(config)
    model.load_state_dict(torch.load(base_dir / "lit_model.pth"))
    add_lora(model, lora)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    folder = save_finetuned(model, root / "lora" / "final",
                            {"finetuning": "lora", "checkpoint_dir": str(base_dir), "lora": asdict(lora)})
    return base_dir, folder


def script(name: str):
    """A script's module, to call its function in-process (seconds, not a new interpreter)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def import_adapter(adapter_dir, base_dir, out_dir):
    return script("import_peft").import_adapter(adapter_dir, base_dir, out_dir)


@pytest.mark.parametrize("padded", [False, True])
def test_export_then_import_gives_the_same_adapter_tensors(tmp_path, padded, one_thread):
    config = Config(**SHAPE, vocab_size=101, padded_vocab_size=128 if padded else 101)
    lora = LoRAConfig(r=4, alpha=8.0, dropout=0.05, head=True)
    base_dir, lora_dir = trained_lora_folder(tmp_path, config, lora)
    script("export_peft").export(lora_dir, tmp_path / "peft")
    out = import_adapter(tmp_path / "peft", base_dir, tmp_path / "imported")

    original = torch.load(lora_dir / "lit_model.pth")
    imported = torch.load(out / "lit_model.pth")
    assert imported.keys() == original.keys()
    for name, value in original.items():
        if name == "lm_head.lora_B" and padded:  # the HF head has no padding rows: they come back as zeros
            assert torch.equal(imported[name][:101], value[:101])
            assert not imported[name][101:].any() and value[101:].any()
        else:
            assert torch.equal(imported[name], value), name
    hyperparameters = yaml.safe_load((out / "hyperparameters.yaml").read_text())
    assert hyperparameters["finetuning"] == "lora" and hyperparameters["checkpoint_dir"] == str(base_dir)
    assert hyperparameters["lora"] == asdict(lora)


def peft_llama(tmp_path, target_modules, tie=False):
    """A tiny random GQA LlamaForCausalLM with PEFT LoRA adapters (random non-zero lora_B), saved; its lit base."""
    hf_config = transformers.LlamaConfig(vocab_size=101, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                         intermediate_size=128, num_hidden_layers=2, max_position_embeddings=64,
                                         rms_norm_eps=1e-5, tie_word_embeddings=tie)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    hf.save_pretrained(tmp_path / "hf")
    from lit_gpt.convert import convert_hf_checkpoint

    convert_hf_checkpoint(tmp_path / "hf")
    model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "peft")
    return model.eval(), tmp_path / "hf"


@pytest.mark.parametrize("targets", [
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
    ["q_proj", "v_proj", "up_proj"],  # k and the other MLP projections get zero adapters
])
def test_a_peft_adapter_imports_with_the_same_logits(tmp_path, targets, one_thread):
    peft_model, base_dir = peft_llama(tmp_path, targets)
    out = import_adapter(tmp_path / "peft", base_dir, tmp_path / "imported")
    lora = LoRAConfig(**yaml.safe_load((out / "hyperparameters.yaml").read_text())["lora"])
    stacked = 1 + ("k_proj" in targets) + ("v_proj" in targets)  # PEFT's q, k and v each have their own lora_A
    assert (lora.r, lora.alpha / lora.r) == (4 * stacked, 2.0)
    assert (lora.projection, lora.mlp, lora.head) == ("o_proj" in targets, True, "lm_head" in targets)

    idx = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = peft_model(input_ids=idx).logits
        ours = load_finetuned(out).eval()(idx)
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=idx).logits
    assert (ours - theirs).abs().max() <= 1e-4
    assert (ours - plain).abs().max() > 1e-3  # the adapters do change the output

    # merge_lora.py takes the imported folder like a trained run's.
    script("merge_lora").merge(out, tmp_path / "merged")
    with torch.no_grad():
        assert (load_model(tmp_path / "merged").eval()(idx) - theirs).abs().max() <= 1e-4


def edit_adapter(folder, config_changes=None, rename=None):
    config_path = folder / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **(config_changes or {})}))
    if rename:
        from safetensors.torch import load_file, save_file

        weights = folder / "adapter_model.safetensors"
        tensors = load_file(str(weights))
        save_file({k.replace(*rename): v for k, v in tensors.items()}, str(weights))


def test_an_adapter_on_a_module_lit_gpt_has_no_lora_for_is_refused_in_one_line(tmp_path, one_thread):
    _, base_dir = peft_llama(tmp_path, ["q_proj", "up_proj"])
    edit_adapter(tmp_path / "peft", {"target_modules": ["q_proj", "act_fn"]}, rename=(".mlp.up_proj.", ".mlp.act_fn."))
    result = run_script("import_peft.py", "--adapter_dir", str(tmp_path / "peft"), "--checkpoint_dir", str(base_dir),
                        "--out_dir", str(tmp_path / "imported"))
    assert_one_line_error(result, "LoRA on 'mlp.act_fn'", "cannot hold")
    assert not (tmp_path / "imported").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_rank_differing_tensors_and_the_embedding_are_refused(tmp_path, one_thread):
    from lit_gpt.peft_format import from_peft
    from lit_gpt.utils import UserError

    config = Config(**SHAPE, vocab_size=101)
    adapter_config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8}
    prefix = "base_model.model.model.layers.0."
    differing = {f"{prefix}self_attn.q_proj.lora_A.weight": torch.ones(4, 64),
                 f"{prefix}self_attn.q_proj.lora_B.weight": torch.ones(64, 4),
                 f"{prefix}self_attn.o_proj.lora_A.weight": torch.ones(2, 64),
                 f"{prefix}self_attn.o_proj.lora_B.weight": torch.ones(64, 2)}
    with pytest.raises(UserError, match="rank 2, not the adapter's r = 4"):
        from_peft(differing, adapter_config, config)
    embedding = {"base_model.model.model.embed_tokens.lora_embedding_A": torch.ones(4, 101)}
    with pytest.raises(UserError, match="no LoRA A/B weight of a linear layer"):
        from_peft(embedding, adapter_config, config)
    head = {"base_model.model.lm_head.lora_A.weight": torch.ones(4, 64),
            "base_model.model.lm_head.lora_B.weight": torch.ones(101, 4)}
    with pytest.raises(UserError, match="ties lm_head to the embedding"):
        from_peft(head, adapter_config, Config(**SHAPE, vocab_size=101, tie_embeddings=True))
    for change, what in (({"rank_pattern": {"q_proj": 8}}, "per-module ranks"), ({"use_dora": True}, "DoRA"),
                         ({"use_rslora": True}, "rank-stabilised"), ({"bias": "all"}, "trains biases")):
        with pytest.raises(UserError, match=what):
            from_peft(head, {**adapter_config, **change}, config)
    saved_head = {**head, "base_model.model.lm_head.base_layer.weight": torch.zeros(101, 64)}
    with pytest.raises(UserError, match="carries its own lm_head.base_layer.weight, which differs"):
        from_peft(saved_head, adapter_config, config, {"lm_head.weight": torch.ones(101, 64)})


def test_the_base_checkpoint_is_never_replaced_but_an_earlier_import_is(tmp_path, one_thread):
    from lit_gpt.utils import UserError

    _, base_dir = peft_llama(tmp_path, ["q_proj"])
    before = sorted(p.name for p in base_dir.iterdir())
    with pytest.raises(UserError, match="already holds something other than a LoRA folder"):
        import_adapter(tmp_path / "peft", base_dir, base_dir)
    assert sorted(p.name for p in base_dir.iterdir()) == before
    out = import_adapter(tmp_path / "peft", base_dir, tmp_path / "imported")
    (out / "stale.txt").write_text("from the earlier import")
    import_adapter(tmp_path / "peft", base_dir, out)
    assert not (out / "stale.txt").exists() and (out / "lit_model.pth").is_file()

