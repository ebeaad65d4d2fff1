"""Download an HF LLaMA checkpoint into checkpoints/ORG/NAME and convert it for lit_gpt."""

from __future__ import annotations

import os
from pathlib import Path

from lit_gpt.convert import convert_hf_checkpoint
from lit_gpt.tokenizer import TOKENIZER_FILES as READ_BY_TOKENIZER
from lit_gpt.utils import UserError, run_cli

TOKENIZER_FILES = [*READ_BY_TOKENIZER, "config.json"]  # chat_template.jinja included


def weight_patterns(repo_files: list[str]) -> list[str]:
    """Prefer safetensors; fall back to PyTorch .bin shards, never both."""
    if any(f.endswith(".safetensors") and "/" not in f for f in repo_files):
        return ["*.safetensors", "model.safetensors.index.json"]
    if any(f.startswith("pytorch_model") and f.endswith(".bin") for f in repo_files):
        return ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
    raise UserError("the repository has no *.safetensors or pytorch_model*.bin weights at its top level")


def list_repo_files(repo_id: str, token: str | None) -> list[str]:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        # One request without retries, so that no network fails within a second, not after a minute.
        info = HfApi().model_info(repo_id, token=token)
    except GatedRepoError:
        raise UserError(f"{repo_id} is gated: accept its licence on the hub, then pass --access_token") from None
    except RepositoryNotFoundError:
        raise UserError(f"{repo_id} was not found on the hub (or is private: pass --access_token)") from None
    except Exception as e:  # the HTTP client's connection errors differ between huggingface_hub versions
        raise UserError(
            f"could not reach the Hugging Face hub to download {repo_id} ({type(e).__name__}: {str(e)[:120]}); "
            f"check the network or HF_ENDPOINT, or copy the files into checkpoints/{repo_id} and run "
            f"scripts/convert_hf_checkpoint.py"
        ) from None
    return [s.rfilename for s in info.siblings or []]


def setup(
    repo_id: str,
    access_token: str | None = os.getenv("HF_TOKEN"),
    checkpoint_root: Path = Path("checkpoints"),
    tokenizer_only: bool = False,
    convert: bool = True,
    dtype: str | None = None,
) -> None:
    """Download a model's weights and tokenizer from the HF hub, then convert them.

    Args:
        repo_id: the hub repository, e.g. meta-llama/Llama-2-7b-hf.
        access_token: an HF token for gated models (default: the HF_TOKEN environment variable).
        checkpoint_root: files go to checkpoint_root/ORG/NAME.
        tokenizer_only: download only the tokenizer and config files.
        convert: run scripts/convert_hf_checkpoint.py on the download.
        dtype: passed to the conversion: float32, bfloat16 or float16.
    """
    if repo_id.count("/") != 1:
        raise UserError(f"--repo_id must look like ORG/NAME (e.g. meta-llama/Llama-2-7b-hf), got {repo_id!r}")
    from huggingface_hub import snapshot_download

    repo_files = list_repo_files(repo_id, access_token)
    patterns = TOKENIZER_FILES if tokenizer_only else TOKENIZER_FILES + weight_patterns(repo_files)
    local_dir = Path(checkpoint_root) / repo_id
    snapshot_download(repo_id, local_dir=local_dir, allow_patterns=patterns, token=access_token)
    print(f"downloaded {repo_id} to {local_dir}")
    if convert and not tokenizer_only:
        config = convert_hf_checkpoint(local_dir, dtype=dtype)
        print(f"converted {config.name}: {local_dir / 'lit_model.pth'}")


if __name__ == "__main__":
    run_cli(setup)
