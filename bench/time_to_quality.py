"""Time to quality: how soon each method reaches the baseline's best validation loss, tuned fairly and over seeds.

The protocol (SmolLM2-135M-Instruct, LoRA, WordNet definitions, loss on the responses only):

* every configuration runs at every `--learning_rates` value with the first seed (the learning-rate grid), and is
  judged at its best learning rate: the lowest final validation loss;
* the configurations in `--headline` then run their best learning rate with every other `--seeds` value;
* the target is the baseline's best final validation loss (mean over its seeds at its best learning rate), and a
  looser one 1 % above it. For each configuration at its best learning rate, and for each seed, the training time
  (steps and DropBP's calibration, not validation) and the FLOPs (the cost model's price of every micro-batch's
  actual decisions) to reach each target are read off the validation curve, interpolated between evaluations.

Every run is written to `<out>/runs/<key>.json` as soon as it ends, and a run whose file exists is not run again: an
interrupted protocol resumes where it stopped, and two processes (one per CPU core) can share the queue of runs
(`--shard i/n`). The report (`time_to_quality.md`, `.json`, `.png`) is rebuilt from every run file present after each
run, and by `--report_only true`.

    python -m bench.time_to_quality --threads 1                                   # the full protocol, hours on CPU
    python -m bench.time_to_quality --configs '[baseline, dropbp-0.5+unbiased]' --headline '[]'
    python -m bench.time_to_quality --report_only true

A configuration is `baseline` or `dropbp-<p>` followed by any of these options, each after a `+`: `unbiased`,
`mlp`, `attention` (only those branches drop), `depth`, `flops` (allocators), `uniform` (no calibration),
`recalibrate` (recalibrate every 15 steps), `decay`, `ramp` (drop-rate schedules).

A scheduled configuration's step cost changes over the run, so its clean time is not measured but derived: step s
costs the baseline's clean step plus `drop_rate_scale(s)` times the saving of the same configuration without the
schedule (which needs both clean step times).
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

from bench.common import (
    drop_rate_history,
    finetune_run,
    machine_description,
    markdown_table,
    resolve_device,
    smollm2_checkpoint,
    wordnet_data,
    wordnet_finetune_flags,
    write_results,
)
from bench.convergence import REAL_MODEL, add_time_without_calibration, run_note, time_to_reach
from lit_gpt.schedule import drop_rate_scale
from lit_gpt.utils import UserError, atomic_write_text, run_cli

CONFIG_OPTIONS = {
    "unbiased": ["--unbiased", "true"],
    "mlp": ["--drop_branches", "mlp"],
    "attention": ["--drop_branches", "attention"],
    "depth": ["--allocator", "depth"],
    "flops": ["--allocator", "flops"],
    "uniform": ["--sensitivity", "none"],
    "decay": ["--drop_schedule", "decay"],
    "ramp": ["--drop_schedule", "ramp"],
    "recalibrate": ["--recalibrate_every", "15"],  # every 10 % of the default 150 steps, after the first at 10 %
}
STEP_TIME_FILE = "step_time.json"
TARGET_SLACK = 0.01  # the looser target: 1 % above the baseline's best final loss


def config_flags(config: str) -> list[str]:
    """The method flags of a configuration name such as `baseline` or `dropbp-0.5+unbiased+mlp`."""
    method, *options = config.split("+")
    if method == "baseline":
        if options:
            raise UserError(f"{config!r}: the baseline takes no options")
        return ["--method", "none"]
    if not method.startswith("dropbp-"):
        raise UserError(f"{config!r}: a configuration is `baseline` or `dropbp-<p>[+option...]`")
    try:
        p = float(method.removeprefix("dropbp-"))
    except ValueError:
        raise UserError(f"{config!r}: the drop rate after `dropbp-` must be a number, such as dropbp-0.5") from None
    if not 0 < p < 1:
        raise UserError(f"{config!r}: the drop rate must lie in (0, 1)")
    unknown = [o for o in options if o not in CONFIG_OPTIONS]
    if unknown:
        raise UserError(f"{config!r}: unknown option(s) {unknown}; choose from {sorted(CONFIG_OPTIONS)}")
    return ["--method", "dropbp", "--drop_rate", str(p)] + [f for o in options for f in CONFIG_OPTIONS[o]]


def parse_shard(shard: str) -> tuple[int, int]:
    """`i/n` as (i, n), with 0 <= i < n."""
    parts = shard.split("/")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or not int(parts[0]) < int(parts[1]):
        raise UserError(f"--shard must be i/n with 0 <= i < n (e.g. 0/2 and 1/2 for two processes), got {shard!r}")
    return int(parts[0]), int(parts[1])


def run_key(config: str, learning_rate: float, seed: int) -> str:
    return f"{config}_lr{learning_rate:g}_seed{seed}"


# ------------------------------------------------------------------------------------------------ the queue
def load_runs(out: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((Path(out) / "runs").glob("*.json"))]


def best_learning_rate(runs: list[dict], config: str, seed: int) -> float | None:
    """The learning rate with the lowest final validation loss among `config`'s grid runs (first seed)."""
    grid = [r for r in runs if r["config"] == config and r["seed"] == seed]
    return min(grid, key=lambda r: r["history"][-1]["val_loss"])["learning_rate"] if grid else None


def planned_runs(configs: list[str], headline: list[str], learning_rates: list[float], seeds: list[int],
                 runs: list[dict]) -> list[tuple[str, float, int]]:
    """The grid (every configuration at every rate, first seed), then the headline's other seeds at its best rate.

    The seed runs of a configuration are planned only once its whole grid has run.
    """
    plan = [(config, lr, seeds[0]) for config in configs for lr in learning_rates]
    done = {run_key(r["config"], r["learning_rate"], r["seed"]) for r in runs}
    for config in headline:
        if all(run_key(config, lr, seeds[0]) in done for lr in learning_rates):
            best = best_learning_rate(runs, config, seeds[0])
            plan += [(config, best, seed) for seed in seeds[1:]]
    return plan


# ------------------------------------------------------------------------------------------------ the summary
def mean_and_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


COSTS = ("train_seconds", "clean_seconds", "train_flops")  # measured time, time at the clean step cost, FLOPs


def summarise(runs: list[dict], seeds: list[int], clean: dict | None = None) -> dict:
    """Per configuration: the learning-rate grid, the best rate, and the costs to the two targets.

    `clean` (from `--measure_steps`) gives each configuration's step and calibration time on an idle machine; a
    run's `clean_seconds` are then its steps at that cost plus the calibrations it had made by then.
    """
    configs = list(dict.fromkeys(r["config"] for r in runs))
    summary: dict = {"configs": {}, "clean_step_time": clean or {}}
    for config in configs:
        best = best_learning_rate(runs, config, seeds[0])
        at_best = [r for r in runs if r["config"] == config and r["learning_rate"] == best]
        grid = {r["learning_rate"]: r["history"][-1]["val_loss"]
                for r in runs if r["config"] == config and r["seed"] == seeds[0]}
        finals = [r["history"][-1]["val_loss"] for r in at_best]
        for r in at_best:
            add_clean_seconds(r, config, clean or {})
        summary["configs"][config] = {"best_learning_rate": best, "grid": dict(sorted(grid.items())),
                                      "seeds": [r["seed"] for r in at_best], "final_losses": finals,
                                      "ms_per_step": statistics.median(r["ms_per_step"] for r in at_best),
                                      "runs": at_best}
    if "baseline" not in summary["configs"]:
        return summary
    target = statistics.fmean(summary["configs"]["baseline"]["final_losses"])
    summary["targets"] = {"best": target, "within_1pct": target * (1 + TARGET_SLACK)}
    for entry in summary["configs"].values():
        for name, loss in summary["targets"].items():
            for key in COSTS:  # clean_seconds only exist once the configuration's clean step time is measured
                entry[f"{key}_to_{name}"] = ([time_to_reach(r["history"], loss, key) for r in entry["runs"]]
                                             if all(key in r["history"][0] for r in entry["runs"]) else None)
    baseline = summary["configs"]["baseline"]
    for entry in summary["configs"].values():
        for name in summary["targets"]:
            for key in COSTS:
                entry[f"{key}_speedup_{name}"] = speedup(baseline[f"{key}_to_{name}"], entry[f"{key}_to_{name}"])
    return summary


SCHEDULES = ("decay", "ramp")


def add_clean_seconds(run: dict, config: str, clean: dict) -> None:
    """`clean_seconds` at every validation: the steps so far at the clean step costs, plus the calibrations so far.

    Nothing is added when the clean costs it needs are missing (the report then says "not measured").
    """
    method, *options = config.split("+")
    schedule = next((o for o in options if o in SCHEDULES), "constant")
    constant = "+".join([method] + [o for o in options if o not in SCHEDULES])
    if constant not in clean or (schedule != "constant" and "baseline" not in clean):
        return
    step_ms, calibration_s = clean[constant]["step_ms"], clean[constant]["calibration_s"]
    base_ms = clean["baseline"]["step_ms"] if schedule != "constant" else step_ms
    max_steps = run["history"][-1]["step"]
    cumulative = [0.0]  # ms of steps 0 .. s-1
    for step in range(max_steps):
        cumulative.append(cumulative[-1] + base_ms + drop_rate_scale(schedule, step, max_steps) * (step_ms - base_ms))
    calibration_steps = [e["step"] for e in run.get("drop_rate_history", []) if e.get("seconds")]
    for point in run["history"]:
        calibrations = sum(1 for step in calibration_steps if step < point["step"])
        point["clean_seconds"] = cumulative[point["step"]] / 1000 + calibrations * calibration_s


def speedup(baseline: list[float | None] | None, method: list[float | None] | None) -> float | None:
    """The baseline's mean cost over the method's, each over its seeds that reached the target (the table shows how
    many did)."""
    if baseline is None or method is None:
        return None
    baseline, method = [v for v in baseline if v is not None], [v for v in method if v is not None]
    return statistics.fmean(baseline) / statistics.fmean(method) if baseline and method else None


def render_tables(summary: dict, learning_rates: list[float]) -> str:
    """The learning-rate grid, each configuration at its best rate, and one table of costs per target."""
    configs, clean = summary["configs"], summary["clean_step_time"]
    grid_rows = [[config] + [fmt(entry["grid"].get(lr), ".4f") for lr in learning_rates]
                 + [f"{entry['best_learning_rate']:g}"] for config, entry in configs.items()]
    tables = [markdown_table(["configuration"] + [f"final val loss @ lr {lr:g}" for lr in learning_rates]
                             + ["best lr"], grid_rows)]
    best_rows = [[config, f"{entry['best_learning_rate']:g}", len(entry["seeds"]),
                  "{:.4f} ± {:.4f}".format(*mean_and_spread(entry["final_losses"])), f"{entry['ms_per_step']:.0f}",
                  fmt(clean.get(config, {}).get("step_ms"), ".0f"),
                  fmt(clean.get(config, {}).get("calibration_s"), ".1f")] for config, entry in configs.items()]
    tables.append(markdown_table(["configuration", "lr", "seeds", "final val loss (mean ± sd)",
                                  "median ms/step in the runs", "clean ms/step", "clean calibration s"], best_rows))
    for name, loss in summary.get("targets", {}).items():
        rows = [[config] + [cell for key, scale, spec in (("train_seconds", 1, ".0f"), ("clean_seconds", 1, ".0f"),
                                                          ("train_flops", 1e-12, ".2f"))
                            for cell in (cost_cell(scaled(entry[f"{key}_to_{name}"], scale), spec),
                                         fmt(entry[f"{key}_speedup_{name}"], ".2f"))]
                for config, entry in configs.items()]
        title = "the baseline's best final loss" if name == "best" else "1 % above it"
        tables.append(f"To {loss:.4f} ({title}), mean ± sd over the seeds that reached it:\n\n" + markdown_table(
            ["configuration", "s (measured)", "speed-up", "s (clean step time)", "speed-up", "TFLOPs", "speed-up"],
            rows))
    return "\n\n".join(tables)


def scaled(values: list[float | None] | None, scale: float) -> list[float | None] | None:
    return None if values is None else [None if v is None else v * scale for v in values]


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def cost_cell(values: list[float | None] | None, spec: str) -> str:
    """Mean ± sd over the seeds that reached the target, and how many did; `-` when not measured."""
    if values is None:
        return "-"
    reached = [v for v in values if v is not None]
    if not reached:
        return f"not reached (0/{len(values)})"
    mean, spread = mean_and_spread(reached)
    text = f"{mean:{spec}} ± {spread:{spec}}"
    return text if len(reached) == len(values) else f"{text} ({len(reached)}/{len(values)} seeds)"


def plot(summary: dict, path: Path, title: str) -> None:
    """Validation loss against training time and FLOPs (mean over seeds, min-max band), and the learning-rate grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for config, entry in summary["configs"].items():
        curves = [r["history"] for r in entry["runs"]]
        points = min(len(c) for c in curves)
        losses = [[c[i]["val_loss"] for c in curves] for i in range(points)]
        mean_loss = [statistics.fmean(values) for values in losses]
        for ax, key, scale in ((axes[0], "train_seconds", 1.0), (axes[1], "train_flops", 1e-12)):
            x = [statistics.fmean(c[i][key] for c in curves) * scale for i in range(points)]
            (line,) = ax.plot(x, mean_loss, marker=".", markersize=3,
                              label=f"{config} (lr {entry['best_learning_rate']:g}, {len(curves)} seeds)")
            if len(curves) > 1:
                ax.fill_between(x, [min(v) for v in losses], [max(v) for v in losses], color=line.get_color(),
                                alpha=0.2)
        rates = list(entry["grid"])
        axes[2].plot(rates, [entry["grid"][lr] for lr in rates], marker="o", label=config)
    for ax, xlabel in zip(axes[:2], ("training time (s; validation excluded)", "training TFLOPs (cost model)")):
        if "targets" in summary:
            ax.axhline(summary["targets"]["best"], color="gray", linestyle=":", linewidth=1,
                       label="baseline's best final loss")
        ax.set(xlabel=xlabel, ylabel="validation loss (responses only)")
    axes[2].set(xscale="log", xlabel="peak learning rate", ylabel="final validation loss (first seed)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    top = max(max(entry["grid"].values()) for entry in summary["configs"].values())
    for ax in axes[:2]:
        ax.set_ylim(top=min(ax.get_ylim()[1], top + 0.5))  # the first evaluations would squash the interesting end
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(out: Path, learning_rates: list[float], seeds: list[int], machine: str) -> dict:
    runs = load_runs(out)
    if not runs:
        raise UserError(f"no runs in {Path(out) / 'runs'} yet: run the protocol first")
    settings = {r["setting"] for r in runs}
    if len(settings) > 1:
        raise UserError(f"{Path(out) / 'runs'} mixes runs of different settings ({' / '.join(sorted(settings))}): "
                        "give each setting its own --out")
    setting = settings.pop()
    clean_file = Path(out) / STEP_TIME_FILE
    summary = summarise(runs, seeds, json.loads(clean_file.read_text()) if clean_file.is_file() else None)
    table = render_tables(summary, learning_rates)
    write_results(out, "time_to_quality", machine, setting, table, {"summary": summary})
    plot(summary, Path(out) / "time_to_quality.png", f"{setting}\n{machine}")
    return summary


# ------------------------------------------------------------------------------------------------ one run
def train_one(config: str, learning_rate: float, seed: int, common_flags: list[str], work_dir: Path,
              threads: int | None, setting: str) -> dict:
    run_dir = Path(work_dir) / "time_to_quality" / run_key(config, learning_rate, seed)
    shutil.rmtree(run_dir, ignore_errors=True)
    flags = common_flags + ["--out_dir", str(run_dir), "--seed", str(seed), "--train.learning_rate",
                            str(learning_rate)] + config_flags(config)
    trainer = finetune_run("lora", flags, threads)
    allocations = drop_rate_history(trainer)
    add_time_without_calibration(trainer.val_history, allocations)
    return {"config": config, "learning_rate": learning_rate, "seed": seed, "setting": setting, "flags": flags,
            "history": trainer.val_history, "ms_per_step": statistics.median(trainer.step_ms),
            "note": run_note(trainer), "drop_rate_history": allocations, "final": str(run_dir / "final")}


def measure_step_time(configs: list[str], common_flags: list[str], work_dir: Path, steps: int, rounds: int,
                      threads: int | None) -> dict:
    """Each configuration's median step time and calibration time on an otherwise idle machine, runs alternating.

    The protocol's runs share the machine (one per core), so their own timings carry the load of whatever else
    ran; the report converts their steps to a target into time with these clean costs instead.
    """
    samples: dict[str, dict[str, list[float]]] = {c: {"step_ms": [], "calibration_s": []} for c in configs}
    for _ in range(rounds):
        for config in configs:  # alternating, so that a drift of the machine's speed hits every configuration alike
            run_dir = Path(work_dir) / "time_to_quality" / "step-time"
            shutil.rmtree(run_dir, ignore_errors=True)
            flags = common_flags + ["--out_dir", str(run_dir), "--train.max_steps", str(steps),
                                    "--train.eval_interval", str(steps)] + config_flags(config)
            trainer = finetune_run("lora", flags, threads)
            samples[config]["step_ms"] += trainer.step_ms[1:]  # the first step warms the allocator up
            samples[config]["calibration_s"] += [e["seconds"] for e in drop_rate_history(trainer) if e["seconds"]]
    return {config: {"step_ms": statistics.median(s["step_ms"]),
                     "calibration_s": statistics.median(s["calibration_s"]) if s["calibration_s"] else 0.0,
                     "threads": threads, "steps": len(s["step_ms"])} for config, s in samples.items()}


def main(
    configs: list[str] = ["baseline", "dropbp-0.5"],
    headline: list[str] | None = None,
    learning_rates: list[float] = [5e-4, 1e-3, 2e-3],
    seeds: list[int] = [1337, 1338, 1339],
    steps: int = 150,
    global_batch_size: int = 8,
    micro_batch_size: int = 1,
    warmup_steps: int = 10,
    eval_interval: int = 10,
    samples: int = 2000,
    test_size: int = 48,
    max_seq_length: int = 64,
    mask_inputs: bool = True,
    prompt_style: str = "chatml",
    threads: int | None = 1,
    device: str = "cpu",
    shard: str = "0/1",
    report_only: bool = False,
    measure_steps: int = 0,
    work_dir: Path = Path("out/bench"),
    out: Path = Path("bench/results/time_to_quality"),
) -> dict:
    """Run the time-to-quality protocol (or the part of it not yet run) and write its report.

    Args:
        configs: configurations to tune over `learning_rates`: `baseline`, `dropbp-<p>[+option...]`.
        headline: configurations that also run every other seed at their best rate; default: all of `configs`.
        learning_rates: the peak learning rates of the grid (the protocol asks for at least 3 spanning 4x).
        seeds: the first seed runs the grid; the others run the headline configurations at their best rate.
        steps: optimizer steps per run.
        global_batch_size: samples per optimizer step.
        micro_batch_size: samples per forward (each micro-batch draws its own DropBP decisions).
        warmup_steps: linear warm-up steps of the cosine schedule.
        eval_interval: optimizer steps between validations (the points of the curves).
        samples: WordNet records to prepare (train + validation), data seed 42.
        test_size: of those, held out for validation.
        max_seq_length: longer samples are truncated.
        mask_inputs: the loss (and the validation loss) on the responses only.
        prompt_style: the prompt around each instruction; chatml is SmolLM2-Instruct's own chat format, and about
            half as many tokens as alpaca's preamble.
        threads: torch threads; 1 with one process per core keeps the timings comparable.
        device: cpu or cuda.
        shard: `i/n` runs every n-th planned run starting at the i-th, for n processes sharing the queue.
        report_only: rebuild the report from the run files and stop.
        measure_steps: instead of training, time this many steps of every configuration (two alternating rounds)
            on the otherwise idle machine with `--threads`, into `<out>/step_time.json`; the report then gives
            each run's time to the targets at these clean costs as well.
        work_dir: the converted checkpoint, the data and the runs' output folders.
        out: the report, and `runs/` with one JSON per finished run.
    """
    headline = configs if headline is None else headline
    for config in configs:
        config_flags(config)
    if len(learning_rates) < 1 or len(seeds) < 1 or steps < 2:
        raise UserError("--learning_rates and --seeds need at least one value each, and --steps at least 2")
    if set(headline) - set(configs):
        raise UserError(f"--headline {sorted(set(headline) - set(configs))} not in --configs")
    index, count = parse_shard(shard)
    torch_device = resolve_device(device)
    machine = machine_description(torch_device)
    setting = (f"{REAL_MODEL}, LoRA r=8 α=16, WordNet {samples - test_size} train / {test_size} val, loss on "
               f"{'responses only' if mask_inputs else 'all tokens'}, {prompt_style} prompts, {steps} steps of "
               f"{global_batch_size} samples (micro-batch {micro_batch_size}), cosine schedule with {warmup_steps} "
               "warm-up steps, fp32")
    if report_only:
        return report(out, learning_rates, seeds, machine)
    checkpoint_dir = smollm2_checkpoint(work_dir)
    data_dir = wordnet_data(checkpoint_dir, work_dir, samples, test_size, seed=42, mask_inputs=mask_inputs,
                            prompt_style=prompt_style)
    common_flags = wordnet_finetune_flags(checkpoint_dir, data_dir, torch_device, global_batch_size, micro_batch_size,
                                          steps, warmup_steps, eval_interval, max_seq_length)
    if measure_steps:
        timed = [c for c in configs if not set(c.split("+")) & set(SCHEDULES)]  # derived from these (see above)
        clean = measure_step_time(timed, common_flags, work_dir, measure_steps, rounds=2, threads=threads)
        clean_file = Path(out) / STEP_TIME_FILE
        existing = json.loads(clean_file.read_text()) if clean_file.is_file() else {}
        atomic_write_text(clean_file, json.dumps(existing | clean, indent=1))
        return report(out, learning_rates, seeds, machine)
    runs_dir = Path(out) / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    while True:
        runs = load_runs(out)
        done = {run_key(r["config"], r["learning_rate"], r["seed"]) for r in runs}
        plan = planned_runs(configs, headline, learning_rates, seeds, runs)
        todo = [run for i, run in enumerate(plan) if i % count == index and run_key(*run) not in done]
        if not todo:
            break
        config, learning_rate, seed = todo[0]
        print(f"--- {run_key(config, learning_rate, seed)} ({len(todo)} left in this shard)", flush=True)
        result = train_one(config, learning_rate, seed, common_flags, work_dir, threads, setting)
        atomic_write_text(runs_dir / f"{run_key(config, learning_rate, seed)}.json", json.dumps(result, indent=1))
        report(out, learning_rates, seeds, machine)
    return report(out, learning_rates, seeds, machine)


if __name__ == "__main__":
    run_cli(main)
