"""DropBP on Hugging Face causal LMs (`dropbp.integrations.transformers`) and its trainers.

Tiny random LLaMA, Mistral and Qwen2 models built from configs: no hub, no download.
"""

from __future__ import annotations

import pytest
import torch

from conftest import SavedBytes

transformers = pytest.importorskip("transformers")

from dropbp.integrations.transformers import apply_dropbp, decoder_branch_modules  # noqa: E402

FAMILIES = {
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
    "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig),
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config),
}
VOCAB = 64


def make_model(family: str = "llama", seed: int = 0, layers: int = 2):
    cls, config_cls = FAMILIES[family]
    config = config_cls(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=128, num_hidden_layers=layers, max_position_embeddings=64)
    torch.manual_seed(seed)
    return cls(config)


def batch(seed: int = 0, n: int = 2, T: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))


def gradients(model) -> dict[str, torch.Tensor | None]:
    x = batch()
    model.train().zero_grad(set_to_none=True)
    model(input_ids=x, labels=x).loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_at_drop_rate_zero_gradients_are_bit_identical_and_names_unchanged(family, one_thread):
    plain, wrapped = make_model(family), make_model(family)
    names = list(wrapped.state_dict())
    handler = apply_dropbp(wrapped, drop_rate=0.0)
    assert list(wrapped.state_dict()) == names  # DropBP adds no parameters or buffers and renames none
    assert len(handler.layers) == 4 and [layer.kind for layer in handler.layers] == ["attention", "mlp"] * 2
    ours, reference = gradients(wrapped), gradients(plain)
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[n], reference[n]) for n in ours)
    x = batch(1)
    wrapped.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(wrapped(input_ids=x).logits, plain(input_ids=x).logits)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dropped_branches_get_no_gradient_and_keep_no_activations(family, one_thread):
    model = make_model(family)
    handler = apply_dropbp(model, drop_rate=0.0)
    handler.set_drop_rates([1.0, 0.0, 0.0, 1.0])  # layer 0's attention, layer 1's MLP
    counter = SavedBytes(model, list(decoder_branch_modules(handler)))
    x = batch()
    loss = counter.run(lambda: model.train()(input_ids=x, labels=x).loss)
    assert handler.dropped == [True, False, False, True]
    saved = counter.per_module()
    assert saved[0] == 0 and saved[3] == 0 and saved[1] > 0 and saved[2] > 0
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    dropped = ("model.layers.0.self_attn.", "model.layers.1.mlp.")
    assert all(grads[n] is None for n in grads if n.startswith(dropped))
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads
               if n.startswith(("model.layers.0.mlp.", "model.layers.1.self_attn.", "lm_head", "model.norm")))


def test_hf_gradient_checkpointing_recomputes_with_the_same_decisions(one_thread):
    def grads(checkpointing: bool) -> dict[str, torch.Tensor | None]:
        model = make_model()
        apply_dropbp(model, drop_rate=0.0).set_drop_rates([1.0, 0.0, 0.0, 1.0])
        if checkpointing:
            model.gradient_checkpointing_enable()
        return gradients(model)

    plain, checkpointed = grads(False), grads(True)
    assert [n for n, g in plain.items() if g is None] == [n for n, g in checkpointed.items() if g is None] != []
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain if plain[n] is not None)


def test_an_unknown_model_names_what_to_pass():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.ffn = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(), Block()])

    with pytest.raises(ValueError, match="layers=.*attention=.*mlp="):
        apply_dropbp(Net())
    handler = apply_dropbp(Net(), layers="blocks", attention="attn", mlp="ffn")
    assert len(handler.layers) == 4


def lora(model):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("order", ["dropbp_then_peft", "peft_then_dropbp"])
def test_lora_adapters_inside_dropped_branches_get_no_gradient_and_backward_is_skipped(order, one_thread):
    model = make_model()
    if order == "dropbp_then_peft":
        handler = apply_dropbp(model, drop_rate=0.0)
        model = lora(model)
    else:
        model = lora(model)
        handler = apply_dropbp(model, drop_rate=0.0)
    x = batch()
    handler.set_drop_rates([1.0, 0.0, 0.0, 1.0])
    model.train()(input_ids=x, labels=x).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    for n, g in grads.items():
        dropped = "layers.0.self_attn." in n or "layers.1.mlp." in n
        assert (g is None) == dropped, n
    assert not handler.detect_non_grad()
    handler.set_initial_drop_rate(1.0)  # every adapter-holding branch dropped: nothing can learn
    loss = model(input_ids=x, labels=x).loss
    assert handler.detect_non_grad() and not loss.requires_grad


# ---------------------------------------------------------------------- trainers
def pattern_dataset(n: int = 32, T: int = 16) -> list[dict[str, list[int]]]:
    """Counting sequences (start, start+1, ...): learnable in a few steps."""
    rows = []
    for i in range(n):
        ids = [(i + t) % VOCAB for t in range(T)]
        rows.append({"input_ids": ids, "labels": list(ids), "attention_mask": [1] * T})
    return rows


def training_args(out_dir, max_steps: int = 10, **kwargs):
    options = dict(output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2,
                   logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
                   dataloader_num_workers=0, disable_tqdm=True)
    return transformers.TrainingArguments(**{**options, **kwargs})


def losses(trainer) -> list[float]:
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


def test_trainer_with_lora_and_dropbp_learns_calibrates_and_skips_backward(tmp_path, one_thread):
    from dropbp.integrations.trainer import DropBPTrainer

    model = lora(make_model())
    handler = apply_dropbp(model, drop_rate=0.5, seed=3)
    trainer = DropBPTrainer(model=model, args=training_args(tmp_path, max_steps=12, gradient_accumulation_steps=2),
                            train_dataset=pattern_dataset(), dropbp_handler=handler)
    trainer.train()
    history = losses(trainer)
    assert sum(history[-3:]) / 3 < sum(history[:3]) / 3
    assert trainer.dropbp_calibrated == [1]  # int(0.1 * 12)
    assert handler.sensitivities is not None and len(trainer.dropbp_history) == 1
    assert len(trainer.dropbp_decisions) == 24 and handler.step == 24  # one draw per micro-batch
    assert any(any(d) for d in trainer.dropbp_decisions)


def test_trainer_skips_backward_when_every_adapter_branch_is_dropped(tmp_path, one_thread):
    from dropbp.integrations.trainer import DropBPTrainer

    model = lora(make_model())
    handler = apply_dropbp(model, drop_rate=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = DropBPTrainer(model=model, args=training_args(tmp_path, max_steps=3), train_dataset=pattern_dataset(),
                            dropbp_handler=handler, sensitivity_at=None)
    trainer.train()  # the loss has no graph: a backward() would raise
    assert trainer.dropbp_skipped_backwards == 3 and trainer.dropbp_calibrated == []
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_trainer_refuses_the_weights_drop_mode_it_cannot_price(tmp_path):
    from dropbp.integrations.trainer import DropBPTrainer

    model = make_model()
    handler = apply_dropbp(model, drop_rate=0.5)
    handler.set_drop_mode("weights")
    with pytest.raises(ValueError, match="drop_mode 'branch' only"):
        DropBPTrainer(model=model, args=training_args(tmp_path), train_dataset=pattern_dataset(),
                      dropbp_handler=handler)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(VOCAB - 2)} | {"<pad>": VOCAB - 2, "</s>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")


def test_sft_trainer_with_lora_and_dropbp_learns(tmp_path, one_thread):
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    import trl

    from dropbp.integrations.trainer import DropBPSFTTrainer

    model = lora(make_model())
    handler = apply_dropbp(model, drop_rate=0.5, seed=3)
    text = [{"text": " ".join(f"t{(i + t) % (VOCAB - 2)}" for t in range(15))} for i in range(32)]
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4, learning_rate=1e-2,
                         logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                         disable_tqdm=True, max_length=16)
    trainer = DropBPSFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(text),
                               processing_class=tiny_tokenizer(), dropbp_handler=handler)
    trainer.train()
    history = losses(trainer)
    assert sum(history[-3:]) / 3 < sum(history[:3]) / 3
    assert trainer.dropbp_calibrated == [1] and handler.step == 12


def test_a_resumed_run_continues_the_same_drop_decisions_and_calibration(tmp_path, one_thread):
    from dropbp.integrations.trainer import STATE_NAME, DropBPTrainer

    def run(out_dir, resume=None):
        model = make_model(layers=2)
        handler = apply_dropbp(model, drop_rate=0.5, seed=5)
        args = training_args(out_dir, max_steps=6, save_strategy="steps", save_steps=3)
        trainer = DropBPTrainer(model=model, args=args, train_dataset=pattern_dataset(), dropbp_handler=handler,
                                sensitivity_at=0.5)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, handler

    full, full_handler = run(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / STATE_NAME).is_file()
    resumed, resumed_handler = run(tmp_path / "resumed", resume=str(checkpoint))
    assert resumed.dropbp_decisions == full.dropbp_decisions[3:]
    assert full.dropbp_calibrated == resumed.dropbp_calibrated == [3]
    assert resumed_handler.state_dict() == full_handler.state_dict()
    assert losses(resumed)[-3:] == pytest.approx(losses(full)[3:], rel=1e-4)  # its log starts with the saved one
