"""Weight conversion between HF LLaMA-style checkpoints (LLaMA 1-3, Mistral, Qwen2) and lit_gpt's state dict.

HF stores q, k and v as three matrices (and three bias vectors in Qwen2); lit_gpt fuses them into one
`attn.attn` whose rows are grouped per query group. Everything else is a rename (see the table in `_HF_TO_LIT`).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lit_gpt.config import PRESETS, Config
from lit_gpt.utils import (
    UserError,
    atomic_save,
    check_checkpoint_dir,
    load_state_dict,
    parse_dtype,
)

# Per-layer HF suffix -> lit suffix. q/k/v are fused separately.
_HF_TO_LIT = {
    "input_layernorm": "norm_1",
    "post_attention_layernorm": "norm_2",
    "self_attn.o_proj": "attn.proj",
    "mlp.gate_proj": "mlp.fc_1",
    "mlp.up_proj": "mlp.fc_2",
    "mlp.down_proj": "mlp.proj",
}
_HF_TOP_LEVEL = {"model.embed_tokens": "transformer.wte", "model.norm": "transformer.ln_f", "lm_head": "lm_head"}
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_READ_ERRORS = (SafetensorError, RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError)


# ---------------------------------------------------------------------- whole checkpoints
def resolve_config(checkpoint_dir: Path, model_name: str | None) -> Config:
    """A named preset when asked for or when the folder is named like one, else the folder's config.json."""
    if model_name is not None:
        return Config.from_name(model_name)
    if checkpoint_dir.name in {c.name for c in PRESETS}:
        return Config.from_name(checkpoint_dir.name)
    if (checkpoint_dir / "config.json").is_file():
        return Config.from_hf_config(checkpoint_dir / "config.json", name=checkpoint_dir.name)
    raise UserError(
        f"cannot tell which model {checkpoint_dir} holds: it has no config.json and its name is not a preset; "
        f"pass --model_name (e.g. Llama-2-7b-hf)"
    )


def convert_hf_checkpoint(checkpoint_dir: Path, model_name: str | None = None, dtype: str | None = None) -> Config:
    """Read the HF shards lazily and write `lit_model.pth` and `lit_config.json` atomically (see `setup`)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise UserError(
            f"checkpoint_dir {str(checkpoint_dir)!r} does not exist: download a model first with "
            f"`python scripts/download.py --repo_id ORG/NAME`"
        )
    config = resolve_config(checkpoint_dir, model_name)
    files = hf_weight_files(checkpoint_dir)
    state_dict = convert_hf_state_dict(iter_hf_tensors(files), config, parse_dtype(dtype))
    check_matches_config(state_dict, config)
    atomic_save(state_dict, checkpoint_dir / "lit_model.pth")
    config.save(checkpoint_dir)
    return config



def convert_lit_checkpoint(checkpoint_dir: Path, output_dir: Path, checkpoint_file: Path | None = None,
                           max_shard_size: str | int = "5GB") -> Path:
    """Write an HF folder for `transformers.AutoModelForCausalLM`: shards, config and tokenizer files (see `setup`).

    Returns `model.safetensors`, or `model.safetensors.index.json` when the weights took several shards.
    """
    from lit_gpt.hf_folder import check_output_dir, write_hf_folder

    checkpoint_dir = check_checkpoint_dir(Path(checkpoint_dir), needs=("lit_config.json",))
    config = Config.from_checkpoint(checkpoint_dir)
    if config.parallel_residual or config.norm_class_name != "RMSNorm" or config.mlp_class_name != "LLaMAMLP":
        raise UserError(f"{config.name} is not a LLaMA architecture; only LLaMA checkpoints convert to HF")
    weights = Path(checkpoint_file) if checkpoint_file else checkpoint_dir / "lit_model.pth"
    if not weights.is_file():
        raise UserError(f"{weights} does not exist: pass --checkpoint_file or convert the model first")
    check_output_dir(output_dir, checkpoint_dir)  # before any weight is read
    hf_state_dict = convert_lit_state_dict(load_state_dict(weights), config)
    dtype = next(iter(hf_state_dict.values())).dtype if hf_state_dict else torch.float32
    folder = write_hf_folder(hf_state_dict, hf_config_dict(config, dtype), output_dir, checkpoint_dir, max_shard_size)
    single = folder / "model.safetensors"  # the weights file when they fit one shard, else the shards' index
    return single if single.is_file() else folder / "model.safetensors.index.json"



# ---------------------------------------------------------------------- reading HF shards lazily
@dataclass
class LazyTensor:
    """A tensor in a checkpoint shard, read only when `load()` is called."""

    name: str
    file: Path
    load: Callable[[], torch.Tensor]


def hf_weight_files(checkpoint_dir: Path) -> list[Path]:
    """The shard files of an HF checkpoint: safetensors when present, else PyTorch .bin files."""
    files = sorted(checkpoint_dir.glob("*.safetensors")) or sorted(checkpoint_dir.glob("pytorch_model*.bin"))
    if not files:
        raise UserError(
            f"{checkpoint_dir} has no *.safetensors or pytorch_model*.bin weights: download them with "
            f"`python scripts/download.py --repo_id ORG/NAME`"
        )
    return files


def iter_hf_tensors(files: list[Path]) -> Iterator[LazyTensor]:
    for file in files:
        try:
            if file.suffix == ".safetensors":
                handle = safe_open(str(file), framework="pt")
                for name in handle.keys():
                    yield LazyTensor(name, file, _reader(handle.get_tensor, name, file))
            else:
                # mmap keeps a 70B .bin shard on disk; only the tensors we touch are read.
                shard = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
                for name in list(shard):
                    yield LazyTensor(name, file, _reader(shard.pop, name, file))
        except _READ_ERRORS as e:
            raise _corrupt(file, e) from None


def _reader(get: Callable[[str], torch.Tensor], name: str, file: Path) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        try:
            return get(name)
        except _READ_ERRORS as e:
            raise _corrupt(file, e) from None

    return load


def _corrupt(file: Path, error: BaseException) -> UserError:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return UserError(f"could not read {file}: it is truncated or corrupt ({reason}); download it again")


# ---------------------------------------------------------------------- HF -> lit
def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: Config) -> torch.Tensor:
    """Interleave per query group: [q heads of group 0, k0, v0, q heads of group 1, k1, v1, ...]."""
    q_rows = config.q_per_kv * config.head_size
    groups = [
        torch.cat((q[g * q_rows : (g + 1) * q_rows], k[g * config.head_size : (g + 1) * config.head_size],
                   v[g * config.head_size : (g + 1) * config.head_size]))
        for g in range(config.n_query_groups)
    ]
    return torch.cat(groups)


def split_qkv(qkv: torch.Tensor, config: Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `fuse_qkv`."""
    grouped = qkv.reshape(config.n_query_groups, config.q_per_kv + 2, config.head_size, *qkv.shape[1:])
    q = grouped[:, : config.q_per_kv].reshape(-1, *qkv.shape[1:])
    k = grouped[:, config.q_per_kv].reshape(-1, *qkv.shape[1:])
    v = grouped[:, config.q_per_kv + 1].reshape(-1, *qkv.shape[1:])
    return q, k, v


def convert_hf_state_dict(
    tensors: Iterator[LazyTensor], config: Config, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Map HF tensors to lit names, loading each one once and holding q/k/v only until fused."""
    lit: dict[str, torch.Tensor] = {}
    pending_qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for tensor in tensors:
        name = tensor.name
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and config.tie_embeddings):
            continue
        layer = _LAYER_KEY.match(name)
        if layer:
            index, module, kind = int(layer.group(1)), layer.group(2), layer.group(3)
            if module in _QKV:
                parts = pending_qkv.setdefault((index, kind), {})
                parts[module] = _cast(tensor.load(), dtype)
                if len(parts) == 3:
                    lit[f"transformer.h.{index}.attn.attn.{kind}"] = fuse_qkv(*(parts[m] for m in _QKV), config)
                    del pending_qkv[(index, kind)]
                continue
            if module not in _HF_TO_LIT:
                raise _unexpected(name, tensor.file)
            lit[f"transformer.h.{index}.{_HF_TO_LIT[module]}.{kind}"] = _cast(tensor.load(), dtype)
            continue
        prefix, _, kind = name.rpartition(".")
        if prefix not in _HF_TOP_LEVEL:
            raise _unexpected(name, tensor.file)
        value = _cast(tensor.load(), dtype)
        if prefix in ("model.embed_tokens", "lm_head"):
            value = _pad_vocab(value, config.padded_vocab_size)
        lit[f"{_HF_TOP_LEVEL[prefix]}.{kind}"] = value
    if pending_qkv:
        (index, _), parts = next(iter(pending_qkv.items()))
        missing = sorted(set(_QKV) - set(parts))
        raise UserError(f"layer {index} is missing {', '.join(missing)}: the checkpoint is incomplete; "
                        "download it again")
    return lit


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor if dtype is None else tensor.to(dtype)


def _pad_vocab(weight: torch.Tensor, rows: int) -> torch.Tensor:
    if weight.size(0) >= rows:
        return weight
    return torch.cat((weight, weight.new_zeros(rows - weight.size(0), *weight.shape[1:])))


def _unexpected(name: str, file: Path) -> UserError:
    return UserError(f"unexpected tensor {name!r} in {file}: only LLaMA-style checkpoints can be converted")


def check_matches_config(state_dict: dict[str, torch.Tensor], config: Config) -> None:
    """Compare names and shapes against `GPT(config)` built on the meta device (no memory)."""
    from lit_gpt.model import GPT

    with torch.device("meta"):
        expected = {k: v.shape for k, v in GPT(config).state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k]]
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        raise UserError(
            f"the weights do not fit config {config.name!r} ({detail}); pass the right --model_name "
            f"or remove it to use the folder's config.json"
        )


# ---------------------------------------------------------------------- lit -> HF
def convert_lit_state_dict(state_dict: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    lit_to_hf = {v: k for k, v in _HF_TO_LIT.items()}
    top_level = {v: k for k, v in _HF_TOP_LEVEL.items()}
    hf: dict[str, torch.Tensor] = {}
    for name, value in state_dict.items():
        prefix, _, kind = name.rpartition(".")
        layer = re.match(r"transformer\.h\.(\d+)\.(.+)$", prefix)
        if layer is None:
            if prefix not in top_level:
                raise UserError(f"unexpected tensor {name!r} in the lit checkpoint")
            if prefix in ("transformer.wte", "lm_head"):
                value = value[: config.vocab_size]
            hf[f"{top_level[prefix]}.{kind}"] = value
            continue
        index, module = int(layer.group(1)), layer.group(2)
        if module == "attn.attn":
            for hf_module, part in zip(_QKV, split_qkv(value, config)):
                hf[f"model.layers.{index}.{hf_module}.{kind}"] = part
        elif module in lit_to_hf:
            hf[f"model.layers.{index}.{lit_to_hf[module]}.{kind}"] = value
        else:
            raise UserError(f"unexpected tensor {name!r} in the lit checkpoint")
    return {k: v.contiguous() for k, v in hf.items()}


def hf_config_dict(config: Config, dtype: torch.dtype) -> dict:
    """An HF `config.json` describing `config`: Qwen2 for a qkv-only bias, Mistral for a sliding window, else LLaMA."""
    family = _hf_family(config)
    hf = {
        "architectures": [f"{family}ForCausalLM"],
        "model_type": family.lower(),
        "hidden_act": "silu",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_query_groups,
        "head_dim": config.head_size,
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if config.rope_scaling is not None:
        hf["rope_scaling"] = dict(config.rope_scaling)
    if family == "Llama":
        hf.update(attention_bias=config.bias, mlp_bias=config.bias)
    elif family == "Mistral":
        hf["sliding_window"] = config.sliding_window
    else:  # Qwen2's q/k/v biases are built in; its sliding window stays off
        hf.update(use_sliding_window=False, sliding_window=None)
    return hf


def _hf_family(config: Config) -> str:
    """The transformers architecture that computes what `config` does."""
    if config.attn_bias and not config.bias:
        if config.sliding_window is not None:
            raise UserError(f"{config.name}: no transformers model has both a qkv-only bias and a sliding window")
        return "Qwen2"
    if config.sliding_window is not None:
        if config.bias:
            raise UserError(f"{config.name}: transformers' Mistral has no biases; this model cannot be exported")
        return "Mistral"
    return "Llama"
