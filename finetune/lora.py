"""LoRA fine-tuning with DropBP: adapters (r = 8, alpha = 16 by default) on every linear, the base frozen.

    python finetune/lora.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf --data_dir data/alpaca \
        --drop_rate 0.875

`--lora.qkv/projection/mlp/head false` switch adapters off per projection. `--help` lists every flag.
"""

from lit_gpt.training import cli

if __name__ == "__main__":
    cli("lora", **{"train.learning_rate": 3e-4})
