"""Dropping Backward Propagation (DropBP), usable on any PyTorch model.

Wrap each residual branch in a `DropBP` layer, then let a `DropBPHandler` decide per micro-batch which
branches skip their backward pass, and reallocate the drop rates from measured sensitivity.
"""

from dropbp.handler import DropBPHandler
from dropbp.layer import DropBP

__all__ = ["DropBP", "DropBPHandler"]
