"""Library calls leave process-wide torch settings (threads, denormal flushing) as they found them,
on return and on an exception."""

import pytest
import torch

from ssmkit.compare import run_compare
from ssmkit.train import load_run_config, train
from ssmkit.utils.process import flush_denormal_enabled, process_settings


@pytest.fixture
def caller_settings():
    """Settings the library calls below would change: 1 thread, denormals not flushed."""
    threads, flush = torch.get_num_threads(), flush_denormal_enabled()
    torch.set_num_threads(1)
    torch.set_flush_denormal(False)
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(flush)


def assert_caller_settings():
    assert torch.get_num_threads() == 1
    assert not flush_denormal_enabled()


def test_process_settings_restores_on_exit_and_on_error(caller_settings):
    with process_settings(threads=2, flush_denormal=True):
        assert torch.get_num_threads() == 2 and flush_denormal_enabled()
    assert_caller_settings()
    with pytest.raises(KeyError):
        with process_settings(threads=2, flush_denormal=True):
            raise KeyError("boom")
    assert_caller_settings()
    with pytest.raises(ValueError, match="threads must be a positive int"):
        with process_settings(threads=0):
            pass


def _run(tmp_path, *overrides):
    return load_run_config(None, ["task.name=induction_heads", "task.kwargs={vocab_size: 4, length: 8}",
                                  "model.d_model=8", "model.n_layers=1", "model.mixer=mamba",
                                  "model.mixer_kwargs={d_state: 2}", "train.steps=2", "train.batch_size=4",
                                  "train.eval_batches=1", "train.checkpoint_every=0", "train.progress=false",
                                  "train.tensorboard=false", "train.threads=2", f"train.out_dir={tmp_path}",
                                  *overrides])


def test_train_restores_threads_and_denormals(tmp_path, caller_settings):
    result = train(_run(tmp_path / "ok"))
    assert result.threads == 2  # it did run with its own settings
    assert_caller_settings()
    with pytest.raises(ValueError, match="must be divisible"):
        train(_run(tmp_path / "bad", "train.grad_accum=3"))  # fails inside, after the settings changed
    assert_caller_settings()


@pytest.mark.slow  # trains a model for at least 20 steps
def test_run_compare_restores_threads_and_denormals(tmp_path, caller_settings, capsys):
    run_compare(models=["mamba"], budget=0.01, length=8, out=str(tmp_path / "c"), threads=2, eval_lengths=[],
                context=16, batch_size=4)
    assert_caller_settings()
    with pytest.raises(ValueError, match="unknown model"):
        run_compare(models=["nope"], budget=0.01, out=str(tmp_path / "d"), threads=2)
    assert_caller_settings()
