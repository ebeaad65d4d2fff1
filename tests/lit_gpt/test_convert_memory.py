"""The README's "shards are read tensor by tensor, so a 70B model never sits in RAM twice", measured.

A ~200 MB float32 checkpoint in 8 shards is converted to float16 in a fresh process, whose peak resident memory
the kernel records (tests/helpers/convert_memory_worker.py). Every converted tensor is a
new float16 copy, so the converted state dict (about 100 MB) must be in memory whole before it is saved; reading
lazily adds at most the shard being read. Reading every shard first, as an eager converter does, adds the whole
checkpoint on top: the model then sits in memory twice (float32 and float16).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

WORKER = ROOT / "tests" / "helpers" / "convert_memory_worker.py"
MiB = 2**20
# Allocator transients of the lazy conversion (a layer's q, k and v cast, then fused; freed memory glibc keeps):
# measured 3-18 MiB above the output plus one shard over five runs; an eager read measured 298-313 MiB in all.
TRANSIENTS = 48 * MiB


def write_hf_checkpoint(folder: Path, n_embd: int, intermediate: int, n_layer: int, shards: int) -> int:
    """A LLaMA-shaped float32 HF folder (config.json + `shards` safetensors files); returns its parameter count."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    vocab = 1000
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", vocab_size=vocab,
                  hidden_size=n_embd, intermediate_size=intermediate, num_hidden_layers=n_layer,
                  num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=False)
    (folder / "config.json").write_text(json.dumps(config))
    per_shard, count = n_layer // shards, 0
    for shard in range(shards):
        tensors = {}
        for layer in range(shard * per_shard, (shard + 1) * per_shard):
            prefix = f"model.layers.{layer}."
            for name in ("q", "k", "v", "o"):
                tensors[f"{prefix}self_attn.{name}_proj.weight"] = torch.full((n_embd, n_embd), 0.01)
            tensors[f"{prefix}mlp.gate_proj.weight"] = torch.full((intermediate, n_embd), 0.01)
            tensors[f"{prefix}mlp.up_proj.weight"] = torch.full((intermediate, n_embd), 0.01)
            tensors[f"{prefix}mlp.down_proj.weight"] = torch.full((n_embd, intermediate), 0.01)
            tensors[f"{prefix}input_layernorm.weight"] = torch.ones(n_embd)
            tensors[f"{prefix}post_attention_layernorm.weight"] = torch.ones(n_embd)
        if shard == 0:
            tensors["model.embed_tokens.weight"] = torch.full((vocab, n_embd), 0.01)
        if shard == shards - 1:
            tensors["model.norm.weight"] = torch.ones(n_embd)
            tensors["lm_head.weight"] = torch.full((vocab, n_embd), 0.01)
        save_file(tensors, str(folder / f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"))
        count += sum(t.numel() for t in tensors.values())
    return count


def peak_growth(mode: str, checkpoint_dir: Path, warmup_dir: Path) -> int:
    result = subprocess.run([sys.executable, str(WORKER), mode, str(checkpoint_dir), str(warmup_dir)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])["growth"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS (VmHWM)")
def test_lazy_conversion_holds_the_output_and_one_shard_not_the_model_twice(tmp_path):
    params = write_hf_checkpoint(tmp_path / "big", n_embd=512, intermediate=1376, n_layer=16, shards=8)
    write_hf_checkpoint(tmp_path / "warmup", n_embd=64, intermediate=128, n_layer=16, shards=8)
    shard_bytes = max(f.stat().st_size for f in (tmp_path / "big").glob("*.safetensors"))
    input_bytes = 4 * params
    assert input_bytes > 190 * MiB and shard_bytes < input_bytes / 7  # big enough for the bound to mean something
    output_bytes = 2 * params  # float16
    allowance = peak_growth("empty", tmp_path / "big", tmp_path / "warmup") + TRANSIENTS
    bound = output_bytes + shard_bytes + allowance
    lazy = peak_growth("lazy", tmp_path / "big", tmp_path / "warmup")
    eager = peak_growth("eager", tmp_path / "big", tmp_path / "warmup")
    print(f"peak growth: lazy {lazy / MiB:.0f} MiB, eager {eager / MiB:.0f} MiB, bound {bound / MiB:.0f} MiB "
          f"(output {output_bytes / MiB:.0f}, shard {shard_bytes / MiB:.0f}, allowance {allowance / MiB:.0f})")
    converted = torch.load(tmp_path / "big" / "lit_model.pth", weights_only=True, mmap=True)
    assert sum(t.numel() for t in converted.values()) == params  # it converted everything
    assert {t.dtype for t in converted.values()} == {torch.float16}
    assert lazy < bound
    assert eager > bound + input_bytes / 4  # the harness does see a model held twice
