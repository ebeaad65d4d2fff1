"""Model configuration: one dataclass, named presets, and construction from HF or lit JSON files."""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

from lit_gpt.utils import UserError, read_json_object


@dataclass
class Config:
    name: str = ""
    hf_repo_id: str = ""  # "org/name" on the HF hub, used by scripts/download.py
    block_size: int = 4096  # longest sequence the model was trained on (max_position_embeddings)
    vocab_size: int = 32000
    padded_vocab_size: int | None = None  # rows of the embedding/head; defaults to vocab_size
    n_layer: int = 32
    n_head: int = 32
    n_embd: int = 4096
    n_query_groups: int | None = None  # = n_head for MHA, 1 for MQA, in between for GQA
    head_size: int | None = None  # defaults to n_embd // n_head
    intermediate_size: int = 11008
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    bias: bool = False
    parallel_residual: bool = False  # x + attn(norm_1(x)) + mlp(norm_2(x)) instead of sequential
    tie_embeddings: bool = False  # the head reuses the token embedding matrix
    norm_class_name: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    mlp_class_name: Literal["LLaMAMLP", "GptNeoxMLP"] = "LLaMAMLP"

    def __post_init__(self) -> None:
        if self.padded_vocab_size is None:
            self.padded_vocab_size = self.vocab_size
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.head_size is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
            self.head_size = self.n_embd // self.n_head
        if self.n_head % self.n_query_groups:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_query_groups={self.n_query_groups}")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError("padded_vocab_size must be at least vocab_size")

    # ------------------------------------------------------------------ derived sizes
    @property
    def q_per_kv(self) -> int:
        """Query heads that share one key/value head."""
        return self.n_head // self.n_query_groups

    @property
    def qkv_size(self) -> int:
        """Output rows of the fused qkv projection."""
        return (self.n_head + 2 * self.n_query_groups) * self.head_size

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Config:
        """A preset by its short name ("Llama-2-7b-hf") or HF repo id ("meta-llama/Llama-2-7b-hf")."""
        preset = _PRESETS_BY_NAME.get(name) or _PRESETS_BY_REPO_ID.get(name)
        if preset is None:
            known = sorted(_PRESETS_BY_NAME)
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else f" Known names: {', '.join(known)}."
            raise UserError(f"unknown model name {name!r}.{hint}")
        return replace(preset, **overrides)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> Config:
        """Load a `lit_config.json` written by `Config.save`."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {str(path)!r} does not exist")
        hint = "convert the checkpoint again (scripts/convert_hf_checkpoint.py)"
        data = read_json_object(path, hint)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"{path} has fields this version does not know: {', '.join(unknown)}")
        data.update(overrides)
        for f in fields(cls):  # a value of the wrong type would fail later, deep inside the model
            if f.name in data and not _same_kind(data[f.name], f.default):
                raise UserError(f"{path}: {f.name} = {data[f.name]!r} is not {_kind(f.default)}: {hint}")
        try:
            return cls(**data)
        except (TypeError, ValueError, ZeroDivisionError) as e:
            raise UserError(f"{path} does not describe a model ({str(e).splitlines()[0] if str(e) else e!r}): "
                            f"{hint}") from None

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, **overrides: Any) -> Config:
        """The config of a converted checkpoint folder (its lit_config.json)."""
        return cls.from_file(Path(checkpoint_dir) / "lit_config.json", **overrides)

    @classmethod
    def from_hf_config(cls, path: str | Path, name: str = "", **overrides: Any) -> Config:
        """Build a config from an HF LLaMA-style `config.json`, so unknown checkpoints still convert."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"HF config {str(path)!r} does not exist")
        hf = read_json_object(path, "download the model's config.json again")
        model_type = hf.get("model_type", "llama")
        if model_type not in ("llama", "mistral"):
            raise UserError(f"{path}: model_type {model_type!r} is not a LLaMA-style model; only llama is supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise UserError(f"{path}: hidden_act {hf['hidden_act']!r} is not supported (LLaMA uses silu)")
        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling:
            raise UserError(f"{path}: rope scaling {scaling} is not supported yet")
        n_head = hf["num_attention_heads"]
        values = dict(
            name=name or path.parent.name,
            block_size=hf.get("max_position_embeddings", 4096),
            vocab_size=hf["vocab_size"],
            n_layer=hf["num_hidden_layers"],
            n_head=n_head,
            n_embd=hf["hidden_size"],
            n_query_groups=hf.get("num_key_value_heads") or n_head,
            head_size=hf.get("head_dim") or hf["hidden_size"] // n_head,
            intermediate_size=hf["intermediate_size"],
            rope_base=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            bias=bool(hf.get("attention_bias", False)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
        values.update(overrides)
        return cls(**values)

    def save(self, checkpoint_dir: str | Path) -> Path:
        from lit_gpt.utils import atomic_write_text

        return atomic_write_text(Path(checkpoint_dir) / "lit_config.json", json.dumps(asdict(self), indent=2))


# ---------------------------------------------------------------------- presets
# Shapes are the published ones; tests pin their parameter counts to the published totals.
_LLAMA_1 = dict(block_size=2048, vocab_size=32000, norm_eps=1e-6)
_LLAMA_2 = dict(block_size=4096, vocab_size=32000, norm_eps=1e-5)
_SMOLLM2 = dict(block_size=8192, vocab_size=49152, norm_eps=1e-5, tie_embeddings=True)


def _presets() -> list[Config]:
    configs = []
    for kind in ("hf", "chat-hf"):
        configs += [
            Config(name=f"Llama-2-7b-{kind}", hf_repo_id=f"meta-llama/Llama-2-7b-{kind}", **_LLAMA_2,
                   n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008),
            Config(name=f"Llama-2-13b-{kind}", hf_repo_id=f"meta-llama/Llama-2-13b-{kind}", **_LLAMA_2,
                   n_layer=40, n_head=40, n_embd=5120, intermediate_size=13824),
            Config(name=f"Llama-2-70b-{kind}", hf_repo_id=f"meta-llama/Llama-2-70b-{kind}", **_LLAMA_2,
                   n_layer=80, n_head=64, n_query_groups=8, n_embd=8192, intermediate_size=28672),
        ]
    configs += [
        Config(name="llama-7b", hf_repo_id="huggyllama/llama-7b", **_LLAMA_1,
               n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008),
        Config(name="llama-13b", hf_repo_id="huggyllama/llama-13b", **_LLAMA_1,
               n_layer=40, n_head=40, n_embd=5120, intermediate_size=13824),
        Config(name="llama-30b", hf_repo_id="huggyllama/llama-30b", **_LLAMA_1,
               n_layer=60, n_head=52, n_embd=6656, intermediate_size=17920),
        Config(name="llama-65b", hf_repo_id="huggyllama/llama-65b", **{**_LLAMA_1, "norm_eps": 1e-5},
               n_layer=80, n_head=64, n_embd=8192, intermediate_size=22016),
    ]
    tinyllama = dict(block_size=2048, vocab_size=32000, norm_eps=1e-5,
                     n_layer=22, n_head=32, n_query_groups=4, n_embd=2048, intermediate_size=5632)
    configs += [
        Config(name="TinyLlama-1.1B-intermediate-step-1431k-3T",
               hf_repo_id="TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", **tinyllama),
        Config(name="TinyLlama-1.1B-Chat-v1.0", hf_repo_id="TinyLlama/TinyLlama-1.1B-Chat-v1.0", **tinyllama),
    ]
    for suffix in ("", "-Instruct"):
        configs += [
            Config(name=f"SmolLM2-135M{suffix}", hf_repo_id=f"HuggingFaceTB/SmolLM2-135M{suffix}", **_SMOLLM2,
                   n_layer=30, n_head=9, n_query_groups=3, n_embd=576, intermediate_size=1536, rope_base=100000.0),
            Config(name=f"SmolLM2-360M{suffix}", hf_repo_id=f"HuggingFaceTB/SmolLM2-360M{suffix}", **_SMOLLM2,
                   n_layer=32, n_head=15, n_query_groups=5, n_embd=960, intermediate_size=2560, rope_base=100000.0),
            Config(name=f"SmolLM2-1.7B{suffix}", hf_repo_id=f"HuggingFaceTB/SmolLM2-1.7B{suffix}", **_SMOLLM2,
                   n_layer=24, n_head=32, n_embd=2048, intermediate_size=8192, rope_base=130000.0),
        ]
    return configs


PRESETS: list[Config] = _presets()
_PRESETS_BY_NAME = {c.name: c for c in PRESETS}
_PRESETS_BY_REPO_ID = {c.hf_repo_id: c for c in PRESETS}
# "TinyLlama-1.1B" is the short name the docs use for the base model.
_PRESETS_BY_NAME["TinyLlama-1.1B"] = replace(_PRESETS_BY_NAME["TinyLlama-1.1B-intermediate-step-1431k-3T"])


def _same_kind(value: Any, default: Any) -> bool:
    """Whether a JSON value fits a field whose default is `default`."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if default is None:  # the optional fields are all counts: padded_vocab_size, n_query_groups, head_size
        return value is None or (isinstance(value, int) and not isinstance(value, bool))
    return True


def _kind(default: Any) -> str:
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, int) or default is None:
        return "a whole number" + (" or null" if default is None else "")
    return "a number" if isinstance(default, float) else "a string"
