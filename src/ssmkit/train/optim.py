"""AdamW with parameter groups, linear warm-up then cosine decay, and gradient clipping.

Parameter groups (the role of each parameter, :func:`classify_parameters`):

=============  ==============================================================  ============  ===================
group          which parameters                                                weight decay  learning rate
=============  ==============================================================  ============  ===================
``decay``      matrices and higher (``ndim >= 2``): linear maps, convolutions,  yes           lr
               embeddings (and the LM head tied to them), S4/S5 ``C``
``no_decay``   vectors and scalars (``ndim < 2``): biases, norm weights,       no            lr
               S4/S4D/S5 ``D``
``ssm``        the state space parameters: those each mixer class lists in     no            lr * ssm_lr_scale
               its ``ssm_parameter_names`` (e.g. Mamba: ``A_log``, ``D``,
               ``dt_proj.bias``; Mamba-2: ``A_log``, ``D``, ``dt_bias``;
               S4D: ``log_dt``, ``A_log_re``, ``A_im``, ``B``)
=============  ==============================================================  ============  ===================

Why these choices. Decay by dimension is the rule of nanoGPT and of mamba_ssm's recipes: norms and biases
are not shrunk towards zero, embeddings are (they are matrices like any other). The SSM parameters set the
dynamics (decay rates, time steps, the state's input map); shrinking A_log or log_dt towards zero would
push every channel towards the same timescale, so S4, S5 and Mamba train them without weight decay and,
in S4/S5, with a smaller learning rate (S4's ``lr`` of 1e-3 for the SSM against a larger global one; S5's
``ssm_lr``), which ``ssm_lr_scale`` expresses as a multiplier (1.0: the same lr).

Schedule (:func:`lr_factor`): update ``s`` (0-based) uses ``lr * factor(s)``, with ``factor = (s + 1) / W``
during the ``W`` warm-up updates, then a half cosine from 1 down to ``min_lr_ratio`` reached exactly at the
last update ``steps - 1``.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..layers.base import Mixer
from ..layers.registry import MIXERS

#: The SSM parameter paths of each registered mixer, read from the classes' ``ssm_parameter_names`` (the one
#: place they are listed); a view for readers and tests, rebuilt on each access so late registrations count.
class _SSMParameterNames(Mapping):
    def _table(self) -> Dict[str, Tuple[str, ...]]:
        return {name: cls.ssm_parameter_names for name, cls in MIXERS.items() if cls.ssm_parameter_names}

    def __getitem__(self, name: str) -> Tuple[str, ...]:
        return self._table()[name]

    def __iter__(self):
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


SSM_PARAMETER_NAMES: Mapping[str, Tuple[str, ...]] = _SSMParameterNames()
GROUPS = ("decay", "no_decay", "ssm")


def classify_parameters(model: nn.Module) -> Dict[str, str]:
    """Map each parameter name of ``model`` (tied parameters once, first name) to its group (module
    docstring): ``"decay"``, ``"no_decay"`` or ``"ssm"``."""
    ssm_ids = set()
    for module in model.modules():
        if isinstance(module, Mixer):
            for path in module.ssm_parameter_names:
                owner, _, attr = path.rpartition(".")
                try:
                    holder = module.get_submodule(owner) if owner else module
                except AttributeError:
                    continue
                param = getattr(holder, attr, None)
                if isinstance(param, nn.Parameter):
                    ssm_ids.add(id(param))
    roles: Dict[str, str] = {}
    seen = set()
    for name, param in model.named_parameters():  # named_parameters yields a tied tensor once
        if id(param) in seen or not param.requires_grad:
            continue
        seen.add(id(param))
        if id(param) in ssm_ids:
            roles[name] = "ssm"
        elif param.ndim >= 2:
            roles[name] = "decay"
        else:
            roles[name] = "no_decay"
    return roles


def parameter_groups(named_parameters: Iterable[Tuple[str, nn.Parameter]], roles: Dict[str, str], *, lr: float,
                     weight_decay: float, ssm_lr_scale: float = 1.0) -> List[dict]:
    """AdamW parameter groups from ``roles`` (:func:`classify_parameters`), in the order decay, no_decay, ssm;
    empty groups are left out. Each group carries ``group`` (its name) and ``initial_lr`` (its base lr).

    ``named_parameters`` may come from a wrapped model whose parameters were replaced (FSDP), as long as the
    names are those ``roles`` was computed with.
    """
    by_group: Dict[str, List[nn.Parameter]] = {g: [] for g in GROUPS}
    seen = set()
    for name, param in named_parameters:
        if id(param) in seen or not param.requires_grad:
            continue
        seen.add(id(param))
        if name not in roles:
            raise ValueError(f"parameter {name!r} has no group: roles were computed for another model "
                             f"(known names start {sorted(roles)[:3]})")
        by_group[roles[name]].append(param)
    settings = {"decay": (lr, weight_decay), "no_decay": (lr, 0.0), "ssm": (lr * ssm_lr_scale, 0.0)}
    groups = []
    for group in GROUPS:
        if by_group[group]:
            group_lr, decay = settings[group]
            groups.append({"params": by_group[group], "lr": group_lr, "initial_lr": group_lr,
                           "weight_decay": decay, "group": group})
    return groups


def build_optimizer(named_parameters, roles: Dict[str, str], train) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups` with the settings of ``train`` (a TrainConfig)."""
    groups = parameter_groups(named_parameters, roles, lr=train.lr, weight_decay=train.weight_decay,
                              ssm_lr_scale=train.ssm_lr_scale)
    return torch.optim.AdamW(groups, lr=train.lr, betas=tuple(train.betas), eps=train.eps)


# --------------------------------------------------------------------------------------------------
def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier of update ``step`` (0-based): linear warm-up over ``warmup_steps`` updates
    ((step + 1) / warmup_steps, so the first update is not wasted at lr 0), then a half cosine from 1 to
    ``min_lr_ratio``, reached at ``step = total_steps - 1`` and kept after it."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = total_steps - 1 - warmup_steps
    if span <= 0:  # no room for a decay after the warm-up
        return 1.0
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Sets each group's ``lr`` to ``initial_lr * lr_factor(step)``; a pure function of the step, so its
    state is the step (saved in checkpoints for exact resume) and the schedule's settings."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                 min_lr_ratio: float):
        self.optimizer = optimizer
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.step_index = 0
        self.set_step(0)

    def factor(self, step: int) -> float:
        return lr_factor(step, warmup_steps=self.warmup_steps, total_steps=self.total_steps,
                         min_lr_ratio=self.min_lr_ratio)

    def set_step(self, step: int) -> None:
        """Prepare the optimiser for update ``step`` (0-based)."""
        self.step_index = step
        factor = self.factor(step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    def state_dict(self) -> dict:
        return {"step": self.step_index, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "min_lr_ratio": self.min_lr_ratio}

    def load_state_dict(self, state: dict) -> None:
        for key in ("warmup_steps", "total_steps", "min_lr_ratio"):
            if state[key] != getattr(self, key):
                raise ValueError(f"scheduler state has {key}={state[key]!r} but this run has "
                                 f"{getattr(self, key)!r}")
        self.set_step(int(state["step"]))


def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: Optional[float]) -> float:
    """Scale gradients so their global L2 norm is at most ``max_norm`` (None: measure only); returns the norm
    before clipping (inf or nan when a gradient is not finite; the caller stops then)."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, math.inf if max_norm is None else max_norm, foreach=None)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)
