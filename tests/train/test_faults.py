"""Faults: a training process SIGKILLed in the middle of a checkpoint write, an output directory that cannot
hold the run, and damaged or foreign checkpoint files.

The crash tests run the real ``ssmkit train`` in a subprocess (tests/train/crash_driver.py) that SIGKILLs
itself at a chosen point of the N-th checkpoint write, then resume in this process: every checkpoint left
under ``checkpoints/step-*`` must be whole and equal, file by file, to the uninterrupted run's checkpoint of
that step, and the resumed run's losses must equal the uninterrupted run's bit for bit. The torchrun tests do
the same with 2 CPU processes (gloo): rank 0, the writer, is killed, and the resumed run is again 2 processes.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssmkit.models import SSMModel
from ssmkit.models.io import load_safetensors
from ssmkit.train import CheckpointCorrupt, OutputDirError, list_checkpoints, train
from ssmkit.train import checkpointing as ckpt

from .test_train import make_run

DRIVER = Path(__file__).with_name("crash_driver.py")
SRC = Path(__file__).resolve().parents[2] / "src"
STEPS = 5
RUN_ARGS = [f"train.steps={STEPS}", "train.log_every=1", "train.threads=1", "train.checkpoint_every=1"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run, every checkpoint kept."""
    out = tmp_path_factory.mktemp("straight")
    return train(make_run(out, *RUN_ARGS, "train.keep_last=0")), out


def _train_args(out_dir, keep_last):
    from .test_train import EASY_TASK

    return EASY_TASK + ["model.d_model=16", "model.n_layers=2", "model.mixer=mamba", "model.mixer_kwargs={d_state: 4}",
                        "train.batch_size=8", "train.lr=1e-2", "train.warmup_steps=2", "train.eval_every=0",
                        "train.eval_batches=1", "train.progress=false", "train.tensorboard=false",
                        f"train.out_dir={out_dir}", f"train.keep_last={keep_last}", *RUN_ARGS]


def _drive(point, n, out_dir, keep_last=2, *extra):
    """``ssmkit train`` through the crash driver in one subprocess (``extra``: more CLI arguments)."""
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(DRIVER), point, str(n), "--", *_train_args(out_dir, keep_last),
                           *extra], env=env, capture_output=True, text=True, timeout=300)


def _run_killed(point, n, out_dir, keep_last=2, *extra):
    proc = _drive(point, n, out_dir, keep_last, *extra)
    assert proc.returncode == -signal.SIGKILL, \
        f"not killed at {point}:{n} (rc {proc.returncode}): {proc.stderr[-2000:]}"


def _assert_checkpoints_intact(out_dir, straight_dir):
    for step, path in list_checkpoints(out_dir):
        want = straight_dir / "checkpoints" / path.name
        got_w, want_w = load_safetensors(path / "model.safetensors"), load_safetensors(want / "model.safetensors")
        assert got_w.keys() == want_w.keys() and all(torch.equal(got_w[k], want_w[k]) for k in got_w), path
        assert ckpt.read_trainer_state(path)["step"] == step
        assert ckpt.read_run_info(path)["step"] == step
        SSMModel.from_pretrained(path)  # config.json and weights load strictly


def _kill_then_resume(point, n, tmp_path, straight, keep_last=2):
    result, straight_dir = straight
    out = tmp_path / f"{point}-{n}"
    _run_killed(point, n, out, keep_last)
    left = list_checkpoints(out)
    assert left, "no checkpoint survived"
    _assert_checkpoints_intact(out, straight_dir)
    resumed = train(make_run(out, *RUN_ARGS, f"train.keep_last={keep_last}"), resume=True)
    assert resumed.start_step == left[-1][0]
    assert resumed.losses == result.losses[resumed.start_step:]  # bitwise
    for (name, a), b in zip(result.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    return left


# kill points (point, N-th checkpoint write): the CI pair, then the rest (slow)
CI_POINTS = [("trainer_state", 2), ("rename", 3)]
SLOW_POINTS = [("weights", 2), ("weights", 4), ("trainer_state", 4), ("rename", 2), ("prune", 3), ("prune", 4),
               ("weights", STEPS), ("rename", STEPS)]  # the last two: during the write of final/


@pytest.mark.parametrize("point, n", CI_POINTS + [pytest.param(*p, marks=pytest.mark.slow) for p in SLOW_POINTS])
def test_sigkill_during_checkpoint_write_then_exact_resume(point, n, tmp_path, straight):
    left = _kill_then_resume(point, n, tmp_path, straight)
    # the checkpoint being written is absent (or, killed while pruning, complete); the previous one is there
    newest = left[-1][0]
    assert newest == (n if point == "prune" else n - 1) or (n == STEPS and newest == STEPS - 1)


def test_sigkill_while_final_is_replaced_then_recovered(tmp_path, straight):
    """A finished run resumed (``ssmkit train --resume``) writes ``final/`` again; killed between the two
    renames of that replacement (the old ``final/`` aside under a hidden name, the new one not in place), the
    next reader puts the old one back: ``from_pretrained`` and a further resume see the finished run whole."""
    result, straight_dir = straight
    out = tmp_path / "swap"
    first = _drive("none", 0, out)
    assert first.returncode == 0, first.stderr[-2000:]
    # the resumed run trains no step and writes final/ again: its first checkpoint write is that one
    _run_killed("swap", 1, out, 2, "--resume")
    assert not (out / "final").exists() and len(list(out.glob(".final.old-*"))) == 1  # the state being tested
    assert len(list(out.glob(".final.tmp-*"))) == 1
    model = SSMModel.from_pretrained(out / "final")  # puts the moved-aside copy back
    assert (out / "final").is_dir() and not list(out.glob(".final.old-*"))
    want = SSMModel.from_pretrained(straight_dir / "final")
    for (name, a), b in zip(model.state_dict().items(), want.state_dict().values()):
        assert torch.equal(a, b), name
    again = train(make_run(out, *RUN_ARGS, "train.keep_last=2"), resume=True)
    assert again.start_step == STEPS and again.losses == []


# --------------------------------------------------------------------------------------------------
# The same under torchrun: 2 processes (gloo), rank 0 killed while it writes a checkpoint
# --------------------------------------------------------------------------------------------------
def _torchrun(point, n, out_dir, *extra, keep_last=2):
    """``ssmkit train`` in 2 CPU processes under torchrun, through the crash driver (point "none": no kill).

    Only rank 0 writes checkpoints, so only rank 0 kills itself; torchrun then stops rank 1 (waiting for
    rank 0 in a collective) and exits non-zero."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--monitor-interval", "0.5", str(DRIVER), point, str(n), "--", *_train_args(out_dir, keep_last),
           "train.distributed=ddp", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _losses_since_last_start(out_dir, event="start"):
    """The per-step train losses that metrics.jsonl records since its last start or resume event (which
    must be ``event``, in a world of 2)."""
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    last = max(i for i, r in enumerate(records) if r["event"] in ("start", "resume"))
    assert records[last]["event"] == event and records[last]["world_size"] == 2
    return [r["loss"] for r in records[last:] if r["event"] == "train"]


@pytest.fixture(scope="module")
def straight_torchrun(tmp_path_factory):
    """The uninterrupted 2-process run, every checkpoint kept."""
    out = tmp_path_factory.mktemp("straight-torchrun")
    proc = _torchrun("none", 0, out, keep_last=0)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    losses = _losses_since_last_start(out)
    assert len(losses) == STEPS
    return losses, out


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
@pytest.mark.parametrize("point, n", [("trainer_state", 2), ("rename", 3)])
def test_sigkill_of_rank_0_under_torchrun_then_exact_resume(point, n, tmp_path, straight_torchrun):
    straight_losses, straight_dir = straight_torchrun
    out = tmp_path / f"{point}-{n}"
    killed = _torchrun(point, n, out)
    assert killed.returncode != 0, f"torchrun finished although rank 0 was to be killed at {point}:{n}"
    # torchrun's failure summary: rank 0 died of SIGKILL (rank 1 then lost its peer and was stopped)
    assert re.search(r"rank\s*:\s*0 \(local_rank: 0\)\s*exitcode\s*:\s*-9", killed.stderr), killed.stderr[-4000:]
    left = list_checkpoints(out)
    assert [step for step, _ in left][-1] == n - 1  # the checkpoint being written is absent, the previous one there
    _assert_checkpoints_intact(out, straight_dir)

    resumed = _torchrun("none", 0, out, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    assert _losses_since_last_start(out, "resume") == straight_losses[n - 1:]  # bitwise, 2 processes as before
    got, want = load_safetensors(out / "final" / "model.safetensors"), \
        load_safetensors(straight_dir / "final" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


# --------------------------------------------------------------------------------------------------
# The output directory, checked before step 1
# --------------------------------------------------------------------------------------------------
def test_read_only_output_directory_is_refused_up_front(tmp_path, capsys):
    if os.geteuid() == 0:  # root writes through file modes: use a directory of a read-only file system
        read_only = Path("/sys/kernel")
        if not read_only.is_dir() or os.access(read_only, os.W_OK) and _can_create(read_only):
            pytest.skip("no read-only directory available to root here")
    else:
        read_only = tmp_path / "ro"
        read_only.mkdir()
        read_only.chmod(0o500)
    with pytest.raises(OutputDirError, match="is not writable") as err:
        train(make_run(read_only / "run", "train.steps=2"))
    assert str(read_only / "run") in str(err.value)
    from ssmkit.cli import main

    assert main(["train", "train.steps=2", f"train.out_dir={read_only / 'run'}"]) == 2
    assert "is not writable" in capsys.readouterr().err


def _can_create(directory):
    try:
        (directory / ".ssmkit-probe").mkdir()
    except OSError:
        return False
    (directory / ".ssmkit-probe").rmdir()
    return True


def test_output_directory_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match="not writable"):
        train(make_run(tmp_path / "file" / "run", "train.steps=2"))


def test_full_disk_is_refused_up_front(tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: real(p)._replace(free=10_000))
    with pytest.raises(OutputDirError, match="MiB free but the run's checkpoints need") as err:
        train(make_run(tmp_path / "run", "train.steps=2", "train.checkpoint_every=1"))
    assert str(tmp_path / "run") in str(err.value)
    assert not list((tmp_path / "run").iterdir())  # nothing trained, nothing written


# --------------------------------------------------------------------------------------------------
# Damaged or foreign checkpoint files: one clear error naming the file
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def one_checkpoint(tmp_path):
    train(make_run(tmp_path / "run", "train.steps=2", "train.checkpoint_every=1"))
    [(_, path)] = list_checkpoints(tmp_path / "run")
    return tmp_path / "run", path


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, file, error", [
    ("truncate", "trainer_state.pt", CheckpointCorrupt), ("garbage", "trainer_state.pt", CheckpointCorrupt),
    ("truncate", "run.json", CheckpointCorrupt), ("truncate", "model.safetensors", ValueError),
    ("garbage", "model.safetensors", ValueError), ("truncate", "config.json", ValueError)])
def test_damaged_checkpoint_file_is_named(one_checkpoint, damage, file, error):
    run_dir, path = one_checkpoint
    if damage == "truncate":
        _truncate(path / file)
    else:
        (path / file).write_bytes(os.urandom(200))
    with pytest.raises(error) as err:
        if file == "config.json":  # resuming reads run.json; config.json is what from_pretrained reads
            SSMModel.from_pretrained(path)
        else:
            train(make_run(run_dir, "train.steps=2", "train.checkpoint_every=1"), resume=path)
    assert str(path / file) in str(err.value)


def test_config_of_another_version_is_named(one_checkpoint):
    _, path = one_checkpoint
    config = json.loads((path / "config.json").read_text())
    config.update(ssmkit_version="99.0.0", rotary_mode="future-field")
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        SSMModel.from_pretrained(path)
    message = str(err.value)
    assert str(path / "config.json") in message and "99.0.0" in message and "rotary_mode" in message


def test_vocabulary_mismatch_is_named(one_checkpoint, tmp_path):
    """ssmkit's LMs have no tokenizer object (the bytes task is vocabulary 256, the synthetic tasks their own):
    a checkpoint whose vocabulary differs from the task's is refused, naming the key and both values."""
    run_dir, path = one_checkpoint
    from ssmkit.train import CheckpointMismatch

    with pytest.raises(CheckpointMismatch) as err:
        train(make_run(run_dir, "train.steps=2", "train.checkpoint_every=1",
                       "task.kwargs={vocab_size: 6, length: 8}"), resume=path)
    assert str(path) in str(err.value) and "vocab_size" in str(err.value)


# Whole module: subprocesses, exports or many drawn cases (tens of seconds); `make test` and CI run it,
# `make test-fast` does not.
pytestmark = pytest.mark.slow
