"""GGUF -> lit conversion: exact logits against `transformers` on GGUF files written like llama.cpp writes them."""

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_HF_CONFIGS, assert_one_line_error, make_hf_family, run_script
from lit_gpt.config import Config
from lit_gpt.convert import LazyTensor, convert_hf_state_dict
from lit_gpt.model import GPT
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.utils import UserError, load_state_dict

gguf = pytest.importorskip("gguf")
from lit_gpt.gguf import convert_gguf_checkpoint, open_gguf, unpermute_rope_rows, write_gguf_tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType

# HF per-layer module -> GGUF tensor, the names llama.cpp's convert_hf_to_gguf.py writes.
HF_TO_GGUF_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
HF_TO_GGUF_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


# ---------------------------------------------------------------------- writing GGUF files like llama.cpp
def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k reordering into Meta's interleaved RoPE layout (the convert_hf_to_gguf.py formula)."""
    rows, columns = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, columns).swapaxes(1, 2).reshape(rows, columns)


def gguf_tensors(hf_model, arch: str = "llama") -> dict[str, np.ndarray]:
    """The model's tensors under llama.cpp's names; q and k (weights and biases) permuted for llama only."""
    config = hf_model.config
    tensors = {}
    for name, value in hf_model.state_dict().items():
        array = value.detach().float().numpy()
        module, _, kind = name.rpartition(".")
        if module.startswith("model.layers."):
            index, hf_name = module.removeprefix("model.layers.").split(".", 1)
            gguf_name = HF_TO_GGUF_LAYER[hf_name]
            if arch == "llama" and gguf_name == "attn_q":
                array = llama_cpp_permute(array, config.num_attention_heads)
            elif arch == "llama" and gguf_name == "attn_k":
                array = llama_cpp_permute(array, config.num_key_value_heads)
            tensors[f"blk.{index}.{gguf_name}.{kind}"] = array
        elif not (module == "lm_head" and config.tie_word_embeddings):
            tensors[f"{HF_TO_GGUF_TOP[module]}.{kind}"] = array
    return tensors


def llama_cpp_rope_factors(config) -> np.ndarray:
    """The rope_freqs tensor llama.cpp's converter writes for Llama 3 rope scaling (its per-frequency loop)."""
    rope = config.rope_parameters
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    context, low, high = rope["original_max_position_embeddings"], rope["low_freq_factor"], rope["high_freq_factor"]
    factors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * rope["rope_theta"] ** (i / head_dim)
        if wavelength < context / high:
            factors.append(1.0)
        elif wavelength > context / low:
            factors.append(rope["factor"])
        else:
            smooth = (context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def tiny_gpt2_vocab(size: int) -> tuple[list[str], list[int], list[str]]:
    """Control tokens, printable ASCII, byte-level space and newline, two merges, and user-defined fillers."""
    control = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    normal = [chr(b) for b in range(33, 127)] + ["Ġ", "Ċ", "Ġt", "he"]
    merges = ["Ġ t", "h e"]
    user_defined = [f"<|unused_{i}|>" for i in range(size - len(control) - len(normal))]  # llama.cpp's padding
    types = [gguf.TokenType.CONTROL] * len(control) + [gguf.TokenType.NORMAL] * len(normal)
    types += [gguf.TokenType.USER_DEFINED] * len(user_defined)
    return control + normal + user_defined, [int(t) for t in types], merges


def write_gguf(path: Path, hf_model, qtype=Q.F32, tokenizer: str = "gpt2", arch: str = "llama",
               sliding_window: int | None = None, pre: str = "smollm") -> Path:
    """The file llama.cpp's converter writes: llama (LLaMA 1-3, Mistral) or qwen2 metadata, names and tensors."""
    config = hf_model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "llama":  # llama.cpp writes these two for llama only
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(config.vocab_size)
    if sliding_window is not None:
        writer.add_sliding_window(sliding_window)
    if config.rope_parameters.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama_cpp_rope_factors(config))
    tokens, types, merges = tiny_gpt2_vocab(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    for name, array in gguf_tensors(hf_model, arch).items():
        # llama.cpp keeps the norm vectors in F32 whatever the file's quantization.
        tensor_type = Q.F32 if array.ndim == 1 else qtype
        writer.add_tensor(name, gguf.quants.quantize(array, tensor_type), raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def make_hf_model(name: str, **overrides):
    """A tiny HF llama with weights big enough that a wrong q/k row order changes the logits."""
    transformers = pytest.importorskip("transformers")
    shape = {**TINY_HF_CONFIGS[name], **overrides}
    config = transformers.LlamaConfig(vocab_size=104, num_hidden_layers=2, max_position_embeddings=64,
                                      rms_norm_eps=1e-5, **shape)
    model = transformers.LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:  # norm weights: tell norm_1, norm_2 and ln_f apart
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
            else:
                param.normal_(0.0, 0.2, generator=generator)
    return model


def assert_same_logits(checkpoint_dir: Path, hf_model, tolerance: float = 1e-4) -> None:
    config = Config.from_checkpoint(checkpoint_dir)
    model = GPT(config)
    model.load_state_dict(load_state_dict(checkpoint_dir / "lit_model.pth"), strict=True)
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf_model(ids).logits
        actual = model.eval()(ids)
    assert expected.abs().max() > 1.0  # the comparison is not vacuous
    assert (actual - expected).abs().max().item() <= tolerance


# ---------------------------------------------------------------------- tests
def test_unpermute_inverts_llama_cpp_permute():
    weight = torch.randn(48, 10)
    for n_heads in (1, 2, 3, 6):
        permuted = torch.from_numpy(llama_cpp_permute(weight.numpy(), n_heads))
        assert not torch.equal(permuted, weight)
        assert torch.equal(unpermute_rope_rows(permuted, n_heads), weight)


@pytest.mark.parametrize("name", sorted(TINY_HF_CONFIGS))
def test_f32_gguf_matches_transformers(tmp_path, name):
    hf_model = make_hf_model(name)
    checkpoint_dir = tmp_path / "converted"
    config = convert_gguf_checkpoint(write_gguf(tmp_path / "model.gguf", hf_model), checkpoint_dir)

    hf_config = hf_model.config
    assert config.name == "converted"
    assert (config.n_layer, config.n_head, config.n_query_groups, config.n_embd, config.intermediate_size) == (
        hf_config.num_hidden_layers, hf_config.num_attention_heads, hf_config.num_key_value_heads,
        hf_config.hidden_size, hf_config.intermediate_size)
    assert (config.vocab_size, config.block_size, config.norm_eps) == (104, 64, 1e-5)
    assert config.rope_base == hf_config.rope_parameters["rope_theta"]
    assert config.tie_embeddings == hf_config.tie_word_embeddings
    assert Config.from_checkpoint(checkpoint_dir) == config
    assert_same_logits(checkpoint_dir, hf_model)

    # Bit-identical to the HF -> lit conversion of the same weights.
    state_dict = load_state_dict(checkpoint_dir / "lit_model.pth")
    hf_tensors = (LazyTensor(k, Path("hf"), lambda v=v: v) for k, v in hf_model.state_dict().items())
    from_hf = convert_hf_state_dict(hf_tensors, config)
    assert state_dict.keys() == from_hf.keys() == GPT(config).state_dict().keys()
    for key, value in from_hf.items():
        assert state_dict[key].dtype == torch.float32 and torch.equal(state_dict[key], value), key
    assert ("lm_head.weight" in state_dict) == (not config.tie_embeddings)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1, Q.F16])
def test_quantized_gguf_matches_dequantized_reference(tmp_path, qtype):
    """The reference model holds dequantize(quantize(w)): llama.cpp's permutation moves whole rows, and the
    quantization blocks lie along rows, so un-permuting commutes with the round trip."""
    # Quantization blocks hold 32 values, so every input dimension must be a multiple of 32.
    hf_model = make_hf_model("llama70b-gqa", intermediate_size=352)
    for param in hf_model.parameters():
        assert param.dim() == 1 or param.shape[1] % 32 == 0
    reference = copy.deepcopy(hf_model)
    with torch.no_grad():
        for param in reference.parameters():
            if param.dim() == 2:
                quantized = gguf.quants.quantize(param.numpy(), qtype)
                param.copy_(torch.from_numpy(gguf.quants.dequantize(quantized, qtype).reshape(param.shape)))
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(reference.parameters(), hf_model.parameters()))

    checkpoint_dir = tmp_path / "converted"
    convert_gguf_checkpoint(write_gguf(tmp_path / "model.gguf", hf_model, qtype), checkpoint_dir, torch.float32)
    assert_same_logits(checkpoint_dir, reference)


def test_dtype_defaults_to_the_files_float_type(tmp_path):
    hf_model = make_hf_model("llama2-mha", intermediate_size=192)
    f16_file = write_gguf(tmp_path / "f16.gguf", hf_model, Q.F16)
    q8_file = write_gguf(tmp_path / "q8.gguf", hf_model, Q.Q8_0)
    cases = [(f16_file, None, torch.float16), (q8_file, None, torch.float32), (q8_file, torch.bfloat16, torch.bfloat16)]
    for path, dtype, expected in cases:
        convert_gguf_checkpoint(path, tmp_path / "out", dtype)
        state_dict = load_state_dict(tmp_path / "out" / "lit_model.pth")
        assert {v.dtype for v in state_dict.values()} == {expected}, (path.name, dtype)


def test_converted_gpt2_tokenizer_files(tmp_path):
    checkpoint_dir = tmp_path / "converted"
    convert_gguf_checkpoint(write_gguf(tmp_path / "model.gguf", make_hf_model("llama2-mha")), checkpoint_dir)
    assert json.loads((checkpoint_dir / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}
    tokenizer_config = json.loads((checkpoint_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False}

    tokenizer = Tokenizer(checkpoint_dir)
    assert tokenizer.backend == "huggingface" and tokenizer.vocab_size == 104
    ids = tokenizer.encode("<|im_start|>the cat\n").tolist()
    assert [tokenizer.id_to_token(i) for i in ids] == ["<|im_start|>", "t", "he", "Ġ", "c", "a", "t", "Ċ"]
    assert tokenizer.decode(ids) == "<|im_start|>the cat\n"
    assert tokenizer.encode("<|unused_0|>").tolist() == [101]  # user-defined tokens stay whole


def test_sentencepiece_rebuilt_from_gguf_encodes_like_the_original(tmp_path):
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as sp_model
    from test_tokenizer import SAMPLES

    from conftest import package_file

    original_path = package_file("mistral_common", "data/tokenizer.model.v1")
    original = sp_model.ModelProto()
    original.ParseFromString(original_path.read_bytes())
    writer = gguf.GGUFWriter(tmp_path / "tokenizer.gguf", "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p.piece for p in original.pieces])
    writer.add_token_scores([p.score for p in original.pieces])
    writer.add_token_types([int(p.type) for p in original.pieces])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    write_gguf_tokenizer(open_gguf(tmp_path / "tokenizer.gguf"), tmp_path / "out")
    reference = SentencePieceProcessor(model_file=str(original_path))
    rebuilt = SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model"))
    tokenizer = Tokenizer(tmp_path / "out")
    assert tokenizer.backend == "sentencepiece" and tokenizer.vocab_size == 32000
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.use_bos) == (1, 2, True)
    for text in SAMPLES + ["\x00 control \x07 bytes", "ünïcödé ⁇ 𝔘"]:
        expected = reference.encode(text)
        assert rebuilt.encode(text) == expected, text
        assert tokenizer.encode(text).tolist() == [1] + expected, text
        assert tokenizer.decode(tokenizer.encode(text)) == reference.decode(expected)


def test_not_a_gguf_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        convert_gguf_checkpoint(tmp_path / "missing.gguf", tmp_path / "out")
    (tmp_path / "garbage.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(UserError, match="could not read"):
        convert_gguf_checkpoint(tmp_path / "garbage.gguf", tmp_path / "out")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(UserError, match="could not read"):
        convert_gguf_checkpoint(tmp_path / "empty.gguf", tmp_path / "out")


def test_other_architectures_are_refused(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "falcon.gguf", "falcon")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="'falcon' is not supported"):
        convert_gguf_checkpoint(tmp_path / "falcon.gguf", tmp_path / "out")
    assert not (tmp_path / "out" / "lit_model.pth").exists()


def test_cli_reports_a_missing_file_on_one_line(tmp_path):
    result = run_script("convert_gguf_checkpoint.py", "--gguf_path", str(tmp_path / "missing.gguf"),
                        "--checkpoint_dir", str(tmp_path / "out"))
    assert_one_line_error(result, "missing.gguf", "does not exist")


def test_cli_converts(tmp_path):
    hf_model = make_hf_model("smollm2-tied")
    gguf_path = write_gguf(tmp_path / "model.gguf", hf_model)
    result = run_script("convert_gguf_checkpoint.py", "--gguf_path", str(gguf_path),
                        "--checkpoint_dir", str(tmp_path / "tiny"), "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert "tiny" in result.stdout and len(result.stdout.strip().splitlines()) == 1
    assert_same_logits(tmp_path / "tiny", hf_model)


# ---------------------------------------------------------------------- Llama 3, Mistral, Qwen2
@pytest.mark.parametrize("name, arch", [
    ("llama3.1-scaled", "llama"),
    ("llama3.2-tied", "llama"),
    ("qwen2-tied", "qwen2"),
    ("qwen2-gqa", "qwen2"),
])
def test_family_ggufs_match_transformers(tmp_path, name, arch):
    hf_model = make_hf_family(name, vocab_size=104)
    config = convert_gguf_checkpoint(write_gguf(tmp_path / "model.gguf", hf_model, arch=arch), tmp_path / "out")
    assert config.attn_bias == (arch == "qwen2") and not config.bias
    assert config.tie_embeddings == hf_model.config.tie_word_embeddings
    assert_same_logits(tmp_path / "out", hf_model)
    if arch == "llama":
        # The rope_freqs tensor became parameters that give the model's frequencies (the file's context
        # length is 8192, llama.cpp's assumption, so the factors scale with it: only their ratios matter).
        scaling, hf_rope = config.rope_scaling, hf_model.config.rope_parameters
        assert scaling["factor"] == hf_rope["factor"] and scaling["original_max_position_embeddings"] == 8192
        ratio = 8192 / hf_rope["original_max_position_embeddings"]
        assert scaling["low_freq_factor"] == pytest.approx(hf_rope["low_freq_factor"] * ratio, rel=1e-6)
        assert scaling["high_freq_factor"] == pytest.approx(hf_rope["high_freq_factor"] * ratio, rel=1e-6)


def test_llama3_gguf_without_its_rope_freqs_would_not_match(tmp_path):
    """The rope_freqs tensor is what carries Llama 3's scaling: the parity above depends on reading it."""
    hf_model = make_hf_family("llama3.1-scaled", vocab_size=104)
    convert_gguf_checkpoint(write_gguf(tmp_path / "model.gguf", hf_model), tmp_path / "out")
    config = Config.from_checkpoint(tmp_path / "out", rope_scaling=None)
    model = GPT(config).eval()
    model.load_state_dict(load_state_dict(tmp_path / "out" / "lit_model.pth"))
    ids = torch.randint(0, 104, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids) - hf_model(ids).logits).abs().max() > 1e-2


def test_mistral_gguf_takes_its_sliding_window_from_the_metadata(tmp_path):
    hf_model = make_hf_family("mistral-window", vocab_size=104)
    config = convert_gguf_checkpoint(write_gguf(tmp_path / "with.gguf", hf_model, sliding_window=8), tmp_path / "a")
    assert config.sliding_window == 8
    assert_same_logits(tmp_path / "a", hf_model)
    # llama.cpp's converter does not write the window for Mistral: such a file converts without one.
    assert convert_gguf_checkpoint(write_gguf(tmp_path / "without.gguf", hf_model), tmp_path / "b").sliding_window \
        is None


def test_rope_freqs_that_are_not_llama3_scaling_are_refused(tmp_path):
    hf_model = make_hf_family("llama3.1-scaled", vocab_size=104)
    path = write_gguf(tmp_path / "model.gguf", hf_model)
    data = bytearray(path.read_bytes())
    factors = llama_cpp_rope_factors(hf_model.config)
    offset = bytes(data).index(factors.tobytes())
    odd = factors.copy()
    odd[1] = 1.5  # a high frequency slowed: no llama3 parameters do that
    data[offset : offset + odd.nbytes] = odd.tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not follow Llama 3's rope scaling"):
        convert_gguf_checkpoint(path, tmp_path / "out")


@pytest.mark.parametrize("pre, pieces", [
    # Llama 3 cuts digits in threes, Qwen2 one by one; both keep a space before a digit on its own, and newlines
    # with the punctuation before them.
    ("llama-bpe", ["I", "'ve", "Ġ", "123", "45", "Ġcats", "!!Ċ"]),
    ("qwen2", ["I", "'ve", "Ġ", "1", "2", "3", "4", "5", "Ġcats", "!!Ċ"]),
])
def test_llama3_and_qwen2_pre_tokenizers_split_like_their_tokenizer_json(tmp_path, pre, pieces):
    hf_model = make_hf_model("llama2-mha")
    convert_gguf_checkpoint(write_gguf(tmp_path / "model.gguf", hf_model, pre=pre), tmp_path / "out")
    from tokenizers import Tokenizer as HFTokenizer

    tokenizer = HFTokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    split = tokenizer.pre_tokenizer.pre_tokenize_str("I've 12345 cats!!\n")
    assert [piece for piece, _ in split] == pieces
