"""DropBP inside the model: forward, gradients, memory, decisions, calibration, state and learning rates.

Everything runs on tiny fp32 (or fp64) CPU models. The pure maths (sampling, allocation, sensitivity against
brute force) lives in `test_dropbp_math.py`.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from conftest import SavedBytes, tiny_shape
from dropbp import DropBP, DropBPHandler
from dropbp.allocation import dropped_fraction
from lit_gpt.config import Config
from lit_gpt.lora import LoRAConfig, LoRALinear, add_lora
from lit_gpt.model import GPT

TINY = tiny_shape(n_embd=32, intermediate_size=64, vocab_size=50, block_size=16)
# GPT-NeoX style: parallel residual, LayerNorm with bias, GELU MLP.
PARALLEL = dict(parallel_residual=True, norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP", bias=True)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is None and b is None or a is not None and b is not None and torch.equal(a, b)


def make_model(n_layer: int = 2, seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(Config(**{**TINY, "n_layer": n_layer, **overrides}))
    model.reset_parameters()
    return model


def make_batch(seed: int = 1, batch_size: int = 2, length: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY["vocab_size"], (batch_size, length + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def loss_of(model: GPT, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(ids)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def gradients(model: GPT) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def branch_param_names(model: GPT) -> list[set[str]]:
    """Names of each branch's parameters, in DropBP-layer order (attn 0, mlp 0, attn 1, ...)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    layers = [m for m in model.modules() if isinstance(m, DropBP)]
    return [{name_of[id(p)] for p in layer.branch_parameters()} for layer in layers]


def bypass_forward(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """GPT.forward with the DropBP layers bypassed: the branches are called directly."""
    T = ids.size(1)
    cos, sin = model.rope_cache(ids.device)
    cos, sin = cos[:T], sin[:T]
    x = model.transformer.wte(ids)
    for block in model.transformer.h:
        if block.parallel_residual:
            x = x + block.attention_branch(x, cos, sin) + block.mlp_branch(x)
        else:
            x = x + block.attention_branch(x, cos, sin)
            x = x + block.mlp_branch(x)
    return model.lm_head(model.transformer.ln_f(x))


# ---------------------------------------------------------------------------------------------- 1. forward
@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
@pytest.mark.parametrize("p", [0.0, 0.5, 0.875, 1.0])
def test_forward_is_unchanged_at_any_drop_rate(p, parallel):
    model = make_model(n_layer=4, **(PARALLEL if parallel else {}))
    handler = DropBPHandler(model, seed=0)
    handler.set_initial_drop_rate(p)
    ids, _ = make_batch()
    model.eval()
    expected = model(ids)
    model.train()
    for _ in range(3):  # three different drop patterns
        logits = model(ids)
        # systematic sampling drops exactly p * (number of branches) here (an integer for these p)
        assert sum(handler.dropped) == round(p * 8)
        assert torch.equal(logits, expected)
    assert torch.equal(bypass_forward(model, ids), expected)


def test_every_draw_drops_the_same_number_of_attention_and_of_mlp_branches():
    """So no draw keeps mostly the larger MLP branches: a step's memory and time do not depend on the draw."""
    model = make_model(n_layer=8)
    handler = DropBPHandler(model, seed=0)
    handler.set_initial_drop_rate(0.75)
    kinds = [layer.kind for layer in handler.layers]
    assert kinds.count("attention") == kinds.count("mlp") == 8
    ids, _ = make_batch()
    patterns = set()
    for _ in range(20):
        model(ids)
        dropped = handler.dropped
        patterns.add(tuple(dropped))
        assert sum(d for d, k in zip(dropped, kinds) if k == "attention") == 6
        assert sum(d for d, k in zip(dropped, kinds) if k == "mlp") == 6
    assert len(patterns) > 10


# ---------------------------------------------------------------------------------------------- 2. p = 0
@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_zero_drop_rate_gives_bit_identical_gradients(parallel):
    overrides = PARALLEL if parallel else {}
    ids, targets = make_batch()

    model = make_model(n_layer=3, **overrides)
    handler = DropBPHandler(model, seed=0)
    handler.set_initial_drop_rate(0.9)
    model(ids)  # leave some branches marked as dropped: p = 0 must clear them at the next draw
    assert any(handler.dropped)
    handler.set_initial_drop_rate(0.0)
    loss_of(model, ids, targets).backward()
    assert handler.step == 2 and not any(handler.dropped)
    with_handler = gradients(model)
    assert all(g is not None and g.abs().sum() > 0 for g in with_handler.values())

    # the same model after handler.remove(): DropBP can never drop
    model.zero_grad(set_to_none=True)
    handler.remove()
    loss_of(model, ids, targets).backward()
    assert handler.step == 2  # the hook is gone
    without_handler = gradients(model)

    # a fresh copy whose forward does not go through the DropBP layers at all
    reference = make_model(n_layer=3, **overrides)
    logits = bypass_forward(reference, ids)
    F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1)).backward()
    bypassed = gradients(reference)

    for name, g in with_handler.items():
        assert torch.equal(g, without_handler[name]), name
        assert torch.equal(g, bypassed[name]), name


# ---------------------------------------------------------------------------------------------- 3. p = 1
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_all_branches_dropped_in_full_finetuning_still_trains_head_norm_and_embeddings(tied):
    model = make_model(n_layer=2, tie_embeddings=tied)
    handler = DropBPHandler(model, seed=0)
    handler.set_initial_drop_rate(1.0)
    ids, targets = make_batch()
    loss = loss_of(model, ids, targets)
    assert all(handler.dropped) and handler.realised_drop_rate == 1.0
    assert not handler.detect_non_grad()
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("transformer.h."):
            assert p.grad is None, name
    outside = ["transformer.wte.weight", "transformer.ln_f.weight"] + ([] if tied else ["lm_head.weight"])
    for name in outside:
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    # the embedding learns through the residual path, not only as the tied head
    if not tied:
        assert model.transformer.wte.weight.grad[ids.unique()].abs().sum(-1).min() > 0

    # eval mode never drops, even though the layers still carry the last training decision
    model.zero_grad(set_to_none=True)
    model.eval()
    loss_of(model, ids, targets).backward()
    assert all(handler.dropped) and handler.step == 1
    assert all(p.grad is not None for p in model.parameters())


def lora_model(head: bool, n_layer: int = 2, tied: bool = False) -> GPT:
    model = add_lora(make_model(n_layer=n_layer, tie_embeddings=tied), LoRAConfig(r=2, head=head))
    for m in model.modules():  # non-zero B, so every adapter weight gets a gradient
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.05)
    return model


@pytest.mark.parametrize(
    "head, tied, expected",
    [(False, False, True), (True, False, False), (True, True, True)],
    ids=["lora-no-head", "lora-head-untied", "lora-head-tied"],
)
def test_detect_non_grad_only_when_nothing_trainable_can_get_a_gradient(head, tied, expected):
    model = lora_model(head=head, tied=tied)
    handler = DropBPHandler(model, seed=0)
    ids, targets = make_batch()

    handler.set_initial_drop_rate(0.0)
    loss_of(model, ids, targets)
    assert not handler.detect_non_grad()  # nothing dropped

    handler.set_initial_drop_rate(0.5)
    loss_of(model, ids, targets)
    assert any(handler.dropped) and not all(handler.dropped)
    assert not handler.detect_non_grad()  # some adapters are live

    handler.set_initial_drop_rate(1.0)
    loss = loss_of(model, ids, targets)
    assert handler.detect_non_grad() is expected
    # detect_non_grad is exactly "backward() would have nothing to do"
    assert loss.requires_grad is not expected
    if not expected:
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert set(grads) == {"lm_head.lora_A", "lm_head.lora_B"}
        assert grads["lm_head.lora_B"].abs().sum() > 0

    # the eval-mode model never drops, so it is never "non-grad"
    model.eval()
    assert not handler.detect_non_grad()


def test_detect_non_grad_sees_adapters_added_after_the_handler():
    model = make_model(n_layer=2)
    handler = DropBPHandler(model, seed=0)
    add_lora(model, LoRAConfig(r=2, head=True))
    handler.set_initial_drop_rate(1.0)
    loss = loss_of(model, *make_batch())
    assert loss.requires_grad  # lm_head's adapter is trainable and outside every branch
    assert not handler.detect_non_grad()


def test_full_finetuning_is_never_non_grad():
    model = make_model(n_layer=2)
    handler = DropBPHandler(model, seed=0)
    for p in (0.0, 0.5, 1.0):
        handler.set_initial_drop_rate(p)
        loss_of(model, *make_batch())
        assert not handler.detect_non_grad()


def test_parallel_residual_blocks_train_at_half_drop_rate():
    model = make_model(n_layer=2, **PARALLEL)
    handler = DropBPHandler(model, seed=0)
    handler.set_initial_drop_rate(0.5)
    branches = branch_param_names(model)
    block_params = {n for n, _ in model.named_parameters() if n.startswith("transformer.h.")}
    assert set().union(*branches) == block_params
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    kept_count = [0] * len(branches)
    for step in range(6):
        optimizer.zero_grad(set_to_none=True)
        loss_of(model, *make_batch(seed=step)).backward()
        assert sum(handler.dropped) == 2
        for i, (names, dropped) in enumerate(zip(branches, handler.dropped)):
            kept_count[i] += not dropped
            for name in names:
                grad = model.get_parameter(name).grad
                if dropped:
                    assert grad is None, name
                else:
                    assert grad is not None and grad.abs().sum() > 0, name
        optimizer.step()
    assert min(kept_count) > 0
    for name in block_params:
        assert not torch.equal(model.get_parameter(name), before[name]), f"{name} never trained"


# ---------------------------------------------------------------------------------------------- 4. memory
def test_activation_memory_at_high_drop_rate():
    model = make_model(n_layer=8)
    handler = DropBPHandler(model, seed=0)
    ids, targets = make_batch()
    blocks = SavedBytes(model, list(model.transformer.h))

    handler.set_initial_drop_rate(0.0)
    blocks.run(lambda: model(ids))
    full = blocks.total()
    assert full > 0

    handler.set_initial_drop_rate(1.0)
    blocks.run(lambda: model(ids))
    assert blocks.total() == 0  # nothing at all is kept inside the blocks

    handler.set_initial_drop_rate(0.875)
    ratios = []
    for _ in range(8):
        blocks.run(lambda: model(ids))
        assert sum(handler.dropped) == 14  # 7 of every 8 of the 16 branches
        ratios.append(blocks.total() / full)
    # two live branches of sixteen keep about 1/8 of the activations; the paper's bound is 20 %
    assert max(ratios) <= 0.20, ratios
    assert min(ratios) > 0


def test_a_dropped_branch_keeps_no_graph():
    model = make_model(n_layer=4)
    handler = DropBPHandler(model, seed=0)
    handler.set_initial_drop_rate(0.5)
    layers = handler.layers
    per_branch = SavedBytes(model, layers)
    outputs = {}
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
    ids, targets = make_batch()
    per_branch.run(lambda: loss_of(model, ids, targets)).backward()  # the graph that was kept works
    saved = per_branch.per_module()
    assert sum(handler.dropped) == 4
    for i, dropped in enumerate(handler.dropped):
        if dropped:
            assert outputs[i].grad_fn is None and not outputs[i].requires_grad
            assert saved[i] == 0
        else:
            assert outputs[i].grad_fn is not None
            assert saved[i] > 0


# ---------------------------------------------------------------------------------------------- 6. determinism
def test_decisions_depend_only_on_seed_and_step():
    ids, _ = make_batch()
    runs = []
    for model_seed in (0, 1):  # different weights, same decisions
        model = make_model(n_layer=4, seed=model_seed)
        handler = DropBPHandler(model, seed=7)
        handler.set_initial_drop_rate(0.5)
        patterns = []
        for step in range(24):
            torch.manual_seed(1000 + step * (len(runs) + 1))  # the global RNG has no say
            model(ids)
            patterns.append(tuple(handler.dropped))
        runs.append(patterns)
    assert runs[0] == runs[1]
    assert all(sum(p) == 4 for p in runs[0])
    assert len(set(runs[0])) >= 16  # steps give different patterns (C(8, 4) = 70 possible)
    # every branch is dropped at some step and kept at another
    assert all(0 < sum(p[i] for p in runs[0]) < 24 for i in range(8))

    other = make_model(n_layer=4)
    handler = DropBPHandler(other, seed=8)
    handler.set_initial_drop_rate(0.5)
    patterns = []
    for _ in range(24):
        other(ids)
        patterns.append(tuple(handler.dropped))
    assert patterns != runs[0]  # another seed, another sequence


def test_training_forward_leaves_the_global_rng_alone():
    model = make_model(n_layer=4)
    handler = DropBPHandler(model, seed=0)
    handler.set_initial_drop_rate(0.5)
    ids, targets = make_batch()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    loss_of(model, ids, targets).backward()
    assert handler.step == 1 and any(handler.dropped)
    assert torch.equal(torch.get_rng_state(), state)


def test_realised_drop_rate_is_the_flops_share_of_the_dropped_branches():
    model = make_model(n_layer=4)
    handler = DropBPHandler(model, seed=0)
    flops = [1.0, 2.0] * 4  # each MLP branch costs twice its attention branch: 12 in all
    handler.set_branch_flops(flops)
    # Branches 0 and 6 are never dropped, 1 and 7 always (4 of the 12 FLOPs), the rest at random.
    handler.set_drop_rates([0.0, 1.0, 0.5, 0.5, 0.25, 0.75, 0.0, 1.0])
    ids, _ = make_batch()
    realised = []
    for _ in range(200):
        model(ids)
        dropped = handler.dropped
        assert sum(dropped) == 4 and not dropped[0] and dropped[1] and not dropped[6] and dropped[7]
        share = sum(f for f, d in zip(flops, dropped) if d) / 12
        assert handler.realised_drop_rate == pytest.approx(share, rel=1e-12)
        realised.append(handler.realised_drop_rate)
    # The rates sum to 4, so systematic sampling drops exactly 4 branches: 1, 7 and two of 2-5. Within each kind
    # too: the attention rates (branches 0, 2, 4, 6) sum to 0.75 and the MLP ones to 3.25, so a draw drops one
    # attention branch and 3 MLP ones (7 of the 12 FLOPs) or 4 MLP ones (8), never two attention branches (6).
    assert sorted(set(realised)) == pytest.approx([7 / 12, 8 / 12], rel=1e-12)
    assert handler.mean_realised_drop_rate == pytest.approx(sum(realised) / len(realised))
    # In expectation: (0 + 1 * 2 + 0.5 * 1 + 0.5 * 2 + 0.25 * 1 + 0.75 * 2 + 0 + 1 * 2) / 12 = 7.25 / 12; the
    # standard error of 200 draws is about 0.01.
    assert handler.mean_realised_drop_rate == pytest.approx(7.25 / 12, abs=0.03)


# ---------------------------------------------------------------------------------------------- 7. calibration
@pytest.mark.parametrize("metric", ["grad", "gradnorm"])
@pytest.mark.parametrize("allocator", ["greedy", "flops"])
def test_calibration_leaves_training_state_untouched(metric, allocator):
    model = make_model(n_layer=3)
    handler = DropBPHandler(model, seed=0)
    handler.set_initial_drop_rate(0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    loss_of(model, *make_batch(seed=1)).backward()
    optimizer.step()
    loss_of(model, *make_batch(seed=2)).backward()  # accumulates on top of the first gradients

    grads = gradients(model)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt_state = copy.deepcopy(optimizer.state_dict())
    dropped, step = handler.dropped, handler.step
    torch.manual_seed(5)
    rng = torch.get_rng_state()

    calibration = make_batch(seed=3, batch_size=3)

    def loss_fn():
        torch.rand(7)  # stands in for dropout: calibration must still leave the RNG as it was
        return loss_of(model, *calibration)

    result = handler.sensitivity_based_drop_bp(loss_fn, 0.5, metric=metric, allocator=allocator)

    assert torch.equal(torch.get_rng_state(), rng)
    assert sum(g is not None for g in grads.values()) > len(grads) // 2
    for name, g in gradients(model).items():
        assert same(g, grads[name]), name
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]), name
    new_state = optimizer.state_dict()
    assert new_state["param_groups"] == opt_state["param_groups"]
    assert new_state["state"].keys() == opt_state["state"].keys()
    for key, value in opt_state["state"].items():
        for field, tensor in value.items():
            assert torch.equal(new_state["state"][key][field], tensor), (key, field)
    assert handler.dropped == dropped and handler.step == step

    assert result.forward_passes == 1 and result.metric == metric
    assert handler.sensitivities == result.sensitivities and all(s > 0 for s in result.sensitivities)
    rates, flops = handler.drop_rates, handler.branch_flops
    assert rates != [0.5] * 6  # the rates follow the sensitivities
    achieved = dropped_fraction(rates, flops)
    if allocator == "flops":
        assert achieved == pytest.approx(0.5, abs=1e-6)
    else:  # steps of 0.1: the budget is met and overshot by less than one step of one branch
        assert 0.5 - 1e-9 <= achieved < 0.5 + 0.1 * max(flops) / sum(flops)

    # training continues from exactly where it was
    loss_of(model, *make_batch(seed=4)).backward()
    assert handler.step == step + 1


# ---------------------------------------------------------------------------------------------- 9. state
def test_state_dict_round_trip_resumes_the_same_decisions():
    ids, targets = make_batch()
    model = make_model(n_layer=3)
    handler = DropBPHandler(model, seed=11, lr_compensation=True)
    handler.set_initial_drop_rate(0.5)
    for _ in range(5):
        model(ids)
    handler.sensitivity_based_drop_bp(lambda: loss_of(model, ids, targets), 0.4, allocator="flops")
    for _ in range(3):
        model(ids)

    buffer = io.BytesIO()
    torch.save(handler.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    restored_model = make_model(n_layer=3)
    restored = DropBPHandler(restored_model, seed=0)
    assert restored.drop_rates != handler.drop_rates
    restored.load_state_dict(state)
    assert restored.step == handler.step == 8
    assert restored.drop_rates == handler.drop_rates
    assert restored.sensitivities == handler.sensitivities is not None
    assert restored.branch_flops == handler.branch_flops
    assert restored.seed == 11 and restored.lr_compensation
    assert restored.mean_realised_drop_rate == handler.mean_realised_drop_rate

    for _ in range(10):
        model(ids)
        restored_model(ids)
        assert restored.dropped == handler.dropped
    assert restored.mean_realised_drop_rate == handler.mean_realised_drop_rate


# ---------------------------------------------------------------------------------------------- 11. learning rates
def _optimizer_with_groups(handler: DropBPHandler, model: GPT) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    groups = handler.split_param_groups([{"params": decay, "weight_decay": 0.1},
                                         {"params": no_decay, "weight_decay": 0.0}])
    return torch.optim.AdamW(groups, lr=1.0)


@pytest.mark.parametrize("compensation", [True, False])
def test_lr_compensation_scales_each_branch_group(compensation):
    model = make_model(n_layer=2)
    handler = DropBPHandler(model, seed=0, lr_compensation=compensation)
    rates = [0.0, 0.5, 0.75, 0.2]
    handler.set_drop_rates(rates)
    optimizer = _optimizer_with_groups(handler, model)

    branch_of = {id(p): i for i, layer in enumerate(handler.layers) for p in layer.branch_parameters()}
    seen = []
    for group in optimizer.param_groups:
        assert {branch_of.get(id(p), -1) for p in group["params"]} == {group["dropbp_branch"]}
        assert group["weight_decay"] == (0.1 if group["params"][0].dim() > 1 else 0.0)
        seen += [id(p) for p in group["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    assert {g["dropbp_branch"] for g in optimizer.param_groups} == {-1, 0, 1, 2, 3}

    for lr in (3e-4, 1e-5):  # as a schedule would
        handler.set_lr(optimizer, lr)
        for group in optimizer.param_groups:
            branch = group["dropbp_branch"]
            if branch >= 0 and compensation:
                assert group["lr"] == pytest.approx(lr / (1 - rates[branch]), rel=1e-12)
            else:
                assert group["lr"] == lr
    outside = {id(p) for n, p in model.named_parameters() if not n.startswith("transformer.h.")}
    assert outside == {id(p) for g in optimizer.param_groups if g["dropbp_branch"] == -1 for p in g["params"]}

    # the compensation follows recalibrated rates at the next set_lr
    handler.set_drop_rates([0.9, 0.0, 0.0, 0.0])
    handler.set_lr(optimizer, 1e-3)
    attention_0 = [g for g in optimizer.param_groups if g["dropbp_branch"] == 0]
    assert all(g["lr"] == pytest.approx(1e-2 if compensation else 1e-3) for g in attention_0)


def test_a_qkv_bias_belongs_to_the_attention_branch():
    """Qwen2's q/k/v bias is dropped (and counted) with its attention branch, like the weights around it."""
    names = branch_param_names(make_model(attn_bias=True))
    assert "transformer.h.0.attn.attn.bias" in names[0] and "transformer.h.1.attn.attn.bias" in names[2]
    assert not any(name.endswith(".bias") for name in names[1] | names[3])
