"""DropBP's sensitivity calibration runs the training loss: with `--train.chunked_loss`, the chunked head and loss,
which must survive the many backward passes of one forward that the measurement takes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import lit_gpt.loss
import lit_gpt.methods.dropbp as dropbp_method
from conftest import tiny_config
from lit_gpt.build import prepare_for_finetuning, random_model
from lit_gpt.data import IGNORE_INDEX
from lit_gpt.methods.base import RunContext
from lit_gpt.methods.dropbp import DropBP, DropBPArgs

pytestmark = pytest.mark.usefixtures("one_thread")


def calibration_batch(size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 32000, (size, 24), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[0, :9] = IGNORE_INDEX  # a prompt: its tokens have no loss
    return ids, labels


def run_context(model: torch.nn.Module, out_dir: Path, chunked_loss: bool) -> RunContext:
    def check_loss(loss: torch.Tensor) -> None:
        assert torch.isfinite(loss)

    return RunContext(model=model, optimizer=None, max_steps=10, accumulation=1, micro_batches_per_epoch=10, seed=0,
                      mean_seq_length=24, out_dir=out_dir, is_main=False, learning_rate=lambda step: 1e-3,
                      run_micro_batches=lambda: None, calibration_batch=calibration_batch,
                      whole_model=lambda: _unchanged(model), all_reduce_mean=lambda x: x, check_loss=check_loss,
                      print=lambda text: None, chunked_loss=chunked_loss)


class _unchanged:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        return self.model

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("kind, tied", [("full", False), ("full", True), ("lora", False)],
                         ids=["full-gradnorm", "full-tied-gradnorm", "lora-grad"])
def test_calibration_with_the_chunked_loss_measures_the_full_logits_sensitivities(kind, tied, tmp_path, monkeypatch):
    # 7 tokens per chunk: the 2 x 24 calibration tokens span 7 chunks, the last one short.
    monkeypatch.setattr(lit_gpt.loss, "CHUNK_ELEMENTS", 7 * 32000)
    calls = []
    chunked_loss = dropbp_method.chunked_next_token_loss
    monkeypatch.setattr(dropbp_method, "chunked_next_token_loss",
                        lambda *args, **kwargs: calls.append(kwargs) or chunked_loss(*args, **kwargs))
    base = prepare_for_finetuning(random_model(tiny_config(tie_embeddings=tied), seed=3), kind).train()
    if kind == "lora":  # non-zero adapters, so that every branch's gradient is non-zero
        for name, p in base.named_parameters():
            if name.endswith("lora_B"):
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(name)))
    sensitivities, rates = {}, {}
    for flag in (False, True):
        model = copy.deepcopy(base)
        method = DropBP(model, DropBPArgs(drop_rate=0.5), full_finetuning=kind == "full", calibration_batch_size=2,
                        seed=0)
        method.calibrate(run_context(model, tmp_path, chunked_loss=flag))
        sensitivities[flag], rates[flag] = method.handler.sensitivities, method.handler.drop_rates
        assert all(p.grad is None for p in model.parameters())  # the measurement leaves no gradient behind
    assert calls == [{"recompute": True}]  # only the run with the flag took the chunked path
    assert method.metric == ("gradnorm" if kind == "full" else "grad")
    full, chunked = torch.tensor(sensitivities[False]), torch.tensor(sensitivities[True])
    assert len(full) == 4 and (full > 0).all()
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=0)
    assert rates[True] == rates[False]
