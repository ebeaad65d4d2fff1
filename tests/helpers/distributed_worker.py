"""One fine-tuning run of a multi-process test, recording what each rank did (used by tests/test_distributed.py).

    python tests/helpers/distributed_worker.py RECORD_DIR KIND [--crash_after_step N] -- FLAGS...

Lightning re-launches this same command line for every other rank. Each rank writes `rank<R>.pth` (its
final weights) and `rank<R>.json` (its drop decisions, rates and sensitivities) into RECORD_DIR.
"""

import json
import sys
from pathlib import Path

import torch

from lit_gpt.training import Trainer, fabric_module, parse_args


def main() -> None:
    separator = sys.argv.index("--")
    record_dir, kind, *options = sys.argv[1:separator]
    crash_after_step = int(options[1]) if options[:1] == ["--crash_after_step"] else None
    trainer = Trainer(parse_args(kind, sys.argv[separator + 1 :]))
    decisions: list[list[bool]] = []
    if trainer.handler is not None:
        draw = trainer.handler.draw

        def recording_draw():
            mask = draw()
            decisions.append(mask.tolist())
            return mask

        trainer.handler.draw = recording_draw
    if crash_after_step is not None:
        save = trainer.save_checkpoint

        def save_then_crash():
            folder = save()
            if trainer.step == crash_after_step:
                raise SystemExit(3)  # every rank dies right after this checkpoint
            return folder

        trainer.save_checkpoint = save_then_crash
    trainer.fit()
    rank = trainer.fabric.global_rank
    Path(record_dir).mkdir(parents=True, exist_ok=True)
    torch.save(fabric_module(trainer.model).state_dict(), Path(record_dir) / f"rank{rank}.pth")
    handler = trainer.handler
    record = {"decisions": decisions, "world_size": trainer.fabric.world_size,
              "drop_rates": handler.drop_rates if handler else None,
              "sensitivities": handler.sensitivities if handler else None}
    (Path(record_dir) / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
