"""Streaming inference: read a signal in chunks as it arrives, carrying each layer's recurrent state.

A causal model's output at time t depends only on the inputs up to t, so a long signal (audio, a sensor
feed) need not be held whole: each chunk of T samples runs through the layers in parallel
(``forward(chunk, state, return_state=True)``; a chunk of one step takes ``step``), starting from the state
the previous chunk left, and the
result equals the offline forward pass over the whole signal up to rounding (tests/models/test_streaming.py
holds the two to each other for every recurrent mixer). Memory stays constant for the SSM mixers; attention's
state is a KV cache that grows with the signal.

    stream = StreamingClassifier(model, batch_size=1)
    for chunk in chunks:                  # chunk (1, T, input_dim) float, or (1, T) token ids
        logits = stream.push(chunk)       # (1, num_classes): the prediction from everything read so far
    stream.reset()                        # the next signal

For a classifier the pooling runs along: ``pooling="mean"`` keeps the running sum of the final-normed
outputs and their count, ``"last"`` the latest one, so :meth:`push` returns what the offline model would
return for the signal read so far. LM and regression models return the chunk's per-position outputs
(B, T, V or output_dim) instead.
"""

from __future__ import annotations

from typing import Optional

import torch

from .model import SSMModel


class StreamingClassifier:
    """Chunked, stateful inference with an :class:`SSMModel` (see the module docstring).

    Args:
        model: a causal model (not ``bidirectional``, not ``rc_equivariant``); put in eval mode by the caller.
        batch_size: rows of every chunk (independent streams read side by side).
    """

    def __init__(self, model: SSMModel, batch_size: int = 1):
        if not isinstance(model, SSMModel):
            raise TypeError(f"model must be an SSMModel; got {type(model).__name__}")
        if model.config.bidirectional or model.config.rc_equivariant:
            raise ValueError("a bidirectional or rc_equivariant model reads the future and cannot stream")
        self.model = model
        self.batch_size = batch_size
        self.reset()

    def reset(self) -> None:
        """Forget everything read: zero states, empty pooling."""
        parameter = next(self.model.parameters())
        self.state = self.model.init_state(self.batch_size, device=parameter.device, dtype=parameter.dtype)
        self.samples_read = 0
        self._pooled: Optional[torch.Tensor] = None  # (B, D): running sum ("mean") or latest output ("last")

    @torch.no_grad()
    def push(self, chunk: torch.Tensor) -> torch.Tensor:
        """Read the next ``chunk``: (B, T, input_dim) float inputs or (B, T) token ids, T >= 1.

        Returns the classifier's logits (B, num_classes) for everything read so far, or the chunk's
        per-position outputs (B, T, ...) for LM and regression heads.
        """
        expected_rows = chunk.shape[0] if isinstance(chunk, torch.Tensor) and chunk.dim() >= 1 else None
        if expected_rows != self.batch_size:
            shape = tuple(chunk.shape) if isinstance(chunk, torch.Tensor) else type(chunk).__name__
            raise ValueError(f"chunk must have batch_size={self.batch_size} rows; got {shape}")
        model = self.model
        h = model._embed(chunk)
        embeddings = h if model.config.shared_block is not None else None  # what a shared block reads
        cross_layer = {}  # what a layer hands to later ones (blocks.py)
        for i, layer in enumerate(model.backbone.layers):
            if h.shape[1] == 1:  # one step: the recurrence itself, without a parallel pass's set-up
                shared = {} if embeddings is None else {"embeddings": embeddings[:, 0]}
                h_t, self.state[i] = layer.step(h[:, 0], self.state[i], **shared, cross_layer=cross_layer)
                h = h_t[:, None]
            else:
                shared = {} if embeddings is None else {"embeddings": embeddings}
                h, self.state[i], _ = layer(h, self.state[i], True, **shared, cross_layer=cross_layer)
        self.samples_read += h.shape[1]
        if model.config.head != "classifier":
            return model._head(h)
        normed = model.backbone.norm_f(h.to(model.backbone.norm_f.weight.dtype))  # (B, T, D)
        if model.config.pooling == "mean":
            chunk_sum = normed.sum(1)
            self._pooled = chunk_sum if self._pooled is None else self._pooled + chunk_sum
            pooled = self._pooled / self.samples_read
        else:
            self._pooled = pooled = normed[:, -1]
        return model.classifier(pooled)
