"""Instruction data for fine-tuning: read records, tokenize them with the Alpaca prompt, split, save, batch.

A prepared data folder (written by `scripts/prepare_*.py`) holds `train.pt` and `test.pt`, each a list of
`{"input_ids": LongTensor, "labels": LongTensor}` of equal length, plus `prepare.yaml` with the settings
used. `input_ids` is BOS + prompt + response + EOS, cut to max_seq_length. `labels` is a copy of it, with the
prompt positions set to IGNORE_INDEX when the inputs are masked.

Tokens shift in the loss, not in the data: position t of `labels` is the token to be predicted *at* t, so the
training loop computes

    cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=IGNORE_INDEX)

and padding (IGNORE_INDEX in labels, from `collate`) never adds to the loss. IGNORE_INDEX is the only ignore
index in the project (Lit-GPT used -1 in one place and -100 in another).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lit_gpt.prompts import alpaca_prompt, render_instruction, render_messages
from lit_gpt.utils import (
    UserError,
    atomic_path,
    atomic_save,
    atomic_write_text,
    check_checkpoint_dir,
    load_torch_file,
)

if TYPE_CHECKING:
    from lit_gpt.tokenizer import Tokenizer

IGNORE_INDEX = -100

PREPARE_SCRIPTS = {
    "alpaca": "prepare_alpaca.py",
    "dolly": "prepare_dolly.py",
    "json": "prepare_json.py",
    "wordnet": "prepare_wordnet.py",
}


# ---------------------------------------------------------------------- prompt
def generate_prompt(example: dict) -> str:
    """The Alpaca prompt for an instruction record; the response is what follows it."""
    return alpaca_prompt(example)


# ---------------------------------------------------------------------- reading records
def load_records(path: Path, rename: Mapping[str, str] | None = None) -> list[dict]:
    """Instruction records from a JSON array file or a JSONL file, as `{"instruction", "input", "output"}` dicts.

    `rename` maps the file's field names onto those three (Dolly: `{"context": "input", "response": "output"}`).
    Malformed JSON and records without `instruction`/`output` strings raise `UserError` naming the file and
    the line (JSONL) or record number (JSON array).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {str(path)!r} does not exist: pass a JSON or JSONL file of instruction records")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e}): convert it to UTF-8 JSON or JSONL") from None

    rename = dict(rename or {})
    if text.lstrip().startswith("["):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path.name} line {e.lineno} column {e.colno} is not valid JSON ({e.msg}): fix the file"
            ) from None
        located = [(f"record {i}", item) for i, item in enumerate(raw, start=1)]
    else:
        located = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                located.append((f"line {line_number}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(
                    f"{path.name} line {line_number} is not valid JSON ({e.msg}, column {e.colno}): fix or remove it"
                ) from None
    if not located:
        raise UserError(f"{path} has no records: expected a JSON array or JSON lines of instruction records")
    return [_normalize_record(item, f"{path.name} {where}", rename) for where, item in located]


def _normalize_record(item: object, where: str, rename: dict[str, str]) -> dict:
    if not isinstance(item, dict):
        raise UserError(f"{where} is a {type(item).__name__}, not a JSON object with instruction and output fields")
    record = dict(item)
    if "messages" in record:
        return {"messages": _normalize_messages(record["messages"], where)}
    for old, new in rename.items():
        if old in record:
            record[new] = record.pop(old)
    original_name = {new: old for old, new in rename.items()}
    for field, required in (("instruction", True), ("output", True), ("input", False)):
        value = record.get(field, None if required else "")
        if value is None and not required:
            value = ""
        if not isinstance(value, str):
            name = f"{original_name[field]!r} (read as {field!r})" if field in original_name else repr(field)
            what = "no" if value is None else f"a non-string ({type(value).__name__})"
            raise UserError(
                f"{where} has {what} {name} field: every record needs instruction and output strings "
                f"(input is optional)"
            )
        record[field] = value
    return {"instruction": record["instruction"], "input": record["input"], "output": record["output"]}


def _normalize_messages(messages: object, where: str) -> list[dict]:
    """A chat record's `messages`: {"role": system|user|assistant, "content": str} dicts, with a reply."""
    hint = 'a list of {"role": "system"|"user"|"assistant", "content": "..."} objects with an assistant reply'
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be {hint}")
    for i, m in enumerate(messages, start=1):
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)):
            raise UserError(f"{where}: message {i} is not a role/content object; 'messages' must be {hint}")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: 'messages' has no assistant reply to learn; it must be {hint}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def download(url: str, destination: Path, timeout_s: float = 60.0) -> Path:
    """Download `url` to `destination` (atomically); a file already there is reused."""
    destination = Path(destination)
    if destination.is_file():
        print(f"using {destination} (downloaded earlier; delete it to download again)")
        return destination
    print(f"downloading {url} to {destination}")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, atomic_path(destination) as tmp:
            with open(tmp, "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(
            f"could not download {url} ({reason}): check the network or pass --data_file LOCAL_FILE"
        ) from None
    return destination


def read_wordnet(wordnet_dir: Path) -> list[dict]:
    """One "define this word" record per synset of WordNet 3.0's `data.{noun,verb,adj,adv}` files.

    A synset line is `offset lex_filenum ss_type w_cnt (word lex_id)*w_cnt ... | gloss`; the first word names
    the synset, and the gloss is a definition followed by `; "example"` quotes, which are dropped. Besides
    `instruction`, `input` and `output`, a record keeps the synset's `lemmas` (the named word first) and its
    `part_of_speech`, for scripts that need the words themselves (tokenization reads only the first three).
    """
    wordnet_dir = Path(wordnet_dir)
    files = [wordnet_dir / f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")]
    if not all(f.is_file() for f in files):
        raise UserError(
            f"WordNet data files (data.noun, data.verb, data.adj, data.adv) not found in {str(wordnet_dir)!r}: "
            f"install it with `apt-get install --no-install-recommends wordnet-base` or pass --wordnet_dir"
        )
    part_of_speech = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
    records = []
    for file in files:
        for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or " | " not in line:  # the licence header
                continue
            fields, gloss = line.split(" | ", 1)
            fields = fields.split()
            words = fields[4:4 + 2 * int(fields[3], 16):2]  # w_cnt is hexadecimal; each word has a lex_id after it
            lemmas = [re.sub(r"\((a|p|ip)\)$", "", w).replace("_", " ") for w in words]  # drop position markers
            definition = gloss.split('; "', 1)[0].strip().rstrip(";").strip()
            if not definition or definition.startswith('"'):
                continue
            definition = definition[0].upper() + definition[1:]
            if definition[-1] not in ".!?":
                definition += "."
            records.append({
                "instruction": f'Define the word "{lemmas[0]}" ({part_of_speech[fields[2]]}).',
                "input": "",
                "output": definition,
                "lemmas": lemmas,
                "part_of_speech": part_of_speech[fields[2]],
            })
    return records


def sample_wordnet(wordnet_dir: Path, max_samples: int | None, seed: int) -> list[dict]:
    """A seeded random sample of `max_samples` of `read_wordnet`'s records (all when None), in WordNet's order.

    `scripts/prepare_wordnet.py` fine-tunes on it; `scripts/prepare_wordnet_mc.py` draws it again to leave it out.
    """
    records = read_wordnet(wordnet_dir)
    keep = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed))[:max_samples]
    return [records[i] for i in sorted(keep.tolist())]


# ---------------------------------------------------------------------- tokenizing and saving
def tokenize_example(example: dict, tokenizer: Tokenizer, max_seq_length: int, mask_inputs: bool,
                     prompt_style: str = "alpaca") -> dict:
    """`input_ids` = BOS + prompt + output + EOS cut to max_seq_length; `labels` masks the prompt if asked.

    Prompt and full text are tokenized separately, as Lit-GPT did, so the response is tokenized in context
    (SentencePiece would add a word-start marker to a response tokenized on its own). The prompt ends with a
    newline, after which both tokenizations agree, so the prompt's length marks where the response starts.
    A chat record (`messages`) is tokenized whole; `mask_inputs` leaves every turn but the assistant's out of
    the loss.
    """
    if "messages" in example:
        return tokenize_messages(example["messages"], tokenizer, max_seq_length, mask_inputs, prompt_style)
    prompt = render_instruction(prompt_style, example, tokenizer)
    prompt_ids = tokenizer.encode(prompt, bos=True, eos=False)
    input_ids = tokenizer.encode(prompt + example["output"], bos=True, eos=True)[:max_seq_length]
    labels = input_ids.clone()
    if mask_inputs:
        labels[: len(prompt_ids)] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels}


def tokenize_messages(messages: list[dict], tokenizer: Tokenizer, max_seq_length: int, mask_inputs: bool,
                      prompt_style: str) -> dict:
    """A conversation as one sample; with `mask_inputs` only the assistant's turns (and the EOS) are learnt.

    Each assistant turn's span runs from the end of the prompt before it to the end of the text through it,
    both tokenized as prefixes of the whole conversation.
    """
    def length(upto: int, generation_prompt: bool) -> int:
        text = render_messages(prompt_style, messages[:upto], tokenizer, add_generation_prompt=generation_prompt)
        return len(tokenizer.encode(text, bos=True, eos=False))

    text = render_messages(prompt_style, messages, tokenizer, add_generation_prompt=False)
    full = tokenizer.encode(text, bos=True, eos=True)
    labels = full.clone()
    if mask_inputs:
        labels[:] = IGNORE_INDEX
        for k, message in enumerate(messages):
            if message["role"] == "assistant":
                start, end = length(k, True), length(k + 1, False)
                labels[start:end] = full[start:end]
        labels[-1] = full[-1]  # the EOS that ends the last reply
    return {"input_ids": full[:max_seq_length], "labels": labels[:max_seq_length]}


def split_sizes(num_records: int, test_size: int | float) -> tuple[int, int]:
    """(train, test) counts: an int test_size is a count, a float one a fraction of the records."""
    if isinstance(test_size, bool) or not isinstance(test_size, (int, float)):
        raise UserError(f"--test_size must be a count (e.g. 2000) or a fraction (e.g. 0.1), got {test_size!r}")
    if isinstance(test_size, float):
        if not 0.0 < test_size < 1.0:
            raise UserError(f"--test_size {test_size} as a fraction must lie between 0 and 1 (e.g. 0.1)")
        num_test = round(num_records * test_size)
    else:
        num_test = test_size
    num_train = num_records - num_test
    if num_test < 1 or num_train < 1:
        raise UserError(
            f"--test_size {test_size} of {num_records} records leaves {num_train} for training and {num_test} "
            f"for testing: both need at least one; choose another --test_size or use more data"
        )
    return num_train, num_test


def split_indices(num_records: int, num_test: int, seed: int) -> dict[str, list[int]]:
    """Which records go to `test` and which to `train`, in the order they are saved: a seeded shuffle, cut."""
    order = torch.randperm(num_records, generator=torch.Generator().manual_seed(seed)).tolist()
    return {"test": order[:num_test], "train": order[num_test:]}


def prepare_dataset(
    records: list[dict],
    tokenizer: Tokenizer,
    destination: Path,
    test_size: int | float,
    seed: int,
    max_seq_length: int,
    mask_inputs: bool,
    source: str,
    prompt_style: str = "alpaca",
) -> dict:
    """Shuffle (seeded), split, tokenize and save `train.pt`, `test.pt` and `prepare.yaml` in `destination`.

    Returns the settings and counts written to `prepare.yaml`.
    """
    import yaml
    from tqdm import tqdm

    if tokenizer.eos_id is None:
        raise UserError(f"the tokenizer in {tokenizer.checkpoint_dir} has no EOS token, which ends every response")
    num_train, num_test = split_sizes(len(records), test_size)
    splits = split_indices(len(records), num_test, seed)

    destination = Path(destination)
    lengths: list[int] = []
    num_truncated = 0
    for split in ("train", "test"):
        samples = []
        for i in tqdm(splits[split], desc=f"tokenizing {split}", unit=" samples", mininterval=1.0):
            sample = tokenize_example(records[i], tokenizer, max_seq_length, mask_inputs, prompt_style)
            num_truncated += len(sample["input_ids"]) == max_seq_length and sample["input_ids"][-1] != tokenizer.eos_id
            lengths.append(len(sample["input_ids"]))
            samples.append(sample)
        atomic_save(samples, destination / f"{split}.pt")

    settings = {
        "source": source,
        "checkpoint_dir": str(tokenizer.checkpoint_dir),
        "max_seq_length": max_seq_length,
        "mask_inputs": mask_inputs,
        "prompt_style": prompt_style,
        "seed": seed,
        "test_size": test_size,
        "num_train": num_train,
        "num_test": num_test,
        "num_truncated": int(num_truncated),
        "max_tokens": max(lengths),
        "mean_tokens": round(sum(lengths) / len(lengths), 1),
    }
    atomic_write_text(destination / "prepare.yaml", yaml.safe_dump(settings, sort_keys=False))
    return settings


def prepare_instruction_data(
    get_records: Callable[[], list[dict]],
    checkpoint_dir: Path,
    destination_path: Path,
    source: str,
    test_size: int | float,
    seed: int,
    mask_inputs: bool,
    max_seq_length: int | None,
    prompt_style: str = "alpaca",
) -> dict:
    """What every prepare script does after reading its flags.

    Checks the tokenizer folder and max_seq_length first (before any download), then gets the records, writes
    the prepared folder and prints a one-line summary.
    """
    from lit_gpt.config import Config
    from lit_gpt.prompts import check_prompt_style, resolve_prompt_style
    from lit_gpt.tokenizer import Tokenizer

    check_prompt_style(prompt_style)
    checkpoint_dir = check_checkpoint_dir(Path(checkpoint_dir), needs=("lit_config.json",))
    tokenizer = Tokenizer(checkpoint_dir)
    prompt_style = resolve_prompt_style(prompt_style, tokenizer)  # recorded as used: auto only with a template
    block_size = Config.from_checkpoint(checkpoint_dir).block_size
    if max_seq_length is None:
        max_seq_length = block_size
    if max_seq_length < 2:
        raise UserError(f"--max_seq_length must be at least 2, got {max_seq_length}")
    if max_seq_length > block_size:
        raise UserError(
            f"--max_seq_length {max_seq_length} is above the model's block_size {block_size} "
            f"({checkpoint_dir / 'lit_config.json'}): pass at most {block_size}"
        )
    records = get_records()
    settings = prepare_dataset(
        records, tokenizer, Path(destination_path), test_size, seed, max_seq_length, mask_inputs, source,
        prompt_style,
    )
    print(
        f"prepared {settings['num_train']} train + {settings['num_test']} test samples "
        f"(max {settings['max_tokens']} tokens, mean {settings['mean_tokens']}, "
        f"{settings['num_truncated']} truncated to {max_seq_length}) in {destination_path}"
    )
    return settings


def load_split(data_dir: Path, split: str) -> list[dict]:
    """The samples of `data_dir/{split}.pt`, as written by a prepare script."""
    data_dir = Path(data_dir)
    path = data_dir / f"{split}.pt"
    if not path.is_file():
        default_destination = data_dir == Path("data", data_dir.name)
        script = PREPARE_SCRIPTS.get(data_dir.name, "prepare_alpaca.py")
        others = [s for s in PREPARE_SCRIPTS.values() if s != script]
        hint = f"python scripts/{script} --checkpoint_dir CHECKPOINT_DIR"
        if not (default_destination and data_dir.name in PREPARE_SCRIPTS):
            hint += f" --destination_path {data_dir}"
        what = "does not exist" if not data_dir.is_dir() else f"has no {split}.pt"
        raise UserError(
            f"data_dir {str(data_dir)!r} {what}: prepare it first with `{hint}` (or {' / '.join(others)})"
        )
    samples = load_torch_file(path, "prepare the data again with scripts/prepare_*.py")
    if not isinstance(samples, list) or not all(isinstance(x, dict) and "input_ids" in x and "labels" in x
                                                for x in samples):
        raise UserError(f"{path} does not hold prepared samples (a list of input_ids/labels): prepare the data again "
                        "with scripts/prepare_*.py")
    return samples


def recorded_data_prompt_style(data_dir: Path) -> str:
    """The prompt style `data_dir` was prepared with (its prepare.yaml); alpaca for data prepared before styles."""
    from lit_gpt.prompts import check_prompt_style
    from lit_gpt.utils import read_yaml_mapping

    path = Path(data_dir) / "prepare.yaml"
    if not path.is_file():
        return "alpaca"
    return check_prompt_style(str(read_yaml_mapping(path, "prepare the data again").get("prompt_style", "alpaca")))


# ---------------------------------------------------------------------- batching
def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator of its own for each (seed, epoch); hashing keeps (1, 0) and (0, 1) apart."""
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def micro_batches(
    lengths: list[int], micro_batch_size: int, seed: int, epoch: int, length_grouped: bool = True
) -> list[list[int]]:
    """The micro-batches (lists of sample indices) of one epoch; a pure function of its arguments.

    Every index appears exactly once and the last, partial micro-batch is kept. With `length_grouped`, the
    shuffled samples are cut into chunks of 50 micro-batches, each chunk is sorted by length before it is cut
    into micro-batches, and the micro-batch order is shuffled: a micro-batch then holds samples of similar
    length and pads little. The micro-batch with the longest sample comes first, so that running out of
    memory shows on the first step rather than hours in.
    """
    if micro_batch_size < 1:
        raise UserError(f"micro_batch_size must be at least 1, got {micro_batch_size}")
    generator = _epoch_generator(seed, epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if not length_grouped:
        return [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]

    chunk_size = 50 * micro_batch_size
    batches = []
    for start in range(0, len(order), chunk_size):
        chunk = sorted(order[start : start + chunk_size], key=lambda i: lengths[i], reverse=True)
        batches.extend(chunk[i : i + micro_batch_size] for i in range(0, len(chunk), micro_batch_size))
    batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    if batches:
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches.insert(0, batches.pop(longest))
    return batches


def collate(samples: list[dict], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """(input_ids, labels) of shape (B, T), right-padded to the micro-batch's longest sample.

    Padding goes after the tokens, so causal attention keeps it out of every real token's view, and its labels
    are IGNORE_INDEX, so it never adds to the loss.
    """
    longest = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        input_ids[row, :n] = sample["input_ids"]
        labels[row, :n] = sample["labels"]
    return input_ids, labels
