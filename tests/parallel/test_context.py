"""Context parallelism (ssmkit.parallel.context): 2 and 3 CPU processes (gloo), each holding a slice of the
sequence, compute the outputs, final states and gradients of one process running the whole sequence."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssmkit.models import ModelConfig
from ssmkit.models.model import SSMModel
from ssmkit.parallel import ContextParallel, check_context_parallel, sequence_bounds

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

# every constant-state mixer of the registry: Mamba (conv + SSM state), Mamba-2, S4D and S5 (complex
# states), S4 (a dense state update), linear attention; d_conv = 3 and 4, so conv states span several positions
MIXER_KWARGS = {"mamba": {"d_state": 4, "d_conv": 3}, "mamba2": {"d_state": 8, "headdim": 8, "chunk_size": 4},
                "s4d": {"d_state": 4}, "s5": {"d_state": 4}, "s4": {"d_state": 4}, "linear_attention": {"n_heads": 2}}
LENGTH, BATCH = 13, 2  # 13 positions over 3 ranks: slices of 5, 4, 4


def _config(pattern, scan_backend="auto"):
    kwargs = {k: dict(v) for k, v in MIXER_KWARGS.items()}
    kwargs["mamba"]["backend"] = scan_backend
    return ModelConfig(d_model=16, n_layers=len(pattern), input_dim=3, head="regression", output_dim=5,
                       mixer=pattern, mixer_kwargs=kwargs)


def _data():
    g = torch.Generator().manual_seed(1)
    inputs = torch.randn(BATCH, LENGTH, 3, generator=g)
    weights = torch.randn(BATCH, LENGTH, 5, generator=g)  # loss = sum(outputs * weights): every output counts
    return inputs, weights


def _run(model, inputs, weights, context=None):
    inputs = inputs.clone().requires_grad_(True)
    x = inputs if context is None else context.split(inputs)
    w = weights if context is None else context.split(weights)
    out = model(inputs=x, context=context, return_state=True)
    (out.logits * w).sum().backward()
    grad_x = inputs.grad if context is None else context.split(inputs.grad)
    return {"y": out.logits.detach(), "state": out.state, "grad_x": grad_x,
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def _worker(rank, world, rdv, pattern, scan_backend, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = SSMModel(_config(pattern, scan_backend))
        context = ContextParallel()
        result = _run(model, *_data(), context=context)
        result["bounds"] = context.bounds(LENGTH)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(world, pattern, scan_backend, tmp_path):
    rdv = tempfile.mktemp(dir=tmp_path)
    mp.start_processes(_worker, args=(world, rdv, pattern, scan_backend, str(tmp_path)), nprocs=world,
                       start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


@needs_gloo
# "torch" scan: the C++ one is held to it by tests/ops, and its first build in a process can take long
@pytest.mark.parametrize("world, pattern, scan_backend", [
    (2, "MD", "torch"),
    pytest.param(3, "MDS54L", "torch", marks=pytest.mark.slow),  # 3 processes: ~30 s on 2 busy cores
])
def test_slices_on_ranks_equal_the_whole_sequence(world, pattern, scan_backend, tmp_path):
    ranks = _spawn(world, pattern, scan_backend, tmp_path)
    torch.manual_seed(0)
    model = SSMModel(_config(pattern, scan_backend))
    whole = _run(model, *_data())

    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks], dim=1), whole["y"], **tol)
    torch.testing.assert_close(torch.cat([r["grad_x"] for r in ranks], dim=1), whole["grad_x"], **tol)
    # the last rank ends where the whole sequence ends: its states are the final states of every layer
    for layer, (got, want) in enumerate(zip(ranks[-1]["state"], whole["state"])):
        assert sorted(got) == sorted(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], **tol, msg=lambda m: f"layer {layer} {key}: {m}")
    # every other rank ends where its slice ends: its states are those of the prefix up to there
    for r in range(world - 1):
        stop = ranks[r]["bounds"][1]
        with torch.no_grad():
            prefix = model(inputs=_data()[0][:, :stop], return_state=True).state
        for layer, (got, want) in enumerate(zip(ranks[r]["state"], prefix)):
            for key in want:
                torch.testing.assert_close(got[key], want[key], **tol, msg=lambda m: f"rank {r} {key}: {m}")
    # each rank holds the gradient of its slice's loss; their sum is the whole gradient
    for name, want in whole["grads"].items():
        got = sum(r["grads"][name] for r in ranks)
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{name}: {m}")
    assert [r["bounds"] for r in ranks] == [sequence_bounds(LENGTH, world, r) for r in range(world)]


def test_sequence_bounds_cover_the_sequence_in_order():
    for length, size in [(13, 3), (12, 4), (5, 5), (7, 1)]:
        bounds = [sequence_bounds(length, size, r) for r in range(size)]
        assert bounds[0][0] == 0 and bounds[-1][1] == length
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1
    with pytest.raises(ValueError, match="length must be an int >= the context size 4"):
        sequence_bounds(3, 4, 0)


def test_layers_without_a_constant_state_are_refused_by_name():
    model = SSMModel(ModelConfig(d_model=16, n_layers=3, vocab_size=8, mixer="MAM",
                                 mixer_kwargs={"attention": {"n_heads": 2}}))
    with pytest.raises(ValueError, match=r"layer 1 \(attention\) keeps a state that grows.*ring attention"):
        check_context_parallel(model)
    check_context_parallel(SSMModel(ModelConfig(d_model=16, n_layers=2, vocab_size=8, mixer="MD",
                                                mixer_kwargs={"mamba2": {"headdim": 8}})))
    for kwargs, match in [({"mlp": "moe"}, "mlp='moe'"), ({"head": "classifier", "num_classes": 2}, "classifier")]:
        with pytest.raises(ValueError, match=match):
            check_context_parallel(SSMModel(ModelConfig(d_model=16, n_layers=1, vocab_size=8, **kwargs)))


def test_state_and_context_are_not_combined():
    model = SSMModel(ModelConfig(d_model=16, n_layers=1, vocab_size=8))
    with pytest.raises(ValueError, match="state and context cannot be combined"):
        model(torch.zeros(1, 4, dtype=torch.long), state=model.init_state(1), context=object())


# Whole module: subprocesses, exports or many drawn cases (tens of seconds); `make test` and CI run it,
# `make test-fast` does not.
pytestmark = pytest.mark.slow
