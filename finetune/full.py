"""Full fine-tuning with DropBP: every weight trains.

    python finetune/full.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf --data_dir data/alpaca \
        --drop_rate 0.875

`--help` lists every flag; `--config configs/<name>.yaml` reproduces one of the paper's settings.
"""

from lit_gpt.training import cli

if __name__ == "__main__":
    # The paper's full fine-tuning: AdamW, lr 1e-4, batch 128 of micro-batches of 2 (its Table 7).
    cli("full", **{"train.learning_rate": 1e-4, "train.weight_decay": 0.0})
