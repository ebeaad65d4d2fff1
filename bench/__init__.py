"""The paper's benchmarks, each a module run as `python -m bench.<name>` from the repository root.

They drive the same public pieces as the training loop: `lit_gpt.build` makes the model, `lit_gpt.loss` runs the
micro-batch, `lit_gpt.flops` prices it, and `lit_gpt.training.Trainer` runs whole fine-tunings.
"""
