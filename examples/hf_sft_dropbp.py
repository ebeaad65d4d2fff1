"""Fine-tune a Hugging Face causal LM with LoRA and DropBP, offline, in seconds on a CPU.

By default the model is a tiny random `LlamaForCausalLM` and the data are counting sequences, so nothing is
downloaded; `--model_path` takes a local HF model folder instead (its tokenizer must be there too for --sft).

    python examples/hf_sft_dropbp.py                       # transformers.Trainer, LoRA, drop rate 0.5
    python examples/hf_sft_dropbp.py --sft                 # TRL SFTTrainer on text
    python examples/hf_sft_dropbp.py --family qwen2 --full # full fine-tuning of a tiny Qwen2
    python examples/hf_sft_dropbp.py --resume              # resume from the last checkpoint in --out_dir
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402
import transformers  # noqa: E402

from dropbp.integrations.trainer import DropBPTrainer  # noqa: E402
from dropbp.integrations.transformers import apply_dropbp  # noqa: E402

VOCAB = 128
FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


def tiny_model(family: str) -> transformers.PreTrainedModel:
    name = FAMILIES[family]
    config = getattr(transformers, f"{name}Config")(
        vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=172,
        num_hidden_layers=4, max_position_embeddings=128)
    torch.manual_seed(0)
    return getattr(transformers, f"{name}ForCausalLM")(config)


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(VOCAB - 2)} | {"<pad>": VOCAB - 2, "</s>": VOCAB - 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>")


def counting(n: int, length: int) -> list[list[int]]:
    return [[(i + t) % (VOCAB - 2) for t in range(length)] for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    parser.add_argument("--model_path", help="a local HF model folder instead of the tiny random model")
    parser.add_argument("--drop_rate", type=float, default=0.5)
    parser.add_argument("--sensitivity_at", type=float, default=0.1, help="fraction of steps; -1 disables")
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--sft", action="store_true", help="TRL SFTTrainer on text instead of transformers.Trainer")
    parser.add_argument("--out_dir", default="out/hf_sft_dropbp")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    model = (transformers.AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32)
             if args.model_path else tiny_model(args.family))
    if not args.full:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    handler = apply_dropbp(model, drop_rate=args.drop_rate, seed=0, seq_len=32)

    common = dict(output_dir=args.out_dir, max_steps=args.max_steps, per_device_train_batch_size=8,
                  learning_rate=1e-2 if not args.full else 1e-3, lr_scheduler_type="constant", logging_steps=5,
                  save_steps=max(args.max_steps // 2, 1), report_to=[], use_cpu=not torch.cuda.is_available(),
                  seed=0, disable_tqdm=True)
    options = dict(dropbp_handler=handler, sensitivity_at=None if args.sensitivity_at < 0 else args.sensitivity_at)
    if args.sft:
        import datasets
        import trl

        from dropbp.integrations.trainer import DropBPSFTTrainer

        tokenizer = (transformers.AutoTokenizer.from_pretrained(args.model_path) if args.model_path
                     else tiny_tokenizer())
        text = [{"text": " ".join(f"t{i}" for i in ids)} for ids in counting(256, 31)]
        trainer = DropBPSFTTrainer(model=model, args=trl.SFTConfig(**common, max_length=32),
                                   train_dataset=datasets.Dataset.from_list(text), processing_class=tokenizer,
                                   **options)
    else:
        rows = [{"input_ids": ids, "labels": ids, "attention_mask": [1] * len(ids)} for ids in counting(256, 32)]
        trainer = DropBPTrainer(model=model, args=transformers.TrainingArguments(**common), train_dataset=rows,
                                **options)
    trainer.train(resume_from_checkpoint=True if args.resume else None)

    history = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    print(f"loss {history[0]:.3f} -> {history[-1]:.3f}; drop rates {[round(p, 3) for p in handler.drop_rates]}; "
          f"mean realised drop rate {handler.mean_realised_drop_rate:.3f}; "
          f"backward passes skipped {trainer.dropbp_skipped_backwards}; "
          f"calibrated at steps {trainer.dropbp_calibrated}")
    trainer.save_model(os.path.join(args.out_dir, "final"))


if __name__ == "__main__":
    main()
