"""Synthetic sequence tasks that probe memory and recall, generated on the fly from a seed.

====================  ======  ===========================================================================
task                  kind    what the model must do
====================  ======  ===========================================================================
``selective_copying``  lm     output, at the M marker positions, the M data tokens scattered among noise
                              (Mamba, Gu & Dao 2023, sec. 3.1 and Table 1)
``induction_heads``    lm     at the final trigger, output the token that followed the trigger earlier
                              (Olsson et al. 2022; Mamba sec. 4.1.2: train at 256, test up to 2^20)
``mqar``               lm     multi-query associative recall: at each re-queried key, output its value
                              (Zoology, Arora et al. 2023)
``string_copy``        lm     after a separator, repeat a random string token by token (Jelassi et al.
                              2024, "Repeat After Me")
``copying_memory``     lm     after T blanks, reproduce the 10 symbols seen at the start (Arjovsky et al.
                              2016)
``adding``             regr.  sum the two values marked in the second channel (Hochreiter &
                              Schmidhuber 1997)
====================  ======  ===========================================================================

Every example is drawn from its own generator (see :mod:`ssmkit.tasks.base`), so it depends only on the
task's settings, seed, split, its position in the stream and the length. Splits are separate streams
(different seeds); with these sample spaces an example repeating across splits is vanishingly unlikely,
but nothing forbids it. ``length`` is always the length of the sequence the model reads.

Glossary (code name: symbol in the papers):

=================  ===================================================================================
``vocab_size``     V, tokens 0..V-1
``length``         L, sequence length the model reads
``num_tokens``     M, data tokens to copy (selective copying)
``num_kv_pairs``   number of key-value pairs (MQAR)
``blanks``         T, the delay in copying memory: L = T + 20
``string_length``  n, tokens in the string to copy (string copy): L = 2n
``power_a``        a, exponent of the power law over query distances (MQAR), p(s) ~ s^(a - 1)
=================  ===================================================================================
"""

from __future__ import annotations

import math
from typing import Dict, List

import torch

from .base import IGNORE_INDEX, Batch, Task, check_int, register_task


@register_task("selective_copying")
class SelectiveCopying(Task):
    """Selective copying (Mamba, Gu & Dao 2023, sec. 3.1; Table 1 uses L=4096, V=16, M=16).

    Token 0 is noise, 1..V-2 are data, V-1 is the marker. The first L - M positions hold M data tokens
    (drawn uniformly from 1..V-2) at distinct random positions, in order, among noise; the last M positions
    are markers. Target at the i-th marker: the i-th data token; -100 elsewhere.

    Note: ``length`` counts every position (noise, data and markers). The safari/Mamba generator's L counts
    only noise, for L + 2M positions in all; ``length=4096 + 32`` reproduces it exactly.
    """

    name = "selective_copying"
    kind = "lm"

    def __init__(self, vocab_size: int = 16, length: int = 4096, num_tokens: int = 16, seed: int = 0):
        super().__init__(seed)
        self.vocab_size = check_int("vocab_size", vocab_size, 3)
        self.num_tokens = check_int("num_tokens", num_tokens, 1)
        self.default_length = check_int("length", length, 1)
        self.check_length(length)
        self._settings = {"vocab_size": vocab_size, "length": length, "num_tokens": num_tokens}

    @property
    def marker(self) -> int:
        return self.vocab_size - 1

    def check_length(self, length: int) -> None:
        if length < 2 * self.num_tokens:
            raise ValueError(f"length must be >= 2 * num_tokens = {2 * self.num_tokens} (room for the data "
                             f"tokens and the markers); got {length}")

    def _make_batch(self, split: str, ids: List[int], length: int) -> Batch:
        M, V = self.num_tokens, self.vocab_size
        inputs, targets = [], []
        for example in ids:
            g = self.example_generator(split, example, length)
            data = torch.randint(1, V - 1, (M,), generator=g)                      # (M,)
            positions = torch.randperm(length - M, generator=g)[:M].sort().values   # (M,) increasing
            x = torch.zeros(length, dtype=torch.long)
            x[positions] = data
            x[length - M:] = self.marker
            y = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
            y[length - M:] = data
            inputs.append(x)
            targets.append(y)
        return Batch(torch.stack(inputs), torch.stack(targets))                               # (B, L), (B, L)


@register_task("induction_heads")
class InductionHeads(Task):
    """Induction heads (Mamba sec. 4.1.2: V=16, trained at L=256, evaluated at 2^6..2^20).

    Tokens 0..V-2 fill the sequence uniformly; V-1 is the trigger. The trigger appears once in the body at a
    uniform position p in [0, L-3], followed by the key (the random token at p+1), and again at the last
    position L-1. Target at L-1: the key; -100 elsewhere. Evaluate other lengths with ``batch(..., length=)``.
    """

    name = "induction_heads"
    kind = "lm"

    def __init__(self, vocab_size: int = 16, length: int = 256, seed: int = 0):
        super().__init__(seed)
        self.vocab_size = check_int("vocab_size", vocab_size, 3)
        self.default_length = check_int("length", length, 1)
        self.check_length(length)
        self._settings = {"vocab_size": vocab_size, "length": length}

    @property
    def trigger(self) -> int:
        return self.vocab_size - 1

    def check_length(self, length: int) -> None:
        if length < 3:
            raise ValueError(f"length must be >= 3 (trigger, key, final trigger); got {length}")

    def _make_batch(self, split: str, ids: List[int], length: int) -> Batch:
        inputs, targets = [], []
        for example in ids:
            g = self.example_generator(split, example, length)
            x = torch.randint(0, self.trigger, (length,), generator=g)   # body tokens never equal the trigger
            p = int(torch.randint(0, length - 2, (1,), generator=g))
            x[p] = self.trigger
            x[length - 1] = self.trigger
            y = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
            y[length - 1] = x[p + 1]
            inputs.append(x)
            targets.append(y)
        return Batch(torch.stack(inputs), torch.stack(targets))


@register_task("mqar")
class MQAR(Task):
    """Multi-query associative recall (Zoology, Arora et al. 2023).

    Layout of one example (L positions, kv = ``num_kv_pairs``):

    * positions 0..2kv-1: k_1 v_1 k_2 v_2 ... with distinct keys from [1, V/2) and distinct values from
      [V/2, V);
    * the rest starts as 0; it has s = (L - 2kv) // 2 even slots, and key k_i is queried (written again) at
      position 2kv + 2 * slot_i, the kv slots drawn without replacement with p(slot = j) ~ j^(a-1),
      j = 1..s, a = ``power_a`` (short distances are the most likely);
    * target at each query position: the queried key's value; -100 elsewhere (loss only at answers).

    Requires V > L and 4 * kv <= L (Zoology's checks). Typical (L, kv): (64, 4), (128, 8), (256, 16),
    (512, 64) with V = 8192.
    """

    name = "mqar"
    kind = "lm"

    def __init__(self, vocab_size: int = 8192, length: int = 256, num_kv_pairs: int = 16,
                 power_a: float = 0.01, seed: int = 0):
        super().__init__(seed)
        self.vocab_size = check_int("vocab_size", vocab_size, 4)
        self.num_kv_pairs = check_int("num_kv_pairs", num_kv_pairs, 1)
        if isinstance(power_a, bool) or not isinstance(power_a, (int, float)) or not power_a > 0:
            raise ValueError(f"power_a must be a number > 0; got {power_a!r}")
        self.power_a = float(power_a)
        self.default_length = check_int("length", length, 1)
        self.check_length(length)
        self._settings = {"vocab_size": vocab_size, "length": length, "num_kv_pairs": num_kv_pairs,
                          "power_a": power_a}
        self._slot_probs: Dict[int, torch.Tensor] = {}

    def check_length(self, length: int) -> None:
        if not self.vocab_size > length:
            raise ValueError(f"mqar needs vocab_size > length; got vocab_size={self.vocab_size}, length={length}")
        if 4 * self.num_kv_pairs > length:
            raise ValueError(f"mqar needs 4 * num_kv_pairs <= length; got num_kv_pairs={self.num_kv_pairs} "
                             f"(4 * {self.num_kv_pairs} = {4 * self.num_kv_pairs}), length={length}")

    def slot_probabilities(self, length: int) -> torch.Tensor:
        """(s,) float64: the power-law probability of each query slot j = 1..s, s = (L - 2kv) // 2."""
        probs = self._slot_probs.get(length)
        if probs is None:
            slots = (length - 2 * self.num_kv_pairs) // 2
            j = torch.arange(1, slots + 1, dtype=torch.float64)
            probs = j ** (self.power_a - 1)
            probs = probs / probs.sum()
            self._slot_probs[length] = probs
        return probs

    def _make_batch(self, split: str, ids: List[int], length: int) -> Batch:
        kv, V = self.num_kv_pairs, self.vocab_size
        half = V // 2
        probs = self.slot_probabilities(length)
        inputs, targets = [], []
        for example in ids:
            g = self.example_generator(split, example, length)
            keys = torch.randperm(half - 1, generator=g)[:kv] + 1            # (kv,) in [1, V/2)
            values = torch.randperm(V - half, generator=g)[:kv] + half      # (kv,) in [V/2, V)
            slots = torch.multinomial(probs, kv, replacement=False, generator=g)  # (kv,) 0-based slot j-1
            x = torch.zeros(length, dtype=torch.long)
            x[0:2 * kv:2] = keys
            x[1:2 * kv:2] = values
            query_positions = 2 * kv + 2 * slots
            x[query_positions] = keys
            y = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
            y[query_positions] = values
            inputs.append(x)
            targets.append(y)
        return Batch(torch.stack(inputs), torch.stack(targets))


@register_task("string_copy")
class StringCopy(Task):
    """Copy a random string (Jelassi, Brandfonbrener, Kakade & Malach 2024, "Repeat After Me", sec. 3).

    Token 0 is the separator; the string is n tokens drawn uniformly from 1..V-1. The model reads
    ``s_1 .. s_n  SEP  s_1 .. s_{n-1}`` (L = 2n positions) and must predict, from the separator on, the next
    string token: target at position n + k is s_{k+1} (k = 0..n-1), -100 on the first n positions. Every
    token of the string has to be held until it is asked for, so a model with a fixed state of S numbers
    cannot copy strings carrying much more than S numbers' worth of information (their Theorem 2.7);
    attention looks each token up. ``length`` must be even: n = L / 2.
    """

    name = "string_copy"
    kind = "lm"
    SEPARATOR = 0

    def __init__(self, vocab_size: int = 32, length: int = 64, seed: int = 0):
        super().__init__(seed)
        self.vocab_size = check_int("vocab_size", vocab_size, 3)
        self.default_length = check_int("length", length, 2)
        self.check_length(length)
        self._settings = {"vocab_size": vocab_size, "length": length}

    def check_length(self, length: int) -> None:
        if length < 2 or length % 2:
            raise ValueError(f"string_copy length must be even and >= 2 (string of length/2 tokens, then its "
                             f"copy); got {length}")

    def _make_batch(self, split: str, ids: List[int], length: int) -> Batch:
        n = length // 2
        inputs, targets = [], []
        for example in ids:
            g = self.example_generator(split, example, length)
            string = torch.randint(1, self.vocab_size, (n,), generator=g)       # (n,)
            x = torch.cat([string, torch.tensor([self.SEPARATOR]), string[:-1]])  # (2n,)
            y = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
            y[n:] = string
            inputs.append(x)
            targets.append(y)
        return Batch(torch.stack(inputs), torch.stack(targets))                 # (B, L), (B, L)


@register_task("copying_memory")
class CopyingMemory(Task):
    """Copying memory (Arjovsky, Shah & Bengio 2016), in the 11-marker form.

    Input (L = T + 20): 10 symbols drawn uniformly from 1..8, T-1 blanks (0), then 11 markers (9).
    Target: blanks (0) at the first T+10 positions, then the 10 symbols at the last 10. Every position is
    scored. Vocabulary 0..9 (V = 10). ``batch(..., length=)`` takes L; T = L - 20.

    Chance baseline: predicting a blank at the first T+10 positions and a uniform symbol at the last 10
    gives the cross-entropy ``10 ln 8 / (T + 20)`` (:meth:`baseline_loss`). ``metrics`` reports
    ``accuracy`` over the 10 recalled symbols and ``token_accuracy`` over every position.
    """

    name = "copying_memory"
    kind = "lm"
    vocab_size = 10
    NUM_SYMBOLS = 10
    MARKER = 9

    def __init__(self, blanks: int = 1000, seed: int = 0):
        super().__init__(seed)
        self.blanks = check_int("blanks", blanks, 1)
        self.default_length = blanks + 20
        self._settings = {"blanks": blanks}

    def check_length(self, length: int) -> None:
        if length < 21:
            raise ValueError(f"copying_memory length L = blanks + 20 must be >= 21; got {length}")

    def baseline_loss(self, length=None) -> float:
        """10 ln 8 / (T + 20): the cross-entropy of the memoryless strategy, at ``length`` = T + 20."""
        length = self.default_length if length is None else length
        return self.NUM_SYMBOLS * math.log(8) / length

    def _make_batch(self, split: str, ids: List[int], length: int) -> Batch:
        T = length - 20
        inputs, targets = [], []
        for example in ids:
            g = self.example_generator(split, example, length)
            symbols = torch.randint(1, 9, (self.NUM_SYMBOLS,), generator=g)
            x = torch.zeros(length, dtype=torch.long)
            x[:self.NUM_SYMBOLS] = symbols
            x[T + 9:] = self.MARKER                                # 11 markers: positions T+9..T+19
            y = torch.zeros(length, dtype=torch.long)
            y[T + 10:] = symbols
            inputs.append(x)
            targets.append(y)
        return Batch(torch.stack(inputs), torch.stack(targets))

    @torch.no_grad()
    def metrics(self, logits: torch.Tensor, batch: Batch) -> Dict[str, float]:
        result = super().metrics(logits, batch)
        predictions = logits[:, -self.NUM_SYMBOLS:, :].argmax(-1)
        recalled = (predictions == batch.targets[:, -self.NUM_SYMBOLS:].to(logits.device)).float()
        result["token_accuracy"] = result["accuracy"]
        result["accuracy"] = float(recalled.mean())
        return result


@register_task("adding")
class AddingProblem(Task):
    """The adding problem (Hochreiter & Schmidhuber 1997; as in Arjovsky et al. 2016).

    Inputs (B, L, 2) float32: channel 0 holds values drawn from U[0, 1]; channel 1 is 0 except for one 1 at
    a uniform position in the first half [0, L//2) and one in the second half [L//2, L). Target (B, 1): the
    sum of the two marked values. Always predicting 1 (the mean) scores MSE 1/6 (``BASELINE_MSE``): the sum
    of two independent U[0, 1] has variance 2/12.
    """

    name = "adding"
    kind = "regression"
    input_dim = 2
    output_dim = 1
    BASELINE_MSE = 1.0 / 6.0

    def __init__(self, length: int = 200, seed: int = 0):
        super().__init__(seed)
        self.default_length = check_int("length", length, 1)
        self.check_length(length)
        self._settings = {"length": length}

    def check_length(self, length: int) -> None:
        if length < 2:
            raise ValueError(f"adding length must be >= 2 (one mark in each half); got {length}")

    def _make_batch(self, split: str, ids: List[int], length: int) -> Batch:
        half = length // 2
        inputs, targets = [], []
        for example in ids:
            g = self.example_generator(split, example, length)
            values = torch.rand(length, generator=g)
            first = int(torch.randint(0, half, (1,), generator=g))
            second = int(torch.randint(half, length, (1,), generator=g))
            marks = torch.zeros(length)
            marks[first] = marks[second] = 1.0
            inputs.append(torch.stack([values, marks], dim=-1))                    # (L, 2)
            targets.append((values[first] + values[second]).reshape(1))            # (1,)
        return Batch(torch.stack(inputs), torch.stack(targets))
