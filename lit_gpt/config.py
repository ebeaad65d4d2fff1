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
    # Llama 3.x frequency scaling, or None: {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"} as in the HF config (see model.rope_frequencies).
    rope_scaling: dict | None = None
    sliding_window: int | None = None  # each token attends to at most this many (itself included); Mistral v0.1
    norm_eps: float = 1e-5
    bias: bool = False  # biases on every linear layer
    attn_bias: bool = False  # a bias on the fused qkv projection only (Qwen2), whatever `bias` says
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
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be at least 1, got {self.sliding_window}")
        if self.rope_scaling is not None:
            # A copy, so that presets and the configs made from them never share one dict.
            self.rope_scaling = check_rope_scaling(dict(self.rope_scaling))

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
            if f.name == "rope_scaling":  # the one field that holds a dict; __post_init__ checks its keys
                if not isinstance(data.get(f.name), dict | None):
                    raise UserError(f"{path}: rope_scaling = {data[f.name]!r} is not an object or null: {hint}")
            elif f.name in data and not _same_kind(data[f.name], f.default):
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
        if model_type not in _HF_MODEL_TYPES:
            raise UserError(f"{path}: model_type {model_type!r} is not a LLaMA-style model; "
                            f"supported: {', '.join(_HF_MODEL_TYPES)}")
        if hf.get("hidden_act", "silu") != "silu":
            raise UserError(f"{path}: hidden_act {hf['hidden_act']!r} is not supported (LLaMA uses silu)")
        rope = hf.get("rope_parameters") or {}
        try:
            rope_scaling = _hf_rope_scaling(hf.get("rope_scaling") or rope)
        except ValueError as e:
            raise UserError(f"{path}: {e}") from None
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
            rope_scaling=rope_scaling,
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            **_hf_family_fields(hf, model_type, path),
        )
        values.update(overrides)
        return cls(**values)

    def save(self, checkpoint_dir: str | Path) -> Path:
        from lit_gpt.utils import atomic_write_text

        return atomic_write_text(Path(checkpoint_dir) / "lit_config.json", json.dumps(asdict(self), indent=2))


_HF_MODEL_TYPES = ("llama", "mistral", "qwen2")


def check_rope_scaling(scaling: dict) -> dict:
    """Validate Llama 3 rope scaling parameters; ValueError names what is wrong."""
    kind = scaling.get("rope_type")
    if kind != "llama3":
        raise ValueError(f"rope scaling of type {kind!r} is not supported (only llama3)")
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        value = scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ValueError(f"llama3 rope scaling needs a positive number {key}, got {value!r}")
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError("llama3 rope scaling needs high_freq_factor > low_freq_factor")
    unknown = sorted(set(scaling) - {"rope_type", "factor", "low_freq_factor", "high_freq_factor",
                                     "original_max_position_embeddings"})
    if unknown:
        raise ValueError(f"llama3 rope scaling has unknown keys: {', '.join(unknown)}")
    return scaling


def _hf_rope_scaling(hf_scaling: dict) -> dict | None:
    """HF's `rope_scaling` (or transformers 5's `rope_parameters`) as this config's `rope_scaling`."""
    kind = hf_scaling.get("rope_type", hf_scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ValueError(f"rope scaling {hf_scaling} is not supported (only llama3)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return check_rope_scaling({"rope_type": "llama3", **{k: hf_scaling.get(k) for k in keys}})


def _hf_family_fields(hf: dict, model_type: str, path: Path) -> dict[str, Any]:
    """Biases and the sliding window, which each HF family spells its own way."""
    if model_type == "qwen2":
        # Qwen2 always has q/k/v biases and nothing else; its sliding window applies only to some layers.
        if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or []):
            raise UserError(f"{path}: Qwen2 sliding-window attention (use_sliding_window) is not supported")
        return dict(bias=False, attn_bias=True)
    attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attention_bias != mlp_bias:  # `bias` puts one on every linear; HF llama can have them on a subset
        raise UserError(f"{path}: attention_bias={attention_bias} with mlp_bias={mlp_bias} is not supported "
                        "(biases go on all linear layers or on none)")
    window = hf.get("sliding_window") if model_type == "mistral" else None
    return dict(bias=attention_bias, sliding_window=window)


# ---------------------------------------------------------------------- presets
# Shapes are the published ones; tests pin their parameter counts to the published totals.
_LLAMA_1 = dict(block_size=2048, vocab_size=32000, norm_eps=1e-6)
_LLAMA_2 = dict(block_size=4096, vocab_size=32000, norm_eps=1e-5)
_SMOLLM2 = dict(block_size=8192, vocab_size=49152, norm_eps=1e-5, tie_embeddings=True)
_LLAMA_3 = dict(block_size=131072, vocab_size=128256, norm_eps=1e-5, rope_base=500000.0, n_query_groups=8)


def _llama3_scaling(factor: float) -> dict:
    return dict(rope_type="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192)


_MISTRAL_7B = dict(block_size=32768, norm_eps=1e-5, n_layer=32, n_head=32, n_query_groups=8, n_embd=4096,
                   intermediate_size=14336)
_QWEN2_5 = dict(vocab_size=151936, norm_eps=1e-6, rope_base=1000000.0, attn_bias=True)


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
    for suffix in ("", "-Instruct"):
        configs += [
            Config(name=f"Llama-3.1-8B{suffix}", hf_repo_id=f"meta-llama/Llama-3.1-8B{suffix}", **_LLAMA_3,
                   rope_scaling=_llama3_scaling(8.0), n_layer=32, n_head=32, n_embd=4096, intermediate_size=14336),
            Config(name=f"Llama-3.2-1B{suffix}", hf_repo_id=f"meta-llama/Llama-3.2-1B{suffix}", **_LLAMA_3,
                   rope_scaling=_llama3_scaling(32.0), tie_embeddings=True,
                   n_layer=16, n_head=32, n_embd=2048, intermediate_size=8192),
            Config(name=f"Llama-3.2-3B{suffix}", hf_repo_id=f"meta-llama/Llama-3.2-3B{suffix}", **_LLAMA_3,
                   rope_scaling=_llama3_scaling(32.0), tie_embeddings=True,
                   n_layer=28, n_head=24, n_embd=3072, head_size=128, intermediate_size=8192),
        ]
    # v0.1 attends over a 4096-token sliding window; v0.2 and v0.3 dropped it for rope_base 1e6.
    for name in ("Mistral-7B-v0.1", "Mistral-7B-Instruct-v0.1"):
        configs.append(Config(name=name, hf_repo_id=f"mistralai/{name}", **_MISTRAL_7B, vocab_size=32000,
                              sliding_window=4096))
    configs.append(Config(name="Mistral-7B-Instruct-v0.2", hf_repo_id="mistralai/Mistral-7B-Instruct-v0.2",
                          **_MISTRAL_7B, vocab_size=32000, rope_base=1000000.0))
    for name in ("Mistral-7B-v0.3", "Mistral-7B-Instruct-v0.3"):
        configs.append(Config(name=name, hf_repo_id=f"mistralai/{name}", **_MISTRAL_7B, vocab_size=32768,
                              rope_base=1000000.0))
    # The 1.5B and 7B base models' config.json allows longer contexts than the Instruct ones (32768).
    for suffix, long_context in (("", 131072), ("-Instruct", 32768)):
        configs += [
            Config(name=f"Qwen2.5-0.5B{suffix}", hf_repo_id=f"Qwen/Qwen2.5-0.5B{suffix}", **_QWEN2_5,
                   block_size=32768, tie_embeddings=True,
                   n_layer=24, n_head=14, n_query_groups=2, n_embd=896, intermediate_size=4864),
            Config(name=f"Qwen2.5-1.5B{suffix}", hf_repo_id=f"Qwen/Qwen2.5-1.5B{suffix}", **_QWEN2_5,
                   block_size=long_context, tie_embeddings=True,
                   n_layer=28, n_head=12, n_query_groups=2, n_embd=1536, intermediate_size=8960),
            Config(name=f"Qwen2.5-7B{suffix}", hf_repo_id=f"Qwen/Qwen2.5-7B{suffix}",
                   **{**_QWEN2_5, "vocab_size": 152064}, block_size=long_context,
                   n_layer=28, n_head=28, n_query_groups=4, n_embd=3584, intermediate_size=18944),
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
    if default is None:  # the optional fields are all counts: padded_vocab_size, n_query_groups, ...
        return value is None or (isinstance(value, int) and not isinstance(value, bool))
    return True


def _kind(default: Any) -> str:
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, int) or default is None:
        return "a whole number" + (" or null" if default is None else "")
    return "a number" if isinstance(default, float) else "a string"
