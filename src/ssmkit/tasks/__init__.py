"""Training and evaluation tasks, generated or read locally (no downloads), all under one contract.

    from ssmkit.tasks import make_task
    task = make_task("induction_heads", vocab_size=16, length=256)
    batch = task.batch("train", index=0, batch_size=32)        # batch.inputs (32, 256), batch.targets (32, 256)
    loss = task.loss(model(batch.inputs).logits, batch)        # targets already aligned: no shift
    task.metrics(logits, batch)                                 # {"loss", "accuracy", "count"}

The contract (kinds, shapes, target alignment, determinism and sharding) is in :mod:`ssmkit.tasks.base`.

=====================  ==============  ============================================================
name                   kind            source
=====================  ==============  ============================================================
``selective_copying``  lm              :class:`~.synthetic.SelectiveCopying`
``induction_heads``    lm              :class:`~.synthetic.InductionHeads`
``mqar``               lm              :class:`~.synthetic.MQAR`
``string_copy``        lm              :class:`~.synthetic.StringCopy`
``copying_memory``     lm              :class:`~.synthetic.CopyingMemory`
``adding``             regression      :class:`~.synthetic.AddingProblem`
``listops``            classification  :class:`~.listops.ListOps` (LRA generator)
``digits``             classification  :class:`~.digits.Digits` (scikit-learn's 8x8 digits)
``bytes_lm``           lm              :class:`~.text.BytesLM` (default: standard-library sources)
``needle_haystack``    lm              :class:`~.needle.NeedleHaystack` (a key=value line in bytes_lm filler)
``ucr``                classification  :class:`~.timeseries.UCRClassification` (UCR/UEA sets in aeon's wheel)
``forecast``           regression      :class:`~.timeseries.Forecast` (airline, CO2, sunspots; multi-horizon)
``text``               lm              :func:`~.user_data.text_task` (the user's files)
``sequences``          class./regr.    :func:`~.user_data.load_sequences` (.npz/.npy/.csv)
=====================  ==============  ============================================================

Long signals (classification): ``generated_spoken_digits``, :class:`~.audio.GeneratedSpokenDigits` (raw 8 kHz
waveforms of speech rendered by espeak-ng), and ``generated_a_tract_phasing``, :class:`~.dna.GeneratedATractPhasing`
(DNA, 10^2-10^5 bp). Names that begin with ``generated_`` are synthetic stand-ins for real data that no installable package ships
(their module docstrings say how they are made and why). DNA tasks tokenize with
:class:`~.nucleotides.NucleotideTokenizer` (bases or k-mers) and carry a ``complement_map`` for
reverse-complement-equivariant models (``ModelConfig.rc_equivariant``).
"""

from .base import (KINDS, SPLITS, TASKS, Batch, Task, last_valid, make_task, register_task,  # noqa: F401
                   seeded_generator, stable_seed)
from .digits import Digits  # noqa: F401
from .listops import ListOps  # noqa: F401
from .synthetic import MQAR, AddingProblem, CopyingMemory, InductionHeads, SelectiveCopying, StringCopy  # noqa: F401
from .text import BytesLM  # noqa: F401
from .needle import NeedleHaystack  # noqa: F401
from .timeseries import Forecast, ForecastBatch, UCRClassification  # noqa: F401
from .user_data import SequenceData, load_sequences, text_task  # noqa: F401
from .dna import GeneratedATractPhasing  # noqa: F401
from .nucleotides import NucleotideTokenizer, reverse_complement  # noqa: F401
from .audio import GeneratedSpokenDigits  # noqa: F401
