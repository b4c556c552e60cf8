"""The vision mixers (Vim, VMamba's SS2D, non-causal attention) under the contract as it applies to
non-causal mixers (layers/directional.py): each direction's parallel scan == its step-by-step recurrence over
that direction's ordering of the tokens (the flipped sequence for a backward direction, the column-major and
reversed scans of the grid for SS2D), with every scan backend; outputs read tokens on both sides; batch rows
independent; gradients reach every parameter; bad input refused with clear errors."""

import pytest
import torch

from ssmkit.layers.attention import Attention
from ssmkit.layers.vim import Vim
from ssmkit.layers.vmamba import VMamba, cross_scan_orders

from ..helpers import assert_close_scaled

D_MODEL = 8
GRID = (3, 5)  # not square, so row-major and column-major orders differ in shape
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
SCAN_BACKENDS = ["torch", "reference",
                 pytest.param("cpp", marks=pytest.mark.skipif(
                     not __import__("ssmkit.ops.mamba", fromlist=["cpp"]).cpp.is_available(),
                     reason="C++ scan not built")),
                 # the GPU kernels, on CUDA tensors (float32 only); the one-token update then runs on Triton too
                 pytest.param("triton", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="the Triton row runs on a GPU"))]


def make(name, dtype=torch.float64, backend=None, seed=0):
    torch.manual_seed(seed)
    mixer = {"vim": lambda: Vim(D_MODEL, d_state=4, expand=1.5, backend=backend),
             "vmamba": lambda: VMamba(D_MODEL, d_state=4, expand=1.5, backend=backend)}[name]().to(dtype)
    with torch.no_grad():  # no test passes by an accident of the initialisation (ones, zeros)
        for p in mixer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return mixer


def grid_for(name):
    return GRID if name == "vmamba" else None


def test_cross_scan_orders_by_hand():
    orders = cross_scan_orders(2, 3)
    assert orders.tolist() == [[0, 1, 2, 3, 4, 5], [0, 3, 1, 4, 2, 5], [5, 4, 3, 2, 1, 0], [5, 2, 4, 1, 3, 0]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", SCAN_BACKENDS)
@pytest.mark.parametrize("name", ["vim", "vmamba"])
def test_each_direction_equals_its_recurrence(name, backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take no float64")
    device = "cuda" if backend == "triton" else "cpu"
    mixer = make(name, dtype, backend).to(device)
    length = GRID[0] * GRID[1]
    x = torch.randn(2, length, D_MODEL, dtype=dtype).to(device)
    grid = grid_for(name)
    with torch.no_grad():
        outputs = mixer.direction_outputs(x, grid)                       # (K, B, L, E), token order
        inputs = mixer.direction_inputs(x, grid)
        orders = mixer.scan_orders(length, grid)
        assert outputs.shape == (mixer.n_directions, 2, length, mixer.d_inner)
        for k in range(mixer.n_directions):
            state = {key: value.to(device) for key, value in mixer.init_direction_state(k, 2).items()}
            stepped = torch.empty_like(outputs[k])
            for t in orders[k].tolist():                                # this direction's order of the tokens
                stepped[:, t], state = mixer.direction_step(k, inputs[:, t], state)
            assert_close_scaled(stepped, outputs[k], TOL[dtype], f"{name} direction {k}")
        # and forward is the merge of exactly these outputs
        assert_close_scaled(mixer(x, grid), mixer.merge(x, outputs), TOL[dtype], f"{name} merge")


@pytest.mark.parametrize("name", ["vim", "vmamba"])
def test_directions_really_differ(name):
    """A test that a mixer with all directions equal (e.g. a missing flip) would fail."""
    mixer = make(name)
    x = torch.randn(1, 15, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        outputs = mixer.direction_outputs(x, grid_for(name))
        # every direction's first token in its scan order has seen only itself: unequal across directions
        for j in range(1, mixer.n_directions):
            assert (outputs[j] - outputs[0]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["vim", "vmamba", "attention"])
def test_outputs_read_tokens_on_both_sides(name):
    mixer = Attention(D_MODEL, n_heads=2, rope=False, causal=False).double() if name == "attention" else make(name)
    x = torch.randn(2, 15, D_MODEL, dtype=torch.float64)
    call = (lambda t: mixer(t)) if name == "attention" else (lambda t: mixer(t, grid_for(name)))
    with torch.no_grad():
        y = call(x)
        for t in (0, 14):  # change only the first, then only the last token
            x2 = x.clone()
            x2[:, t] += torch.randn_like(x2[:, t])
            changed = (call(x2) - y).abs().amax(dim=(0, 2))
            assert (changed > 1e-6).all(), f"{name}: some output ignores token {t}"


@pytest.mark.parametrize("name", ["vim", "vmamba"])
def test_batch_rows_independent_and_gradients_reach_every_parameter(name):
    mixer = make(name)
    x = torch.randn(3, 15, D_MODEL, dtype=torch.float64, requires_grad=True)
    grid = grid_for(name)
    y = mixer(x, grid)
    rows = torch.cat([mixer(x[i : i + 1], grid) for i in range(3)])
    assert_close_scaled(rows, y, 1e-12, f"{name} one row at a time")
    (y * torch.randn_like(y)).sum().backward()
    for pname, p in mixer.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, f"{name}: no gradient reaches {pname}"
    assert x.grad.abs().max() > 0


def test_bad_input_is_refused():
    vim, ss2d = make("vim", torch.float32), make("vmamba", torch.float32)
    with pytest.raises(ValueError, match=r"x must be \(batch, length, d_model=8\); got \(2, 5, 7\)"):
        vim(torch.randn(2, 5, 7))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        vim(torch.ones(2, 5, D_MODEL, dtype=torch.long))
    with pytest.raises(ValueError, match=r"grid must be \(height, width\)"):
        ss2d(torch.randn(2, 15, D_MODEL))
    with pytest.raises(ValueError, match=r"grid \(3, 4\) holds 12 tokens but x has length 15"):
        ss2d(torch.randn(2, 15, D_MODEL), (3, 4))
    with pytest.raises(ValueError, match=r"direction must be an int in \[0, 4\)"):
        ss2d.init_direction_state(4, 2)
    with pytest.raises(ValueError, match="d_conv must be odd"):
        VMamba(D_MODEL, d_conv=4)


def test_non_causal_attention_has_no_recurrence():
    attention = Attention(D_MODEL, n_heads=2, causal=False)
    x = torch.randn(2, 5, D_MODEL)
    with pytest.raises(ValueError, match="non-causal Attention"):
        attention.step(x[:, 0], attention.init_state(2))
    with pytest.raises(ValueError, match="non-causal Attention"):
        attention(x, return_state=True)
    with pytest.raises(ValueError, match="window needs causal=True"):
        Attention(D_MODEL, n_heads=2, causal=False, window=4)
    # without a mask every query reads every key: the first output changes with the last input
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert (attention(x2)[:, 0] - attention(x)[:, 0]).abs().max() > 1e-6
