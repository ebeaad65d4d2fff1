"""bench.memory: the memory count on tiny models, its agreement with real CPU runs, the longest-sequence solve,
the output files, and its flag checks.

The benchmark's own numbers (SmolLM2-135M shape, LLaMA-2 estimates) belong to its committed run, not to these tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import lit_gpt.loss as memory_loss
from bench import memory
from conftest import ROOT, assert_one_line_error, assert_plot
from lit_gpt.config import Config
from lit_gpt.utils import UserError

# in_features are multiples of 64, bitsandbytes' 4-bit block size, for the QLoRA check.
TINY = Config(n_layer=2, n_head=4, n_query_groups=2, n_embd=64, intermediate_size=128, vocab_size=101, block_size=128)
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def real_count(config: Config, method: str, p: float, draw: int = 0, seq_len: int = 32, quantize: str = "bnb.nf4"):
    model = memory.build_model(config, method, torch.float32, CPU, 0, quantize)
    handler = memory.make_handler(model, 0)
    return model, memory.count_step(model, handler, p, draw, seq_len, 2)


def fake_counter(config: Config = TINY, method: str = "full") -> memory.Counter:
    return memory.Counter(config, method, torch.float32, 0, "bnb.nf4", 2)


# ---------------------------------------------------------------------------------------------- the count
def test_dropped_branches_save_nothing_and_kept_ones_add_a_fixed_amount():
    saved = {(n, p): real_count(replace(TINY, n_layer=n), "full", p)[1].saved for n in (2, 3, 4) for p in (0.0, 1.0)}
    assert saved[4, 1.0] < saved[4, 0.0]
    # Every branch dropped: extra layers add no saved activation byte.
    assert saved[2, 1.0] == saved[3, 1.0] == saved[4, 1.0]
    # Every branch kept: each layer adds the same positive amount.
    per_layer = saved[3, 0.0] - saved[2, 0.0]
    assert per_layer > 0 and saved[4, 0.0] - saved[3, 0.0] == per_layer


def test_saved_bytes_count_each_storage_once_and_skip_weights():
    model, count = real_count(TINY, "lora", 0.0)
    packs: list[torch.Tensor] = []  # every saved tensor, as often as it is saved
    ids = torch.zeros(2, 32, dtype=torch.long)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packs.append(t) or t, lambda t: t):
        memory.training_loss(model, ids, chunked_loss=True)
    weights = {memory.storage_key(t) for t in memory.weight_tensors(model)}
    naive = sum(t.untyped_storage().nbytes() for t in packs)
    distinct = {memory.storage_key(t): t.untyped_storage().nbytes() for t in packs}
    assert any(memory.storage_key(t) in weights for t in packs)  # weights are saved too, and left out
    assert len(distinct) < len(packs)  # some storages are saved more than once (views)
    assert count.saved == sum(n for k, n in distinct.items() if k not in weights) < naive
    assert count.peak >= count.saved  # the saved tensors are alive at the end of forward


def test_static_bytes_of_each_method():
    full = memory.static_bytes(memory.build_model(TINY, "full", torch.float32, CPU, 0, "bnb.nf4"), "full", "bnb.nf4")
    lora = memory.static_bytes(memory.build_model(TINY, "lora", torch.float32, CPU, 0, "bnb.nf4"), "lora", "bnb.nf4")
    n = sum(p.numel() for p in memory.GPT(TINY).parameters())
    assert full == dict(weights=4 * n, grads=4 * n, optimizer=8 * n)
    assert lora["grads"] < full["grads"] / 5 and lora["optimizer"] == 2 * lora["grads"]
    assert lora["weights"] == full["weights"] + lora["grads"]  # the base plus the adapters


def test_four_bit_bytes_formula():
    assert memory.four_bit_bytes(64 * 128, "bnb.nf4") == 64 * 64 + 128 * 4 + 64
    assert memory.four_bit_bytes(64 * 128, "bnb.nf4-dq") == 64 * 64 + 128 + 4 + 1024 + 4 + 64


# ---------------------------------------------------------------------------------------------- fake == real
@pytest.mark.parametrize("method", ["full", "lora", "full-tied"])
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_fake_tensor_count_equals_a_real_cpu_run(method, p):
    """full-tied: SmolLM2's head, whose embedding share of the gradient is sparse (indices and values counted)."""
    config = replace(TINY, tie_embeddings=method.endswith("-tied"))
    method = method.removesuffix("-tied")
    model, real = real_count(config, method, p, draw=1)
    fake = fake_counter(config, method)
    counted = fake.count(p, 1, 32)
    assert ((counted.saved, counted.peak, counted.timeline, counted.ops)
            == (real.saved, real.peak, real.timeline, real.ops))
    assert fake.static == memory.static_bytes(model, method, "bnb.nf4")


@pytest.mark.parametrize("tied", [False, True])
def test_memtracker_agrees_with_the_count_or_stands_aside(tied):
    """PyTorch's MemTracker sees the same step peak on untied full fine-tuning; it cannot read the sparse gradient
    of a tied embedding (SmolLM2's), so there the cross-check is skipped instead of ending the run."""
    counter = fake_counter(replace(TINY, tie_embeddings=tied))
    tracked = memory.memtracker_peak(counter.model, counter.handler, 0.0, 0, 32, 2, counter.fake_mode,
                                     counter.chunked_loss)
    assert tracked is None if tied else tracked == counter.count(0.0, 0, 32).peak


def test_meta_device_would_count_differently():
    """Why the count runs on fake CPU tensors: on the meta device SDPA saves what its math path needs."""
    with torch.device("meta"):
        model = memory.GPT(TINY)
    model.train()
    meta = memory.count_step(model, memory.make_handler(model, 0), 0.0, 0, 32, 2)
    _, real = real_count(TINY, "full", 0.0)
    assert meta.saved > real.saved


@pytest.mark.parametrize("tied", [False, True])
def test_qlora_count_equals_a_real_four_bit_run(tied):
    """An untied 4-bit head gets the full logits even with the chunked loss (`count_rows` counts it so); a tied one
    is the float embedding, and runs the chunked loss."""
    pytest.importorskip("bitsandbytes")
    config = replace(TINY, tie_embeddings=tied)
    model, real = real_count(config, "qlora", 0.5)
    fake = memory.Counter(config, "lora", torch.float32, 0, "bnb.nf4", 2, chunked_loss=tied)
    counted = fake.count(0.5, 0, 32)
    assert (counted.saved, counted.peak) == (real.saved, real.peak)
    assert memory.static_bytes(fake.model, "qlora", "bnb.nf4") == memory.static_bytes(model, "qlora", "bnb.nf4")


# ---------------------------------------------------------------------------------------------- longest sequence
def step(seq_len: int, timeline: list[int]) -> memory.StepCount:
    return memory.StepCount(seq_len, 0, max(timeline), timeline, ["op"] * len(timeline))


def test_affine_longest_solves_the_binding_op():
    # Two ops: 100 + 10·T and 1000 + 2·T. With 2000 bytes: min((2000-100)//10, (2000-1000)//2) = 190.
    a, b = step(10, [200, 1020]), step(20, [300, 1040])
    assert memory.affine_longest(a, b, 2000) == (190, True)
    assert memory.affine_longest(a, b, 1500) == (140, True)
    assert memory.affine_longest(a, b, 900) == (0, True)  # the second op alone needs 1000 bytes
    assert memory.affine_longest(a, step(20, [300, 1040, 5]), 2000) == (0, False)  # different ops: no solve
    assert memory.affine_longest(a, step(20, [301, 1040]), 2000) == (0, False)  # not affine in whole bytes


def test_bisect_longest_finds_the_last_fitting_length():
    assert memory.bisect_longest(lambda n: n <= 777, 16) == 777
    assert memory.bisect_longest(lambda n: n <= 5, 16) == 5
    assert memory.bisect_longest(lambda n: False, 16) == 0


def test_longest_sequence_grows_with_p_and_respects_the_budget():
    counter = fake_counter()
    static = sum(counter.static.values())
    budget = static + 3 * 2**20
    draws = [0, 1, 2]
    longest = {}
    for p in (0.0, 0.5, 0.875, 1.0):
        result = counter.longest(p, draws, static, budget, 32)
        assert result["solved"].startswith("affine")
        t = longest[p] = result["longest"]
        assert all(counter.count(p, d, t).peak + static <= budget for d in draws)
        assert any(counter.count(p, d, t + 1).peak + static > budget for d in draws)
    assert longest[0.0] < longest[0.5] < longest[0.875] <= longest[1.0]
    # The affine solve agrees with bisection over counts.
    assert memory.bisect_longest(lambda n: all(counter.count(0.5, d, n).peak + static <= budget for d in draws), 32) \
        == longest[0.5]


def test_longest_sequence_across_the_chunked_losss_chunks(monkeypatch):
    """With the chunked loss the ops change every chunk (here 20 tokens, 10 per sequence of the micro-batch of 2):
    the solve walks the runs of lengths with the same chunks, and agrees with bisection over counts."""
    monkeypatch.setattr(memory_loss, "CHUNK_ELEMENTS", 20 * TINY.padded_vocab_size)
    counter = fake_counter()
    assert counter.chunk == 20 and counter.segment(32) == (31, 40) and counter.segment(2) == (2, 10)
    static = sum(counter.static.values())
    draws = [0, 1]
    for extra in (2**20, 3 * 2**20):
        result = counter.longest(0.5, draws, static, static + extra, 32)
        assert result["solved"] == "affine, confirmed at T*"
        t = result["longest"]
        assert t > 40  # past the first length's run of lengths
        assert t == memory.bisect_longest(
            lambda n, extra=extra: all(counter.count(0.5, d, n).peak <= extra for d in draws), 32)


def test_chunked_loss_lowers_the_step_peak_of_a_large_vocabulary():
    config = replace(TINY, vocab_size=32000, padded_vocab_size=32000, tie_embeddings=True)
    peaks = {flag: memory.Counter(config, "lora", torch.float32, 0, "bnb.nf4", 2, chunked_loss=flag).count(0.0, 0, 64)
             for flag in (True, False)}
    logits = 2 * 63 * 32000 * 4  # one (tokens x vocab) fp32 tensor, every position but the last
    assert peaks[False].peak - peaks[True].peak >= logits
    assert peaks[False].saved - peaks[True].saved >= logits  # the full path saves its log-probabilities


def test_the_chunked_loss_holds_one_chunk_of_logits_at_a_time():
    """Its peak is the gradients it keeps plus one chunk's logits, however many chunks there are."""
    config = replace(TINY, vocab_size=4096, padded_vocab_size=4096, block_size=64)
    model = memory.build_model(config, "full", torch.float32, CPU, 0, "bnb.nf4")
    ids = torch.randint(0, 4096, (2, 64), generator=torch.Generator().manual_seed(0))
    hidden = model(ids, return_hidden=True).detach().requires_grad_()
    chunk = 16
    counter = memory.LiveBytes({memory.storage_key(t) for t in memory.static_tensors(model)}
                               | {memory.storage_key(ids), memory.storage_key(hidden)})
    with counter:
        memory_loss.chunked_next_token_loss(model, hidden, ids, chunk_size=chunk)
    kept = hidden.numel() * 4 + model.lm_head.weight.numel() * 4  # the gradients of the hidden states and the head
    logits = chunk * 4096 * 4
    assert 2 * 64 // chunk == 8  # eight chunks
    assert kept + logits <= max(counter.timeline) < kept + 1.5 * logits


def test_every_draw_of_a_uniform_rate_counts_the_same_peak():
    """Each draw keeps as many attention and MLP branches as any other: the same saved bytes, and a peak that
    differs only by where the kept branches sit (what is alive when the backward reaches them)."""
    counter = fake_counter(replace(TINY, n_layer=8))
    for p in (0.5, 0.875):
        peaks = [counter.count(p, d, 32).peak for d in range(6)]
        assert len({counter.count(p, d, 32).saved for d in range(6)}) == 1
        assert max(peaks) < 1.02 * min(peaks), (p, peaks)


def test_pld_counts_only_the_blocks_it_keeps():
    counter = fake_counter(replace(TINY, n_layer=4))
    plain = counter.count(0.0, 0, 32)
    kept = []
    for d in range(6):
        pld = counter.pld(0.5)
        pld.draw(step=d)  # the count's decision, drawn here to read it
        kept.append(sum(b.keep for b in pld.blocks))
        pld.remove()
        saved = counter.count(None, d, 32, pld_theta=0.5).saved
        assert (saved < plain.saved) == (kept[-1] < 4)
    assert min(kept) < 4  # some draw drops a block
    assert all(b.keep for b in counter.model.transformer.h)  # every block runs again after a count


def test_budget_below_the_weights_fits_nothing():
    counter = fake_counter()
    assert counter.longest(0.0, [0], sum(counter.static.values()), 1000, 32)["longest"] == 0


# ---------------------------------------------------------------------------------------------- the script
def test_main_writes_its_tables_and_plots(tmp_path, monkeypatch):
    monkeypatch.setattr(memory.Config, "from_name", classmethod(lambda cls, name, **kw: replace(TINY, name=name, **kw)))
    out = tmp_path / "memory"
    result = memory.main(model_name="tiny", methods=["full", "lora"], drop_rates=[0.0, 0.875], seq_len=32,
                         micro_batch_size=2, memory_budget_gib=0.01, draws=2, device="cpu", validate_on=[],
                         estimates=[], out=out)
    rows = {(r["method"], r["drop_rate"]): r for r in result["rows"]}
    for method in ("full", "lora"):
        assert rows[method, 0.875]["saved"] < rows[method, 0.0]["saved"]
        assert rows[method, 0.875]["longest"] > rows[method, 0.0]["longest"] > 0
        assert rows[method, 0.875]["longest_ratio"] > 1
        # PLD at θ̄ = 0.5 (the default); the peak over its draws: with 2 blocks, a draw may keep both.
        assert rows[method, None]["pld_theta"] == 0.5
        assert rows[method, None]["saved"] <= rows[method, 0.0]["saved"]
    assert result["cross_checks"] and all(c["equal"] for c in result["cross_checks"])
    text = (out / "memory.md").read_text()
    assert "Machine:" in text and "Command: `python -m bench.memory" in text and "| full | 0.875 |" in text
    assert "| lora | PLD θ̄=0.5 |" in text and "chunked head + loss" in text
    assert json.loads((out / "memory.json").read_text())["rows"][0]["method"] == "full"
    assert_plot(out / "memory_breakdown.png", max(6.0, 0.62 * len(result["rows"]) + 1.5), 4.6, dpi=120)
    assert_plot(out / "memory_longest.png", 6.4, 4.4, dpi=120)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(methods=["bogus"]), "unknown method"),
    (dict(drop_rates=[0.5]), "must include 0"),
    (dict(drop_rates=[0.0, 1.5]), "[0, 1]"),
    (dict(validate_on=["full-0.5"]), "full@0.875"),
    (dict(validate_on=["full@0.3"]), "not among"),
    (dict(estimates=["Llama-2-7b-hf:bogus"]), "unknown method"),
    (dict(quantize="int3"), "--quantize"),
    (dict(pld_theta=0.0), "--pld_theta"),
    (dict(search_granularity=0), "--search_granularity"),
])
def test_bad_arguments_raise_user_errors(kwargs, fragment, tmp_path):
    with pytest.raises(UserError) as info:
        memory.main(out=tmp_path, **kwargs)
    assert fragment in str(info.value)


def test_a_bad_flag_is_a_one_line_error():
    result = subprocess.run([sys.executable, "-m", "bench.memory", "--methods", "[full, bogus]"],
                            check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert_one_line_error(result, "unknown method 'bogus'")
