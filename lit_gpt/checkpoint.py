"""Loading converted checkpoint folders (`lit_model.pth` + `lit_config.json`)."""

from __future__ import annotations

from pathlib import Path

import torch

from lit_gpt.config import Config
from lit_gpt.model import GPT
from lit_gpt.utils import UserError, check_checkpoint_dir, load_state_dict


def load_model(checkpoint_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> GPT:
    """Build the model on the meta device and assign the memory-mapped weights: no second copy in RAM."""
    checkpoint_dir = check_checkpoint_dir(Path(checkpoint_dir))
    config = Config.from_checkpoint(checkpoint_dir)
    state_dict = load_state_dict(checkpoint_dir / "lit_model.pth")
    with torch.device("meta"):
        model = GPT(config)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        raise UserError(
            f"{checkpoint_dir / 'lit_model.pth'} does not match lit_config.json ({str(e).splitlines()[0]}); convert it again"
        ) from None
    return model.to(device=device, dtype=dtype)
