"""Training step time against the DropBP drop rate (the paper's Table 5), for full fine-tuning and LoRA.

For each method the same randomly initialised model is timed at every drop rate, round-robin, so that
the noise of a shared machine hits all rates alike. The fastest of the timed steps is reported: other
processes only ever add time, so the minimum is the least disturbed measurement.
Forward and backward are timed separately (the optimizer step does not depend on the drop rate and is
left out). Two efficiency figures compare the saving with what it should be:

* straight-line: (T(0) - T(p)) / (p * (T(0) - T(1))), 1.0 when time falls linearly in p;
* straight-line to the p -> 1 limit: the same with T(1-), the time when every branch is dropped but the
  backward through the loss and the head still runs. At any p < 1 some branch is kept and needs that
  backward; at p = 1 with a frozen head (LoRA) it disappears. With a large vocabulary and a small model
  (SmolLM2-135M: a 49,152-token head on 30 narrow layers) that jump at p = 1 is a fifth of the LoRA backward,
  so this column shows how linear the saving is below p = 1;
* FLOPs theory: measured saving (T(0) - T(p)) / T(0) divided by the FLOPs saving from `dropbp.flops`,
  counted over the whole step (embedding, head and loss included).

    python bench/step_time.py                                  # CPU, fp32, SmolLM2-135M shape
    python bench/step_time.py --device cuda --model_name Llama-2-7b-hf --seq_len 512 --micro_batch_size 2
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is a folder of scripts, not a package

from common import default_dtype, machine_description, markdown_table, resolve_device, synchronize  # noqa: E402

from dropbp import DropBPHandler  # noqa: E402
from dropbp.flops import branch_flops, theoretical_saving  # noqa: E402
from lit_gpt.config import Config  # noqa: E402
from lit_gpt.lora import LoRAConfig, add_lora  # noqa: E402
from lit_gpt.model import GPT  # noqa: E402
from lit_gpt.utils import UserError, parse_dtype, run_cli  # noqa: E402


def build_model(config: Config, method: str, device: torch.device, dtype: torch.dtype, seq_len: int, seed: int):
    torch.manual_seed(seed)
    with torch.device(device):
        model = GPT(config)
    model.reset_parameters()
    model.to(dtype)
    if method == "lora":
        add_lora(model, LoRAConfig())  # r = 8, alpha = 16 on every linear, as in the paper
    model.train()
    handler = DropBPHandler(model, seed=seed)
    handler.set_branch_flops([f.backward for f in branch_flops(config, seq_len, method)])
    return model, handler


def timed_step(model, handler, ids: torch.Tensor, device: torch.device,
               keep_head_backward: bool = False) -> tuple[float, float]:
    """Seconds for the forward (with loss) and the backward of one micro-batch.

    `keep_head_backward` makes the final norm's output require grad, so the backward through the loss and
    the head runs even when every branch is dropped (the p -> 1 limit).
    """
    model.zero_grad(set_to_none=True)
    hook = model.transformer.ln_f.register_forward_hook(lambda m, i, out: out.detach().requires_grad_()) \
        if keep_head_backward else None
    synchronize(device)
    start = time.perf_counter()
    logits = model(ids[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
    synchronize(device)
    middle = time.perf_counter()
    if keep_head_backward or not handler.detect_non_grad():  # as in training: skip when nothing can learn
        loss.backward()
    synchronize(device)
    if hook is not None:
        hook.remove()
    return middle - start, time.perf_counter() - middle


def measure(method: str, config: Config, drop_rates: list[float], device, dtype, seq_len: int,
            micro_batch_size: int, steps: int, warmup: int, seed: int) -> dict[float | str, tuple[float, float]]:
    """Per-sample (forward ms, backward ms) for each drop rate, and under "1-" the p -> 1 limit."""
    model, handler = build_model(config, method, device, dtype, seq_len, seed)
    ids = torch.randint(0, config.vocab_size, (micro_batch_size, seq_len + 1), device=device,
                        generator=torch.Generator(device=device).manual_seed(seed))
    handler.set_initial_drop_rate(1.0)
    handler.draw()
    skips_backward_at_1 = handler.detect_non_grad()  # LoRA on a frozen head: the p -> 1 limit differs from p = 1
    settings = [(p, p, False) for p in drop_rates] + ([("1-", 1.0, True)] if 1.0 in drop_rates and skips_backward_at_1 else [])
    samples: dict[float | str, list[tuple[float, float]]] = {key: [] for key, _, _ in settings}
    for repeat in range(warmup + steps):
        for key, p, keep_head_backward in settings:
            handler.set_initial_drop_rate(p)
            forward_s, backward_s = timed_step(model, handler, ids, device, keep_head_backward)
            if repeat >= warmup:
                samples[key].append((forward_s, backward_s))
    per_sample_ms = 1000.0 / micro_batch_size
    fastest = {p: min(s, key=lambda fb: fb[0] + fb[1]) for p, s in samples.items()}
    return {p: (f * per_sample_ms, b * per_sample_ms) for p, (f, b) in fastest.items()}


def efficiency_rows(method: str, config: Config, seq_len: int,
                    timings: dict[float | str, tuple[float, float]]) -> list[dict]:
    total = {p: f + b for p, (f, b) in timings.items()}
    base, all_dropped, limit = total.get(0.0), total.get(1.0), total.get("1-")
    rows = []
    for p, (forward_ms, backward_ms) in timings.items():
        row = dict(method=method, drop_rate=p, forward_ms=forward_ms, backward_ms=backward_ms, total_ms=total[p])
        if base is not None and isinstance(p, float) and p > 0:
            row["reduction"] = 1 - total[p] / base
            row["flops_theory_saving"] = theoretical_saving(config, seq_len, method, p)
            row["flops_efficiency"] = row["reduction"] / row["flops_theory_saving"]
            if all_dropped is not None and p < 1:
                row["straight_line_efficiency"] = (base - total[p]) / (p * (base - all_dropped))
            if limit is not None and p < 1:
                row["limit_line_efficiency"] = (base - total[p]) / (p * (base - limit))
        rows.append(row)
    return rows


def render_table(rows: list[dict]) -> str:
    headers = ["method", "drop rate", "FW ms", "BW ms", "total ms", "reduction", "FLOPs-theory saving",
               "efficiency (straight line)", "efficiency (line to p→1)", "efficiency (FLOPs theory)"]
    def pct(row, key):
        return f"{row[key]:.1%}" if key in row else "–"
    def ratio(row, key):
        return f"{row[key]:.3f}" if key in row else "–"
    body = [[r["method"], "1− (head BW kept)" if r["drop_rate"] == "1-" else r["drop_rate"], f"{r['forward_ms']:.1f}", f"{r['backward_ms']:.1f}", f"{r['total_ms']:.1f}",
             pct(r, "reduction"), pct(r, "flops_theory_saving"), ratio(r, "straight_line_efficiency"),
             ratio(r, "limit_line_efficiency"), ratio(r, "flops_efficiency")] for r in rows]
    return markdown_table(headers, body)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r["drop_rate"], r["total_ms"], r.get("flops_theory_saving")) for r in rows
                        if r["method"] == method and isinstance(r["drop_rate"], float))
        line = ax.plot([p for p, *_ in points], [t for _, t, _ in points], "o-", label=f"{method}: measured")[0]
        base = dict((p, t) for p, t, _ in points).get(0.0)
        if base is not None:
            ax.plot([p for p, *_ in points], [base * (1 - (s or 0.0)) for _, _, s in points], "--",
                    color=line.get_color(), alpha=0.6, label=f"{method}: FLOPs theory")
    ax.set_xlabel("drop rate p")
    ax.set_ylabel("forward + backward ms per sample")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(
    model_name: str = "SmolLM2-135M",
    methods: list[str] = ["full", "lora"],
    drop_rates: list[float] = [0.0, 0.5, 0.75, 0.875, 1.0],
    seq_len: int = 256,
    micro_batch_size: int = 1,
    steps: int = 5,
    warmup: int = 1,
    device: str = "auto",
    dtype: str | None = None,
    seed: int = 1234,
    out: Path = Path("bench/results/step_time"),
) -> list[dict]:
    """Time forward and backward against the drop rate and write a markdown table, JSON and a plot.

    Args:
        model_name: a lit_gpt preset; its shape is used with random weights.
        methods: any of full, lora.
        drop_rates: uniform DropBP rates to time; include 0 and 1 for the straight-line efficiency.
        seq_len: tokens per sequence.
        micro_batch_size: sequences per step; times are reported per sequence.
        steps: timed steps per configuration (the fastest is reported).
        warmup: untimed steps per configuration first.
        device: cpu, cuda or auto.
        dtype: float32, bfloat16 or float16; default fp32 on CPU, bf16 on CUDA.
        seed: seed of the weights, the data and the drop decisions.
        out: folder for step_time.md, step_time.json and step_time.png.
    """
    for method in methods:
        if method not in ("full", "lora"):
            raise UserError(f"unknown method {method!r}: choose full or lora")
    if any(not 0 <= p <= 1 for p in drop_rates):
        raise UserError("drop rates must lie in [0, 1]")
    torch_device = resolve_device(device)
    torch_dtype = parse_dtype(dtype) or default_dtype(torch_device)
    config = Config.from_name(model_name, block_size=max(seq_len, 1))
    rows = []
    for method in methods:
        timings = measure(method, config, drop_rates, torch_device, torch_dtype, seq_len, micro_batch_size,
                          steps, warmup, seed)
        rows += efficiency_rows(method, config, seq_len, timings)

    machine = machine_description(torch_device)
    setting = (f"{model_name} shape, random weights, {str(torch_dtype).removeprefix('torch.')}, seq {seq_len}, "
               f"micro-batch {micro_batch_size}, fastest of {steps} steps")
    table = render_table(rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/step_time.py " + " ".join(sys.argv[1:])
    (out / "step_time.md").write_text(f"Machine: {machine}\n\nSetting: {setting}\n\nCommand: `{command.strip()}`\n\n{table}\n")
    (out / "step_time.json").write_text(json.dumps(dict(machine=machine, setting=setting, rows=rows), indent=2))
    plot(rows, out / "step_time.png", f"{setting}\n{machine}")
    print(f"Machine: {machine}\nSetting: {setting}\n\n{table}\n\nwrote {out}/step_time.md, .json, .png")
    return rows


if __name__ == "__main__":
    run_cli(main)
