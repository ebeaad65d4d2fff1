"""bench.gradient_alignment: the comparison with exact gradients is exact where no branch above is dropped."""

from __future__ import annotations

import pytest
import torch

from bench import gradient_alignment
from bench.common import detached_handler, training_model
from lit_gpt import Config
from lit_gpt.utils import UserError


def test_last_mlp_gets_the_exact_gradient_and_lower_branches_a_biased_one(one_thread):
    model = training_model(Config(n_layer=4, n_head=4, n_query_groups=2, n_embd=64, intermediate_size=128,
                                  vocab_size=101, padded_vocab_size=101, block_size=32), "lora", seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.05)
    model.train()
    handler = detached_handler(model, seed=0)
    ids = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(0))
    rows = gradient_alignment.measure(model, handler, ids, ids.clone(), drop_rates=[0.5], draws=6)
    by_branch = {(r["layer"], r["branch"]): r for r in rows if isinstance(r["layer"], int)}
    top = by_branch[(3, "MLP")]  # nothing above it but the head: dropping others cannot bias it
    assert top["cosine"] == pytest.approx(1.0, abs=1e-5) and top["norm_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert min(r["cosine"] for r in by_branch.values()) < 0.999  # a dropped branch above changes a lower gradient
    assert all(-1.0 <= r["cosine"] <= 1.0 + 1e-6 for r in by_branch.values())
    thirds = {r["layer"] for r in rows if not isinstance(r["layer"], int)}
    assert thirds == {"first third", "middle third", "last third"}


def test_bad_flags_fail_clearly(tmp_path):
    with pytest.raises(UserError, match="--drop_rates must lie in"):
        gradient_alignment.main(drop_rates=[1.0], work_dir=tmp_path)
    with pytest.raises(UserError, match="--checkpoint_dir"):
        gradient_alignment.main(model_name="Llama-2-7b-hf", work_dir=tmp_path)
