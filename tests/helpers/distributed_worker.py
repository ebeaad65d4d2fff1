"""Fine-tuning runs of a multi-process test, recording what each rank did (used by tests/lit_gpt/test_distributed.py).

    python tests/helpers/distributed_worker.py RECORD_DIR KIND [--crash_after_step N] -- FLAGS... [--then JOB ...]

Lightning re-launches this same command line for every other rank. Each rank writes `rank<R>.pth` (its
final weights, gathered whole under FSDP), `rank<R>_grads.pth` (the first optimizer step's gradients, averaged
over the ranks and not yet clipped) and `rank<R>.json` (its drop decisions, rates, sensitivities, block
forwards and a few facts about sharding) into RECORD_DIR.

Several jobs (`RECORD_DIR KIND [...] -- FLAGS...`, separated by `--then`) run one after the other in the same
processes, so that a test pays for starting the processes and importing torch and Lightning only once: the
later Trainers find the process group already up. A job with `--crash_after_step N` stops every rank right
after the checkpoint of step N; when it is the last job, the processes exit with code 3.
"""

import json
import sys
from pathlib import Path

import torch

from lit_gpt.parallel import fabric_module, gathered_state_dict
from lit_gpt.training import Trainer, parse_args


class Crashed(Exception):
    pass


def split_jobs(argv: list[str]) -> list[tuple[str, str, int | None, list[str]]]:
    jobs, current = [], []
    for arg in argv + ["--then"]:
        if arg != "--then":
            current.append(arg)
            continue
        separator = current.index("--")
        record_dir, kind, *options = current[:separator]
        crash_after_step = int(options[1]) if options[:1] == ["--crash_after_step"] else None
        jobs.append((record_dir, kind, crash_after_step, current[separator + 1 :]))
        current = []
    return jobs


def run_job(record_dir: str, kind: str, crash_after_step: int | None, flags: list[str]) -> None:
    trainer = Trainer(parse_args(kind, flags))
    decisions: list[list[bool]] = []
    handler = getattr(trainer.method, "handler", None)  # DropBP's, at a positive --drop_rate
    if handler is not None:
        draw = handler.draw

        def recording_draw():
            mask = draw()
            decisions.append(mask.tolist())
            return mask

        handler.draw = recording_draw
    backward_calls = 0
    backward = trainer.fabric.backward

    def counting_backward(*args, **kwargs):
        nonlocal backward_calls
        backward_calls += 1
        return backward(*args, **kwargs)

    trainer.fabric.backward = counting_backward
    # The first optimizer step's gradients as the optimizer would see them (averaged over the ranks, before
    # clipping): whole tensors, gathered from the shards under FSDP.
    first_grads: dict[str, torch.Tensor] = {}
    clip_gradients = trainer.fabric.clip_gradients

    def recording_clip_gradients(*args, **kwargs):
        if not first_grads:
            for name, param in fabric_module(trainer.model).named_parameters():
                if param.grad is not None:
                    grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
                    first_grads[name] = grad.detach().to("cpu", copy=True)
        return clip_gradients(*args, **kwargs)

    trainer.fabric.clip_gradients = recording_clip_gradients
    # Forwards of every block's first norm: activation checkpointing runs them again in backward.
    block_forwards = 0

    def count_forward(*_):
        nonlocal block_forwards
        block_forwards += 1

    for block in fabric_module(trainer.model).transformer.h:
        block.norm_1.register_forward_hook(count_forward)
    if crash_after_step is not None:
        save = trainer.save_checkpoint

        def save_then_crash():
            folder = save()
            if trainer.step == crash_after_step:
                raise Crashed  # every rank stops right after this checkpoint
            return folder

        trainer.save_checkpoint = save_then_crash
    trainer.fit()
    rank = trainer.fabric.global_rank
    Path(record_dir).mkdir(parents=True, exist_ok=True)
    model = fabric_module(trainer.model)
    if trainer.sharded:
        weights = gathered_state_dict(trainer.fabric, trainer.model, adapters_only=False, everywhere=True)
    else:
        weights = model.state_dict()
    torch.save(weights, Path(record_dir) / f"rank{rank}.pth")
    torch.save(first_grads, Path(record_dir) / f"rank{rank}_grads.pth")
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    names = {id(p): n for n, p in model.named_parameters()}
    record = {"decisions": decisions, "world_size": trainer.fabric.world_size, "sharded": trainer.sharded,
              "drop_rates": handler.drop_rates if handler else None,
              "sensitivities": handler.sensitivities if handler else None,
              "backward_calls": backward_calls, "block_forwards": block_forwards,
              "local_numel": sum(t.numel() for t in local), "full_numel": sum(p.numel() for p in model.parameters()),
              "optimizer_params": [names[id(p)] for g in trainer.optimizer.param_groups for p in g["params"]],
              "trainable_params": [n for n, p in model.named_parameters() if p.requires_grad]}
    (Path(record_dir) / f"rank{rank}.json").write_text(json.dumps(record))


def main() -> None:
    torch.set_num_threads(1)  # two ranks share a small machine
    jobs = split_jobs(sys.argv[1:])
    for number, job in enumerate(jobs):
        try:
            run_job(*job)
        except Crashed:
            if number == len(jobs) - 1:
                raise SystemExit(3) from None


if __name__ == "__main__":
    main()
