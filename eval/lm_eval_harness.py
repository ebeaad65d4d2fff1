"""Score a checkpoint with EleutherAI's lm-evaluation-harness: an `LM` over `lit_gpt.GPT`, and its CLI.

    python eval/lm_eval_harness.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf --out base.json
    python eval/lm_eval_harness.py --lora_path out/lora/alpaca --out lora.json       # base + merged adapters
    python eval/lm_eval_harness.py --checkpoint_dir X --tasks demo_choice --include_path eval/tasks
    python eval/lm_eval_harness.py --checkpoint_dir X --tasks wordnet_mc --include_path data/wordnet_mc  # see below

What it loads: a converted checkpoint or a full fine-tune (`--checkpoint_dir`), or a LoRA/QLoRA folder
written by finetune/*.py (`--lora_path`), whose adapters are merged into the base weights on load.
`--quantize bnb.nf4` then stores the linear layers in 4 bits (lit_gpt/quantize.py; works on CPU and CUDA).

The model is lm-eval's public `TemplateLM` (it encodes the requests; lm-eval's `Collator` orders them), not its
`HFLM`, which needs a transformers model: QLoRA as trained (4-bit base, float adapters beside it) has no such form.

The default tasks are the paper's Table 1: MMLU 5-shot and six commonsense tasks 0-shot. Each task keeps
its own few-shot count inside one `simple_evaluate` call: the tasks are built first, their count is set
on them, and the built tasks are handed to lm-eval (its `num_fewshot` argument would set one count for all).

Offline task YAMLs (see eval/tasks/) may give `data_files` relative to the YAML's folder; lm-eval itself would
resolve them against the working directory, so lm-eval indexes wrappers that `include:` them with absolute paths.
scripts/prepare_wordnet_mc.py writes such a folder: WordNet multiple choice for words the fine-tuning never saw.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, ignore_constructor, make_disjoint_window, warning_once
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from lit_gpt.checkpoint import (
    HYPERPARAMETERS_FILE,
    LORA_METHODS,
    finetuned_folder,
    load_finetuned,
    load_hyperparameters,
    load_model,
)
from lit_gpt.generate import generate_tokens
from lit_gpt.lora import fold_lora
from lit_gpt.model import GPT
from lit_gpt.quantize import check_quantize_mode, quantize_linears
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.utils import UserError, atomic_write_text, parse_dtype, run_cli

# The paper's Table 1: MMLU 5-shot, commonsense reasoning 0-shot.
PAPER_NUM_FEWSHOT: dict[str, int] = {
    "mmlu": 5, "piqa": 0, "hellaswag": 0, "arc_challenge": 0, "arc_easy": 0, "openbookqa": 0, "winogrande": 0,
}
PAPER_TASKS = list(PAPER_NUM_FEWSHOT)

log = logging.getLogger(__name__)


class LitGPTLM(TemplateLM):
    """lm-eval's model interface over a `lit_gpt.GPT` and its `Tokenizer`.

    - `loglikelihood` (TemplateLM's, over `_loglikelihood_tokens`): one forward pass per batch of requests,
      longest first; requests with the same input (the choices of a one-token multiple-choice question) share a
      row. Inputs longer than the block size lose tokens on the left.
    - `loglikelihood_rolling`: disjoint windows of `block_size` tokens, the first conditioned on BOS.
    - `generate_until`: one prompt at a time through the KV cache (lit_gpt.generate), cut at the first stop
      string, at most `max_gen_toks` tokens, stopping at the tokenizer's EOS ids; greedy unless sampling.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, batch_size: int = 1, max_gen_toks: int = 256,
                 seed: int = 1234, model_info: dict[str, Any] | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise UserError("--batch_size must be at least 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = model.config.block_size
        self.max_gen_toks = max_gen_toks
        self.seed = seed
        self.model_info = model_info or {}

    # ------------------------------------------------------------------ tokens
    @property
    def device(self) -> torch.device:
        return self.model.transformer.wte.weight.device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id if self.tokenizer.eos_id is not None else self.prefix_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is replaced by: BOS (EOS for tokenizers without one), as lm-eval's HF model does."""
        token_id = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id
        if token_id is None:
            raise ValueError("the tokenizer has neither a BOS nor an EOS token to condition an empty context on")
        return token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids; BOS as the checkpoint's tokenizer adds it (as HF does), none with `add_special_tokens=False`."""
        return self.tokenizer.encode(string, bos=False if add_special_tokens is False else None).tolist()

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(tokens)

    def get_model_info(self) -> dict[str, Any]:
        """Recorded under `config` in the results, so a results file says what was evaluated."""
        return dict(self.model_info)

    # ------------------------------------------------------------------ log-likelihoods
    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests: Sequence[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding would produce it) per request.

        Each request is (cache key, context ids, continuation ids). The model reads the last `block_size`
        tokens of context + continuation minus its final token; the logits at the continuation's positions
        score it.
        """
        for _, context, continuation in requests:
            if not context or not continuation or len(continuation) > self.max_length:
                raise ValueError(f"cannot score a continuation of {len(continuation)} tokens after {len(context)} "
                                 f"context tokens with block_size {self.max_length}")
        # As in lm-eval's HF model: longest first (the first batch shows at once whether memory suffices, and
        # padding stays small); requests whose inputs agree (context + continuation[:-1]) share one row.
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
                            group_by="contexts", group_fn=lambda r: r[1] + r[2][:-1])
        results = []
        progress = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm)
        for batch in collator.get_batched(n=self.batch_size):
            inputs = [(context + continuation)[-(self.max_length + 1):][:-1] for _, context, continuation in batch]
            # Right padding is invisible to the real tokens of a causal model: they only attend to the left.
            padded = pad_sequence([torch.tensor(tokens) for tokens in inputs], batch_first=True)
            logits = self.model(padded.to(self.device))
            for (group_key, context, group_continuation), tokens, row in zip(batch, inputs, logits):
                group_span = row[None, len(tokens) - len(group_continuation):len(tokens)]
                # One row scores every request of its group; a shorter continuation is the span's tail.
                for key, continuation, span in collator.get_cache(
                        req_str=group_key, cxt_toks=context, cont_toks=group_continuation, logits=group_span):
                    answer = self._score(span[0, -len(continuation):], continuation)
                    results.append(answer)
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, answer)
                    progress.update(1)
        progress.close()
        return collator.get_original(results)

    def _score(self, logits: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
        """Log-probability of `continuation` under `logits` (one row per token), and whether it is the argmax."""
        logits = logits[:, :self.model.config.vocab_size]  # the padded vocabulary's extra rows are no tokens
        log_probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(dim=-1)
        target = torch.tensor(continuation, device=log_probs.device)
        logprob = log_probs.gather(-1, target[:, None]).sum(dtype=torch.float64).item()
        return logprob, bool((log_probs.argmax(dim=-1) == target).all())

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts: disjoint windows of `block_size` predicted tokens, BOS before the first."""
        windows: list[tuple[None, list[int], list[int]]] = []
        owners: list[int] = []
        for index, (text,) in enumerate(request.args for request in requests):
            tokens = self.tok_encode(text, add_special_tokens=False)  # the prefix token plays BOS
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for context, gen_kwargs in tqdm([r.args for r in requests], desc="generate_until", disable=disable_tqdm):
            outputs.append(self.generate(context, **(gen_kwargs or {})))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), outputs[-1])
        return outputs

    @torch.inference_mode()
    def generate(self, context: str, **gen_kwargs: Any) -> str:
        """The continuation of `context`, cut before the first stop string in `until`.

        lm-eval's `normalize_gen_kwargs` reads the request's settings: at most `max_gen_toks` tokens (the context
        loses tokens on the left to make room), greedy unless `do_sample` (temperature 1 unless given). An EOS
        id ends generation too.
        """
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        stops, max_new_tokens = [s for s in kwargs.pop("until") if s], kwargs.pop("max_gen_toks")
        temperature = kwargs.pop("temperature", None)
        temperature = float(1.0 if temperature is None else temperature) if kwargs.pop("do_sample") else 0.0
        top_k = kwargs.pop("top_k", None)
        if kwargs:
            warning_once(log, "generate_until ignores the generation settings %s", ", ".join(sorted(kwargs)))
        prompt = (self.tok_encode(context) or [self.prefix_token_id])[-max(self.max_length - max_new_tokens, 1):]
        stop_ids = set(self.tokenizer.stop_ids)
        generator = torch.Generator(device=self.device).manual_seed(self.seed) if temperature > 0 else None
        new_tokens: list[int] = []
        tokens = generate_tokens(self.model, torch.tensor(prompt, device=self.device), max_new_tokens,
                                 temperature, top_k, stop_ids, generator)
        with contextlib.closing(tokens):  # stopping early still clears the KV cache
            for token in tokens:
                if token in stop_ids:
                    break
                new_tokens.append(token)
                if any(stop in self.tokenizer.decode(new_tokens) for stop in stops):
                    break
        return postprocess_generated_text(self.tokenizer.decode(new_tokens), stops, think_end_token=None)


# ---------------------------------------------------------------------- loading
def _is_lora_folder(folder: Path) -> bool:
    return (folder / HYPERPARAMETERS_FILE).is_file() and load_hyperparameters(folder).get("finetuning") in LORA_METHODS
def tokenizer_dir(folder: Path) -> Path:
    """The folder with the tokenizer files: `folder`, or for a fine-tune without them, its base checkpoint."""
    has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()
    if not has_tokenizer and (folder / HYPERPARAMETERS_FILE).is_file():
        base = load_hyperparameters(folder).get("checkpoint_dir")
        if base:
            return Path(base)
    return folder


def load_checkpoint(checkpoint_dir: Path | None = None, lora_path: Path | None = None,
                    device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    quantize: str | None = None) -> tuple[GPT, Tokenizer]:
    """The model to evaluate and its tokenizer.

    `checkpoint_dir` is a converted checkpoint or a full fine-tune; `lora_path` a LoRA/QLoRA folder from
    finetune/*.py, loaded on top of `checkpoint_dir` (default: the base its hyperparameters name). The adapters
    are merged into the float weights; with `quantize` they stay beside the 4-bit base layers instead, which is
    the forward pass QLoRA trained them in.
    """
    if checkpoint_dir is None and lora_path is None:
        raise UserError("pass --checkpoint_dir (a converted or fully fine-tuned checkpoint) or --lora_path")
    if lora_path is None and _is_lora_folder(Path(checkpoint_dir)):
        lora_path, checkpoint_dir = checkpoint_dir, None  # an adapter-only folder passed as the checkpoint
    # A quantized model is loaded on the CPU and moved one layer at a time: the float model need not fit the GPU.
    load_device = "cpu" if quantize else device
    if lora_path is not None:
        folder = finetuned_folder(lora_path)
        base_unnamed = _is_lora_folder(folder) and not load_hyperparameters(folder).get("checkpoint_dir")
        if checkpoint_dir is None and base_unnamed:
            raise UserError(f"{folder} does not name its base model: pass it with --checkpoint_dir")
        model = load_finetuned(folder, checkpoint_dir=checkpoint_dir, device=load_device, dtype=dtype, merge=False)
        if not quantize:
            fold_lora(model)
        tokenizer = Tokenizer(tokenizer_dir(Path(checkpoint_dir) if checkpoint_dir else folder))
    else:
        model = load_model(checkpoint_dir, device=load_device, dtype=dtype)
        tokenizer = Tokenizer(tokenizer_dir(Path(checkpoint_dir)))
    if quantize:
        model = quantize_linears(model, quantize, model.transformer.wte.weight.dtype, device).to(device)
    return model, tokenizer


# ---------------------------------------------------------------------- tasks
def task_names(tasks: str | Sequence[str] | None) -> list[str]:
    """`"a,b"`, `["a", "b"]` or None (the paper's tasks) as a list of names."""
    if tasks is None:
        return list(PAPER_TASKS)
    items = tasks.split(",") if isinstance(tasks, str) else [p for t in tasks for p in str(t).split(",")]
    names = [t.strip() for t in items if t.strip()]
    if not names:
        raise UserError("--tasks is empty: name at least one task, or leave it out for the paper's tasks")
    return names


def fewshot_counts(names: Sequence[str], num_fewshot: int | Mapping[str, int] | None = None) -> dict[str, int | None]:
    """Few-shot examples per requested task: `num_fewshot` for all (an int) or per name (a mapping), else the
    paper's count (MMLU 5, commonsense 0), else None: the task's own setting (0 when it has none)."""
    if isinstance(num_fewshot, int):
        return {name: num_fewshot for name in names}
    overrides = {**PAPER_NUM_FEWSHOT, **(num_fewshot or {})}
    return {name: overrides.get(name) for name in names}


def include_folders(include_path: str | Path | Sequence[str | Path] | None) -> list[Path]:
    paths = [] if include_path is None else [include_path] if isinstance(include_path, (str, Path)) else include_path
    folders = [Path(p).expanduser().resolve() for p in paths]
    for folder in folders:
        if not folder.is_dir():
            raise UserError(f"--include_path {str(folder)!r} is not a folder of task YAML files")
    return folders


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads a task YAML's plain keys; `!function` values are left unresolved (lm-eval's own loader imports them)."""


_TaskYamlLoader.add_constructor("!function", ignore_constructor)


def absolute_task_folder(folders: Sequence[Path], into: Path) -> dict[str, Path]:
    """Fill `into` with one YAML per YAML of `folders` that includes the original by its absolute path.

    lm-eval's `include:` keeps everything else as written (`!function` modules, nested includes resolve beside
    the original); only relative `dataset_kwargs.data_files` are overridden, resolved against the original's folder.
    Returns each wrapper's original.
    """
    originals = {}
    for number, folder in enumerate(folders):
        for original in sorted(folder.rglob("*.yaml")):
            wrapper = into / str(number) / original.relative_to(folder)
            wrapper.parent.mkdir(parents=True, exist_ok=True)
            wrapper.write_text(yaml.safe_dump({"include": str(original), **_absolute_data_files(original)}))
            originals[str(wrapper)] = original
    return originals


def _absolute_data_files(yaml_path: Path) -> dict[str, Any]:
    """`{"dataset_kwargs": ...}` with the YAML's relative data_files made absolute, or {} when none are relative."""
    try:
        config = yaml.load(yaml_path.read_text(encoding="utf-8"), Loader=_TaskYamlLoader)  # noqa: S506 (safe base)
    except (yaml.YAMLError, UnicodeDecodeError):
        return {}  # not for us to judge: lm-eval skips or reports it
    dataset_kwargs = config.get("dataset_kwargs") if isinstance(config, dict) else None
    if not isinstance(dataset_kwargs, dict) or dataset_kwargs.get("data_files") is None:
        return {}
    absolute = _resolve_paths(dataset_kwargs["data_files"], yaml_path.parent)
    if absolute == dataset_kwargs["data_files"]:
        return {}
    return {"dataset_kwargs": {**dataset_kwargs, "data_files": absolute}}


def _resolve_paths(data_files: Any, folder: Path) -> Any:
    """data_files may be a path, a list of them, or a dict of split -> path(s); URLs and absolute paths stay."""
    if isinstance(data_files, Mapping):
        return {split: _resolve_paths(files, folder) for split, files in data_files.items()}
    if isinstance(data_files, (list, tuple)):
        return [_resolve_paths(files, folder) for files in data_files]
    if isinstance(data_files, str) and "://" not in data_files and not Path(data_files).expanduser().is_absolute():
        return str(folder / data_files)
    return data_files


def task_manager(names: Sequence[str], local: Sequence[Path] = ()):
    """An lm-eval `TaskManager` that knows every name in `names`: the tasks in the `local` folders, and lm-eval's
    built-in tasks, indexed (about 10 s) only when a name needs them."""
    from lm_eval.tasks import TaskManager

    local = list(local)
    manager = TaskManager(include_path=local, include_defaults=False) if local else None
    if manager is None or _unknown(names, manager):
        manager = TaskManager(include_path=local or None, include_defaults=True)
    unknown = _unknown(names, manager)
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "list them with `lm_eval ls tasks`"
        where = " or in --include_path" if local else "; local YAML tasks need --include_path"
        raise UserError(f"unknown task {unknown[0]!r}: not an lm-eval task{where}; {hint}")
    return manager


def _unknown(names: Sequence[str], manager) -> list[str]:
    return [name for name in names if not manager.match_tasks([name])]


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


@dataclass
class Tasks:
    """Requested names and the lm-eval tasks and groups built for them (their data loaded)."""

    names: list[str]
    manager: Any  # lm_eval.tasks.TaskManager
    built: list  # lm_eval Task and Group objects


def prepare_tasks(tasks: str | Sequence[str] | None = None, num_fewshot: int | Mapping[str, int] | None = None,
                  include_path: str | Path | Sequence[str | Path] | None = None) -> Tasks:
    """Find and build the requested tasks and groups, each leaf task set to its own few-shot count."""
    names = task_names(tasks)
    folders = include_folders(include_path)
    built = []
    # Building a task reads its YAML and loads its data; afterwards lm-eval needs neither the YAML files again.
    with tempfile.TemporaryDirectory(prefix="lm_eval_tasks_") as scratch:
        originals = absolute_task_folder(folders, Path(scratch))
        manager = task_manager(names, [Path(scratch)] if folders else [])
        for name, shots in fewshot_counts(names, num_fewshot).items():
            for match in manager.match_tasks([name]):
                loaded = _load_task(manager, match)
                for task in loaded["tasks"].values():
                    if shots is not None:
                        task.set_config(key="num_fewshot", value=shots)
                    _name_original_yaml(task, originals)
                group = loaded.get("groups", {}).get(match)
                built.extend([group] if group is not None else loaded["tasks"].values())
    return Tasks(names, manager, built)


def _name_original_yaml(task, originals: Mapping[str, Path]) -> None:
    """The results' `configs` name the YAML a task came from: the original, not its deleted wrapper."""
    source = (task.get_config("metadata") or {}).get("config_source")
    if source in originals:
        task.set_config(key="metadata", value={"config_source": str(originals[source])}, update=True)


def _load_task(manager, name: str) -> dict[str, Any]:
    try:  # building a task loads its data set
        return manager.load([name])
    except OSError as e:  # ConnectionError, FileNotFoundError: the data is neither cached nor reachable
        raise UserError(
            f"could not load the data of task {name!r} ({_first_line(e)}): lm-eval downloads it "
            f"from the Hugging Face Hub into HF_HOME; run once online, or use local tasks (--include_path)"
        ) from None


def evaluate(lm: LitGPTLM, tasks: str | Sequence[str] | Tasks | None = None,
             num_fewshot: int | Mapping[str, int] | None = None, limit: int | float | None = None,
             include_path: str | Path | Sequence[str | Path] | None = None, seed: int = 1234,
             bootstrap_iters: int = 100_000) -> dict[str, Any]:
    """Run lm-eval on `lm` and return its results dict (`results`, `groups`, `n-shot`, `config`, ...).

    `tasks` are names (default: the paper's), or `prepare_tasks(...)` built already.
    """
    import lm_eval

    if not isinstance(tasks, Tasks):
        tasks = prepare_tasks(tasks, num_fewshot, include_path)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=tasks.built, limit=limit, task_manager=tasks.manager,
        batch_size=lm.batch_size, device=str(lm.device), log_samples=False, bootstrap_iters=bootstrap_iters,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )
    results["requested_tasks"] = tasks.names
    return results


# ---------------------------------------------------------------------- output
def summary_rows(results: dict[str, Any]) -> list[tuple[str, str, str, float, float | None]]:
    """(task, n-shot, metric, value, stderr) for the requested tasks and the groups directly below them."""
    scores = {**results.get("results", {}), **results.get("groups", {})}
    children = results.get("group_subtasks", {})
    names = []
    for name in results.get("requested_tasks") or list(scores):
        names += [name] + [child for child in children.get(name, []) if child in children]
    rows = []
    for name in dict.fromkeys(names):
        shots = results.get("n-shot", {}).get(name, "")
        for key, value in scores.get(name, {}).items():
            metric, comma, filter_name = key.partition(",")  # "acc,none": metric acc, no filter
            if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = scores[name].get(f"{metric}_stderr,{filter_name}")
            label = metric if filter_name in ("none", "") else f"{metric} ({filter_name})"
            rows.append((name, str(shots), label, float(value), stderr if isinstance(stderr, (int, float)) else None))
    return rows


def format_summary(results: dict[str, Any]) -> str:
    rows = [("task", "n-shot", "metric", "value", "± stderr")]
    for name, shots, metric, value, stderr in summary_rows(results):
        shown_stderr = "" if stderr is None or math.isnan(stderr) else f"{stderr:.4f}"
        rows.append((name, shots, metric, f"{value:.4f}", shown_stderr))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:])


def write_results(results: dict[str, Any], path: Path) -> Path:
    from lm_eval.utils import handle_non_serializable

    return atomic_write_text(path, json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))


# ---------------------------------------------------------------------- CLI
def setup(
    checkpoint_dir: Path | None = None,
    lora_path: Path | None = None,
    tasks: list[str] | str | None = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: int = 4,
    include_path: Path | None = None,
    out: Path | None = None,
    device: str = "auto",
    precision: str | None = None,
    quantize: str | None = None,
    max_gen_toks: int = 256,
    seed: int = 1234,
) -> dict[str, Any]:
    """Evaluate a checkpoint on lm-eval tasks and print a results table.

    Args:
        checkpoint_dir: a converted checkpoint or a full fine-tune folder (lit_model.pth, lit_config.json);
            with --lora_path, the base model (default: the one its hyperparameters.yaml names).
        lora_path: a LoRA/QLoRA folder written by finetune/*.py; the adapters are merged on load (with
            --quantize they run beside the 4-bit base layers, as QLoRA trained them).
        tasks: comma-separated lm-eval task or group names (globs allowed); default: the paper's Table 1,
            mmlu (5-shot), piqa, hellaswag, arc_challenge, arc_easy, openbookqa, winogrande (0-shot).
        num_fewshot: few-shot examples for every task; default: 5 for mmlu, 0 for the paper's other tasks,
            and each local task's own setting.
        limit: evaluate only this many documents per task (or this fraction, when below 1); for quick checks.
        batch_size: sequences per forward pass for log-likelihoods (generation runs one prompt at a time).
        include_path: a folder of task YAML files (e.g. eval/tasks); relative data_files are resolved against
            each YAML's folder.
        out: write lm-eval's results as JSON here (atomically); eval/report.py turns them into Table 1.
        device: cpu, cuda, or auto (cuda when available).
        precision: float32, bfloat16 or float16; default bfloat16 on CUDA, float32 on CPU.
        quantize: bnb.nf4 (or bnb.nf4-dq, bnb.fp4, bnb.fp4-dq): store the linear layers in 4 bits with bitsandbytes.
        max_gen_toks: the default generation length for tasks that do not set one.
        seed: seeds lm-eval's sampling of documents and few-shot examples, and generation.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = parse_dtype(precision) or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if quantize is not None:
        check_quantize_mode(quantize)
    if limit is not None:
        if limit <= 0:
            raise UserError("--limit must be positive: a number of documents, or a fraction below 1")
        limit = int(limit) if limit >= 1 else limit
    for folder in (checkpoint_dir, lora_path):  # fail before the slow task indexing
        if folder is not None and not Path(folder).exists():
            raise UserError(f"{str(folder)!r} does not exist: pass a converted checkpoint "
                            f"(scripts/convert_hf_checkpoint.py) or a folder written by finetune/*.py")
    prepared = prepare_tasks(tasks, num_fewshot, include_path)  # unknown tasks and missing data fail before loading
    model, tokenizer = load_checkpoint(checkpoint_dir, lora_path, device=device, dtype=dtype, quantize=quantize)
    info = {"checkpoint_dir": str(checkpoint_dir) if checkpoint_dir else None,
            "lora_path": str(lora_path) if lora_path else None, "precision": str(dtype).removeprefix("torch."),
            "quantize": quantize, "model_name": model.config.name}
    lm = LitGPTLM(model, tokenizer, batch_size=batch_size, max_gen_toks=max_gen_toks, seed=seed, model_info=info)
    results = evaluate(lm, prepared, limit=limit, seed=seed)
    if out is not None:
        write_results(results, Path(out))
    print(format_summary(results))
    if out is not None:
        print(f"results written to {out}", file=sys.stderr)
    return results


if __name__ == "__main__":
    run_cli(setup)
