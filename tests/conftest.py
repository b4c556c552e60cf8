"""Test-wide settings: one thread per test process (pytest-xdist runs one process per core), denormals
flushed as the library's hot loops expect, a fixed seed per test, and on a machine without CUDA Triton's
CPU interpreter for the whole session (set here, before anything imports triton, so that no test module
changes it for the tests that happen to run after it in the same worker).

No test may change process state for the tests after it (they share a worker process under xdist, in an
order that varies): ``_no_leaked_process_state`` fails any test that leaves torch's thread count, denormal
flushing, default dtype or an environment variable changed (and puts them back), and importing a test
module must not change the environment either (``pytest_make_collect_report`` below).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(1)
torch.set_flush_denormal(True)

#: known leaks, to be fixed where they happen: node id prefix -> what it leaks ("threads", "flush_denormal",
#: "default_dtype", "environment"). The state is still restored after these tests; they only do not fail.
KNOWN_LEAKS = {}
#: test modules known to change the environment when imported (same rule as KNOWN_LEAKS)
KNOWN_IMPORT_LEAKS = {}
#: not checked: pytest sets the first for each phase of each test; libraries set the others once, when
#: first imported or used (torch's inductor its cache directory, scikit-learn the OpenMP runtime's flags)
_VOLATILE_ENV = {"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR", "KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK"}


def _flush_denormal_enabled() -> bool:
    tiny = torch.tensor([1e-30], dtype=torch.float32)
    return bool((tiny * 1e-15).item() == 0.0)  # 1e-45 is a float32 denormal: 0 only when flushing


def _environment() -> dict:
    return {k: v for k, v in os.environ.items() if k not in _VOLATILE_ENV}


def _env_changes(before: dict, after: dict) -> list:
    return sorted(f"{k}: {before.get(k, '<unset>')!r} -> {after.get(k, '<unset>')!r}"
                  for k in set(before) | set(after) if before.get(k) != after.get(k))


@pytest.fixture(autouse=True)
def _no_leaked_process_state(request):
    threads, flush, dtype, env = torch.get_num_threads(), _flush_denormal_enabled(), torch.get_default_dtype(), \
        _environment()
    yield
    leaks = {}
    if torch.get_num_threads() != threads:
        leaks["threads"] = f"torch threads {threads} -> {torch.get_num_threads()}"
        torch.set_num_threads(threads)
    if _flush_denormal_enabled() != flush:
        leaks["flush_denormal"] = f"flush-denormal {flush} -> {not flush}"
        torch.set_flush_denormal(flush)
    if torch.get_default_dtype() != dtype:
        leaks["default_dtype"] = f"default dtype {dtype} -> {torch.get_default_dtype()}"
        torch.set_default_dtype(dtype)
    changes = _env_changes(env, _environment())
    if changes:
        leaks["environment"] = "environment " + ", ".join(changes)
        now = _environment()
        for key in set(now) - set(env):
            del os.environ[key]
        os.environ.update({k: v for k, v in env.items() if now.get(k) != v})
    allowed = {kind for prefix, kind in KNOWN_LEAKS.items() if request.node.nodeid.startswith(prefix)}
    reported = [text for kind, text in leaks.items() if kind not in allowed]
    if reported:
        pytest.fail("the test left process state changed for the tests after it (restore it, e.g. with "
                    "monkeypatch or try/finally): " + "; ".join(reported), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """Importing a test module must not change the environment of the tests collected after it."""
    if not isinstance(collector, pytest.Module):
        return (yield)
    before = _environment()
    report = yield
    changes = _env_changes(before, _environment())
    known = any(collector.nodeid.startswith(prefix) for prefix in KNOWN_IMPORT_LEAKS)
    if changes and not known and report.outcome == "passed":
        report.outcome = "failed"
        report.longrepr = (f"importing {collector.nodeid} changed the environment for every later test of this "
                           f"process: {', '.join(changes)}; set it inside a fixture (monkeypatch) or a subprocess")
    return report


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
