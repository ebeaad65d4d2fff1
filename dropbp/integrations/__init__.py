"""Integrations of `dropbp` with other libraries (Hugging Face `transformers`, `peft`, `trl`).

Each submodule imports its library lazily, so `import dropbp` never needs them.
"""
