"""QLoRA fine-tuning with DropBP: LoRA adapters over a base quantized to 4 bits with bitsandbytes.

    python finetune/qlora.py --checkpoint_dir checkpoints/meta-llama/Llama-2-70b-hf --data_dir data/alpaca \\
        --drop_rate 0.875 --quantize bnb.nf4-dq

The base is quantized on load (`lit_gpt/quantize.py`), on CPU as on CUDA; the optimizer is bitsandbytes'
paged AdamW. `--help` lists every flag.
"""

from lit_gpt.training import cli

if __name__ == "__main__":
    # The paper's 70B QLoRA: micro-batches of 1 and lr 1e-4 (its Table 7).
    cli("qlora", **{"train.learning_rate": 1e-4, "train.micro_batch_size": 1})
