"""Long recurrent runs in float32 for every constant-state mixer (``cls.constant_state``).

The sequence is fed in chunks through ``forward(chunk, state, return_state=True)`` (the contract's way to
continue a sequence) and checked along the way:

* every output and state entry stays finite;
* the state norm stays bounded: after the first tenth of the run it never exceeds 4x its largest value over
  that first tenth (a stable recurrence driven by stationary input has a stationary state). Linear attention
  has no decay: its normaliser z_t = sum phi(k_s) grows like t, so for it the bound is on norm / t;
* in a few windows (the first chunk, one in the middle, the last) the chunked output equals ``step`` token by
  token from the same state, to float32 rounding.

CI runs 10^4 steps per mixer; the slow variant runs 10^6.
"""

import pytest
import torch

from ssmkit.layers import MIXERS, build_mixer

from ..helpers import assert_close_scaled

D_MODEL = 8
CHUNK = 4096
WINDOW = 48  # tokens compared with step() in each checked window
CONSTANT_STATE = sorted(name for name, cls in MIXERS.items() if cls.constant_state
                        and not cls.contract_config.get("bidirectional"))
#: mixers whose state accumulates without decay (the bound is on norm / t; module docstring)
NON_DECAYING = {"linear_attention"}


def _state_norm(state):
    """Norm of the recurrent state (integer entries, such as Hawk's position counter, are not state values)."""
    return sum(float(v.abs().double().pow(2).sum()) for v in state.values()
               if v.is_floating_point() or v.is_complex()) ** 0.5


def run_long(name, total_steps, seed=0):
    torch.manual_seed(seed)
    mixer = build_mixer(name, D_MODEL, **MIXERS[name].contract_config).float().eval()
    g = torch.Generator().manual_seed(seed)
    n_chunks = -(-total_steps // CHUNK)
    windows = {0, n_chunks // 2, n_chunks - 1}
    state = mixer.init_state(1, dtype=torch.float32)
    norms, t = [], 0
    with torch.no_grad():
        for index in range(n_chunks):
            length = min(CHUNK, total_steps - t)
            x = torch.randn(1, length, D_MODEL, generator=g)
            y, new_state = mixer(x, state, return_state=True)
            assert torch.isfinite(y).all(), f"{name}: non-finite output in steps {t}..{t + length}"
            assert all(torch.isfinite(v).all() for v in new_state.values()), f"{name}: non-finite state at {t}"
            if index in windows:
                stepped, s = [], state
                for i in range(min(WINDOW, length)):
                    y_t, s = mixer.step(x[:, i], s)
                    stepped.append(y_t)
                assert_close_scaled(torch.stack(stepped, 1), y[:, :len(stepped)], 2e-4,
                                    f"{name}: chunked forward vs step at step {t}")
            state, t = new_state, t + length
            norm = _state_norm(state)
            norms.append(norm / t if name in NON_DECAYING else norm)
    warm = max(norms[: max(1, len(norms) // 10)])
    assert max(norms) <= 4 * warm + 1e-6, f"{name}: state norm grew from {warm:.3g} to {max(norms):.3g} over {t} steps"
    return norms


@pytest.mark.parametrize("name", CONSTANT_STATE)
def test_long_recurrence_ci(name):
    run_long(name, 10_000)


@pytest.mark.slow
@pytest.mark.parametrize("name", CONSTANT_STATE)
def test_long_recurrence_million_steps(name):
    run_long(name, 1_000_000)


# Whole module: subprocesses, exports or many drawn cases (tens of seconds); `make test` and CI run it,
# `make test-fast` does not.
pytestmark = pytest.mark.slow
