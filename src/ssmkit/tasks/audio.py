"""Raw-waveform classification of spoken digits, GENERATED with a speech synthesiser (no spectrogram).

No package that our registries serve ships real recordings in its wheel (the Free Spoken Digit Dataset and
Speech Commands are downloaded at first use by the packages that wrap them), so the utterances are rendered
here by ``espeak-ng`` (Debian package ``espeak-ng``; ``apt-get install espeak-ng``) and the task's name says
so: ``generated_spoken_digits``. It is the SC09 setting of S4 and SaShiMi (Goel et al. 2022, arXiv 2202.09729:
ten spoken digits, one second of raw audio) at a synthetic scale: many voices, speeds and pitches, plus noise.

What an example is
------------------
The word "zero" .. "nine" (class 0..9) spoken by one of 160 voices (8 English accents x 20 voice variants of
espeak-ng) at one of 5 speeds (120-230 words per minute) and 5 pitches, resampled to ``sample_rate`` Hz
(8,000 by default), trimmed of silence, scaled to a random peak in [0.25, 0.95], placed at a random offset in
a window of ``length`` samples (8,000 = 1 s by default) and mixed with white noise at a random SNR in
``snr_db`` (5-30 dB). Inputs are (B, length, 1) float32 in about [-1, 1]; targets (B,) int64 digits. With
``samples_per_step`` = S > 1, each model step reads S consecutive samples: inputs (B, length / S, S), the
same waveform folded into frames (still raw samples, no spectrogram; SaShiMi pools its input similarly).

The splits are speaker-independent: the 160 voices are split once (a fixed seeded shuffle) into 130 train, 10
val and 20 test voices, so a test example is always a voice never heard in training.

Determinism and the cache
-------------------------
An example is a pure function of (seed, split, index, length, sample_rate, snr_db) like every task. Each
distinct utterance (word, voice, speed, pitch) is rendered once by ``espeak-ng`` (about 15 ms) into a local
cache, ``$SSMKIT_CACHE/spoken_digits/<espeak-ng version>/`` (default ``~/.cache/ssmkit``), as int16 at
espeak-ng's own 22,050 Hz; nothing is downloaded. :func:`render_all` fills the whole cache ahead of time
(40,000 utterances, about 1 GB); otherwise utterances are rendered on first use. espeak-ng's output is the
same on every run for one version, which is why the version names the cache folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import wave
from functools import lru_cache
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .base import Batch, Task, check_int, register_task, seeded_generator

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2", "klatt3",
            "klatt4", "croak", "grandma", "grandpa", "whisper")
SPEEDS_WPM = (120, 145, 170, 200, 230)
PITCHES = (20, 35, 50, 65, 80)
SYNTH_RATE = 22_050  # espeak-ng's output rate
VOICE_SPLITS = {"train": 130, "val": 10, "test": 20}


def voices() -> List[str]:
    """All 160 voices as espeak-ng ``-v`` names (accent+variant), in a fixed order."""
    return [f"{accent}+{variant}" for accent in ACCENTS for variant in VARIANTS]


@lru_cache(maxsize=1)
def voices_by_split() -> dict:
    """{"train": 130 voices, "val": 10, "test": 20}: one fixed seeded shuffle, independent of any task seed."""
    every = voices()
    order = torch.randperm(len(every), generator=seeded_generator("spoken-digits-voices")).tolist()
    shuffled = [every[i] for i in order]
    train, val = VOICE_SPLITS["train"], VOICE_SPLITS["val"]
    return {"train": shuffled[:train], "val": shuffled[train:train + val], "test": shuffled[train + val:]}


# --------------------------------------------------------------------------------------------------
# Rendering and the cache
# --------------------------------------------------------------------------------------------------
def espeak_executable() -> str:
    """The path of ``espeak-ng``, or RuntimeError saying how to install it."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise RuntimeError("the generated_spoken_digits task renders speech with espeak-ng, which is not installed; "
                           "install it with `apt-get install espeak-ng` (Debian/Ubuntu)")
    return path


@lru_cache(maxsize=1)
def espeak_version() -> str:
    """e.g. "1.51" (names the cache folder: another version renders other samples)."""
    out = subprocess.run([espeak_executable(), "--version"], capture_output=True, text=True, check=True).stdout
    words = out.split()
    return words[words.index("NG") + 3] if "NG" in words and len(words) > words.index("NG") + 3 else \
        hashlib.sha1(out.encode()).hexdigest()[:8]


def cache_dir() -> Path:
    root = Path(os.environ.get("SSMKIT_CACHE", Path.home() / ".cache" / "ssmkit"))
    return root / "spoken_digits" / f"espeak-ng-{espeak_version()}"


def render(word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """The utterance as int16 samples at 22,050 Hz, from the cache or rendered by espeak-ng (then cached)."""
    path = cache_dir() / f"{word}_{voice}_{speed}_{pitch}.npy"
    if path.exists():
        return np.load(path)
    with tempfile.TemporaryDirectory() as tmp:
        wav_path = Path(tmp) / "utterance.wav"
        subprocess.run([espeak_executable(), "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav_path),
                        word], check=True, capture_output=True)
        with wave.open(str(wav_path), "rb") as wav:
            if wav.getframerate() != SYNTH_RATE or wav.getsampwidth() != 2 or wav.getnchannels() != 1:
                raise RuntimeError(f"espeak-ng wrote {wav.getnchannels()} channel(s) of {8 * wav.getsampwidth()}-bit "
                                   f"audio at {wav.getframerate()} Hz; expected mono 16-bit at {SYNTH_RATE} Hz")
            samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(partial, samples)
    os.replace(partial, path)  # atomic: parallel workers never read half a file
    return samples


def render_all(splits: Sequence[str] = ("train", "val", "test"), progress: bool = True) -> int:
    """Render every utterance of ``splits`` into the cache ahead of time; returns how many there are."""
    todo = [(w, v, s, p) for split in splits for v in voices_by_split()[split] for w in WORDS
            for s in SPEEDS_WPM for p in PITCHES]
    for i, args in enumerate(todo):
        render(*args)
        if progress and (i + 1) % 1000 == 0:
            print(f"rendered {i + 1}/{len(todo)} utterances into {cache_dir()}", flush=True)
    return len(todo)


# --------------------------------------------------------------------------------------------------
# Signal processing
# --------------------------------------------------------------------------------------------------
def resample(signal: np.ndarray, from_rate: int, to_rate: int, half_width: int = 16) -> np.ndarray:
    """Band-limited resampling by windowed-sinc interpolation (Smith's bandlimited interpolation).

    signal (N,) float -> (round(N * to_rate / from_rate),) float64. Low-passes at 0.95 x the lower Nyquist
    frequency with a Hann-windowed sinc of ``half_width`` zero crossings on each side.
    """
    if from_rate == to_rate:
        return signal.astype(np.float64)
    length = int(round(len(signal) * to_rate / from_rate))
    taps, kernel, span = _sinc_kernel(from_rate, to_rate, half_width, _bucket(length))
    padded = np.concatenate([np.zeros(span), signal.astype(np.float64), np.zeros(span + 1)])
    taps = np.minimum(taps[:length] + span, len(padded) - 1)  # rows past the signal's end read the zero padding
    return (padded[taps] * kernel[:length]).sum(1)


def _bucket(length: int) -> int:
    """The next power of two >= length, so that a few kernels serve every utterance length."""
    return 1 << max(0, length - 1).bit_length()


@lru_cache(maxsize=8)
def _sinc_kernel(from_rate: int, to_rate: int, half_width: int, rows: int):
    """(taps (rows, 2 span + 1) int64 input indices, kernel (rows, 2 span + 1) weights, span) for the first
    ``rows`` output samples. Row n depends only on n, so one table serves every signal up to ``rows`` long."""
    ratio = to_rate / from_rate
    cutoff = 0.95 * min(1.0, ratio)                          # in units of the input Nyquist frequency
    times = np.arange(rows) / ratio                          # output instants, in input samples
    span = int(np.ceil(half_width / cutoff))
    taps = np.floor(times).astype(np.int64)[:, None] + np.arange(-span, span + 1)[None, :]
    offset = times[:, None] - taps
    window = 0.5 + 0.5 * np.cos(np.pi * np.clip(offset / (span + 1), -1, 1))
    return taps, cutoff * np.sinc(cutoff * offset) * window, span


def trim_silence(signal: np.ndarray, threshold: float = 0.02) -> np.ndarray:
    """Drop leading and trailing samples quieter than ``threshold`` x the peak."""
    loud = np.flatnonzero(np.abs(signal) > threshold * max(np.abs(signal).max(), 1e-12))
    return signal[loud[0]:loud[-1] + 1] if loud.size else signal


@lru_cache(maxsize=4096)  # ~4096 x 5,000 float32 samples: about 80 MB
def _speech(word: str, voice: str, speed: int, pitch: int, sample_rate: int) -> np.ndarray:
    """The rendered utterance at ``sample_rate``, trimmed of silence, float32 in [-1, 1]."""
    speech = trim_silence(resample(render(word, voice, speed, pitch) / 32768.0, SYNTH_RATE, sample_rate))
    speech = speech.astype(np.float32)
    speech.flags.writeable = False  # shared by every example that uses it
    return speech


# --------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------
@register_task("generated_spoken_digits")
class GeneratedSpokenDigits(Task):
    """Which digit was said? Raw waveforms of synthesised speech (module docstring).

    Args:
        sample_rate: samples per second of the inputs (>= 8,000).
        length: samples per example (default 8,000: one second at 8 kHz); ``batch(..., length=)`` overrides.
        snr_db: (low, high) signal-to-noise ratio range of the added white noise, in dB.
        samples_per_step: consecutive samples read per model step (input_dim); must divide ``length``.
        seed: the stream of examples (which utterance, offset, gain and noise each example gets).
    """

    name = "generated_spoken_digits"
    kind = "classification"
    num_classes = 10

    def __init__(self, sample_rate: int = 8_000, length: int = 8_000, snr_db: Tuple[float, float] = (5.0, 30.0),
                 samples_per_step: int = 1, seed: int = 0):
        super().__init__(seed)
        self.sample_rate = check_int("sample_rate", sample_rate, 8_000)
        self.input_dim = self.samples_per_step = check_int("samples_per_step", samples_per_step, 1)
        self.default_length = check_int("length", length, 1)
        self.check_length(self.default_length)
        if (not isinstance(snr_db, (list, tuple)) or len(snr_db) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in snr_db)
                or snr_db[0] > snr_db[1]):
            raise ValueError(f"snr_db must be (low, high) numbers in dB with low <= high; got {snr_db!r}")
        self.snr_db = (float(snr_db[0]), float(snr_db[1]))
        self._settings = {"sample_rate": self.sample_rate, "length": self.default_length, "snr_db": list(self.snr_db),
                          "samples_per_step": self.samples_per_step}
        espeak_executable()  # fail now, not at the first batch, when espeak-ng is missing

    def check_length(self, length: int) -> None:
        if length < self.sample_rate // 4:
            raise ValueError(f"generated_spoken_digits needs length >= sample_rate / 4 = {self.sample_rate // 4} "
                             f"samples (a quarter second) to hold a word; got length={length}")
        if length % self.samples_per_step:
            raise ValueError(f"length={length} must be a multiple of samples_per_step={self.samples_per_step}")

    def utterance(self, split: str, example: int, length: int) -> Tuple[int, str, int, int]:
        """(digit, voice, speed, pitch) of example number ``example`` of ``split``."""
        generator = self.example_generator(split, example, length)
        pool = voices_by_split()[split]
        picks = [int(torch.randint(n, (), generator=generator))
                 for n in (len(WORDS), len(pool), len(SPEEDS_WPM), len(PITCHES))]
        return picks[0], pool[picks[1]], SPEEDS_WPM[picks[2]], PITCHES[picks[3]]

    def waveform(self, split: str, example: int, length: int) -> Tuple[np.ndarray, int]:
        """Example number ``example`` of ``split``: (float32 samples (length,), digit)."""
        digit, voice, speed, pitch = self.utterance(split, example, length)
        # a second generator for the mixing, so that the choice of utterance above never depends on it
        generator = seeded_generator(self.name, self.seed, split, example, length, "mix")
        speech = _speech(WORDS[digit], voice, speed, pitch, self.sample_rate).astype(np.float64)
        if len(speech) > length:  # a slow long word in a short window: keep its middle
            start = (len(speech) - length) // 2
            speech = speech[start:start + length]
        peak = 0.25 + 0.7 * float(torch.rand((), generator=generator, dtype=torch.float64))
        speech = speech * (peak / max(np.abs(speech).max(), 1e-12))
        offset = int(torch.randint(length - len(speech) + 1, (), generator=generator))
        snr = self.snr_db[0] + (self.snr_db[1] - self.snr_db[0]) * float(torch.rand((), generator=generator,
                                                                                     dtype=torch.float64))
        noise_rms = np.sqrt(np.mean(speech ** 2)) / 10 ** (snr / 20)
        signal = noise_rms * torch.randn(length, generator=generator, dtype=torch.float64).numpy()
        signal[offset:offset + len(speech)] += speech
        return signal.astype(np.float32), digit

    def _make_batch(self, split: str, ids: List[int], length: int) -> Batch:
        waves, digits = zip(*(self.waveform(split, example, length) for example in ids))
        inputs = torch.from_numpy(np.stack(waves)).reshape(len(ids), length // self.samples_per_step,
                                                           self.samples_per_step)  # (B, length / S, S)
        return Batch(inputs, torch.tensor(digits, dtype=torch.int64))


def _main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m ssmkit.tasks.audio``: render every utterance into the cache (no network)."""
    import argparse

    parser = argparse.ArgumentParser(description="Render the generated spoken digits into the local cache.")
    parser.add_argument("--splits", nargs="+", default=["train", "val", "test"], choices=list(VOICE_SPLITS))
    args = parser.parse_args(argv)
    count = render_all(args.splits)
    print(f"{count} utterances in {cache_dir()}")


if __name__ == "__main__":
    _main()
