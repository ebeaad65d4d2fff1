"""The seeds' methods side by side on one tiny run: FLOPs per step, ms per step and final validation loss.

Every method fine-tunes the same randomly initialised tiny LLaMA on the same instruction data (a real 32k
SentencePiece tokenizer, "repeat the word" records), with the same seed, batches and schedule, through the
one training loop (`lit_gpt.training`). Only `--method` and its own flags change between rows:

* FLOPs per step: one micro-batch of the last optimizer step, counted with FlopCounterMode ("measured") and
  priced by `lit_gpt.flops` for the decisions that micro-batch actually took ("theory"), times the
  micro-batches per step; and the mean over the run of every step's price ("run mean"), which is what a
  stochastic method (DropBP, PLD) costs on average;
* ms per step: median over the steps, the counted one left out (a short untimed run warms up first);
* final validation loss on the held-out records.

    python -m bench.methods                          # the tests' tiny shape (2 layers, n_embd 64, 32k vocab)
    python -m bench.methods --shape wide --steps 40  # 8 layers of n_embd 256: the blocks weigh more than the head
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

import torch

from bench.common import command_line, dropbp_handler, finetune_run, machine_description, markdown_table
from lit_gpt import Config
from lit_gpt.build import random_model
from lit_gpt.data import prepare_instruction_data

SHAPES = {
    "tiny": dict(n_layer=2, n_head=4, n_query_groups=2, n_embd=64, intermediate_size=128),  # tests/test_finetune.py
    "wide": dict(n_layer=8, n_head=8, n_query_groups=4, n_embd=256, intermediate_size=688),
}
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]
RUNS = [  # (label, flags)
    ("none", ["--method", "none"]),
    ("dropbp p=0.5", ["--method", "dropbp", "--drop_rate", "0.5"]),
    ("dropbp p=0.875", ["--method", "dropbp", "--drop_rate", "0.875"]),
    ("pld θ̄=0.5 γ=0.001", ["--method", "pld"]),
    ("pld θ̄=0.5 γ=0.1", ["--method", "pld", "--pld_gamma", "0.1"]),
    ("greentrainer ρ=0.5", ["--method", "greentrainer", "--gt_rho", "0.5"]),
    ("greentrainer ρ=0.8", ["--method", "greentrainer", "--gt_rho", "0.8"]),
]


def make_checkpoint_and_data(root: Path, shape: str) -> tuple[Path, Path]:
    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        raise SystemExit("error: the benchmark uses mistral-common's tokenizer: pip install --no-deps mistral-common")
    checkpoint_dir = root / "checkpoints" / f"bench-{shape}"
    checkpoint_dir.mkdir(parents=True)
    shutil.copy(Path(spec.origin).parent / "data" / "tokenizer.model.v1", checkpoint_dir / "tokenizer.model")
    config = Config(name=f"bench-{shape}", vocab_size=32000, block_size=96, **SHAPES[shape])
    config.save(checkpoint_dir)
    torch.save(random_model(config, seed=0).state_dict(), checkpoint_dir / "lit_model.pth")
    records = [{"instruction": f"Repeat the word {w} {n} times.", "input": "", "output": " ".join([w] * k)}
               for w in WORDS for n, k in (("two", 2), ("three", 3), ("four", 4)) for _ in range(2)]
    data_dir = root / "data"
    prepare_instruction_data(lambda: records, checkpoint_dir, data_dir, source="bench.methods", test_size=8, seed=42,
                             mask_inputs=False, max_seq_length=None)
    return checkpoint_dir, data_dir


def run(kind: str, flags: list[str], checkpoint_dir: Path, data_dir: Path, out_dir: Path, steps: int) -> dict:
    lr = "3e-3" if kind == "full" else "2e-2"
    argv = ["--checkpoint_dir", str(checkpoint_dir), "--data_dir", str(data_dir), "--out_dir", str(out_dir),
            "--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--train.max_steps", str(steps),
            "--train.warmup_steps", "4", "--train.learning_rate", lr, "--train.eval_interval", str(steps),
            "--train.sample_tokens", "0", "--train.save_interval", "0", *flags]
    trainer = finetune_run(kind, argv)
    measured, theory = trainer.flops["flops_per_step_measured"], trainer.flops["flops_per_step_theory"]
    step_ms = sorted(trainer.step_ms)
    method = trainer.method
    note = ""
    if method.name == "greentrainer":
        note = f"{int(method.selected.sum())}/{len(method.units)} tensors, {method.backward_fraction:.2f} of backward"
    elif method.name == "pld":
        note = f"θ(end) {method.theta:.3f}, kept {method.metrics()['pld_mean_kept_fraction']:.2f} of blocks"
    elif dropbp_handler(trainer) is not None:
        note = f"mean realised drop {dropbp_handler(trainer).mean_realised_drop_rate:.2f}"
    return {"measured": measured, "theory": theory, "run_mean": sum(trainer.step_flops) / len(trainer.step_flops),
            "ms": step_ms[len(step_ms) // 2], "val_loss": trainer.val_loss, "note": note}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of 4 samples (10 steps are an epoch)")
    parser.add_argument("--finetuning", nargs="+", default=["full", "lora"], choices=["full", "lora", "qlora"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads; one is fastest for tiny models")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "methods")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint_dir, data_dir = make_checkpoint_and_data(Path(tmp), args.shape)
        for kind in args.finetuning:
            run(kind, ["--method", "none"], checkpoint_dir, data_dir, Path(tmp) / f"{kind}-warmup", 3)  # not timed
            for label, flags in RUNS:
                print(f"--- {kind} {label}", flush=True)
                result = run(kind, flags, checkpoint_dir, data_dir, Path(tmp) / f"{kind}-{len(results)}", args.steps)
                results.append({"finetuning": kind, "method": label, **result})
    rows = [[r["finetuning"], r["method"], f"{r['measured']:.3g}", f"{r['theory']:.3g}",
             f"{r['measured'] / r['theory']:.3f}",
             f"{r['run_mean']:.3g}", f"{r['ms']:.1f}", f"{r['val_loss']:.3f}", r["note"]] for r in results]
    table = markdown_table(["fine-tuning", "method", "FLOPs/step measured", "FLOPs/step theory", "measured/theory",
                            "FLOPs/step run mean", "ms/step", "final val loss", "notes"], rows)
    header = (f"{args.shape} shape {SHAPES[args.shape]}, 32k vocab, {args.steps} steps of 4 samples, fp32; "
              f"{machine_description(torch.device('cpu'))}; `{command_line('methods')}`")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"methods_{args.shape}.md").write_text(f"{header}\n\n{table}\n")
    (args.out / f"methods_{args.shape}.json").write_text(json.dumps({"setting": header, "results": results}, indent=2))
    print(f"\n{header}\n\n{table}")


if __name__ == "__main__":
    main()
