"""GGUF -> lit conversion: exact logits against `transformers` on GGUF files written like llama.cpp writes them."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_HF_CONFIGS, assert_one_line_error, run_script
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


def gguf_tensors(hf_model) -> dict[str, np.ndarray]:
    config = hf_model.config
    tensors = {}
    for name, value in hf_model.state_dict().items():
        array = value.detach().float().numpy()
        module = name.removesuffix(".weight")
        if module.startswith("model.layers."):
            index, hf_name = module.removeprefix("model.layers.").split(".", 1)
            gguf_name = HF_TO_GGUF_LAYER[hf_name]
            if gguf_name == "attn_q":
                array = llama_cpp_permute(array, config.num_attention_heads)
            elif gguf_name == "attn_k":
                array = llama_cpp_permute(array, config.num_key_value_heads)
            tensors[f"blk.{index}.{gguf_name}.weight"] = array
        elif not (module == "lm_head" and config.tie_word_embeddings):
            tensors[f"{HF_TO_GGUF_TOP[module]}.weight"] = array
    return tensors


def tiny_gpt2_vocab(size: int) -> tuple[list[str], list[int], list[str]]:
    """Control tokens, printable ASCII, byte-level space and newline, two merges, and user-defined fillers."""
    control = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    normal = [chr(b) for b in range(33, 127)] + ["Ġ", "Ċ", "Ġt", "he"]
    merges = ["Ġ t", "h e"]
    user_defined = [f"<|unused_{i}|>" for i in range(size - len(control) - len(normal))]  # llama.cpp's padding
    types = [gguf.TokenType.CONTROL] * len(control) + [gguf.TokenType.NORMAL] * len(normal)
    types += [gguf.TokenType.USER_DEFINED] * len(user_defined)
    return control + normal + user_defined, [int(t) for t in types], merges


def write_gguf(path: Path, hf_model, qtype=Q.F32, tokenizer: str = "gpt2") -> Path:
    config = hf_model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    tokens, types, merges = tiny_gpt2_vocab(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    for name, array in gguf_tensors(hf_model).items():
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
