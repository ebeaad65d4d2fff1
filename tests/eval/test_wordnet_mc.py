"""scripts/prepare_wordnet_mc.py: WordNet multiple-choice questions for words fine-tuning never saw, run by lm-eval.

A fake WordNet folder in the real file format (a few dozen synsets, some words with two senses or as a
second lemma, two synsets with the same gloss) and a data folder prepared from it by scripts/prepare_wordnet.py.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import pytest

import test_eval
from conftest import ROOT, add_sentencepiece_tokenizer, assert_one_line_error, run_script
from lit_gpt import Config
from lit_gpt.data import load_split
from test_eval import encode_pair, harness, load_module, make_lm, reference_loglikelihood

# test_eval's fixtures: a tiny random checkpoint (block size 32) with a real 32k SentencePiece tokenizer, the model
# in float64, and HF datasets offline in a temporary HF_HOME.
checkpoint_dir, model64, tokenizer, offline_hf = (
    test_eval.checkpoint_dir, test_eval.model64, test_eval.tokenizer, test_eval.offline_hf)

mc = load_module("prepare_wordnet_mc", ROOT / "scripts" / "prepare_wordnet_mc.py")
prepare_wordnet = load_module("prepare_wordnet", ROOT / "scripts" / "prepare_wordnet.py")

PART_OF_SPEECH_FILES = {"noun": ("data.noun", "n"), "verb": ("data.verb", "v"), "adjective": ("data.adj", "a"),
                        "adverb": ("data.adv", "r")}
NOUNS = ["apple", "river", "stone", "cloud", "tiger", "candle", "ladder", "garden", "mirror", "pillow", "basket",
         "window", "hammer", "violin", "rabbit", "carpet", "kettle", "button", "feather", "anchor", "lantern",
         "saddle", "marble", "pepper", "harbor", "blanket", "compass", "thimble", "trumpet", "walnut"]
VERBS = ["run", "jump", "sing", "write", "swim", "climb", "paint", "whistle", "knit", "bake"]
ADJECTIVES = ["red", "quiet", "bitter", "narrow", "gentle", "hollow", "brave", "sticky"]
ADVERBS = ["quickly", "softly", "rarely", "boldly", "gladly", "loosely"]


def fake_synsets() -> dict[str, list[tuple[list[str], str]]]:
    """(lemmas, gloss) per part of speech; glosses of varied length, so that acc_norm differs from acc."""
    def gloss(word: str, pos: str, i: int) -> str:
        return f"a {pos} like {word}" + " that is plain" * (i % 3) + (f'; "a {word} here"' if i % 4 == 0 else "")

    synsets = {pos: [([w], gloss(w, pos, i)) for i, w in enumerate(words)]
               for pos, words in (("noun", NOUNS), ("verb", VERBS), ("adjective", ADJECTIVES), ("adverb", ADVERBS))}
    synsets["noun"] += [
        (["river"], "a second sense of river"),  # a word with two senses: neither may be the other's distractor
        (["stream", "brook"], "a small river"),
        (["creek", "apple"], "a word whose second lemma names another question"),
        (["pebble"], "a noun like apple"),  # apple's definition too, once its example is dropped
        (["water_mill"], "a mill run by water"),  # underscores become spaces
    ]
    synsets["verb"] += [(["run"], "move fast on foot"), (["dash", "run"], "go somewhere in a hurry")]
    synsets["adjective"].append((["outback(a)"], "remote and sparsely settled"))  # position marker dropped
    return synsets


def write_wordnet(folder: Path, synsets: dict[str, list[tuple[list[str], str]]]) -> Path:
    """WordNet 3.0's data.* format: a licence header, then `offset lex_filenum ss_type w_cnt (word lex_id)* p_cnt
    | gloss`, w_cnt in hexadecimal."""
    folder.mkdir(parents=True, exist_ok=True)
    for pos, (name, ss_type) in PART_OF_SPEECH_FILES.items():
        lines = ["  1 This software and database is being provided to you, the LICENSEE, by Princeton University"]
        for offset, (lemmas, gloss) in enumerate(synsets[pos]):
            words = " ".join(f"{lemma} 0" for lemma in lemmas)
            lines.append(f"{offset:08d} 03 {ss_type} {len(lemmas):02x} {words} 000 | {gloss}  ")
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def wordnet_dir(tmp_path_factory) -> Path:
    return write_wordnet(tmp_path_factory.mktemp("wordnet"), fake_synsets())


@pytest.fixture(scope="module")
def prepared(wordnet_dir, tmp_path_factory) -> Path:
    """A fine-tuning data folder: a sample of 16 of the fake synsets, 12 train and 4 test (block size 256, so that
    no prompt is cut)."""
    folder = tmp_path_factory.mktemp("prepared")
    model_dir = add_sentencepiece_tokenizer(folder / "model")
    Config(name="tiny", n_layer=1, n_head=2, n_embd=16, intermediate_size=32, vocab_size=32000,
           block_size=256).save(model_dir)
    prepare_wordnet.prepare(model_dir, destination_path=folder / "data", wordnet_dir=wordnet_dir, max_samples=16,
                            test_size=4, seed=3)
    return folder / "data"


def write_questions(prepared: Path, wordnet_dir: Path, destination: Path, **kwargs) -> list[dict]:
    mc.prepare(prepared, destination_path=destination, wordnet_dir=wordnet_dir, **kwargs)
    return [json.loads(line) for line in (destination / "wordnet_mc.jsonl").read_text().splitlines()]


def trained_words_and_definitions(prepared: Path, tokenizer) -> tuple[set[str], set[str]]:
    """What fine-tuning sees, read back from the prepared tokens: the words asked for and the definitions."""
    words, definitions = set(), set()
    for split in ("train", "test"):
        for sample in load_split(prepared, split):
            text = tokenizer.decode(sample["input_ids"])
            words.add(re.search(r'Define the word "(.+?)" \(', text).group(1))
            definitions.add(text.split("### Response:\n", 1)[1].strip())
    return words, definitions


# ---------------------------------------------------------------------- the questions
def test_questions_have_four_distinct_choices_with_the_words_definition_at_answer(prepared, wordnet_dir, tmp_path):
    synsets = fake_synsets()

    def definition(gloss: str) -> str:  # WordNet's gloss as read_wordnet writes it: no example, a capital, a full stop
        text = gloss.split('; "')[0].strip()
        return text[0].upper() + text[1:] + "."

    senses = defaultdict(set)  # every definition each word has, as any of its synsets' lemmas
    for pos, entries in synsets.items():
        for lemmas, gloss in entries:
            for lemma in lemmas:
                senses[(re.sub(r"\(a\)$", "", lemma).replace("_", " "), pos)].add(definition(gloss))
    same_pos = {pos: {definition(gloss) for _, gloss in entries} for pos, entries in synsets.items()}

    for seed in range(4):  # with "run" and "river" asked for often enough to meet their other senses
        questions = write_questions(prepared, wordnet_dir, tmp_path / str(seed), num_questions=20, seed=seed)
        assert len(questions) == 20 and len({q["word"] for q in questions}) == 20
        for q in questions:
            choices, right = q["choices"], q["choices"][q["answer"]]
            assert len(choices) == 4 and len(set(choices)) == 4, q
            assert right in senses[(q["word"], q["part_of_speech"])], q
            assert set(choices) <= same_pos[q["part_of_speech"]], q
            assert not set(choices) - {right} & senses[(q["word"], q["part_of_speech"])], q  # no second right one
            assert q["prompt"].endswith(f'\n### Instruction:\nDefine the word "{q["word"]}" '
                                        f'({q["part_of_speech"]}).\n\n### Response:\n'), q["prompt"]
        assert len({q["answer"] for q in questions}) == 4  # the right definition is not always in the same place
        assert {q["part_of_speech"] for q in questions} >= {"noun", "verb", "adjective"}


def test_no_question_asks_for_a_word_or_offers_a_definition_fine_tuning_saw(prepared, wordnet_dir, tmp_path,
                                                                             tokenizer):
    words, definitions = trained_words_and_definitions(prepared, tokenizer)
    assert len(words) >= 14 and len(definitions) >= 14  # the sample really takes out a third of the synsets
    # As many questions as can be asked: every word outside the sample that has three other definitions.
    with pytest.raises(mc.UserError, match=r"--num_questions 100 is too many: only \d+ words") as too_many:
        write_questions(prepared, wordnet_dir, tmp_path / "too_many", num_questions=100, seed=1)
    most = int(re.search(r"only (\d+) words", str(too_many.value)).group(1))
    assert most >= 20
    questions = write_questions(prepared, wordnet_dir, tmp_path / "all", num_questions=most, seed=1)
    asked = {q["word"] for q in questions}
    assert len(asked) == most
    assert not asked & words
    assert not {choice for q in questions for choice in q["choices"]} & definitions
    # The prompt is the one fine-tuning used, up to the word.
    trained_text = tokenizer.decode(load_split(prepared, "train")[0]["input_ids"])
    assert questions[0]["prompt"].split('"')[0] == trained_text.split('"')[0]


def test_questions_are_determined_by_the_seed(prepared, wordnet_dir, tmp_path):
    first = write_questions(prepared, wordnet_dir, tmp_path / "a", num_questions=12, seed=5)
    again = write_questions(prepared, wordnet_dir, tmp_path / "b", num_questions=12, seed=5)
    other = write_questions(prepared, wordnet_dir, tmp_path / "c", num_questions=12, seed=6)
    assert (tmp_path / "a" / "wordnet_mc.jsonl").read_bytes() == (tmp_path / "b" / "wordnet_mc.jsonl").read_bytes()
    assert first == again and first != other
    chatml = write_questions(prepared, wordnet_dir, tmp_path / "d", num_questions=12, seed=5, prompt_style="chatml")
    assert [q["choices"] for q in chatml] == [q["choices"] for q in first]
    assert chatml[0]["prompt"] == (f'<|im_start|>user\nDefine the word "{first[0]["word"]}" '
                                   f'({first[0]["part_of_speech"]}).<|im_end|>\n<|im_start|>assistant\n')


def test_a_data_folder_from_another_wordnet_is_refused(prepared, tmp_path):
    """The sample is drawn again from --wordnet_dir; one with other glosses cannot be the one fine-tuned on."""
    synsets = fake_synsets()
    synsets["noun"] = [(lemmas, gloss + " indeed") for lemmas, gloss in synsets["noun"]]
    with pytest.raises(mc.UserError, match="was not prepared from the WordNet in"):
        write_questions(prepared, write_wordnet(tmp_path / "other", synsets), tmp_path / "mc", num_questions=4)


def test_bad_input_is_one_line(prepared, wordnet_dir, tmp_path):
    result = run_script("prepare_wordnet_mc.py", "--exclude_data_dir", str(prepared), "--wordnet_dir",
                        str(tmp_path / "nowhere"), "--destination_path", str(tmp_path / "mc"))
    assert_one_line_error(result, "not found", "apt-get install --no-install-recommends wordnet-base")

    alpaca = tmp_path / "alpaca"
    alpaca.mkdir()
    (alpaca / "prepare.yaml").write_text("source: alpaca-cleaned\nseed: 42\nnum_train: 10\nnum_test: 2\n")
    with pytest.raises(mc.UserError, match="was not prepared by scripts/prepare_wordnet.py"):
        write_questions(alpaca, wordnet_dir, tmp_path / "mc")
    with pytest.raises(mc.UserError, match="--num_questions must be at least 1"):
        write_questions(prepared, wordnet_dir, tmp_path / "mc", num_questions=0)
    assert not (tmp_path / "mc").exists()


# ---------------------------------------------------------------------- lm-eval end to end, offline
def test_lm_eval_scores_each_choice_by_its_log_likelihood_after_the_prompt(offline_hf, prepared, wordnet_dir,
                                                                           tmp_path, model64, tokenizer):
    questions = write_questions(prepared, wordnet_dir, tmp_path / "mc", num_questions=16, seed=2)
    results = harness.evaluate(make_lm(model64, tokenizer, batch_size=4), "wordnet_mc",
                               include_path=tmp_path / "mc", bootstrap_iters=100)
    scores = results["results"]["wordnet_mc"]

    right, right_norm = [], []
    for q in questions:
        # lm-eval moves the prompt's trailing newline into the continuation: the definition is scored with the
        # newline before it, tokenized together as in fine-tuning (the model's block size cuts the prompt's left).
        context = q["prompt"].rstrip()
        lls = [reference_loglikelihood(model64, *encode_pair(tokenizer, context, "\n" + choice))[0]
               for choice in q["choices"]]
        right.append(max(range(4), key=lambda i: lls[i]) == q["answer"])
        right_norm.append(max(range(4), key=lambda i: lls[i] / len(q["choices"][i])) == q["answer"])
    assert results["n-shot"] == {"wordnet_mc": 0}
    assert results["n-samples"]["wordnet_mc"]["effective"] == 16
    assert scores["acc,none"] == pytest.approx(sum(right) / 16)
    assert scores["acc_norm,none"] == pytest.approx(sum(right_norm) / 16)
    assert right != right_norm and 0 < sum(right) < 16  # the two metrics and the questions really differ


def test_the_task_folder_works_from_any_working_directory(offline_hf, prepared, wordnet_dir, tmp_path, monkeypatch):
    """The YAML names its JSONL relative to itself, so the folder can be moved."""
    write_questions(prepared, wordnet_dir, tmp_path / "mc", num_questions=4)
    (tmp_path / "mc").rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    tasks = harness.prepare_tasks("wordnet_mc", include_path=tmp_path / "moved")
    (task,) = tasks.built
    docs = list(task.test_docs())
    assert [doc["word"] for doc in docs] == [json.loads(line)["word"] for line in
                                             (tmp_path / "moved" / "wordnet_mc.jsonl").read_text().splitlines()]
    assert task.doc_to_text(docs[0]) == docs[0]["prompt"] and task.doc_to_choice(docs[0]) == docs[0]["choices"]
    assert task.doc_to_target(docs[0]) == docs[0]["answer"]
