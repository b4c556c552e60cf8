"""Language-model cross-entropy: the reference (full logits) and a chunked version that never holds them."""

from .chunked import lm_loss_chunked
from .reference import lm_loss_ref

__all__ = ["lm_loss_ref", "lm_loss_chunked"]
