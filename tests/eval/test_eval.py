"""eval/: the lm-eval model over lit_gpt.GPT, the offline task YAMLs, the CLI, and the Table 1 report.

A tiny random LLaMA (block_size 32) with a real 32k SentencePiece tokenizer. Log-likelihoods are compared
in float64, so that 1e-5 measures the slicing, truncation and windowing, not float32 rounding.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import math
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, add_sentencepiece_tokenizer, assert_one_line_error, tiny_shape
from lit_gpt import GPT, Config
from lit_gpt.checkpoint import load_model, save_finetuned
from lit_gpt.lora import LoRAConfig, add_lora, merge_lora
from lit_gpt.tokenizer import TOKENIZER_FILES, Tokenizer

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

TASKS_DIR = ROOT / "eval" / "tasks"
BLOCK_SIZE = 32
TINY = tiny_shape(name="tiny-eval", block_size=BLOCK_SIZE)


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


harness = load_module("lm_eval_harness", ROOT / "eval" / "lm_eval_harness.py")
report = load_module("eval_report", ROOT / "eval" / "report.py")


def run_eval_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "eval" / "lm_eval_harness.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def offline_hf(tmp_path_factory):
    """HF_HOME in a temporary folder and HF_DATASETS_OFFLINE=1, also for a `datasets` another test imported."""
    home = tmp_path_factory.mktemp("hf_home_eval")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(home))
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        import datasets.config

        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
        yield {"HF_HOME": str(home), "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    """A random tiny checkpoint folder with mistral-common's LLaMA-shaped 32k SentencePiece tokenizer."""
    folder = add_sentencepiece_tokenizer(tmp_path_factory.mktemp("tiny_checkpoint"))
    torch.manual_seed(0)
    config = Config(**TINY)
    model = GPT(config)
    model.reset_parameters(std=0.1)  # peakier than 0.02, so that argmax ties are far from rounding noise
    torch.save(model.state_dict(), folder / "lit_model.pth")
    config.save(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(checkpoint_dir) -> Tokenizer:
    return Tokenizer(checkpoint_dir)


@pytest.fixture(scope="module")
def model64(checkpoint_dir) -> GPT:
    return load_model(checkpoint_dir, dtype=torch.float64).eval()


def make_lm(model, tokenizer, batch_size=1, **kwargs):
    return harness.LitGPTLM(model, tokenizer, batch_size=batch_size, **kwargs)


def instance(kind: str, *arguments) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=tuple(arguments), idx=0)


# ---------------------------------------------------------------------- references, straight from the logits
@torch.inference_mode()
def reference_loglikelihood(model: GPT, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The model reads the last block_size tokens before the final one; score the continuation's positions."""
    tokens = (context + continuation)[-(BLOCK_SIZE + 1):]
    log_probs = model(torch.tensor([tokens[:-1]]))[0].log_softmax(dim=-1)
    total, greedy = 0.0, True
    first = len(tokens) - 1 - len(continuation)
    for position, target in zip(range(first, len(tokens) - 1), continuation):
        total += log_probs[position, target].item()
        greedy &= log_probs[position].argmax().item() == target
    return total, greedy


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's convention: encode context and context + continuation, the continuation is the difference;
    an empty context becomes BOS."""
    if not context:
        return [tokenizer.bos_id], tokenizer.encode(continuation, bos=False).tolist()
    context_ids = tokenizer.encode(context).tolist()
    return context_ids, tokenizer.encode(context + continuation).tolist()[len(context_ids):]


@torch.inference_mode()
def greedy_continuation(model: GPT, context: list[int], n: int) -> list[int]:
    """n tokens that are each the argmax in the window the log-likelihood of context + them is scored in."""
    start = max(0, len(context) + n - (BLOCK_SIZE + 1))
    continuation: list[int] = []
    for _ in range(n):
        logits = model(torch.tensor([(context + continuation)[start:]]))[0, -1]
        continuation.append(int(logits.argmax()))
    return continuation


LONG_CONTEXT = ("The committee met on a rainy Tuesday to decide where the new library should be built, and after "
                "three hours of debate about parking, trees, noise and the bus routes, it chose the old market square")
PAIRS = [
    ("The capital of France is", " Paris"),
    ("Question: How many legs does a spider have?\nAnswer:", " eight"),
    ("Question: How many legs does a spider have?\nAnswer:", " six legs, like an insect"),
    (LONG_CONTEXT, " by a narrow vote."),  # > 32 tokens: the context is left-truncated
    (LONG_CONTEXT + " next to the river", " and the station"),
    ("", "Hello world"),  # empty context: BOS conditions the first token
    ("A B C D E F G H I J", " k l m n o p q r s t u v w x y z a b c d e f g h i j"),  # 26 tokens: BOS, A-C cut
]


# ---------------------------------------------------------------------- log-likelihoods
@pytest.mark.parametrize("batch_size", [1, 8])
def test_loglikelihood_is_the_sum_of_the_continuations_log_probs(model64, tokenizer, batch_size):
    lm = make_lm(model64, tokenizer, batch_size=batch_size)
    encoded = [encode_pair(tokenizer, c, x) for c, x in PAIRS]
    assert any(len(c) + len(x) > BLOCK_SIZE + 1 for c, x in encoded), "no request needs truncation"
    results = lm.loglikelihood([instance("loglikelihood", c, x) for c, x in PAIRS], disable_tqdm=True)
    expected = [reference_loglikelihood(model64, c, x) for c, x in encoded]
    deltas = [abs(got[0] - want[0]) for got, want in zip(results, expected)]
    assert max(deltas) < 1e-5, deltas
    assert [got[1] for got in results] == [want[1] for want in expected]

    # Greedy continuations, after a short and after a truncated context, and one token off.
    short = tokenizer.encode("Once upon a time").tolist()
    long = tokenizer.encode(LONG_CONTEXT).tolist()
    greedy_short, greedy_long = greedy_continuation(model64, short, 3), greedy_continuation(model64, long, 4)
    wrong = greedy_short[:2] + [(greedy_short[2] + 1) % 32000]
    requests = [(None, short, greedy_short), (None, long, greedy_long), (None, short, wrong)]
    results = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert [greedy for _, greedy in results] == [True, True, False]
    for (_, context, continuation), (logprob, _greedy) in zip(requests, results):
        assert abs(logprob - reference_loglikelihood(model64, context, continuation)[0]) < 1e-5


def test_loglikelihood_shares_one_row_between_choices_with_the_same_input(model64, tokenizer):
    """MMLU's one-token answers after the same prompt need one forward row, and are scored apart."""
    lm = make_lm(model64, tokenizer, batch_size=4)
    context = tokenizer.encode("Question: 2 + 2 =\nA. 3\nB. 4\nAnswer:").tolist()
    letters = [tokenizer.encode(letter, bos=False).tolist()[-1:] for letter in (" A", " B", " C", " D")]
    calls = []
    forward = lm.model.forward
    lm.model.forward = lambda idx, *a, **k: calls.append(idx.shape) or forward(idx, *a, **k)
    try:
        results = lm._loglikelihood_tokens([(None, context, letter) for letter in letters], disable_tqdm=True)
    finally:
        del lm.model.forward
    assert calls == [torch.Size([1, len(context)])]
    for letter, (logprob, _) in zip(letters, results):
        assert abs(logprob - reference_loglikelihood(model64, context, letter)[0]) < 1e-5
    assert len({round(logprob, 6) for logprob, _ in results}) == 4


@torch.inference_mode()
def test_loglikelihood_rolling_sums_disjoint_windows(model64, tokenizer):
    text = " ".join([LONG_CONTEXT] * 3)
    tokens = tokenizer.encode(text, bos=False).tolist()
    assert len(tokens) > 3 * BLOCK_SIZE
    # Window by window: BOS + the text; each window predicts up to BLOCK_SIZE new tokens and reads the
    # BLOCK_SIZE tokens before its last prediction.
    sequence = [tokenizer.bos_id] + tokens
    expected, windows = 0.0, 0
    for begin in range(1, len(sequence), BLOCK_SIZE):
        end = min(begin + BLOCK_SIZE, len(sequence))
        start = max(0, end - 1 - BLOCK_SIZE)
        log_probs = model64(torch.tensor([sequence[start:end - 1]]))[0].log_softmax(dim=-1)
        expected += sum(log_probs[i - 1 - start, sequence[i]].item() for i in range(begin, end))
        windows += 1
    assert windows >= 4
    for batch_size in (1, 8):
        got = make_lm(model64, tokenizer, batch_size=batch_size).loglikelihood_rolling(
            [instance("loglikelihood_rolling", text)], disable_tqdm=True)
        assert abs(got[0] - expected) < 1e-5, (got[0], expected)


# ---------------------------------------------------------------------- generation
@torch.inference_mode()
def greedy_tokens_without_cache(model: GPT, prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


def test_generate_until_stops_at_the_first_stop_string_and_max_gen_toks(model64, checkpoint_dir, tokenizer):
    lm = make_lm(model64, tokenizer)
    context = "Once upon a time"
    reference = greedy_tokens_without_cache(model64, tokenizer.encode(context).tolist(), 12)
    text = tokenizer.decode(reference)

    # Two stop strings, the later one listed first: the text is cut before the earlier one.
    early = text[len(tokenizer.decode(reference[:4])):][:2]
    late = text[len(tokenizer.decode(reference[:9])):][:2]
    cut = min(text.find(early), text.find(late))
    assert 0 < cut < len(tokenizer.decode(reference[:5])), (text, early, late)
    outputs = lm.generate_until([
        instance("generate_until", context, {"until": [late, early], "max_gen_toks": 12, "do_sample": False}),
        instance("generate_until", context, {"until": [], "max_gen_toks": 5}),
        instance("generate_until", context, {"until": ["never appears"], "max_gen_toks": 12, "temperature": 0.0}),
    ], disable_tqdm=True)
    assert outputs[0] == text[:cut]
    assert outputs[1] == tokenizer.decode(reference[:5])  # max_gen_toks: the first 5 greedy tokens, no more
    assert outputs[2] == text  # greedy through the KV cache equals greedy without it

    # The tokenizer's EOS ids end generation too, and are not part of the text.
    eos_lm = make_lm(model64, Tokenizer(checkpoint_dir))
    eos_lm.tokenizer.stop_ids = [reference[3]]
    assert eos_lm.generate_until([instance("generate_until", context, {"until": [], "max_gen_toks": 12})],
                                 disable_tqdm=True) == [tokenizer.decode(reference[:3])]


# The generation settings of eval/tasks/demo_generate.yaml.
GENERATE_STOPS, GENERATE_MAX_TOKENS = ("\n", "Question:"), 16


def greedy_answer(model: GPT, tokenizer: Tokenizer, prompt: str) -> str:
    """The model's greedy continuation of `prompt`, as demo_generate's filter sees it: the prompt keeps its last
    block_size - max_gen_toks tokens (lm-eval's convention), an EOS id or the first stop string ends the text,
    outer whitespace is stripped."""
    prompt_ids = tokenizer.encode(prompt).tolist()[-(BLOCK_SIZE - GENERATE_MAX_TOKENS):]
    tokens = greedy_tokens_without_cache(model, prompt_ids, GENERATE_MAX_TOKENS)
    ends = [i for i, token in enumerate(tokens) if token in tokenizer.stop_ids]
    text = tokenizer.decode(tokens[:ends[0]] if ends else tokens)
    cut = min([i for i in map(text.find, GENERATE_STOPS) if i >= 0], default=len(text))
    return text[:cut].strip()


def normalized(answer: str) -> str:
    """demo_generate's exact_match ignores case and punctuation."""
    return answer.lower().translate(str.maketrans("", "", string.punctuation))


def expected_exact_match(model: GPT, tokenizer: Tokenizer, prompts: list[str], docs: list[dict]) -> float:
    """The share of prompts whose greedy answer matches the answer of the question the prompt ends with."""
    answers = {f"Question: {doc['question']}\nAnswer:": doc["answer"] for doc in docs}
    targets = [next(answer for ending, answer in answers.items() if prompt.endswith(ending)) for prompt in prompts]
    hits = [normalized(greedy_answer(model, tokenizer, p)) == normalized(t) for p, t in zip(prompts, targets)]
    return sum(hits) / len(hits)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def recording_prompts(lm) -> list[str]:
    """The prompts lm-eval sends to `lm.generate_until`, in a list that fills as it runs."""
    prompts = []
    generate_until = lm.generate_until

    def recording_generate_until(requests, **kwargs):
        prompts.extend(request.args[0] for request in requests)
        return generate_until(requests, **kwargs)

    lm.generate_until = recording_generate_until
    return prompts


# ---------------------------------------------------------------------- LoRA and 4-bit
@pytest.fixture(scope="module")
def finetuned(checkpoint_dir, tmp_path_factory) -> dict[str, Path]:
    """A LoRA folder (adapters only, random non-zero B) on the tiny base, and the merged model as a full fine-tune."""
    folder = tmp_path_factory.mktemp("finetuned")
    lora_config = LoRAConfig(r=4, alpha=8.0)
    model = load_model(checkpoint_dir)
    add_lora(model, lora_config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    common = {"checkpoint_dir": str(checkpoint_dir)}
    save_finetuned(model, folder / "lora", {"finetuning": "lora", **common,
                                            "lora": dataclasses.asdict(lora_config)})
    merge_lora(model)
    merged = GPT(model.config)
    merged.load_state_dict({k.replace(".linear.", "."): v for k, v in model.state_dict().items() if "lora_" not in k})
    save_finetuned(merged, folder / "full", {"finetuning": "full", **common})
    for name in TOKENIZER_FILES:  # as written before final/ folders carried the tokenizer: the fallback is tested
        (folder / "full" / name).unlink(missing_ok=True)
    return {"lora": folder / "lora", "full": folder / "full"}


def loglikelihoods(model: GPT, tokenizer: Tokenizer) -> list[float]:
    lm = make_lm(model, tokenizer, batch_size=4)
    return [logprob for logprob, _ in lm.loglikelihood([instance("loglikelihood", c, x) for c, x in PAIRS],
                                                       disable_tqdm=True)]


def test_base_plus_lora_scores_like_the_merged_full_checkpoint(checkpoint_dir, finetuned):
    assert not (finetuned["full"] / "tokenizer.model").exists()  # found through hyperparameters.yaml
    lora = loglikelihoods(*harness.load_checkpoint(lora_path=finetuned["lora"]))
    full = loglikelihoods(*harness.load_checkpoint(checkpoint_dir=finetuned["full"]))
    adapter_folder_as_checkpoint = loglikelihoods(*harness.load_checkpoint(checkpoint_dir=finetuned["lora"]))
    base = loglikelihoods(*harness.load_checkpoint(checkpoint_dir=checkpoint_dir))
    assert max(abs(a - b) for a, b in zip(lora, full)) < 1e-5
    assert adapter_folder_as_checkpoint == lora
    assert max(abs(a - b) for a, b in zip(lora, base)) > 1e-2  # the adapters do change the model


def test_quantize_nf4_runs_the_adapters_beside_4bit_linears(finetuned, tokenizer):
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit

    from lit_gpt.checkpoint import load_finetuned
    from lit_gpt.lora import LoRALinear

    model, _ = harness.load_checkpoint(lora_path=finetuned["lora"], quantize="bnb.nf4")
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized) == TINY["n_layer"] * 5 + 1  # qkv, proj, fc_1, fc_2, mlp.proj per block, and the head
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == len(quantized)
    # The same model in float, each 4-bit weight replaced by its dequantized value, scores the same.
    reference = load_finetuned(finetuned["lora"], merge=False)
    with torch.no_grad():
        for name, m in quantized.items():
            reference.get_submodule(name).weight.copy_(dequantize_4bit(m.weight.data, m.weight.quant_state))
            # On AVX512-BF16 CPUs bitsandbytes repacks the weights for a bf16 kernel at the first eval-mode
            # call (about 1e-2 off here); the float32 kernel makes the comparison exact.
            m.support_avx512bf16_for_cpu = False
    got, want = loglikelihoods(model, tokenizer), loglikelihoods(reference, tokenizer)
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5
    unquantized = loglikelihoods(*harness.load_checkpoint(lora_path=finetuned["lora"]))
    assert max(abs(a - b) for a, b in zip(got, unquantized)) > 1e-3  # the weights really are 4-bit


# ---------------------------------------------------------------------- lm-eval end to end, offline
def test_simple_evaluate_runs_the_local_tasks_offline(offline_hf, checkpoint_dir, tokenizer):
    lm = make_lm(load_model(checkpoint_dir), tokenizer, batch_size=8)
    prompts = recording_prompts(lm)
    results = harness.evaluate(lm, "demo_choice,demo_generate,demo_perplexity", num_fewshot={"demo_generate": 2},
                               include_path=TASKS_DIR, bootstrap_iters=100)
    scores = results["results"]
    # Each task keeps its own few-shot count inside one simple_evaluate call.
    assert results["n-shot"] == {"demo_choice": 0, "demo_generate": 2, "demo_perplexity": 0}
    assert len(prompts) == 8 and all(p.count("Question:") == 3 for p in prompts)  # 2 examples + the question
    # exact_match is what the model's own greedy answers to those prompts score against the targets.
    expected = expected_exact_match(lm.model, tokenizer, prompts, read_jsonl(TASKS_DIR / "demo_generate.jsonl"))
    assert scores["demo_generate"]["exact_match,strip"] == expected

    # acc is what our log-likelihoods say about each question's choices.
    docs = [json.loads(line) for line in (TASKS_DIR / "demo_choice.jsonl").read_text().splitlines()]
    correct = []
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        lls = lm.loglikelihood([instance("loglikelihood", context, " " + c) for c in doc["choices"]], disable_tqdm=True)
        correct.append(max(range(len(lls)), key=lambda i: lls[i][0]) == doc["answer"])
    assert scores["demo_choice"]["acc,none"] == pytest.approx(sum(correct) / len(docs))

    # word_perplexity is exp(-total log-likelihood / total words) of the rolling log-likelihoods.
    texts = [json.loads(line)["text"] for line in (TASKS_DIR / "demo_perplexity.jsonl").read_text().splitlines()]
    total = sum(lm.loglikelihood_rolling([instance("loglikelihood_rolling", t) for t in texts], disable_tqdm=True))
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    assert scores["demo_perplexity"]["word_perplexity,none"] == pytest.approx(math.exp(-total / words), rel=1e-6)


def test_exact_match_counts_the_models_greedy_answers(offline_hf, model64, tokenizer, tmp_path):
    """demo_generate with every other answer replaced by the model's own greedy answer: a task it half solves."""
    docs = read_jsonl(TASKS_DIR / "demo_generate.jsonl")
    for doc in docs[::2]:
        doc["answer"] = greedy_answer(model64, tokenizer, f"Question: {doc['question']}\nAnswer:")
    assert all(doc["answer"] for doc in docs), docs  # an empty answer would match without generating anything
    (tmp_path / "self_answer.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    task_yaml = (TASKS_DIR / "demo_generate.yaml").read_text()
    (tmp_path / "self_answer.yaml").write_text(task_yaml.replace("demo_generate", "self_answer"))

    lm = make_lm(model64, tokenizer)
    prompts = recording_prompts(lm)
    results = harness.evaluate(lm, "self_answer", include_path=tmp_path, bootstrap_iters=100)
    expected = expected_exact_match(model64, tokenizer, prompts, docs)
    assert len(prompts) == len(docs) and 0 < expected < 1, (prompts, expected)
    assert results["results"]["self_answer"]["exact_match,strip"] == expected


def test_default_tasks_are_the_papers_table_1(monkeypatch):
    """MMLU 5-shot; PIQA, HellaSwag, ARC-Challenge, ARC-Easy, OpenBookQA and WinoGrande 0-shot (paper, Table 1)."""
    paper = {"mmlu": 5, "piqa": 0, "hellaswag": 0, "arc_challenge": 0, "arc_easy": 0, "openbookqa": 0,
             "winogrande": 0}
    cli_defaults = {name: p.default for name, p in inspect.signature(harness.setup).parameters.items()}
    assert cli_defaults["tasks"] is None and cli_defaults["num_fewshot"] is None
    assert harness.fewshot_counts(harness.task_names(cli_defaults["tasks"])) == paper

    # The counts reach every task lm-eval builds, the subtasks of a group (MMLU) included.
    class FakeTask:
        def __init__(self, name):
            self.name, self.config = name, {}

        def set_config(self, key, value, update=False):
            self.config[key] = value

        def get_config(self, key):
            return self.config.get(key)

    built = {}

    class FakeManager:
        def match_tasks(self, names):
            return names

        def load(self, names):
            (name,) = names
            subtasks = [f"{name}_humanities", f"{name}_stem"] if name == "mmlu" else [name]
            built.update({subtask: FakeTask(subtask) for subtask in subtasks})
            groups = {name: f"group {name}"} if name == "mmlu" else {}
            return {"tasks": {subtask: built[subtask] for subtask in subtasks}, "groups": groups}

    monkeypatch.setattr(harness, "task_manager", lambda names, local: FakeManager())
    prepared = harness.prepare_tasks()
    assert {name: task.config.get("num_fewshot") for name, task in built.items()} == {
        "mmlu_humanities": 5, "mmlu_stem": 5, **{name: 0 for name in list(paper)[1:]}}
    assert prepared.names == list(paper) and prepared.built[0] == "group mmlu"

    # The names are lm-eval's: MMLU a group (its four categories are Table 1's columns), the others tasks.
    from lm_eval.tasks import TaskManager

    lm_eval_tasks = TaskManager()
    assert "mmlu" in lm_eval_tasks.all_groups
    assert set(paper) - {"mmlu"} <= set(lm_eval_tasks.all_subtasks)


def test_cli_writes_results_json_offline(offline_hf, checkpoint_dir, tmp_path):
    out = tmp_path / "results.json"
    result = run_eval_cli("--checkpoint_dir", str(checkpoint_dir), "--tasks", "demo_choice,demo_perplexity",
                          "--include_path", "eval/tasks", "--limit", "4", "--batch_size", "4", "--device", "cpu",
                          "--out", str(out), env=offline_hf)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["requested_tasks"] == ["demo_choice", "demo_perplexity"]
    assert results["n-samples"]["demo_choice"]["effective"] == 4
    assert 0 <= results["results"]["demo_choice"]["acc,none"] <= 1
    assert 0 <= results["results"]["demo_choice"]["acc_norm,none"] <= 1
    assert math.isfinite(results["results"]["demo_perplexity"]["bits_per_byte,none"])
    assert results["config"]["checkpoint_dir"] == str(checkpoint_dir)
    assert results["config"]["precision"] == "float32"
    assert re.search(r"demo_choice\s+0\s+acc\s+\d\.\d{4}", result.stdout), result.stdout


@pytest.mark.parametrize("case", ["missing checkpoint", "unknown task"])
def test_cli_bad_input_is_one_line(offline_hf, checkpoint_dir, tmp_path, case):
    if case == "missing checkpoint":
        result = run_eval_cli("--checkpoint_dir", str(tmp_path / "nope"), "--tasks", "demo_choice",
                              "--include_path", "eval/tasks", env=offline_hf)
        assert_one_line_error(result, "does not exist")
    else:  # looked up in eval/tasks, then in lm-eval's own tasks (about 10 s)
        result = run_eval_cli("--checkpoint_dir", str(checkpoint_dir), "--tasks", "demo_chioce",
                              "--include_path", "eval/tasks", env=offline_hf)
        assert_one_line_error(result, "unknown task 'demo_chioce'", "did you mean demo_choice")


# ---------------------------------------------------------------------- report
def paper_like_results(**n_shot) -> dict:
    """LLaMA2-7B's Table 1 row, with decoy values under the metrics the table must not use."""
    results = {
        "mmlu_humanities": {"acc,none": 0.435}, "mmlu_stem": {"acc,none": 0.370},
        "mmlu_social_sciences": {"acc,none": 0.516}, "mmlu_other": {"acc,none": 0.522}, "mmlu": {"acc,none": 0.457},
        "piqa": {"acc,none": 0.781, "acc_norm,none": 0.791},
        "hellaswag": {"acc,none": 0.571, "acc_norm,none": 0.760},
        "arc_challenge": {"acc,none": 0.433, "acc_norm,none": 0.462},
        "arc_easy": {"acc,none": 0.763, "acc_norm,none": 0.745},
        "openbookqa": {"acc,none": 0.314, "acc_norm,none": 0.440},
        "winogrande": {"acc,none": 0.693},
    }
    groups = {k: results[k] for k in ("mmlu", "mmlu_humanities", "mmlu_stem", "mmlu_social_sciences", "mmlu_other")}
    return {"results": results, "groups": groups, "n-shot": {"mmlu": 5, "piqa": 0, **n_shot}}


def test_report_renders_the_papers_table_1_row(tmp_path):
    full = paper_like_results()
    partial = paper_like_results(mmlu=0)
    for task in ("hellaswag", "mmlu_stem"):
        del partial["results"][task]
    partial["groups"].pop("mmlu_stem")
    (tmp_path / "base.json").write_text(json.dumps(full))
    (tmp_path / "partial.json").write_text(json.dumps(partial))

    table = report.main([str(tmp_path / "base.json"), str(tmp_path / "partial.json"),
                         "--names", "LLaMA2-7B", "LoRA|Alpaca", "--out", str(tmp_path / "table.md")])
    lines = table.splitlines()
    assert lines[2] == ("| Run | Humanities | STEM | Social | Other | MMLU Avg. | PIQA | HellaSwag | ARC-C | ARC-E "
                        "| OBQA | WinoG | CS Avg. |")
    assert "| LLaMA2-7B | 43.5 | 37.0 | 51.6 | 52.2 | 45.7 | 79.1 | 76.0 | 46.2 | 74.5 | 44.0 | 69.3 | 64.9 |" in lines
    assert "| LoRA\\|Alpaca | 43.5 | – | 51.6 | 52.2 | 45.7 | 79.1 | – | 46.2 | 74.5 | 44.0 | 69.3 | – |" in lines
    assert "- LoRA|Alpaca: MMLU Avg. was evaluated 0-shot (the paper: 5-shot)" in lines
    assert (tmp_path / "table.md").read_text() == table

    # The file name names a run by default; a missing file is a one-line error.
    assert "| base | 43.5 |" in report.main([str(tmp_path / "base.json")])
    result = subprocess.run([sys.executable, str(ROOT / "eval" / "report.py"), str(tmp_path / "missing.json")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert_one_line_error(result, "does not exist")
