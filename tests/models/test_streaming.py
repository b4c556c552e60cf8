"""Streaming inference (ssmkit.models.streaming): chunks through the recurrent state == the offline forward."""

import pytest
import torch

from ssmkit.layers.registry import MIXERS
from ssmkit.models import ModelConfig
from ssmkit.models.model import SSMModel
from ssmkit.models.streaming import StreamingClassifier

#: kwargs that make each mixer small, or long enough (Hyena's filters are made for l_max positions)
SMALL = {"attention": {"n_heads": 2}, "mamba2": {"headdim": 4, "chunk_size": 16}, "hyena": {"l_max": 300}}
CHUNKS = [37, 80, 1, 100, 82]  # uneven on purpose, 300 in all


def model_for(mixer, pooling="mean", head="classifier", seed=0):
    torch.manual_seed(seed)
    extra = dict(num_classes=5) if head == "classifier" else dict(output_dim=3)
    config = ModelConfig(d_model=8, n_layers=2, input_dim=1, head=head, mixer=mixer, pooling=pooling, mlp="gated",
                         mixer_kwargs={mixer: SMALL.get(mixer, {})}, **extra)
    return SSMModel(config).double().eval()


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_streamed_logits_equal_the_offline_logits_after_every_chunk(mixer, pooling):
    model = model_for(mixer, pooling)
    signal = torch.randn(2, sum(CHUNKS), 1, dtype=torch.float64)
    stream = StreamingClassifier(model, batch_size=2)
    read = 0
    for size in CHUNKS:
        logits = stream.push(signal[:, read:read + size])
        read += size
        offline = model(inputs=signal[:, :read]).logits
        torch.testing.assert_close(logits, offline, rtol=1e-10, atol=1e-10)
    assert stream.samples_read == sum(CHUNKS)
    stream.reset()
    torch.testing.assert_close(stream.push(signal[:, :50]), model(inputs=signal[:, :50]).logits, rtol=1e-10, atol=1e-10)


def test_streamed_regression_outputs_are_the_offline_ones():
    model = model_for("s4d", head="regression")
    signal = torch.randn(1, 120, 1, dtype=torch.float64)
    stream = StreamingClassifier(model)
    streamed = torch.cat([stream.push(chunk) for chunk in signal.split(25, dim=1)], dim=1)
    torch.testing.assert_close(streamed, model(inputs=signal).logits, rtol=1e-10, atol=1e-10)


def test_streaming_refuses_models_that_read_the_future_and_wrong_batches():
    torch.manual_seed(0)
    config = ModelConfig(d_model=8, n_layers=1, input_dim=1, head="classifier", num_classes=2, mixer="s4d",
                         bidirectional=True)
    with pytest.raises(ValueError, match="cannot stream"):
        StreamingClassifier(SSMModel(config))
    stream = StreamingClassifier(model_for("s4d"), batch_size=2)
    with pytest.raises(ValueError, match="batch_size=2"):
        stream.push(torch.randn(3, 10, 1, dtype=torch.float64))
