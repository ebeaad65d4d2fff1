"""Instruction data: prompts, tokenization and masking, the prepare scripts, batching and padding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import add_sentencepiece_tokenizer, assert_one_line_error, run_script
from lit_gpt.config import Config
from lit_gpt.data import (
    IGNORE_INDEX,
    collate,
    download,
    generate_prompt,
    load_records,
    load_split,
    micro_batches,
    prepare_dataset,
    read_wordnet,
    tokenize_example,
)
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.utils import UserError

WORDNET_DIR = Path("/usr/share/wordnet")
BLOCK_SIZE = 256


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    """A model folder with only what data preparation needs: a real 32k SentencePiece model and lit_config.json."""
    folder = add_sentencepiece_tokenizer(tmp_path_factory.mktemp("checkpoint"))
    Config(name="tiny", n_layer=1, n_head=2, n_embd=16, intermediate_size=32, vocab_size=32000,
           block_size=BLOCK_SIZE).save(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(checkpoint_dir) -> Tokenizer:
    return Tokenizer(checkpoint_dir)


def alpaca_records(n: int) -> list[dict]:
    """Records with unique outputs; every third has an input."""
    return [
        {"instruction": f"Add {i} and {i + 1}.", "input": f"numbers {i}" if i % 3 == 0 else "",
         "output": f"The sum is {2 * i + 1}, answer number {i}."}
        for i in range(n)
    ]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


# ---------------------------------------------------------------------- prompt and tokenization
def test_prompt_has_the_alpaca_wording_with_and_without_input():
    with_input = generate_prompt({"instruction": "Translate.", "input": "Bonjour", "output": "Hello"})
    assert with_input == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate.\n\n### Input:\nBonjour\n\n### Response:\n"
    )
    without_input = generate_prompt({"instruction": "Say hi.", "input": "", "output": "Hi"})
    assert without_input == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    )
    assert generate_prompt({"instruction": "Say hi."}) == without_input  # no input field at all


def test_labels_mask_exactly_the_prompt_when_asked(tokenizer):
    example = {"instruction": "Name the capital of France.", "input": "", "output": "Paris is the capital."}
    prompt_ids = tokenizer.encode(generate_prompt(example), bos=True)
    masked = tokenize_example(example, tokenizer, max_seq_length=BLOCK_SIZE, mask_inputs=True)
    unmasked = tokenize_example(example, tokenizer, max_seq_length=BLOCK_SIZE, mask_inputs=False)

    ids = masked["input_ids"]
    assert ids.dtype == torch.long and masked["labels"].dtype == torch.long
    assert torch.equal(ids, unmasked["input_ids"])
    assert ids[0].item() == tokenizer.bos_id and ids[-1].item() == tokenizer.eos_id
    assert torch.equal(ids[: len(prompt_ids)], prompt_ids)  # the prompt is a prefix of the full text
    assert tokenizer.decode(ids[len(prompt_ids) : -1]) == "Paris is the capital."
    assert (masked["labels"][: len(prompt_ids)] == IGNORE_INDEX).all()
    assert torch.equal(masked["labels"][len(prompt_ids) :], ids[len(prompt_ids) :])
    assert torch.equal(unmasked["labels"], ids)

    # The loss convention: logits at t predict labels at t + 1, so the targets are the response and EOS.
    targets = masked["labels"][1:]
    assert tokenizer.decode(targets[targets != IGNORE_INDEX][:-1]) == "Paris is the capital."


def test_truncation_keeps_input_ids_and_labels_the_same_length(tokenizer):
    example = {"instruction": "Write a long story.", "input": "", "output": "Once upon a time " * 50}
    full = tokenize_example(example, tokenizer, max_seq_length=BLOCK_SIZE, mask_inputs=True)
    assert len(full["input_ids"]) > 100
    for mask_inputs in (True, False):
        cut = tokenize_example(example, tokenizer, max_seq_length=40, mask_inputs=mask_inputs)
        assert len(cut["input_ids"]) == len(cut["labels"]) == 40
        assert torch.equal(cut["input_ids"], full["input_ids"][:40])
    # A prompt longer than max_seq_length leaves nothing to learn from when inputs are masked.
    short = tokenize_example(example, tokenizer, max_seq_length=10, mask_inputs=True)
    assert len(short["labels"]) == 10 and (short["labels"] == IGNORE_INDEX).all()


# ---------------------------------------------------------------------- reading records
def test_load_records_reads_json_arrays_and_jsonl_with_renames(tmp_path):
    array = tmp_path / "data.json"
    array.write_text(json.dumps([{"instruction": "a", "output": "b"},
                                 {"instruction": "c", "input": "d", "output": "e"}]))
    assert load_records(array) == [
        {"instruction": "a", "input": "", "output": "b"},
        {"instruction": "c", "input": "d", "output": "e"},
    ]
    dolly = tmp_path / "dolly.jsonl"
    dolly.write_text(
        '{"instruction": "q1", "context": "c1", "response": "r1", "category": "open_qa"}\n\n'
        '{"instruction": "q2", "context": "", "response": "r2", "category": "brainstorming"}\n'
    )
    assert load_records(dolly, rename={"context": "input", "response": "output"}) == [
        {"instruction": "q1", "input": "c1", "output": "r1"},
        {"instruction": "q2", "input": "", "output": "r2"},
    ]
    with pytest.raises(UserError, match=r"dolly.jsonl line 1 has no 'output' field"):
        load_records(dolly)  # without the renames Dolly has no output
    dolly.write_text('{"instruction": "q1", "context": "c1", "response": "r1"}\n{"instruction": "q2", "context": ""}\n')
    with pytest.raises(UserError, match=r"dolly.jsonl line 2 has no 'response' \(read as 'output'\) field"):
        load_records(dolly, rename={"context": "input", "response": "output"})
    bad_array = tmp_path / "bad.json"
    bad_array.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]')
    with pytest.raises(UserError, match="bad.json line 3 column 23 is not valid JSON"):
        load_records(bad_array)
    wrong_type = tmp_path / "wrong.json"
    wrong_type.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a", "output": 3}]))
    with pytest.raises(UserError, match=r"wrong.json record 2 has a non-string \(int\) 'output' field"):
        load_records(wrong_type)


def test_malformed_json_line_is_a_one_line_error_naming_file_and_line(tmp_path, checkpoint_dir):
    data_file = write_jsonl(tmp_path / "broken.jsonl", alpaca_records(6))
    lines = data_file.read_text().splitlines()
    lines[4] = lines[4][:-5]  # cut the closing quote and brace off line 5
    data_file.write_text("\n".join(lines) + "\n")
    result = run_script("prepare_json.py", "--data_file", str(data_file), "--checkpoint_dir", str(checkpoint_dir),
                        "--destination_path", str(tmp_path / "out"))
    assert_one_line_error(result, "broken.jsonl line 5 is not valid JSON", "fix or remove it")
    assert not (tmp_path / "out").exists()


def test_missing_field_is_a_one_line_error_naming_the_record(tmp_path, checkpoint_dir):
    records = alpaca_records(6)
    del records[3]["output"]
    data_file = tmp_path / "alpaca.json"
    data_file.write_text(json.dumps(records, indent=2))
    result = run_script("prepare_alpaca.py", "--data_file", str(data_file), "--checkpoint_dir", str(checkpoint_dir),
                        "--destination_path", str(tmp_path / "out"))
    assert_one_line_error(result, "alpaca.json record 4 has no 'output' field", "instruction and output strings")


def test_download_failure_asks_for_a_local_file(tmp_path):
    destination = tmp_path / "alpaca" / "alpaca_data_cleaned.json"
    with pytest.raises(UserError) as error:
        download("http://127.0.0.1:9/x", destination, timeout_s=5)
    message = str(error.value)
    assert message.startswith("could not download http://127.0.0.1:9/x (")
    assert message.endswith("check the network or pass --data_file LOCAL_FILE")
    assert not destination.parent.exists() or list(destination.parent.iterdir()) == []  # no partial file


# ---------------------------------------------------------------------- the prepare scripts
def decoded_outputs(tokenizer: Tokenizer, samples: list[dict]) -> list[str]:
    """The response text of each sample (after the prompt, without EOS)."""
    texts = [tokenizer.decode(s["input_ids"][:-1]) for s in samples]
    return [t.split("### Response:\n", 1)[1] for t in texts]


def test_prepare_alpaca_splits_off_a_test_count(tmp_path, checkpoint_dir, tokenizer):
    records = alpaca_records(50)
    data_file = tmp_path / "alpaca_data_cleaned.json"
    data_file.write_text(json.dumps(records))
    destination = tmp_path / "alpaca"
    result = run_script("prepare_alpaca.py", "--data_file", str(data_file), "--checkpoint_dir", str(checkpoint_dir),
                        "--destination_path", str(destination), "--test_size", "5", "--mask_inputs", "true",
                        "--max_seq_length", "128")
    assert result.returncode == 0, result.stderr
    assert "prepared 45 train + 5 test samples" in result.stdout and str(destination) in result.stdout

    train, test = load_split(destination, "train"), load_split(destination, "test")
    assert (len(train), len(test)) == (45, 5)
    outputs = decoded_outputs(tokenizer, train) + decoded_outputs(tokenizer, test)
    assert sorted(outputs) == sorted(r["output"] for r in records)  # every record once, in one split
    for sample in train + test:
        assert len(sample["input_ids"]) == len(sample["labels"]) <= 128
        assert (sample["labels"][:10] == IGNORE_INDEX).all() and (sample["labels"][-5:] != IGNORE_INDEX).all()
    settings = yaml.safe_load((destination / "prepare.yaml").read_text())
    assert settings["source"] == str(data_file) and settings["checkpoint_dir"] == str(checkpoint_dir)
    assert (settings["num_train"], settings["num_test"], settings["max_seq_length"]) == (45, 5, 128)
    assert settings["mask_inputs"] is True


def test_prepare_dolly_renames_fields_and_holds_out_ten_percent(tmp_path, checkpoint_dir, tokenizer):
    records = [{"instruction": f"Question {i}?", "context": f"Context {i}." if i % 2 else "",
                "response": f"Answer {i}.", "category": "closed_qa"} for i in range(50)]
    data_file = write_jsonl(tmp_path / "databricks-dolly-15k.jsonl", records)
    destination = tmp_path / "dolly"
    result = run_script("prepare_dolly.py", "--data_file", str(data_file), "--checkpoint_dir", str(checkpoint_dir),
                        "--destination_path", str(destination))
    assert result.returncode == 0, result.stderr
    train, test = load_split(destination, "train"), load_split(destination, "test")
    assert (len(train), len(test)) == (45, 5)
    texts = {tokenizer.decode(s["input_ids"][:-1]) for s in train + test}
    expected = {generate_prompt({"instruction": r["instruction"], "input": r["context"]}) + r["response"]
                for r in records}
    assert texts == expected  # context became the prompt's input, response the output
    assert torch.equal(train[0]["labels"], train[0]["input_ids"])  # --mask_inputs defaults to false
    assert yaml.safe_load((destination / "prepare.yaml").read_text())["max_seq_length"] == BLOCK_SIZE


def test_prepare_json_reads_jsonl(tmp_path, checkpoint_dir, tokenizer):
    records = alpaca_records(20)
    data_file = write_jsonl(tmp_path / "mine.jsonl", records)
    destination = tmp_path / "json"
    result = run_script("prepare_json.py", "--data_file", str(data_file), "--checkpoint_dir", str(checkpoint_dir),
                        "--destination_path", str(destination), "--test_size", "0.25")
    assert result.returncode == 0, result.stderr
    train, test = load_split(destination, "train"), load_split(destination, "test")
    assert (len(train), len(test)) == (15, 5)
    assert sorted(decoded_outputs(tokenizer, train + test)) == sorted(r["output"] for r in records)


def test_split_is_seeded_and_rejects_empty_splits(tmp_path, tokenizer):
    records = alpaca_records(12)
    common = dict(tokenizer=tokenizer, max_seq_length=BLOCK_SIZE, mask_inputs=False, source="test")
    prepare_dataset(records, destination=tmp_path / "a", test_size=3, seed=7, **common)
    prepare_dataset(records, destination=tmp_path / "b", test_size=3, seed=7, **common)
    prepare_dataset(records, destination=tmp_path / "c", test_size=3, seed=8, **common)
    test_outputs = {name: decoded_outputs(tokenizer, load_split(tmp_path / name, "test")) for name in "abc"}
    assert test_outputs["a"] == test_outputs["b"] and test_outputs["a"] != test_outputs["c"]
    for test_size in (12, 0, 0.01, 1.0):
        with pytest.raises(UserError, match="test_size"):
            prepare_dataset(records, destination=tmp_path / "d", test_size=test_size, seed=7, **common)


def test_max_seq_length_above_block_size_is_a_one_line_error(tmp_path, checkpoint_dir):
    data_file = write_jsonl(tmp_path / "data.jsonl", alpaca_records(10))
    result = run_script("prepare_json.py", "--data_file", str(data_file), "--checkpoint_dir", str(checkpoint_dir),
                        "--destination_path", str(tmp_path / "out"), "--max_seq_length", str(BLOCK_SIZE + 1))
    assert_one_line_error(result, f"--max_seq_length {BLOCK_SIZE + 1} is above the model's block_size {BLOCK_SIZE}")


def test_load_split_of_a_missing_folder_says_how_to_prepare_it(tmp_path):
    with pytest.raises(UserError) as error:
        load_split(Path("data/alpaca-never-prepared"), "train")
    hint = "does not exist: prepare it first with `python scripts/prepare_alpaca.py --checkpoint_dir"
    assert hint in str(error.value)
    (tmp_path / "dolly").mkdir()
    with pytest.raises(UserError, match=r"has no test.pt: prepare it first with `python scripts/prepare_dolly.py"):
        load_split(tmp_path / "dolly", "test")


# ---------------------------------------------------------------------- batching
def padding_tokens(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)


def skewed_lengths(n: int) -> list[int]:
    """Mostly short samples with a long tail, like instruction data."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 120, (n,), generator=generator)
    long = torch.rand(n, generator=generator) < 0.1
    lengths[long] = torch.randint(400, 2000, (int(long.sum()),), generator=generator)
    return lengths.tolist()


@pytest.mark.parametrize("length_grouped", [True, False])
def test_micro_batches_cover_every_index_once_and_depend_only_on_seed_and_epoch(length_grouped):
    lengths = skewed_lengths(1003)
    epoch0 = micro_batches(lengths, 8, seed=1, epoch=0, length_grouped=length_grouped)
    assert sorted(i for b in epoch0 for i in b) == list(range(1003))
    assert sorted(len(b) for b in epoch0) == [3] + [8] * 125  # the partial micro-batch is kept
    torch.manual_seed(123)  # the global RNG plays no part
    assert micro_batches(lengths, 8, seed=1, epoch=0, length_grouped=length_grouped) == epoch0
    assert micro_batches(lengths, 8, seed=1, epoch=1, length_grouped=length_grouped) != epoch0
    assert micro_batches(lengths, 8, seed=2, epoch=0, length_grouped=length_grouped) != epoch0
    assert micro_batches(lengths, 8, seed=0, epoch=1, length_grouped=length_grouped) != \
        micro_batches(lengths, 8, seed=1, epoch=0, length_grouped=length_grouped)


def test_length_grouping_cuts_padding_and_puts_the_longest_micro_batch_first():
    lengths = skewed_lengths(2000)
    random_padding = padding_tokens(micro_batches(lengths, 8, seed=0, epoch=0, length_grouped=False), lengths)
    grouped = micro_batches(lengths, 8, seed=0, epoch=0, length_grouped=True)
    grouped_padding = padding_tokens(grouped, lengths)
    # Measured: 1,243,719 padding tokens at random (~620 per sample) against 35,719 grouped (~18 per sample).
    assert random_padding > 1_000_000 and grouped_padding < 0.05 * random_padding
    assert max(lengths) in [lengths[i] for i in grouped[0]]
    # Grouping changes the batches, not the randomness: the epoch still reshuffles them.
    assert grouped[1:] != micro_batches(lengths, 8, seed=0, epoch=1, length_grouped=True)[1:]


def test_collate_pads_inputs_with_pad_id_and_labels_with_the_ignore_index():
    samples = [
        {"input_ids": torch.tensor([1, 5, 6]), "labels": torch.tensor([IGNORE_INDEX, 5, 6])},
        {"input_ids": torch.tensor([1, 7, 8, 9, 2]), "labels": torch.tensor([1, 7, 8, 9, 2])},
    ]
    input_ids, labels = collate(samples, pad_id=0)
    assert input_ids.shape == labels.shape == (2, 5) and input_ids.dtype == labels.dtype == torch.long
    assert input_ids.tolist() == [[1, 5, 6, 0, 0], [1, 7, 8, 9, 2]]
    assert labels.tolist() == [[IGNORE_INDEX, 5, 6, IGNORE_INDEX, IGNORE_INDEX], [1, 7, 8, 9, 2]]
    assert collate(samples, pad_id=3)[0][0].tolist() == [1, 5, 6, 3, 3]


# ---------------------------------------------------------------------- WordNet
needs_wordnet = pytest.mark.skipif(
    not (WORDNET_DIR / "data.noun").is_file(),
    reason="WordNet is not installed: apt-get install --no-install-recommends wordnet-base",
)


@needs_wordnet
def test_wordnet_records_define_real_words():
    records = read_wordnet(WORDNET_DIR)
    assert len(records) == 117659  # WordNet 3.0's synsets: 82,115 nouns, 13,767 verbs, 18,156 adjectives, 3,621 adverbs
    by_instruction: dict[str, list[str]] = {}
    for record in records:
        assert record["input"] == "" and not record["output"][0].islower() and record["output"].endswith((".", "!"))
        by_instruction.setdefault(record["instruction"], []).append(record["output"])
    dog = by_instruction['Define the word "dog" (noun).']
    assert any("domesticated by man" in d and '"the dog barked' not in d for d in dog)  # example quote dropped
    assert by_instruction['Define the word "run" (verb).']
    assert 'Define the word "outback" (adjective).' in by_instruction  # "outback(a)" marker removed
    assert 'Define the word "physical entity" (noun).' in by_instruction  # underscores become spaces
    assert by_instruction['Define the word "Princeton" (noun).'] == ["A university town in central New Jersey."]
    assert not any("LICENSEE" in o for outputs in by_instruction.values() for o in outputs)  # no licence header


@needs_wordnet
def test_prepare_wordnet_writes_a_seeded_sample(tmp_path, checkpoint_dir, tokenizer):
    destination = tmp_path / "wordnet"
    result = run_script("prepare_wordnet.py", "--checkpoint_dir", str(checkpoint_dir), "--destination_path",
                        str(destination), "--max_samples", "100", "--seed", "3")
    assert result.returncode == 0, result.stderr
    train, test = load_split(destination, "train"), load_split(destination, "test")
    assert (len(train), len(test)) == (90, 10)
    text = tokenizer.decode(train[0]["input_ids"])
    assert '### Instruction:\nDefine the word "' in text and "### Response:\n" in text

    missing = run_script("prepare_wordnet.py", "--checkpoint_dir", str(checkpoint_dir), "--wordnet_dir",
                         str(tmp_path / "nowhere"), "--destination_path", str(tmp_path / "out"))
    assert_one_line_error(missing, "not found", "apt-get install --no-install-recommends wordnet-base", "--wordnet_dir")
