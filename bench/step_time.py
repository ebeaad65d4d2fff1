"""Training step time per sample (the paper's Table 5): full, LoRA and QLoRA, with DropBP, PLD and GreenTrainer.

For each fine-tuning kind one randomly initialised model is built, and every setting is timed on it
round-robin, so that the noise of a shared machine hits all settings alike:

* baseline: plain training (every branch keeps its backward);
* DropBP at each `--drop_rates` value (uniform rates, as before calibration);
* PLD at its final keep level θ̄ (the end of its schedule, where it saves the most);
* GreenTrainer at `--gt_rho`, with the tensors its DP selects from one real importance step on the batch.

The fastest of the timed steps is reported: other processes only ever add time, so the minimum is the least
disturbed measurement. To keep that minimum fair for stochastic methods, each setting repeats one fixed set of
decisions: of 64 seeded draws, the one whose FLOPs are closest to the mean of the 64 (a representative draw).
Forward and backward are timed separately; the optimizer step does not depend on the method and is left out.

Columns:

* reduction: 1 - T / T(baseline);
* efficiency (straight line, DropBP only): (T(0) - T(p)) / (p * (T(0) - T(1-))), 1.0 when time falls linearly in
  p. T(1-) is the time with every branch's backward dropped but the rest of the step unchanged: it is the line
  through the work DropBP can drop. For LoRA, p = 1 drops more than that: nothing trainable is left, so the
  loop skips even the backward through the loss and the frozen head. That jump at p = 1 is not reachable at any
  p < 1, and the column "line to p = 1" shows how much it bends the line (a fifth of SmolLM2-135M's LoRA
  backward: its 49,152-token head is large against 30 narrow layers);
* efficiency (FLOPs theory): the reduction divided by the FLOPs saving of the same decisions, priced over the
  whole step (embedding, head and loss included) by `lit_gpt.flops`.

The model comes from the training loop's factory (`lit_gpt.build`) and every timed micro-batch runs through the
loop's `lit_gpt.loss.forward_backward`, including its rule for skipping the backward.

    python -m bench.step_time                                  # CPU, fp32, SmolLM2-135M shape, seq 256
    python -m bench.step_time --device cuda --model_name Llama-2-7b-hf --seq_len 512 --micro_batch_size 2
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import (
    default_dtype,
    detached_handler,
    machine_description,
    markdown_table,
    resolve_device,
    synchronize,
    training_model,
    write_results,
)
from dropbp import DropBPHandler
from lit_gpt.config import Config
from lit_gpt.flops import CostModel
from lit_gpt.loss import forward_backward, next_token_loss
from lit_gpt.model import GPT
from lit_gpt.utils import UserError, parse_dtype, run_cli

KINDS = ("full", "lora", "qlora")
CANDIDATE_DRAWS = 64


@dataclass
class Setting:
    """One row of the table: what `apply()` turns on for a step, and its label."""

    label: str
    drop_rate: float = 0.0
    enter: Callable[[], None] = lambda: None  # before each timed step
    leave: Callable[[], None] = lambda: None  # after it
    keep_head_backward: bool = False
    flops: float | None = None  # forward + backward FLOPs per sequence of its decisions
    note: str = ""


def step_flops(cost: CostModel, seq_len: int) -> float:
    """Forward + backward FLOPs of one sequence with the model's current decisions."""
    return sum(cost.current(seq_len))


def representative(draw: Callable[[int], None], price: Callable[[], float]) -> tuple[int, float]:
    """(index, FLOPs) of the seeded draw whose FLOPs are closest to the mean of `CANDIDATE_DRAWS` draws."""
    prices = []
    for index in range(CANDIDATE_DRAWS):
        draw(index)
        prices.append(price())
    mean = statistics.fmean(prices)
    index = min(range(CANDIDATE_DRAWS), key=lambda i: abs(prices[i] - mean))
    return index, prices[index]


def clear_drops(handler: DropBPHandler) -> None:
    """Rate 0 and no branch marked dropped, so that other settings run (and are priced) without DropBP."""
    handler.set_initial_drop_rate(0.0)
    handler.draw()


def dropbp_setting(cost: CostModel, handler: DropBPHandler, p: float, seq_len: int,
                   keep_head_backward=False, drop_mode: str = "branch") -> Setting:
    """DropBP at uniform rate p, repeating its representative decision. `handler` has no forward hook
    (`detached_handler`): the setting draws the decision itself, so every timed step runs the same one.
    `drop_mode` "weights" drops only the chosen branches' weight gradients (labelled apart from the paper's rows)."""
    def draw(index: int) -> None:
        handler.set_drop_mode(drop_mode)
        handler.set_initial_drop_rate(p)
        handler.draw(step=index)

    def leave() -> None:
        clear_drops(handler)
        handler.set_drop_mode("branch")

    index, flops = representative(draw, lambda: step_flops(cost, seq_len))
    label = "DropBP 1− (head BW kept)" if keep_head_backward else f"DropBP {p:g}"
    if drop_mode == "weights":
        label = f"weight grads only {p:g}"
    draw(index)
    dropped = sum(handler.dropped)
    leave()
    if keep_head_backward:
        flops = None  # the cost model prices the loop's real p = 1 step, which skips the head's backward
    return Setting(label, p, lambda: draw(index), leave, keep_head_backward, flops,
                   f"{dropped}/{len(handler.layers)} branches dropped")


def pld_setting(model: GPT, cost: CostModel, theta_bar: float, seed: int, seq_len: int) -> Setting:
    """PLD held at its final keep level θ̄, repeating its representative decision."""
    from lit_gpt.methods.pld import ProgressiveLayerDrop

    pld = ProgressiveLayerDrop(model, theta_bar=theta_bar, gamma=0.0, seed=seed)
    pld.remove()  # no forward hook: the setting draws the decision itself, and `remove` restores every block
    pld.set_theta(theta_bar)

    def draw(index: int) -> None:
        pld.draw(step=index)

    index, flops = representative(draw, lambda: step_flops(cost, seq_len))
    draw(index)
    kept = sum(b.keep for b in pld.blocks)
    pld.remove()  # other settings run every block
    return Setting(f"PLD θ̄={theta_bar:g}", enter=lambda: draw(index), leave=pld.remove, flops=flops,
                   note=f"{kept}/{len(pld.blocks)} blocks kept")


def greentrainer_setting(model: GPT, cost: CostModel, rho: float, ids: torch.Tensor, seq_len: int) -> Setting:
    from lit_gpt.methods.greentrainer import GreenTrainer, normalise, tensor_importance

    gt = GreenTrainer(model, rho=rho, seq_len=seq_len)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def backward() -> None:
        next_token_loss(model(ids), ids).backward()  # the training loop's loss

    mask = gt.choose(normalise(tensor_importance([u.params for u in gt.units], backward, optimizer)).tolist())
    everything = [True] * len(gt.units)
    gt.apply(mask)
    flops = step_flops(cost, seq_len)
    gt.apply(everything)
    return Setting(f"GreenTrainer ρ={rho:g}", enter=lambda: gt.apply(mask), leave=lambda: gt.apply(everything),
                   flops=flops, note=f"{int(mask.sum())}/{len(gt.units)} tensors trained")


@contextmanager
def head_backward_kept(model: GPT, on: bool) -> Iterator[None]:
    """Make the final norm's output require grad, so the backward through loss and head runs even at p = 1."""
    hook = model.transformer.ln_f.register_forward_hook(lambda m, i, out: out.detach().requires_grad_()) if on else None
    try:
        yield
    finally:
        if hook is not None:
            hook.remove()


def timed_step(model: GPT, handler: DropBPHandler, ids: torch.Tensor, device: torch.device,
               keep_head_backward: bool) -> tuple[float, float]:
    """Seconds for the forward (with loss) and the backward of one micro-batch of `ids`.

    The micro-batch is the training loop's (`lit_gpt.loss.forward_backward`), with its rule for skipping the
    backward; the backward it calls is timed from its start, so the two halves split where the loop's do.
    """
    model.zero_grad(set_to_none=True)
    middle = None

    def backward(loss: torch.Tensor) -> None:
        nonlocal middle
        synchronize(device)
        middle = time.perf_counter()
        loss.backward()

    with head_backward_kept(model, keep_head_backward):
        synchronize(device)
        start = time.perf_counter()
        forward_backward(model, ids, ids, backward=backward,
                         skip_backward=lambda: not keep_head_backward and handler.detect_non_grad())
        synchronize(device)
        end = time.perf_counter()
    if middle is None:  # the backward was skipped: the whole micro-batch was its forward
        middle = end
    return middle - start, end - middle


def settings_for(model: GPT, handler: DropBPHandler, kind: str, ids: torch.Tensor, args: dict) -> list[Setting]:
    """Every setting of the table; `handler` must be a `detached_handler` of `model`."""
    seq_len = args["seq_len"]
    cost = CostModel(model)
    settings = [Setting("baseline", flops=step_flops(cost, seq_len))]
    settings += [dropbp_setting(cost, handler, p, seq_len) for p in args["drop_rates"] if p > 0]
    settings += [dropbp_setting(cost, handler, p, seq_len, drop_mode="weights") for p in args["weights_drop_rates"]]
    handler.set_initial_drop_rate(1.0)
    handler.draw()
    if 1.0 in args["drop_rates"] and handler.detect_non_grad():  # LoRA with a frozen head: p = 1 skips it too
        settings.append(dropbp_setting(cost, handler, 1.0, seq_len, keep_head_backward=True))
    clear_drops(handler)
    if args["pld_theta"] is not None:
        settings.append(pld_setting(model, cost, args["pld_theta"], args["seed"], seq_len))
    if args["gt_rho"] is not None:
        settings.append(greentrainer_setting(model, cost, args["gt_rho"], ids, seq_len))
    return settings


def measure(kind: str, config: Config, device: torch.device, dtype: torch.dtype, args: dict) -> list[dict]:
    """Per-sample forward, backward and total ms of every setting, fastest of `steps` round-robin repeats."""
    model = training_model(config, kind, device, dtype, args["seed"])
    handler = detached_handler(model, seed=args["seed"])
    # seq_len + 1 tokens drawn as before the loop's loss was shared; the model reads the first seq_len of them
    ids = torch.randint(0, config.vocab_size, (args["micro_batch_size"], args["seq_len"] + 1), device=device,
                        generator=torch.Generator(device=device).manual_seed(args["seed"]))[:, :-1]
    settings = settings_for(model, handler, kind, ids, args)
    samples: dict[str, list[tuple[float, float]]] = {s.label: [] for s in settings}
    for repeat in range(args["warmup"] + args["steps"]):
        for setting in settings:
            setting.enter()
            try:
                forward_s, backward_s = timed_step(model, handler, ids, device, setting.keep_head_backward)
            finally:
                setting.leave()
            if repeat >= args["warmup"]:
                samples[setting.label].append((forward_s, backward_s))
    per_sample_ms = 1000.0 / args["micro_batch_size"]
    rows = []
    for setting in settings:
        forward_s, backward_s = min(samples[setting.label], key=sum)
        rows.append(dict(kind=kind, setting=setting.label, drop_rate=setting.drop_rate,
                         head_backward_kept=setting.keep_head_backward, forward_ms=forward_s * per_sample_ms,
                         backward_ms=backward_s * per_sample_ms, total_ms=(forward_s + backward_s) * per_sample_ms,
                         flops=setting.flops, note=setting.note))
    return rows


def add_efficiencies(rows: list[dict]) -> list[dict]:
    """Reduction against the baseline and the two efficiency figures, per fine-tuning kind."""
    for kind in dict.fromkeys(r["kind"] for r in rows):
        group = [r for r in rows if r["kind"] == kind]
        base = group[0]
        dropbp = {r["drop_rate"]: r["total_ms"] for r in group if r["setting"].startswith("DropBP")
                  and not r["head_backward_kept"]}
        limit = next((r["total_ms"] for r in group if r["head_backward_kept"]), dropbp.get(1.0))
        for row in group[1:]:
            row["reduction"] = 1 - row["total_ms"] / base["total_ms"]
            if row["flops"] is not None and base["flops"]:
                row["flops_saving"] = 1 - row["flops"] / base["flops"]
                if row["flops_saving"] > 0:
                    row["flops_efficiency"] = row["reduction"] / row["flops_saving"]
            p = row["drop_rate"]
            if row["setting"].startswith("DropBP") and 0 < p < 1 and not row["head_backward_kept"]:
                if limit is not None:
                    row["straight_line_efficiency"] = ((base["total_ms"] - row["total_ms"])
                                                       / (p * (base["total_ms"] - limit)))
                if 1.0 in dropbp:
                    row["line_to_1_efficiency"] = ((base["total_ms"] - row["total_ms"])
                                                   / (p * (base["total_ms"] - dropbp[1.0])))
    return rows


def render_table(rows: list[dict]) -> str:
    headers = ["fine-tuning", "setting", "FW ms", "BW ms", "total ms", "reduction", "FLOPs saving",
               "efficiency (straight line)", "efficiency (line to p = 1)", "efficiency (FLOPs theory)", "decisions"]

    def pct(row, key):
        return f"{row[key]:.1%}" if key in row else "–"

    def ratio(row, key):
        return f"{row[key]:.3f}" if key in row else "–"

    body = [[r["kind"], r["setting"], f"{r['forward_ms']:.1f}", f"{r['backward_ms']:.1f}", f"{r['total_ms']:.1f}",
             pct(r, "reduction"), pct(r, "flops_saving"), ratio(r, "straight_line_efficiency"),
             ratio(r, "line_to_1_efficiency"), ratio(r, "flops_efficiency"), r["note"]] for r in rows]
    return markdown_table(headers, body)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Stacked forward/backward bars per setting, one panel per fine-tuning kind, with the FLOPs-theory total."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 4.6), sharey=False, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        group = [r for r in rows if r["kind"] == kind]
        x = range(len(group))
        forward = [r["forward_ms"] for r in group]
        ax.bar(x, forward, color="#9ecae1", label="forward")
        ax.bar(x, [r["backward_ms"] for r in group], bottom=forward, color="#3182bd", label="backward")
        base = group[0]
        theory = [base["total_ms"] * r["flops"] / base["flops"] if r["flops"] and base["flops"] else None
                  for r in group]
        ax.plot([i for i, t in zip(x, theory) if t], [t for t in theory if t], "k_", markersize=18, mew=2,
                label="FLOPs theory")
        ax.set_xticks(list(x), [r["setting"].replace("DropBP 1− (head BW kept)", "DropBP 1−") for r in group],
                      rotation=60, ha="right", fontsize=8)
        ax.set_title(kind)
        ax.set_ylabel("ms per sample")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(
    model_name: str = "SmolLM2-135M",
    methods: list[str] = ["full", "lora", "qlora"],
    drop_rates: list[float] = [0.5, 0.75, 0.875, 1.0],
    weights_drop_rates: list[float] = [],
    pld_theta: float | None = 0.5,
    gt_rho: float | None = 0.7,
    seq_len: int = 256,
    micro_batch_size: int = 1,
    steps: int = 5,
    warmup: int = 1,
    device: str = "auto",
    dtype: str | None = None,
    seed: int = 1234,
    out: Path = Path("bench/results/step_time"),
) -> list[dict]:
    """Time forward and backward of every method and write a markdown table, JSON and a plot.

    Args:
        model_name: a lit_gpt preset; its shape is used with random weights.
        methods: fine-tuning kinds to time: any of full, lora, qlora (bitsandbytes 4-bit base).
        drop_rates: uniform DropBP rates to time against the baseline; include 1 for the straight-line efficiency.
        weights_drop_rates: uniform rates of the weights drop mode (`--drop_mode weights`: dropped branches skip only
            their weight gradients) to time as well; none by default.
        pld_theta: PLD's final keep level θ̄ (timed at the end of its schedule); None leaves PLD out.
        gt_rho: GreenTrainer's FLOPs budget ρ; None leaves GreenTrainer out.
        seq_len: tokens per sequence.
        micro_batch_size: sequences per step; times are reported per sequence.
        steps: timed steps per setting (the fastest is reported).
        warmup: untimed steps per setting first.
        device: cpu, cuda or auto.
        dtype: float32, bfloat16 or float16; default fp32 on CPU, bf16 on CUDA.
        seed: seed of the weights, the data and the decisions.
        out: folder for step_time.md, step_time.json and step_time.png.
    """
    for kind in methods:
        if kind not in KINDS:
            raise UserError(f"unknown fine-tuning method {kind!r}: choose from {', '.join(KINDS)}")
    if any(not 0 < p <= 1 for p in drop_rates + weights_drop_rates):
        raise UserError(f"--drop_rates and --weights_drop_rates must lie in (0, 1] (the baseline is always timed), "
                        f"got {drop_rates} and {weights_drop_rates}")
    if pld_theta is not None and not 0 < pld_theta <= 1:
        raise UserError(f"--pld_theta must lie in (0, 1], got {pld_theta}")
    if gt_rho is not None and not 0 < gt_rho <= 1:
        raise UserError(f"--gt_rho must lie in (0, 1], got {gt_rho}")
    if steps < 1 or warmup < 0 or seq_len < 1 or micro_batch_size < 1:
        raise UserError("--steps, --seq_len and --micro_batch_size must be at least 1 and --warmup at least 0")
    torch_device = resolve_device(device)
    torch_dtype = parse_dtype(dtype) or default_dtype(torch_device)
    config = Config.from_name(model_name, block_size=max(seq_len, 1))
    args = dict(drop_rates=drop_rates, weights_drop_rates=weights_drop_rates, pld_theta=pld_theta, gt_rho=gt_rho,
                seq_len=seq_len, micro_batch_size=micro_batch_size, steps=steps, warmup=warmup, seed=seed)
    rows = []
    for kind in methods:
        print(f"timing {kind} ...", flush=True)
        rows += measure(kind, config, torch_device, torch_dtype, args)
    add_efficiencies(rows)

    machine = machine_description(torch_device)
    setting = (f"{model_name} shape, random weights, {str(torch_dtype).removeprefix('torch.')}, seq {seq_len}, "
               f"micro-batch {micro_batch_size}, fastest of {steps} steps")
    table = render_table(rows)
    write_results(out, "step_time", machine, setting, table, {"rows": rows})
    plot(rows, Path(out) / "step_time.png", f"{setting}\n{machine}")
    return rows


if __name__ == "__main__":
    run_cli(main)
