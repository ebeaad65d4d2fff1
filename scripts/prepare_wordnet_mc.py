"""Write an offline lm-eval task from WordNet 3.0: which of four definitions is the word's? (acc, acc_norm, 0-shot)

    python scripts/prepare_wordnet_mc.py --exclude_data_dir data/wordnet --destination_path data/wordnet_mc
    python eval/lm_eval_harness.py --checkpoint_dir ... --tasks wordnet_mc --include_path data/wordnet_mc

The destination folder holds `wordnet_mc.jsonl` (one question a line: `word`, `part_of_speech`, `choices`,
`answer`, the index of the right choice, and `prompt`) and `wordnet_mc.yaml`, which names the JSONL by a path
relative to itself, so the folder can be moved as a whole.

A question is the fine-tuning prompt ('Define the word "X" (noun).' in the prompt style the excluded data was
prepared with); its choices are X's definition and three definitions of other words of the same part of speech,
shuffled. No question asks for a word of the sample `scripts/prepare_wordnet.py` wrote to `--exclude_data_dir`
(any lemma of any of its synsets, train and test split alike), and no choice is a definition from that sample.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from lit_gpt.data import (
    load_split,
    read_wordnet,
    recorded_data_prompt_style,
    sample_wordnet,
    split_indices,
    tokenize_example,
)
from lit_gpt.prompts import check_prompt_style, render_instruction
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.utils import UserError, atomic_write_text, read_yaml_mapping, run_cli

TASK = "wordnet_mc"
NUM_CHOICES = 4
NUM_CHECKED = 8  # training samples re-tokenized to check that the sample drawn again is the prepared one

TASK_YAML = """\
# WordNet multiple choice, written by scripts/prepare_wordnet_mc.py ({provenance}).
# Each choice is scored by its log-likelihood right after the fine-tuning prompt (acc; acc_norm divides by
# the choice's length). data_files is relative to this YAML's folder: eval/lm_eval_harness.py resolves it.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {task}.jsonl
test_split: test
fewshot_split: test
num_fewshot: 0
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: answer
target_delimiter: ""  # the definition follows the prompt directly, as the response does in fine-tuning
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def prepare(
    exclude_data_dir: Path,
    destination_path: Path = Path("data/wordnet_mc"),
    wordnet_dir: Path = Path("/usr/share/wordnet"),
    num_questions: int = 200,
    seed: int = 42,
    prompt_style: str | None = None,
) -> Path:
    """Write `wordnet_mc.jsonl` and `wordnet_mc.yaml` to `destination_path`; returns the YAML's path.

    Args:
        exclude_data_dir: a folder written by scripts/prepare_wordnet.py; its whole sample (train and test) is
            drawn again from --wordnet_dir with its recorded size and seed, and left out of the questions.
        destination_path: where the task's JSONL and YAML go; pass it to eval/lm_eval_harness.py as --include_path.
        wordnet_dir: the folder with WordNet's data.noun, data.verb, data.adj and data.adv files.
        num_questions: how many questions, each for a different word.
        seed: seed of the choice of words, of the distractors and of the order of the choices.
        prompt_style: how the question is asked; default: the style exclude_data_dir was prepared with.
    """
    if num_questions < 1:
        raise UserError(f"--num_questions must be at least 1, got {num_questions}")
    records = read_wordnet(wordnet_dir)  # first: a missing WordNet is the likeliest mistake
    excluded, tokenizer = prepared_sample(Path(exclude_data_dir), Path(wordnet_dir))
    style = check_prompt_style(prompt_style or recorded_data_prompt_style(exclude_data_dir))
    if style == "auto" and tokenizer is None:
        raise UserError(f"--prompt_style auto needs the tokenizer {exclude_data_dir} was prepared with, which is "
                        "gone: pass --prompt_style alpaca, chatml, llama2 or plain")
    questions = make_questions(records, excluded, num_questions, seed)
    if len(questions) < num_questions:
        raise UserError(f"--num_questions {num_questions} is too many: only {len(questions)} words of WordNet outside "
                        f"{exclude_data_dir}'s sample have {NUM_CHOICES - 1} other definitions to choose from; "
                        "ask for fewer")
    for question in questions:
        instruction = f'Define the word "{question["word"]}" ({question["part_of_speech"]}).'
        question["prompt"] = render_instruction(style, {"instruction": instruction, "input": ""}, tokenizer)

    destination = Path(destination_path)
    atomic_write_text(destination / f"{TASK}.jsonl", "".join(json.dumps(q) + "\n" for q in questions))
    provenance = (f"{num_questions} questions, seed {seed}, {style} prompts, WordNet {wordnet_dir}, "
                  f"excluding the sample of {exclude_data_dir}")
    yaml_path = atomic_write_text(destination / f"{TASK}.yaml", TASK_YAML.format(provenance=provenance, task=TASK))
    print(f"wrote {num_questions} questions to {destination}: evaluate with "
          f"`python eval/lm_eval_harness.py --tasks {TASK} --include_path {destination} --checkpoint_dir ...`")
    return yaml_path


def prepared_sample(data_dir: Path, wordnet_dir: Path) -> tuple[list[dict], Tokenizer | None]:
    """The records scripts/prepare_wordnet.py sampled into `data_dir` (which keeps only tokens), drawn again.

    Its sample had num_train + num_test records (every sampled record is saved), and a sample's first n records
    are the same whatever the requested size beyond n, so that count and the recorded seed reproduce it. When the
    recorded tokenizer folder is at hand, the first training samples are tokenized again and must match: a
    different WordNet would otherwise leave the wrong words out without a word. Also returns that tokenizer.
    """
    settings = read_yaml_mapping(data_dir / "prepare.yaml", "pass a folder written by scripts/prepare_wordnet.py")
    if not str(settings.get("source", "")).startswith("wordnet:"):
        raise UserError(f"--exclude_data_dir {str(data_dir)!r} was not prepared by scripts/prepare_wordnet.py "
                        f"(source: {settings.get('source')!r}): pass the WordNet data the model was fine-tuned on")
    num_train, num_test, seed = int(settings["num_train"]), int(settings["num_test"]), int(settings["seed"])
    records = sample_wordnet(wordnet_dir, num_train + num_test, seed)
    tokenizer_dir = Path(str(settings.get("checkpoint_dir")))
    if not any((tokenizer_dir / name).is_file() for name in ("tokenizer.model", "tokenizer.json")):
        print(f"warning: {tokenizer_dir} (the tokenizer of {data_dir}) is gone, so the sample drawn again from "
              f"{wordnet_dir} is not checked against it", file=sys.stderr)
        return records, None
    tokenizer = Tokenizer(tokenizer_dir)
    train = load_split(data_dir, "train")
    order = split_indices(len(records), num_test, seed)["train"]
    for sample, index in itertools.islice(zip(train, order), NUM_CHECKED):
        again = tokenize_example(records[index], tokenizer, int(settings["max_seq_length"]),
                                 bool(settings["mask_inputs"]), str(settings["prompt_style"]))
        if not torch.equal(again["input_ids"], sample["input_ids"]):
            raise UserError(f"{data_dir} was not prepared from the WordNet in {wordnet_dir}: its training samples "
                            f"differ from the sample drawn again; pass the --wordnet_dir it was prepared with")
    return records, tokenizer


def make_questions(records: list[dict], excluded: list[dict], num_questions: int, seed: int) -> list[dict]:
    """Up to `num_questions` questions `{word, part_of_speech, choices, answer}`, for distinct words of `records`
    that are no lemma of `excluded`, with choices from `records` whose definitions are not in `excluded`.

    Each part of speech's definitions are dealt out in one seeded order, cycling, so distractors rarely repeat.
    A distractor must not have the question's word among its lemmas (it would be right too), and the four
    definitions must be distinct strings.
    """
    generator = torch.Generator().manual_seed(seed)
    excluded_words = {lemma.lower() for record in excluded for lemma in record["lemmas"]}
    excluded_definitions = {record["output"] for record in excluded}
    unseen = [record for record in records if record["output"] not in excluded_definitions]
    by_part_of_speech = defaultdict(list)
    for record in unseen:
        by_part_of_speech[record["part_of_speech"]].append(record)
    dealers = {pos: (len(pool), itertools.cycle([pool[i] for i in torch.randperm(len(pool), generator=generator)]))
               for pos, pool in sorted(by_part_of_speech.items())}

    questions, asked = [], set()
    for index in torch.randperm(len(unseen), generator=generator).tolist():
        if len(questions) == num_questions:
            break
        record = unseen[index]
        word = record["lemmas"][0]
        if word.lower() in excluded_words or word.lower() in asked:
            continue
        pool_size, dealer = dealers[record["part_of_speech"]]
        definitions = [record["output"]]
        for candidate in itertools.islice(dealer, pool_size):
            if candidate["output"] not in definitions and word.lower() not in map(str.lower, candidate["lemmas"]):
                definitions.append(candidate["output"])
                if len(definitions) == NUM_CHOICES:
                    break
        if len(definitions) < NUM_CHOICES:
            continue  # a part of speech with too few definitions (only in tiny WordNet folders)
        order = torch.randperm(NUM_CHOICES, generator=generator).tolist()
        asked.add(word.lower())
        questions.append({"word": word, "part_of_speech": record["part_of_speech"],
                          "choices": [definitions[i] for i in order], "answer": order.index(0)})
    return questions


if __name__ == "__main__":
    run_cli(prepare)
