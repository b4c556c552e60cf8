"""The generated spoken-digit task (espeak-ng speech as raw waveforms) and streaming it through a model."""

import os
import shutil
import socket

import numpy as np
import pytest
import torch

from ssmkit.models import ModelConfig
from ssmkit.models.model import SSMModel
from ssmkit.models.streaming import StreamingClassifier
from ssmkit.tasks import make_task
from ssmkit.tasks.audio import SYNTH_RATE, WORDS, render, resample, voices, voices_by_split

if shutil.which("espeak-ng") is None:
    if os.environ.get("CI"):  # .ci/run installs it: its absence there is a failure, not a skip
        raise RuntimeError("espeak-ng is missing on CI: .ci/run must install it (apt-get install espeak-ng)")
    pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)", allow_module_level=True)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test renders into its own cache, and any attempt to open a connection fails it."""
    monkeypatch.setenv("SSMKIT_CACHE", str(tmp_path / "cache"))

    def refuse(*args, **kwargs):
        raise AssertionError("the task tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_batches_have_the_documented_shapes_and_are_deterministic(tmp_path):
    task = make_task("generated_spoken_digits", seed=1)
    batch = task.batch("train", 3, 4)
    assert batch.inputs.shape == (4, 8000, 1) and batch.inputs.dtype == torch.float32
    assert batch.targets.shape == (4,) and batch.targets.dtype == torch.int64
    assert int(batch.targets.min()) >= 0 and int(batch.targets.max()) <= 9
    assert 0.2 < float(batch.inputs.abs().amax(1).min()) and float(batch.inputs.abs().max()) < 1.5
    again = make_task("generated_spoken_digits", seed=1).batch("train", 3, 4)
    assert torch.equal(batch.inputs, again.inputs) and torch.equal(batch.targets, again.targets)
    assert torch.equal(task.batch("train", 1, 8).inputs[4:], batch.inputs)  # rows are examples 12..15
    assert not torch.equal(make_task("generated_spoken_digits", seed=2).batch("train", 3, 4).inputs, batch.inputs)
    longer = make_task("generated_spoken_digits", sample_rate=16_000, length=16_000).batch("val", 0, 2)
    assert longer.inputs.shape == (2, 16_000, 1)
    framed = make_task("generated_spoken_digits", seed=1, samples_per_step=8).batch("train", 3, 4)
    assert framed.inputs.shape == (4, 1000, 8)  # the same samples, 8 per step
    assert torch.equal(framed.inputs.reshape(4, 8000, 1), batch.inputs)


def test_rendering_is_the_same_in_a_fresh_cache(tmp_path, monkeypatch):
    first = render("seven", "en-us+f3", 145, 50)
    assert first.dtype == np.int16 and len(first) > SYNTH_RATE // 4
    monkeypatch.setenv("SSMKIT_CACHE", str(tmp_path / "other"))
    assert np.array_equal(render("seven", "en-us+f3", 145, 50), first)  # rendered again, not read back
    assert (tmp_path / "other").exists()


def test_splits_use_disjoint_voices_and_every_digit():
    split = voices_by_split()
    assert [len(split[s]) for s in ("train", "val", "test")] == [130, 10, 20]
    assert not set(split["train"]) & set(split["test"]) and not set(split["train"]) & set(split["val"])
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(voices())
    task = make_task("generated_spoken_digits")
    picks = [task.utterance("test", i, 8000) for i in range(200)]
    assert {voice for _, voice, _, _ in picks} <= set(split["test"])
    assert {digit for digit, _, _, _ in picks} == set(range(len(WORDS)))


def test_resampling_keeps_a_tone_and_removes_what_lies_above_the_new_nyquist_frequency():
    t = np.arange(SYNTH_RATE) / SYNTH_RATE
    out_t = np.arange(8000) / 8000
    tone = resample(np.sin(2 * np.pi * 440 * t), SYNTH_RATE, 8000)
    assert tone.shape == (8000,)
    np.testing.assert_allclose(tone[200:-200], np.sin(2 * np.pi * 440 * out_t)[200:-200], atol=2e-3)
    alias = resample(np.sin(2 * np.pi * 6000 * t), SYNTH_RATE, 8000)  # 6 kHz > 4 kHz: must vanish, not fold
    assert np.abs(alias[200:-200]).max() < 0.02


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="sample_rate must be >= 8000"):
        make_task("generated_spoken_digits", sample_rate=4000)
    with pytest.raises(ValueError, match="length >= sample_rate / 4"):
        make_task("generated_spoken_digits", length=1000)
    with pytest.raises(ValueError, match="multiple of samples_per_step=3"):
        make_task("generated_spoken_digits", samples_per_step=3)
    with pytest.raises(ValueError, match="snr_db"):
        make_task("generated_spoken_digits", snr_db=(30, 5))


@pytest.mark.parametrize("mixer", ["s4d", pytest.param("mamba", marks=pytest.mark.slow)])  # mamba: ~8 s
def test_a_waveform_streamed_in_10_ms_chunks_gives_the_offline_logits(mixer):
    task = make_task("generated_spoken_digits")
    batch = task.batch("test", 0, 2)
    torch.manual_seed(0)
    model = SSMModel(ModelConfig(d_model=16, n_layers=2, input_dim=1, head="classifier", num_classes=10,
                                 mixer=mixer)).eval()
    stream = StreamingClassifier(model, batch_size=2)
    for chunk in batch.inputs.split(80, dim=1):  # 80 samples = 10 ms at 8 kHz
        streamed = stream.push(chunk)
    with torch.no_grad():
        offline = model(inputs=batch.inputs).logits
    torch.testing.assert_close(streamed, offline, rtol=1e-4, atol=1e-5)
