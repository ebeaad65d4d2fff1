"""The chunked head + loss of training equals the full-logits loss, and keeps no (tokens x vocab) tensor."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import SavedBytes, losses, metrics, save_random_checkpoint, tiny_config
from lit_gpt.build import random_model
from lit_gpt.config import Config
from lit_gpt.data import IGNORE_INDEX
from lit_gpt.lora import LoRAConfig, add_lora
from lit_gpt.loss import chunked_next_token_loss, forward_backward, next_token_loss

V = 500


def tiny_model(tied: bool, lora: bool = False, dropout: float = 0.0):
    config = Config(name="t", n_layer=2, n_head=4, n_query_groups=2, n_embd=32, intermediate_size=64, vocab_size=V,
                    block_size=40, tie_embeddings=tied)
    model = random_model(config, seed=1)
    if lora:
        add_lora(model, LoRAConfig(r=4, dropout=dropout))
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):  # non-zero, so the adapters' gradients are all exercised
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(name)))
    return model


def batch(T: int = 33):
    ids = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :10] = IGNORE_INDEX  # a prompt
    labels[2, 20:] = IGNORE_INDEX  # padding
    return ids, labels


@pytest.mark.parametrize("tied, lora", [(True, False), (False, False), (False, True), (True, True)],
                         ids=["tied", "untied", "lora-head", "tied-lora"])
@pytest.mark.parametrize("chunk_size", [7, None])
def test_chunked_loss_and_every_gradient_equal_the_full_logits(tied, lora, chunk_size, one_thread):
    full, chunked = tiny_model(tied, lora), None
    chunked = copy.deepcopy(full)
    ids, labels = batch()
    expected = next_token_loss(full(ids), labels)
    expected.backward()
    loss = chunked_next_token_loss(chunked, chunked(ids, return_hidden=True), labels, chunk_size=chunk_size)
    loss.backward()
    assert abs(loss.item() - expected.item()) < 1e-5
    for (name, p), q in zip(full.named_parameters(), chunked.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-5, msg=name)
    if lora:
        assert chunked.lm_head is None or chunked.lm_head.lora_A.grad is not None


def test_lora_dropout_on_the_head_falls_back_to_the_full_logits(one_thread):
    model = tiny_model(tied=False, lora=True, dropout=0.5).eval()  # eval: dropout off, so the two paths agree
    ids, labels = batch()
    with torch.no_grad():
        expected = next_token_loss(model(ids), labels)
        loss = chunked_next_token_loss(model, model(ids, return_hidden=True), labels)
    assert abs(loss.item() - expected.item()) < 1e-5


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_loss_keeps_no_tokens_by_vocab_tensor(tied, one_thread):
    """Everything autograd keeps from the forward to the backward: the full-logits path keeps the (tokens x vocab)
    log-probabilities, the chunked one no tensor of that size."""
    T = 33
    ids, labels = batch(T)
    kept = {}
    for chunked in (False, True):
        model = tiny_model(tied)
        counter = SavedBytes(model, None)  # everything saved, parameters excluded

        def loss_fn(model=model, chunked=chunked):
            if chunked:
                return chunked_next_token_loss(model, model(ids, return_hidden=True), labels, chunk_size=8)
            return next_token_loss(model(ids), labels)

        loss = counter.run(loss_fn)
        node = loss.grad_fn.next_functions[0][0]  # the chunked loss keeps its gradients on its autograd node
        extra = [g for g in getattr(node, "grads", None) or [] if g is not None]
        sizes = [*counter.storages[0].values(), *(g.untyped_storage().nbytes() for g in extra)]
        kept[chunked] = (max(sizes), sum(sizes))
    tokens_by_vocab = 3 * (T - 1) * V * 4
    assert kept[False][0] >= tokens_by_vocab
    # The largest it keeps is weight-sized (the head's gradient) or one per token of the model's width.
    assert kept[True][0] <= 4 * max(V * 32, 3 * T * 32) < tokens_by_vocab
    # In all, it keeps the full path's log-probabilities less one weight-sized gradient (none when the head is frozen).
    assert kept[False][1] - kept[True][1] >= tokens_by_vocab - 4 * V * 32


def test_forward_backward_flag_gives_the_same_gradients(one_thread):
    ids, labels = batch()
    models = {flag: tiny_model(tied=True) for flag in (True, False)}
    lost = {flag: forward_backward(m, ids, labels, accumulation=2, chunked_loss=flag) for flag, m in models.items()}
    assert abs(lost[True].item() - lost[False].item()) < 1e-5
    for p, q in zip(models[True].parameters(), models[False].parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["full", "lora", "full-tied"])
def test_fine_tuning_with_and_without_the_chunked_loss_ends_alike(tiny, tmp_path, kind, one_thread):
    """DropBP at 0.5 with its calibration, two accumulated micro-batches per step; tied: SmolLM2's head."""
    from lit_gpt.training import cli

    checkpoint_dir = tiny["checkpoint_dir"]
    if kind == "full-tied":
        import shutil

        checkpoint_dir = save_random_checkpoint(tmp_path / "tied", tiny_config(tie_embeddings=True))
        shutil.copy(tiny["checkpoint_dir"] / "tokenizer.model", checkpoint_dir)
    runs = {}
    for flag in ("true", "false"):
        out_dir = tmp_path / flag
        cli(kind.removesuffix("-tied"), argv=[
            "--checkpoint_dir", str(checkpoint_dir), "--data_dir", str(tiny["data_dir"]), "--out_dir", str(out_dir),
            "--drop_rate", "0.5", "--train.global_batch_size", "4", "--train.micro_batch_size", "2",
            "--train.max_steps", "4", "--train.warmup_steps", "1", "--train.learning_rate", "1e-3",
            "--train.eval_interval", "4", "--train.sample_tokens", "0", "--train.chunked_loss", flag])
        rows = metrics(out_dir)
        weights = torch.load(out_dir / "final" / "lit_model.pth", weights_only=True)
        runs[flag] = losses(rows, "train_loss"), losses(rows, "val_loss"), weights
    (train_on, val_on, on), (train_off, val_off, off) = runs["true"], runs["false"]
    assert len(train_on) == 4 and len(val_on) == 2
    torch.testing.assert_close(train_on, train_off, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(val_on, val_off, rtol=1e-5, atol=1e-5)
    assert on.keys() == off.keys()
    # Adam turns rounding-level gradient differences on near-zero gradients into updates of up to lr, so the weights
    # (4 steps at lr 1e-3: moved up to 4e-3) agree within 1e-4; measured: 1.6e-5 at most.
    for k in on:
        torch.testing.assert_close(on[k], off[k], rtol=0, atol=1e-4, msg=k)


@pytest.mark.parametrize("tied, lora", [(True, False), (False, False), (False, True)], ids=["tied", "untied", "lora"])
def test_chunked_loss_runs_the_matrix_products_of_the_full_head(tied, lora, one_thread):
    """The gradients are taken chunk by chunk, nothing recomputed: FlopCounterMode (the cost model's check) counts
    the same FLOPs, so `flops_per_step_measured` means the same with the flag on or off."""
    from torch.utils.flop_counter import FlopCounterMode

    ids, labels = batch()
    counted = {}
    for flag in (True, False):
        model = tiny_model(tied, lora)
        with FlopCounterMode(display=False) as counter:
            forward_backward(model, ids, labels, chunked_loss=flag)
        counted[flag] = counter.get_total_flops()
    assert counted[True] == counted[False]


@pytest.mark.parametrize("chunked", [True, False])
def test_tied_full_fine_tuning_sums_a_sparse_embedding_gradient_into_a_dense_one(chunked, one_thread):
    """`prepare_for_finetuning` makes a tied embedding's share of the gradient sparse: same dense `.grad`, one
    (vocab x dim) tensor fewer; over two accumulated micro-batches, as the loop runs them."""
    from lit_gpt.build import prepare_for_finetuning

    plain = tiny_model(tied=True)
    prepared = prepare_for_finetuning(copy.deepcopy(plain), "full")
    assert prepared.transformer.wte.sparse and not plain.transformer.wte.sparse
    ids, labels = batch()
    for model in (plain, prepared):
        for _ in range(2):
            forward_backward(model, ids, labels, accumulation=2, chunked_loss=chunked)
    for p, q in zip(plain.parameters(), prepared.parameters()):
        assert not q.grad.is_sparse
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-6)
    untied = prepare_for_finetuning(tiny_model(tied=False), "full")
    assert not untied.transformer.wte.sparse  # its gradient would stay sparse, which AdamW refuses


def test_a_second_backward_through_the_chunked_loss_is_a_clear_error(one_thread):
    model = tiny_model(tied=True)
    ids, labels = batch()
    loss = chunked_next_token_loss(model, model(ids, return_hidden=True), labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        loss.backward()


@pytest.mark.parametrize("tied, lora", [(True, False), (False, False), (False, True), (True, True)],
                         ids=["tied", "untied", "lora-head", "tied-lora"])
def test_the_recomputing_chunked_loss_backpropagates_one_forward_many_times(tied, lora, one_thread):
    """What sensitivity calibration does: gradients of one forward taken again and again (retain_graph), some only
    down to the hidden states, some scaled; each equals the full-logits one."""
    full, chunked = tiny_model(tied, lora), None
    chunked = copy.deepcopy(full)
    ids, labels = batch()
    grads = {}
    expected = next_token_loss(full(ids), labels)
    loss = chunked_next_token_loss(chunked, chunked(ids, return_hidden=True), labels, chunk_size=7, recompute=True)
    assert abs(loss.item() - expected.item()) < 1e-5
    for model, value in ((full, expected), (chunked, loss)):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        below_head = [p for n, p in named if not n.startswith(("lm_head", "transformer.wte"))][-1]
        first = torch.autograd.grad(value, [p for _, p in named], retain_graph=True)
        again = torch.autograd.grad(value, [p for _, p in named], grad_outputs=torch.tensor(-2.0), retain_graph=True)
        partial = torch.autograd.grad(value, below_head, retain_graph=True)  # the head's weights need nothing
        grads[model is chunked] = (first, again, partial)
    for want, got in zip(grads[False], grads[True]):
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
    for first, again in zip(*grads[True][:2]):
        torch.testing.assert_close(again, -2 * first, rtol=1e-6, atol=1e-7)


def test_the_recomputing_chunked_loss_keeps_only_its_inputs_and_one_number_per_token(one_thread):
    """Between forward and backward it keeps the hidden states, the weights and each token's log-sum-exp: no
    (tokens x vocab) tensor, and no weight-sized gradient either."""
    T = 33
    ids, labels = batch(T)
    model = tiny_model(tied=True)
    hidden = model(ids, return_hidden=True)
    loss = chunked_next_token_loss(model, hidden, labels, chunk_size=8, recompute=True)
    kept = loss.grad_fn.next_functions[0][0].saved_tensors
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    own = [t for t in kept if t is not None and t.untyped_storage().data_ptr() not in weights]
    assert sorted(t.numel() for t in own) == sorted([3 * T, 3 * T, 3 * T * 32])  # targets, log-sum-exps, hidden
