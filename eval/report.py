"""Render results files of eval/lm_eval_harness.py as the paper's Table 1, in markdown: one row per run.

    python eval/report.py base.json lora.json dropbp.json --names LLaMA2-7B LoRA "LoRA+DropBP 0.5" --out table1.md

Columns: MMLU (5-shot) Humanities, STEM, Social, Other and Avg., then commonsense reasoning (0-shot) PIQA,
HellaSwag, ARC-C, ARC-E, OBQA, WinoG and Avg. Values are percent with one decimal; "–" marks a task the run
lacks.

Metrics, following the paper and lm-eval's conventions:
- MMLU: acc (its only metric). The categories are lm-eval's groups mmlu_humanities, mmlu_stem,
  mmlu_social_sciences and mmlu_other; Avg. is the `mmlu` group's acc, which weights every question equally.
- Commonsense: acc_norm (accuracy after normalising each choice's log-likelihood by its length) for PIQA,
  HellaSwag, ARC-C, ARC-E and OBQA, and acc for WinoGrande, which has no acc_norm. The paper's LLaMA2-7B row
  matches these (HellaSwag 76.0 is acc_norm; plain acc is about 57). Avg. is the mean of the six columns,
  shown only when all six are present.
A run evaluated with another few-shot count than the paper's gets a footnote.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from lit_gpt.utils import UserError, atomic_write_text

# (header, lm-eval task or group, metric, the paper's few-shot count)
MMLU_COLUMNS = [
    ("Humanities", "mmlu_humanities", "acc", 5),
    ("STEM", "mmlu_stem", "acc", 5),
    ("Social", "mmlu_social_sciences", "acc", 5),
    ("Other", "mmlu_other", "acc", 5),
]
MMLU_AVERAGE = ("MMLU Avg.", "mmlu", "acc", 5)
COMMONSENSE_COLUMNS = [
    ("PIQA", "piqa", "acc_norm", 0),
    ("HellaSwag", "hellaswag", "acc_norm", 0),
    ("ARC-C", "arc_challenge", "acc_norm", 0),
    ("ARC-E", "arc_easy", "acc_norm", 0),
    ("OBQA", "openbookqa", "acc_norm", 0),
    ("WinoG", "winogrande", "acc", 0),
]
HEADERS = ["Run"] + [c[0] for c in MMLU_COLUMNS] + [MMLU_AVERAGE[0]] + [c[0] for c in COMMONSENSE_COLUMNS] + ["CS Avg."]
MISSING = "–"


def load_results(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"results file {str(path)!r} does not exist: write it with eval/lm_eval_harness.py --out")
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(results, dict) or not isinstance(results.get("results"), dict):
        raise UserError(f"{path} has no 'results' section: pass the JSON that eval/lm_eval_harness.py --out wrote")
    return results


def score(results: dict[str, Any], task: str, metric: str) -> float | None:
    """A task's or group's metric (a fraction), unfiltered ("acc,none"), or None when absent."""
    for section in ("results", "groups"):
        value = (results.get(section) or {}).get(task, {}).get(f"{metric},none")
        if isinstance(value, (int, float)) and not math.isnan(value):
            return float(value)
    return None


def row_values(results: dict[str, Any]) -> list[float | None]:
    """The twelve numbers of one row, in percent."""
    def percent(column) -> float | None:
        value = score(results, column[1], column[2])
        return None if value is None else 100 * value

    mmlu = [percent(c) for c in MMLU_COLUMNS] + [percent(MMLU_AVERAGE)]
    commonsense = [percent(c) for c in COMMONSENSE_COLUMNS]
    average = None if None in commonsense else sum(commonsense) / len(commonsense)
    return mmlu + commonsense + [average]


def fewshot_notes(name: str, results: dict[str, Any]) -> list[str]:
    """Footnotes for the tasks this run scored with another few-shot count than the paper's."""
    shots = results.get("n-shot") or {}
    notes = []
    for header, task, _, expected in MMLU_COLUMNS + [MMLU_AVERAGE] + COMMONSENSE_COLUMNS:
        if task in shots and shots[task] != expected and score(results, task, "acc") is not None:
            notes.append(f"{name}: {header} was evaluated {shots[task]}-shot (the paper: {expected}-shot)")
    return notes


def render(runs: list[tuple[str, dict[str, Any]]]) -> str:
    """The markdown table for (name, results) pairs, with a caption and few-shot footnotes."""
    lines = [
        "MMLU 5-shot (acc) and commonsense reasoning 0-shot (acc_norm; WinoG acc), in percent.",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(HEADERS) - 1)) + "|",
    ]
    notes = []
    for name, results in runs:
        cells = [MISSING if v is None else f"{v:.1f}" for v in row_values(results)]
        lines.append("| " + " | ".join([name.replace("|", "\\|")] + cells) + " |")
        notes += fewshot_notes(name, results)
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path,
                        help="results JSON files written by eval/lm_eval_harness.py --out")
    parser.add_argument("--names", nargs="+", help="one row name per results file (default: the file names)")
    parser.add_argument("--out", type=Path, help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    try:
        names = args.names or [path.stem for path in args.results]
        if len(names) != len(args.results):
            raise UserError(f"--names has {len(names)} names for {len(args.results)} results files")
        table = render([(name, load_results(path)) for name, path in zip(names, args.results)])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(table, end="")
    if args.out is not None:
        atomic_write_text(args.out, table)
    return table


if __name__ == "__main__":
    main()
