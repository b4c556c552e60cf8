"""Image classifiers from the vision mixers: Vim, VMamba (SS2D) and a ViT of the same size.

    patches = Conv2d(in_channels, d_model, kernel = stride = patch_size)(image)   # (B, d, Hp, Wp)
    tokens  = row-major patch tokens (B, Hp * Wp, d), a class token inserted, + position embedding
    h       = h + mixer(norm(h))   [+ h + mlp(norm2(h))]                            # n_layers pre-norm blocks
    logits  = head(norm_f(h at the class token, or the mean over tokens))

Mixers (``VisionConfig.mixer``):

* ``"vim"``: :class:`ssmkit.layers.vim.Vim`, bidirectional Mamba; class token in the middle of the sequence
  (Vim, Zhu et al. 2024: the position their ablation of the class token found best), learned position
  embedding.
* ``"vmamba"``: :class:`ssmkit.layers.vmamba.VMamba`, SS2D's four-direction cross-scan over the patch grid
  (Liu et al. 2024); no class token (the grid would lose its shape), mean pooling as VMamba's classifier.
  One resolution throughout (no patch merging): a same-size comparison, not VMamba's hierarchical backbone.
* ``"attention"``: ViT (Dosovitskiy et al. 2021): ssmkit's :class:`~ssmkit.layers.attention.Attention` with
  ``causal=False`` (every token reads every token), no rotary embedding (the learned position embedding
  gives positions), class token first.

The configuration is architecture only (JSON-serialisable); image and patch size are fields, so the same
code builds the 8x8-digit models and the 28x28-MNIST ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.attention import Attention
from ..layers.vim import Vim
from ..layers.vmamba import VMamba
from .blocks import GatedMLP, make_norm

VISION_MIXERS = ("vim", "vmamba", "attention")
CLASS_TOKENS = ("middle", "first", "none")
#: where each mixer's class token goes by default (the papers' choices)
DEFAULT_CLASS_TOKEN = {"vim": "middle", "vmamba": "none", "attention": "first"}


@dataclass
class VisionConfig:
    """An image classifier: patches -> ``n_layers`` blocks of ``mixer`` -> class logits (module docstring).

    ``image_size`` and ``patch_size`` are ints (square) or [height, width]; the patch size must divide the
    image size. ``class_token`` None takes the mixer's default (:data:`DEFAULT_CLASS_TOKEN`).
    """

    image_size: Any = 8
    patch_size: Any = 2
    in_channels: int = 1
    num_classes: int = 10
    d_model: int = 64
    n_layers: int = 4
    mixer: str = "vim"
    mixer_kwargs: Dict[str, Any] = field(default_factory=dict)
    mlp: str = "none"  # "none" | "gated"
    mlp_hidden: Optional[int] = None
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    class_token: Optional[str] = None

    def __post_init__(self) -> None:
        self.validate()

    @staticmethod
    def _pair(name: str, value) -> Tuple[int, int]:
        pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else tuple(value) \
            if isinstance(value, (list, tuple)) else None
        if pair is None or len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
            raise ValueError(f"{name} must be a positive int or [height, width]; got {value!r}")
        return pair

    @property
    def grid(self) -> Tuple[int, int]:
        """(Hp, Wp): patches along the height and the width."""
        (h, w), (ph, pw) = self._pair("image_size", self.image_size), self._pair("patch_size", self.patch_size)
        return h // ph, w // pw

    @property
    def cls_position(self) -> Optional[str]:
        return DEFAULT_CLASS_TOKEN[self.mixer] if self.class_token is None else self.class_token

    def validate(self) -> None:
        if self.mixer not in VISION_MIXERS:
            raise ValueError(f"mixer must be one of {list(VISION_MIXERS)}; got {self.mixer!r}")
        (h, w), (ph, pw) = self._pair("image_size", self.image_size), self._pair("patch_size", self.patch_size)
        if h % ph or w % pw:
            raise ValueError(f"patch_size {self.patch_size!r} must divide image_size {self.image_size!r}")
        for name in ("in_channels", "num_classes", "d_model", "n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if self.mlp not in ("none", "gated"):
            raise ValueError(f"mlp must be 'none' or 'gated'; got {self.mlp!r}")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"norm must be 'rmsnorm' or 'layernorm'; got {self.norm!r}")
        if self.class_token is not None and self.class_token not in CLASS_TOKENS:
            raise ValueError(f"class_token must be one of {list(CLASS_TOKENS)} or None; got {self.class_token!r}")
        if self.mixer == "vmamba" and self.cls_position != "none":
            raise ValueError("class_token must be 'none' with mixer='vmamba': SS2D scans the 2-D patch grid, "
                             f"which has no place for an extra token; got {self.class_token!r}")
        if not isinstance(self.mixer_kwargs, dict) or "backend" in self.mixer_kwargs:
            raise ValueError("mixer_kwargs must be a dict of architecture arguments (choose a backend at run time, "
                             f"with ssmkit.ops.use_backend); got {self.mixer_kwargs!r}")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "VisionConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown VisionConfig fields {unknown}; known: {sorted(names)}")
        return cls(**data)


def build_vision_mixer(config: VisionConfig) -> nn.Module:
    """One mixer of ``config.mixer`` at width ``config.d_model`` with ``config.mixer_kwargs``."""
    kwargs = dict(config.mixer_kwargs)
    if config.mixer == "vim":
        return Vim(config.d_model, **kwargs)
    if config.mixer == "vmamba":
        return VMamba(config.d_model, **kwargs)
    kwargs.setdefault("rope", False)
    kwargs.setdefault("n_heads", 4)
    return Attention(config.d_model, causal=False, **kwargs)


class VisionBlock(nn.Module):
    """Pre-norm residual block: h + mixer(norm(h)), then h + mlp(norm2(h)) when the config has an MLP."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm = make_norm(config.norm, config.d_model, config.norm_eps)
        self.mixer = build_vision_mixer(config)
        self.mlp = None
        if config.mlp == "gated":
            self.norm2 = make_norm(config.norm, config.d_model, config.norm_eps)
            self.mlp = GatedMLP(config.d_model, config.mlp_hidden or 4 * config.d_model)

    def forward(self, h: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        normed = self.norm(h)
        h = h + (self.mixer(normed, grid) if getattr(self.mixer, "needs_grid", False) else self.mixer(normed))
        if self.mlp is not None:
            h = h + self.mlp(self.norm2(h))
        return h


@dataclass
class VisionOutput:
    """``logits`` (B, num_classes); ``loss`` (cross-entropy) when labels were given."""

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None


class VisionClassifier(nn.Module):
    """Patch embedding -> vision blocks -> class logits (module docstring).

    Shapes: images (batch, in_channels, H, W) with (H, W) = ``config.image_size`` -> logits (batch, num_classes).
    """

    def __init__(self, config: VisionConfig):
        super().__init__()
        if not isinstance(config, VisionConfig):
            raise TypeError(f"config must be a VisionConfig; got {type(config).__name__}")
        self.config = config
        d = config.d_model
        patch = config._pair("patch_size", config.patch_size)
        self.patch_embed = nn.Conv2d(config.in_channels, d, kernel_size=patch, stride=patch)
        hp, wp = config.grid
        self.num_patches = hp * wp
        position = config.cls_position
        self.cls_index = {"middle": self.num_patches // 2, "first": 0, "none": None}[position]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if self.cls_index is not None else None
        tokens = self.num_patches + (self.cls_index is not None)
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, d))
        self.layers = nn.ModuleList(VisionBlock(config) for _ in range(config.n_layers))
        self.norm_f = make_norm(config.norm, d, config.norm_eps)
        self.head = nn.Linear(d, config.num_classes)
        with torch.no_grad():  # ViT / Vim: truncated normal(0.02) for the class token and position embedding
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            if self.cls_token is not None:
                nn.init.trunc_normal_(self.cls_token, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> tokens (B, L, d): patches row-major, the class token inserted, positions added."""
        cfg = self.config
        want = (cfg.in_channels, *cfg._pair("image_size", cfg.image_size))
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
            raise TypeError(f"images must be a floating-point tensor (batch, {want[0]}, {want[1]}, {want[2]}); got {got}")
        if images.dim() != 4 or tuple(images.shape[1:]) != want or images.shape[0] == 0:
            raise ValueError(f"images must be (batch, {want[0]}, {want[1]}, {want[2]}); got {tuple(images.shape)}")
        patches = self.patch_embed(images.to(self.patch_embed.weight.dtype))   # (B, d, Hp, Wp)
        x = patches.flatten(2).transpose(1, 2)                                  # (B, Hp Wp, d) row-major
        if self.cls_token is not None:
            cls = self.cls_token.expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, : self.cls_index], cls, x[:, self.cls_index:]], dim=1)
        return x + self.pos_embed

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> VisionOutput:
        h = self.tokens(images)
        grid = self.config.grid
        for layer in self.layers:
            h = layer(h, grid)
        h = self.norm_f(h)
        pooled = h.mean(1) if self.cls_index is None else h[:, self.cls_index]
        logits = self.head(pooled)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return VisionOutput(logits, loss)
