"""Convert a llama.cpp GGUF file (any quantization the `gguf` package reads) into a lit checkpoint folder.

The weights are dequantized to floats, one tensor at a time, and written as `lit_model.pth`; the model
shape comes from the `llama.*` (LLaMA 1-3, Mistral) or `qwen2.*` metadata, and the tokenizer stored in the
file is rebuilt as a `tokenizer.json` (byte-level BPE) or `tokenizer.model` (SentencePiece) next to it.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lit_gpt.config import Config, check_rope_scaling
from lit_gpt.convert import fuse_qkv
from lit_gpt.utils import UserError, atomic_path, atomic_save, atomic_write_text

# Per-layer GGUF tensor -> lit module. attn_q/attn_k/attn_v are fused into attn.attn separately.
_LAYER_TENSORS = {
    "attn_norm": "norm_1",
    "attn_output": "attn.proj",
    "ffn_norm": "norm_2",
    "ffn_gate": "mlp.fc_1",
    "ffn_up": "mlp.fc_2",
    "ffn_down": "mlp.proj",
}
_TOP_LEVEL_TENSORS = {"token_embd": "transformer.wte", "output_norm": "transformer.ln_f", "output": "lm_head"}
_QKV = ("attn_q", "attn_k", "attn_v")
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
# Llama 3's rope scaling is stored as this tensor: one divisor per rotary frequency, not as metadata.
_ROPE_FREQS = "rope_freqs.weight"
# llama.cpp's converter reorders q and k rows for the llama architecture only; qwen2 keeps HF's order.
_ARCHITECTURES = ("llama", "qwen2")

# The split regexes of the tokenizer.json files that GGUF's `tokenizer.ggml.pre` names (Llama 3: digits in
# threes; Qwen2: digits one by one), run before the byte-level step as those files do.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")
_SPLIT_REGEXES = {**dict.fromkeys(_LLAMA3_PRE, _LLAMA3_SPLIT), "qwen2": _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")}

# llama.cpp's token types (gguf.TokenType); SentencePiece numbers its piece types the same way.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("reading GGUF files needs the gguf package: pip install gguf") from None
    return gguf


# ---------------------------------------------------------------------- whole file
def convert_gguf_checkpoint(gguf_path: Path, checkpoint_dir: Path, dtype: torch.dtype | None = None) -> Config:
    """Write `lit_model.pth`, `lit_config.json` and the tokenizer files of a llama/qwen2 GGUF into `checkpoint_dir`.

    Tokenizer files already in `checkpoint_dir` are replaced by the ones the GGUF file holds.

    `dtype` defaults to the file's own float type for F16/BF16 files and to float32 for quantized ones.
    """
    gguf_path, checkpoint_dir = Path(gguf_path), Path(checkpoint_dir)
    reader = open_gguf(gguf_path)
    config = config_from_gguf(reader, name=checkpoint_dir.name)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    # The tokenizer is cheap and validates the file's vocabulary before the long weight conversion.
    write_gguf_tokenizer(reader, checkpoint_dir)
    state_dict = convert_gguf_tensors(reader, config, dtype or default_dtype(reader))
    _check_fits_model(state_dict, config, gguf_path)
    atomic_save(state_dict, checkpoint_dir / "lit_model.pth")
    config.save(checkpoint_dir)
    return config


def open_gguf(gguf_path: Path):
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        problem = "is a folder" if gguf_path.is_dir() else "does not exist"
        raise UserError(f"GGUF file {str(gguf_path)!r} {problem}: pass the path of a downloaded .gguf file")
    gguf = _gguf()
    try:
        return gguf.GGUFReader(gguf_path)
    except (OSError, ValueError, IndexError, KeyError, EOFError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"could not read {gguf_path} as GGUF ({reason}): it is truncated or not a GGUF file") from None


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


# ---------------------------------------------------------------------- metadata -> Config
def config_from_gguf(reader, name: str = "") -> Config:
    """The model shape from the `<architecture>.*` metadata; the tensors decide vocabulary rows and tying."""
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise UserError(f"GGUF architecture {arch!r} is not supported: only {' and '.join(_ARCHITECTURES)} "
                        "models convert")
    if _field(reader, f"{arch}.expert_count", 0):
        raise UserError("mixture-of-experts GGUFs (Mixtral, Qwen2-MoE) are not supported")
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise UserError(f"rope scaling ({scaling}) is not supported; only Llama 3's (a rope_freqs tensor) is")

    def required(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise UserError(f"the GGUF file has no {arch}.{key} metadata: it is incomplete; download it again")
        return value

    n_embd, n_head = int(required("embedding_length")), int(required("attention.head_count"))
    head_size = int(_field(reader, f"{arch}.attention.key_length", n_embd // n_head))
    rope_dims = int(_field(reader, f"{arch}.rope.dimension_count", head_size))
    if rope_dims != head_size:
        raise UserError(f"partial rotary embeddings ({rope_dims} of {head_size} dims) are not supported")
    embedding_rows = int(_tensor(reader, "token_embd.weight").shape[-1])  # ggml shape: (n_embd, rows)
    vocab_size = _field(reader, f"{arch}.vocab_size")
    if vocab_size is None:  # older files and qwen2: the vocabulary is the token list
        vocab_size = len(_field(reader, "tokenizer.ggml.tokens") or []) or embedding_rows
    if vocab_size > embedding_rows:
        raise UserError(f"the GGUF file lists {vocab_size} tokens but embeds only {embedding_rows}: it is corrupt")
    rope_base = _float32_value(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    window = _field(reader, f"{arch}.attention.sliding_window")
    return Config(
        name=name,
        block_size=int(_field(reader, f"{arch}.context_length", 4096)),
        vocab_size=int(vocab_size),
        padded_vocab_size=embedding_rows,
        n_layer=int(required("block_count")),
        n_head=n_head,
        n_embd=n_embd,
        n_query_groups=int(_field(reader, f"{arch}.attention.head_count_kv", n_head)),
        head_size=head_size,
        intermediate_size=int(required("feed_forward_length")),
        rope_base=rope_base,
        rope_scaling=_rope_scaling(reader, arch, head_size, rope_base),
        sliding_window=int(window) if window else None,
        norm_eps=_float32_value(required("attention.layer_norm_rms_epsilon")),
        attn_bias="blk.0.attn_q.bias" in _tensor_names(reader),
        tie_embeddings="output.weight" not in _tensor_names(reader),
    )


def _rope_scaling(reader, arch: str, head_size: int, rope_base: float) -> dict | None:
    """Llama 3's rope scaling parameters, recovered from the per-frequency divisors in `rope_freqs.weight`.

    The divisors are 1 for short wavelengths, `factor` for long ones, and 1 / ((1 - s) / factor + s) in between,
    where s is linear in context / wavelength; two in-between frequencies fix the line, hence the parameters
    (with fewer, Meta's ratio high_freq_factor / low_freq_factor = 4 is assumed).
    Only the ratios context / low_freq_factor and context / high_freq_factor matter, so the context is taken
    from the metadata, or is 8192 as llama.cpp's converter assumes. The result is checked against the tensor.
    """
    from lit_gpt.model import rope_frequencies

    if _ROPE_FREQS not in _tensor_names(reader):
        return None
    divisors = dequantize_tensor(_tensor(reader, _ROPE_FREQS)).flatten().double()
    if divisors.numel() != head_size // 2:
        raise UserError(f"{_ROPE_FREQS} has {divisors.numel()} values for {head_size // 2} rotary frequencies: "
                        "the GGUF file is corrupt")
    factor = divisors.max().item()
    if factor == 1.0:
        return None
    context = int(_field(reader, f"{arch}.rope.scaling.original_context_length", 8192))
    wavelengths = 2 * math.pi / rope_frequencies(head_size, rope_base).double()
    between = (divisors > 1) & (divisors < factor)
    x = context / wavelengths[between]
    s = (1 / divisors[between] - 1 / factor) / (1 - 1 / factor)
    if len(x) >= 2:
        slope, intercept = np.polyfit(x.numpy(), s.numpy(), 1)
        low, high = -intercept / slope, (1 - intercept) / slope
    elif len(x) == 1:  # one equation for two unknowns: assume Meta's high_freq_factor = 4 * low_freq_factor
        low = (x[0] / (3 * s[0] + 1)).item()
        high = 4 * low
    else:  # nothing in between to tell: Meta's values, if they fit
        low, high = 1.0, 4.0
    scaling = dict(rope_type="llama3", factor=_rounded(factor), low_freq_factor=_rounded(low),
                   high_freq_factor=_rounded(high), original_max_position_embeddings=context)
    try:
        implied = rope_frequencies(head_size, rope_base) / rope_frequencies(head_size, rope_base,
                                                                            check_rope_scaling(scaling))
    except ValueError:  # the fit gave no valid parameters (high_freq_factor <= low_freq_factor, ...)
        implied = None
    if implied is None or not torch.allclose(implied.double(), divisors, rtol=1e-4, atol=0):
        raise UserError(f"the {_ROPE_FREQS} tensor does not follow Llama 3's rope scaling; this rope scaling "
                        "is not supported")
    return scaling


def _rounded(value: float) -> float:
    """Undo float32 storage noise in fitted parameters: 3.9999998 -> 4.0."""
    return float(f"{value:.6g}")


def _float32_value(value: float) -> float:
    """GGUF stores floats as float32: read back 1e-5, not 9.999999747378752e-06."""
    return float(str(np.float32(value)))


def _tensor_names(reader) -> set[str]:
    return {t.name for t in reader.tensors}


def _tensor(reader, name: str):
    for tensor in reader.tensors:
        if tensor.name == name:
            return tensor
    raise UserError(f"the GGUF file has no {name} tensor: it is incomplete; download it again")


# ---------------------------------------------------------------------- tensors -> lit state dict
def default_dtype(reader) -> torch.dtype:
    """Keep F16/BF16 files in their type; quantized (or mixed) files dequantize to float32."""
    gguf = _gguf()
    matrix_types = {t.tensor_type for t in reader.tensors if len(t.shape) == 2}
    if matrix_types == {gguf.GGMLQuantizationType.F16}:
        return torch.float16
    if matrix_types == {gguf.GGMLQuantizationType.BF16}:
        return torch.bfloat16
    return torch.float32


def dequantize_tensor(tensor) -> torch.Tensor:
    """A GGUF tensor as a float32 torch tensor in PyTorch's (out_features, in_features) order."""
    gguf = _gguf()
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise UserError(
            f"tensor {tensor.name} is stored as {tensor.tensor_type.name}, which this gguf package cannot "
            f"dequantize: pip install -U gguf, or use a file with another quantization"
        ) from None
    shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml lists dimensions innermost first
    # Copy out of the read-only memory map; the copy is the one this tensor will keep.
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))


def unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order (Meta's interleaved RoPE pairs) into HF's rotate-half order.

    Works on weights (rows, columns) and biases (rows,) alike.
    """
    rows, rest = weight.shape[0], weight.shape[1:]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *rest).transpose(1, 2).reshape(weight.shape)


def convert_gguf_tensors(reader, config: Config, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Dequantize tensor by tensor into lit names, holding a layer's q and k only until v arrives."""
    permuted = _field(reader, "general.architecture") == "llama"
    lit: dict[str, torch.Tensor] = {}
    pending_qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for tensor in reader.tensors:
        name = tensor.name
        if name == _ROPE_FREQS:  # read into the config (`_rope_scaling`)
            continue
        layer = _LAYER_NAME.match(name)
        if layer is None:
            prefix = name.removesuffix(".weight")
            if prefix not in _TOP_LEVEL_TENSORS or not name.endswith(".weight"):
                raise _unexpected(name)
            lit[f"{_TOP_LEVEL_TENSORS[prefix]}.weight"] = dequantize_tensor(tensor).to(dtype)
            continue
        index, kind, suffix = int(layer.group(1)), layer.group(2), layer.group(3)
        if kind in _QKV:
            parts = pending_qkv.setdefault((index, suffix), {})
            value = dequantize_tensor(tensor)
            parts[kind] = (_unpermuted(value, kind, config) if permuted else value).to(dtype)
            if len(parts) == 3:
                lit[f"transformer.h.{index}.attn.attn.{suffix}"] = fuse_qkv(*(parts[k] for k in _QKV), config)
                del pending_qkv[(index, suffix)]
        elif kind in _LAYER_TENSORS:
            lit[f"transformer.h.{index}.{_LAYER_TENSORS[kind]}.{suffix}"] = dequantize_tensor(tensor).to(dtype)
        else:
            raise _unexpected(name)
    if pending_qkv:
        (index, _), parts = next(iter(pending_qkv.items()))
        missing = ", ".join(sorted(set(_QKV) - set(parts)))
        raise UserError(f"layer {index} of the GGUF file has no {missing}: the file is incomplete; download it again")
    return lit


def _unpermuted(weight: torch.Tensor, kind: str, config: Config) -> torch.Tensor:
    if kind == "attn_q":
        return unpermute_rope_rows(weight, config.n_head)
    if kind == "attn_k":
        return unpermute_rope_rows(weight, config.n_query_groups)
    return weight  # v carries no rotary embedding, so llama.cpp leaves it alone


def _unexpected(name: str) -> UserError:
    return UserError(f"unexpected tensor {name!r} in the GGUF file: only plain llama and qwen2 models convert")


def _check_fits_model(state_dict: dict[str, torch.Tensor], config: Config, gguf_path: Path) -> None:
    """Names and shapes must match `GPT(config)` exactly (built on the meta device, so free)."""
    from lit_gpt.model import GPT

    with torch.device("meta"):
        expected = {k: v.shape for k, v in GPT(config).state_dict().items()}
    problems = [f"missing {k}" for k in sorted(set(expected) - set(state_dict))]
    problems += [f"unexpected {k}" for k in sorted(set(state_dict) - set(expected))]
    problems += [f"{k} has shape {tuple(state_dict[k].shape)}, not {tuple(shape)}"
                 for k, shape in expected.items() if k in state_dict and state_dict[k].shape != shape]
    if problems:
        raise UserError(f"the tensors of {gguf_path} do not fit its metadata ({'; '.join(problems[:3])})")


# ---------------------------------------------------------------------- tokenizer
def write_gguf_tokenizer(reader, checkpoint_dir: Path) -> list[Path]:
    """Rebuild the tokenizer stored in the GGUF file, plus tokenizer_config.json and generation_config.json."""
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    model = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if model is None or not tokens:
        raise UserError(
            "the GGUF file holds no tokenizer: copy tokenizer.json or tokenizer.model from the original model"
        )
    token_types = _field(reader, "tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if model == "gpt2":
        tokenizer_file = _write_byte_level_bpe(reader, tokens, token_types, checkpoint_dir / "tokenizer.json")
    elif model == "llama":
        tokenizer_file = _write_sentencepiece(reader, tokens, token_types, checkpoint_dir / "tokenizer.model")
    else:
        raise UserError(f"GGUF tokenizer model {model!r} is not supported: only gpt2 (BPE) and llama (SentencePiece)")
    return [tokenizer_file, *_write_tokenizer_configs(reader, model, tokens, checkpoint_dir)]


def _write_byte_level_bpe(reader, tokens: list[str], token_types: list[int], path: Path) -> Path:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    # Merges are stored as "left right"; byte-level tokens spell spaces as "Ġ", so one split is safe.
    merges = [tuple(merge.split(" ", 1)) for merge in _field(reader, "tokenizer.ggml.merges") or []]
    vocab = {token: index for index, token in enumerate(tokens)}
    pre = _field(reader, "tokenizer.ggml.pre")
    # Llama 3's tokenizer.json takes a whole word from the vocabulary before trying merges (as llama.cpp does).
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                                     ignore_merges=pre in _LLAMA3_PRE))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # SmolLM2 (like StarCoder) splits every digit on its own before the GPT-2 regex.
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _SPLIT_REGEXES:
        split = pre_tokenizers.Split(Regex(_SPLIT_REGEXES[pre]), behavior="isolated", invert=False)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        if pre == "qwen2":
            tokenizer.normalizer = normalizers.NFC()
    else:
        if pre not in (None, "default", "gpt-2"):
            warnings.warn(f"GGUF pre-tokenizer {pre!r} is approximated by GPT-2's split; a few texts may "
                          f"tokenize differently than with the original tokenizer.json", stacklevel=2)
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    # Without this, "<|im_start|>" in a chat prompt would be cut into "<", "|", ... pieces.
    tokenizer.add_special_tokens([
        AddedToken(token, special=True, normalized=False)
        for token, kind in zip(tokens, token_types) if kind in (_CONTROL, _USER_DEFINED)
    ])
    with atomic_path(path) as tmp:
        tokenizer.save(str(tmp))
    return path


def _write_sentencepiece(reader, tokens: list[str], token_types: list[int], path: Path) -> Path:
    from sentencepiece import sentencepiece_model_pb2 as sp_model

    scores = _field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
    proto = sp_model.ModelProto()
    for token, score, kind in zip(tokens, scores, token_types):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = token, float(score), int(kind)
    trainer = proto.trainer_spec
    trainer.model_type = sp_model.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = _BYTE in token_types
    # SentencePiece finds its specials by spelling, so name them after the file's ids.
    roles = (("unk", "unknown", 0), ("bos", "bos", 1), ("eos", "eos", 2), ("pad", "padding", -1))
    for role, gguf_role, default in roles:
        token_id = int(_field(reader, f"tokenizer.ggml.{gguf_role}_token_id", default))
        setattr(trainer, f"{role}_id", token_id)
        if 0 <= token_id < len(tokens):
            setattr(trainer, f"{role}_piece", tokens[token_id])
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
    normalizer.remove_extra_whitespaces = bool(_field(reader, "tokenizer.ggml.remove_extra_whitespaces", False))
    normalizer.escape_whitespaces = True
    with atomic_path(path) as tmp:
        tmp.write_bytes(proto.SerializeToString())
    return path


def _write_tokenizer_configs(reader, model: str, tokens: list[str], checkpoint_dir: Path) -> list[Path]:
    """The BOS/EOS choices llama.cpp would make, in the HF files `Tokenizer` reads."""
    def token_id(role: str) -> int | None:
        value = _field(reader, f"tokenizer.ggml.{role}_token_id")
        return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

    bos_id, eos_id = token_id("bos"), token_id("eos")
    # llama.cpp also stops at end-of-turn / end-of-message tokens (Llama 3 chat).
    stop_ids = [i for i in dict.fromkeys((eos_id, token_id("eot"), token_id("eom"))) if i is not None]
    tokenizer_config: dict[str, Any] = {
        "bos_token": tokens[bos_id] if bos_id is not None else None,
        "eos_token": tokens[eos_id] if eos_id is not None else None,
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", model == "llama")),
    }
    chat_template = _field(reader, "tokenizer.chat_template")
    if chat_template:
        tokenizer_config["chat_template"] = chat_template
    generation_config = {
        "bos_token_id": bos_id,
        "eos_token_id": stop_ids[0] if len(stop_ids) == 1 else (stop_ids or None),
    }
    return [
        atomic_write_text(checkpoint_dir / "tokenizer_config.json", json.dumps(tokenizer_config, indent=2)),
        atomic_write_text(checkpoint_dir / "generation_config.json", json.dumps(generation_config, indent=2)),
    ]
