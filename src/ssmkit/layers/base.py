"""The sequence-mixer contract that every layer of ssmkit follows.

A *mixer* maps a sequence ``x`` of shape (batch, length, d_model) to a sequence of the same shape, and can
be run two ways that give the same numbers:

* in parallel over the whole sequence: ``y = mixer(x)`` or ``y, state = mixer(x, state, return_state=True)``;
* as a recurrence, one token at a time: ``y_t, state = mixer.step(x_t, state)`` with ``x_t`` (batch, d_model).

The state is a ``dict[str, Tensor]`` made by ``init_state(batch_size)``. Its keys are prefixed with the
mixer's registry name (``"s4d.h"``), so a state made by one kind of mixer is refused by another, and it
holds tensors only, so it can be indexed by batch row, moved, saved and traced like any tensor.

A new mixer is one file in ``ssmkit/layers``: it subclasses :class:`Mixer`, implements ``_forward``,
``_step`` and ``state_spec``, declares its metadata as class attributes at the top of the class, and is
registered with ``@register_mixer("name")``. Importing ``ssmkit.layers`` imports every module of the package,
so nothing else needs editing. The metadata is what the rest of ssmkit reads from the registry:

* ``pattern_letter`` (required): one character naming the mixer in hybrid patterns ("MMMAMMMM").
* ``contract_config`` (required): small constructor kwargs (at d_model=8) for the shared contract suite and
  for tests that build every mixer.
* ``ssm_parameter_names``: paths of the SSM dynamics parameters (A, B, Delta, D, ...) inside the mixer; the
  optimiser puts them in their own group without weight decay.
* ``depth_scaled``: paths of the residual output projections whose initial weights are divided by
  sqrt(2 n_layers) in a model (GPT-2 / Mamba init).
* ``supports_packing``: whether ``forward`` takes packed sequences (``seq_idx`` / ``cu_seqlens``).
* ``constant_state``: whether the recurrent state has a size independent of the sequence length
  (False for a KV cache).
* ``contract_backends``: the backends (:attr:`Mixer.backend` values) the contract suite runs the mixer with,
  one row each; ``(None,)`` for a mixer without fast paths.
* ``inplace_step``: whether ``_step`` takes ``inplace=True`` and then writes the new state into the given
  tensors (``step_inplace``, used by CUDA-graph decoding); other mixers' new state is copied in.

**Precision.** A mixer runs in the dtype of its parameters (``model.to(torch.bfloat16)``, ``.half()``,
``.double()``), and its output has the input's dtype, which is the model's. In a half-precision model
(bfloat16 or float16 parameters, no autocast) the projections, convolutions and attention run in that dtype,
as in mamba_ssm, but the recurrent cores (scans, SSD, SSM kernels and their FFT convolutions, the running
sums of linear attention) compute in float32: the selective scan and SSD ops do so internally for
half-precision activations (beside float32 A, D and Delta biases, which the layers pass as
``to_core_dtype(parameter)`` rather than casting them down), and the other cores are given float32 inputs
by the layer (:func:`to_core_dtype`), whose result is cast back to the model's dtype. Under autocast the
parameters stay float32 and :func:`ssm_core_precision` keeps the cores out of it.

**State dtypes** (:func:`state_dtype`) follow the same rule, so that ``init_state``, ``forward``, ``step`` and
the state check agree: a recurrent state (kind "real" or "complex") of a half-precision model is float32
(complex64), since rounding it to 8 or 11 bits at every token would compound over a long decode (and
complex32 has almost no operators); for float32 and float64 models it has the model's dtype. A cache of
past inputs (kind "cache": attention's keys and values, a convolution's last inputs) holds values that were
already rounded to the model's dtype, so it keeps that dtype exactly and costs no extra memory.

:func:`~ssmkit.layers.registry.register_mixer` refuses a class whose required metadata is missing or malformed.
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, Optional, Tuple

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

from .._checks import check_positive_int, check_shape, check_tensor
from ..ops.backends import record_backends, use_backend

State = Dict[str, torch.Tensor]


def check_recompute(value) -> bool:
    """The ``recompute`` argument of a mixer: a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"recompute must be True or False; got {value!r}")
    return value


class Mixer(nn.Module):
    """Base class of all sequence mixers (see the module docstring for the contract)."""

    #: registry name, set by :func:`ssmkit.layers.registry.register_mixer`
    name: str = "mixer"

    # ----------------------------------------------------------------------------------------------
    # Metadata every mixer declares (module docstring); register_mixer checks it
    # ----------------------------------------------------------------------------------------------
    #: one character for hybrid patterns such as "MMMAMMMM" (required)
    pattern_letter: Optional[str] = None
    #: constructor kwargs of a small instance (d_model=8) for the contract suite (required)
    contract_config: Optional[Dict[str, object]] = None
    #: attribute paths of the SSM dynamics parameters: own optimiser group, no weight decay
    ssm_parameter_names: Tuple[str, ...] = ()
    #: attribute paths of residual output projections scaled by 1/sqrt(2 n_layers) at model init
    depth_scaled: Tuple[str, ...] = ()
    #: whether ``forward`` takes packed variable-length batches (``seq_idx`` / ``cu_seqlens``)
    supports_packing: bool = False
    #: whether the state's size is independent of the sequence length (False for a KV cache)
    constant_state: bool = True
    #: the backends the contract suite runs this mixer with, one row each (None: its default)
    contract_backends: Tuple[Optional[str], ...] = (None,)
    #: whether ``_forward`` and ``_step`` take ``cross_layer``: a dict the model passes from layer to layer
    #: within one forward or step, for values one layer hands to later ones (RWKV-7's first-layer value)
    cross_layer: bool = False
    #: whether ``_step(x_t, state, inplace=True)`` writes the new state into ``state`` (see ``step_inplace``)
    inplace_step: bool = False

    @classmethod
    def model_kwargs(cls, position: int, count: int) -> Dict[str, object]:
        """Constructor kwargs a model adds for the ``position``-th (from 0) of its ``count`` mixers of this
        kind (RWKV-7: the value residual from the second on); the configuration's kwargs override them."""
        return {}

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)

    # ----------------------------------------------------------------------------------------------
    # What a subclass provides
    # ----------------------------------------------------------------------------------------------
    def state_spec(self, batch_size: int) -> Dict[str, Tuple[Tuple[Optional[int], ...], object]]:
        """Map each state key (without the name prefix) to ``(shape, kind)``.

        ``kind`` is ``False`` or ``"real"`` (a recurrent state: the input's dtype, float32 for half-precision
        inputs), ``True`` or ``"complex"`` (the complex dtype of that precision), ``"cache"`` (past values kept
        verbatim in the input's dtype: a KV cache, a convolution's last inputs) or ``"index"`` (int64, e.g. a
        position counter); see :func:`state_dtype`. A ``None`` in ``shape`` is a size that grows with the
        sequence (a KV cache); ``init_state`` makes it 0.
        """
        raise NotImplementedError

    def _forward(self, x: torch.Tensor, state: Optional[State], return_state: bool):
        """x (B, L, D), validated state or None -> y (B, L, D) and the final state (or None)."""
        raise NotImplementedError

    def _step(self, x_t: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]:
        """x_t (B, D), validated state -> y_t (B, D), new state."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------------
    # The public contract
    # ----------------------------------------------------------------------------------------------
    #: Execution, not architecture: a backend name applied (as :func:`ssmkit.ops.use_backend`) to every op
    #: this mixer calls that has a backend of that name; None or "auto" leaves the choice to an enclosing
    #: ``use_backend`` context and then to each op's "auto" rule. Never saved in a model configuration.
    backend: Optional[str] = None
    #: the op whose backend :attr:`last_backend` reports (the mixer's recurrent core), if any
    main_op: Optional[str] = None
    #: Execution, not architecture: when True (mixers that set ``supports_recompute``), a forward with
    #: gradients keeps only the input of the mixer's core (e.g. Mamba's in_proj output) for the backward and
    #: recomputes the rest of the core there (the convolution, the Delta/B/C projections, the scan), as
    #: mamba_ssm's fused block does: less memory per layer for one more core forward. Gradients are the same
    #: (the recomputation runs the same ops in the same order). Never saved in a model configuration.
    recompute: bool = False
    #: whether this mixer honours :attr:`recompute`
    supports_recompute: bool = False

    @property
    def last_backends(self) -> Dict[str, str]:
        """``{op: backend}`` of the ops that the latest ``forward`` or ``step`` of this mixer ran."""
        return self.__dict__.get("_last_backends", {})

    @property
    def last_backend(self) -> Optional[str]:
        """The backend that the latest ``forward``/``step`` ran for :attr:`main_op`, or None."""
        return self.last_backends.get(self.main_op) if self.main_op else None

    def _backend_scope(self):
        """The op-backend context of this mixer's :attr:`backend` (for a recomputation in the backward, which
        runs outside the forward's scope)."""
        return use_backend(self.backend) if self.backend not in (None, "auto") else contextlib.nullcontext()

    def _run_core(self, core, *args):
        """``core(*args)``, or with :attr:`recompute` and gradients on, the same under activation
        checkpointing: only ``args`` are kept for the backward, which runs ``core`` again (in this mixer's
        backend scope, with the forward's autocast state) to get the gradients."""
        if not (self.recompute and torch.is_grad_enabled()):
            return core(*args)

        def scoped(*inner):
            with self._backend_scope():
                return core(*inner)

        return torch.utils.checkpoint.checkpoint(scoped, *args, use_reentrant=False, preserve_rng_state=False)

    @contextlib.contextmanager
    def _execution(self):
        """The backend scope of one call, recording what ran into :attr:`last_backends`."""
        with self._backend_scope(), record_backends() as ran:
            yield
        self.__dict__["_last_backends"] = dict(ran)

    def forward(self, x: torch.Tensor, state: Optional[State] = None, return_state: bool = False, *,
                seq_idx: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                cross_layer: Optional[dict] = None):
        """Run the mixer over a whole sequence.

        Args:
            x: (batch, length, d_model) floating-point input, length >= 1.
            state: optional state from ``init_state``, ``step`` or an earlier ``forward``; the sequence is
                treated as the continuation of the one that produced it (with packing: of the first
                sequence of each row).
            return_state: also return the state after the last token (with packing: of the last sequence).
            seq_idx: optional (batch, length) integer ids of packed sequences, non-decreasing along a row; the
                state restarts from zero where the id changes (mixers with ``supports_packing`` only).
            cu_seqlens: optional 1-D cumulative sequence lengths [0, l1, l1 + l2, ...] for a batch of one,
                the other way to describe packing.
            cross_layer: the dict the model passes between layers (mixers with ``cross_layer`` only).

        Returns:
            y (batch, length, d_model), or ``(y, state)`` when ``return_state``.
        """
        self._check_input(x)
        if state is not None:
            self._check_state(state, x)
        extra = self._cross_layer_kwargs(cross_layer)
        if seq_idx is None and cu_seqlens is None:
            with self._execution():
                y, new_state = self._forward(x, state, return_state, **extra)
        else:
            if not self.supports_packing:
                raise ValueError(f"{type(self).__name__} does not take packed sequences (seq_idx / cu_seqlens); "
                                 "run the sequences as separate rows")
            from ..ops.conv1d import packed_seq_idx

            seq_idx = packed_seq_idx(x.shape[0], x.shape[1], seq_idx, cu_seqlens)
            if seq_idx is not None and seq_idx.device != x.device:
                raise ValueError(f"seq_idx is on {seq_idx.device} but x is on {x.device}")
            with self._execution():
                y, new_state = self._forward(x, state, return_state, seq_idx=seq_idx, **extra)
        return (y, new_state) if return_state else y

    def _cross_layer_kwargs(self, cross_layer: Optional[dict]) -> Dict[str, dict]:
        if cross_layer is None:
            return {}
        if not isinstance(cross_layer, dict):
            raise TypeError(f"cross_layer must be a dict; got {type(cross_layer).__name__}")
        if not self.cross_layer:
            raise ValueError(f"{type(self).__name__} takes no cross_layer values (its cross_layer is False)")
        return {"cross_layer": cross_layer}

    def step(self, x_t: torch.Tensor, state: State, cross_layer: Optional[dict] = None
             ) -> Tuple[torch.Tensor, State]:
        """Advance the recurrence by one token: x_t (batch, d_model) -> (y_t (batch, d_model), new state).
        ``cross_layer``: as in ``forward``, with this token's values."""
        check_tensor("x_t", x_t)
        check_shape("x_t", x_t, (None, self.d_model), f"(batch, d_model={self.d_model})")
        if state is None:
            raise ValueError("state is required for step(); make one with init_state(batch_size)")
        self._check_state(state, x_t)
        extra = self._cross_layer_kwargs(cross_layer)
        with self._execution():
            return self._step(x_t, state, **extra)

    def step_inplace(self, x_t: torch.Tensor, state: State, cross_layer: Optional[dict] = None) -> torch.Tensor:
        """``step`` that writes the new state into ``state``'s own tensors and returns y_t (batch, d_model).

        For decoding loops that keep their buffers (a CUDA graph replays fixed addresses). Mixers whose
        ``_step`` takes ``inplace=True`` (:attr:`inplace_step`) update the state inside their kernels; the
        others compute the new state and copy it in. Only for a state of constant size (``constant_state``).
        """
        if not self.constant_state:
            raise ValueError(f"{type(self).__name__} has a growing state (a cache); step_inplace needs a "
                             "state of constant size")
        check_tensor("x_t", x_t)
        check_shape("x_t", x_t, (None, self.d_model), f"(batch, d_model={self.d_model})")
        if state is None:
            raise ValueError("state is required for step_inplace(); make one with init_state(batch_size)")
        self._check_state(state, x_t)
        extra = self._cross_layer_kwargs(cross_layer)
        with self._execution():
            if self.inplace_step:
                y, _ = self._step(x_t, state, inplace=True, **extra)
                return y
            y, new_state = self._step(x_t, state, **extra)
        for key, value in new_state.items():
            state[key].copy_(value)
        return y

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        """A zero state for ``batch_size`` sequences. ``dtype`` is the dtype of the inputs it will see (default:
        the parameters'); each entry's dtype follows from it and the entry's kind (:func:`state_dtype`), so a
        bfloat16 model gets float32 recurrent states and bfloat16 caches."""
        check_positive_int("batch_size", batch_size)
        param = next(self.parameters(), None)
        if device is None:
            device = param.device if param is not None else torch.device("cpu")
        if dtype is None:
            dtype = param.dtype if param is not None and param.is_floating_point() else torch.get_default_dtype()
        return {
            f"{self.name}.{key}": torch.zeros(tuple(0 if s is None else s for s in shape), device=device,
                                              dtype=_state_dtype(kind, dtype))
            for key, (shape, kind) in self.state_spec(batch_size).items()
        }

    def state_key(self, key: str) -> str:
        return f"{self.name}.{key}"

    # ----------------------------------------------------------------------------------------------
    # Validation
    # ----------------------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        check_tensor("x", x)
        check_shape("x", x, (None, None, self.d_model), f"(batch, length, d_model={self.d_model})")
        if x.shape[1] == 0:
            raise ValueError(f"x must hold at least one time step; got an empty sequence, shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"x must hold at least one batch row; got shape {tuple(x.shape)}")

    def _check_state(self, state: State, x: torch.Tensor) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict of tensors from {type(self).__name__}.init_state(); "
                            f"got {type(state).__name__}")
        batch = x.shape[0]
        spec = {self.state_key(k): v for k, v in self.state_spec(batch).items()}
        if set(state) != set(spec):
            raise ValueError(f"state has keys {sorted(state)} but {type(self).__name__} expects "
                             f"{sorted(spec)} (is it the state of another mixer?)")
        for key, (shape, kind) in spec.items():
            value = state[key]
            expected_dtype = _state_dtype(kind, x.dtype)
            check_tensor(f"state[{key!r}]", value, floating=expected_dtype.is_floating_point or expected_dtype.is_complex,
                         complex_ok=True)
            if len(value.shape) != len(shape) or any(s is not None and s != v for s, v in zip(shape, value.shape)):
                shown = tuple("any" if s is None else s for s in shape)
                raise ValueError(f"state[{key!r}] must have shape {shown} for batch size {batch}; "
                                 f"got {tuple(value.shape)}")
            if value.dtype != expected_dtype:
                why = (" (half-precision models keep recurrent states in float32)"
                       if x.dtype in HALF_DTYPES and kind not in ("cache", "index") else "")
                raise TypeError(f"state[{key!r}] must have dtype {expected_dtype} to match x ({x.dtype}){why}; "
                                f"got {value.dtype}")
            if value.device != x.device:
                raise ValueError(f"state[{key!r}] is on {value.device} but x is on {x.device}")


class RateMixin:
    """``rate``: a factor on the step size of a continuous-time SSM (S4, S4D, S5).

    dt_eff = exp(log_dt) * rate, so a model trained at one sampling interval runs at another without
    retraining (rate = 2 when each new step covers twice the time). A settable attribute, checked here once.
    """

    @property
    def rate(self) -> float:
        return self._rate

    @rate.setter
    def rate(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
            raise ValueError(f"rate must be a finite number > 0; got {value!r}")
        self._rate = float(value)


class ConvolutionalSSM(RateMixin, Mixer):
    """What S4 and S4D share: per-channel SSMs computed as a long convolution (or a recurrence), followed by
    GELU and a gated linear output (H -> 2H, GLU) as in the S4 layer. A bidirectional one reads the future,
    so it has no recurrent form: ``step``, an initial state and ``return_state`` are refused."""

    def _refuse_recurrence(self, what: str) -> None:
        if self.bidirectional:
            raise ValueError(f"bidirectional {type(self).__name__} has no recurrent form: {what} is not available "
                             "(the look-ahead kernel needs the whole sequence)")

    def _output(self, s: torch.Tensor) -> torch.Tensor:
        """(..., H) SSM output -> (..., H): GELU, linear to 2H, GLU."""
        return F.glu(self.output_linear(F.gelu(s)), dim=-1)

    def step(self, x_t: torch.Tensor, state: State):
        self._refuse_recurrence("step()")
        return super().step(x_t, state)


def ssm_core_precision(x: torch.Tensor):
    """Context for the recurrent core of a mixer (kernels, convolutions, scans): autocast off.

    Under bfloat16 autocast the projections around the core run in bfloat16, but exponentials of decays and
    long sums over time need float32 (as mamba_ssm computes its scan); callers cast the core's inputs with
    ``.float()`` inside this context and the next projection casts back.
    """
    return torch.autocast(device_type=x.device.type, enabled=False)


HALF_DTYPES = (torch.float16, torch.bfloat16)


def to_core_dtype(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors (bfloat16, float16) -> float32 for the recurrent core; others unchanged (a float64
    model keeps float64)."""
    return t.float() if t.dtype in HALF_DTYPES else t


def state_dtype(dtype: torch.dtype, kind="real") -> torch.dtype:
    """The dtype of a state entry of ``kind`` (see :meth:`Mixer.state_spec`) for inputs of ``dtype``.

    "real": ``dtype``, but float32 for bfloat16 / float16 (a recurrent state accumulates over every token, so
    it is kept in the precision the core computes in); "complex": the complex dtype of that precision;
    "cache": ``dtype`` itself (stored past inputs, already rounded to it); "index": int64.
    """
    if kind in (False, "real"):
        return torch.float32 if dtype in HALF_DTYPES else dtype
    if kind in (True, "complex"):
        return _complex_of(state_dtype(dtype, "real"))
    if kind == "cache":
        return dtype
    if kind == "index":
        return torch.int64
    raise ValueError(f"state kind must be 'real', 'complex', 'cache' or 'index'; got {kind!r}")


def _state_dtype(kind, real_dtype: torch.dtype) -> torch.dtype:
    return state_dtype(real_dtype, kind)


def _complex_of(dtype: torch.dtype) -> torch.dtype:
    if dtype.is_complex:
        return dtype
    return {torch.float64: torch.complex128, torch.float32: torch.complex64}.get(dtype, torch.complex64)
