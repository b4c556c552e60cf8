"""Run ``ssmkit train`` (the real CLI) and SIGKILL this process at a chosen point of a checkpoint write.

Used by tests/train/test_faults.py as ``python tests/train/crash_driver.py POINT N -- <train overrides>``:
the process kills itself with SIGKILL (nothing runs after it: no ``finally``, no atexit) when the N-th
checkpoint write (1-based, counting every checkpoint the run writes, ``final`` included) reaches POINT:

* ``weights``: model.safetensors half written (the real file, then truncated to half its bytes);
* ``trainer_state``: weights whole, trainer_state.pt half written;
* ``rename``: every file written and flushed, before the temporary directory is renamed into place;
* ``prune``: the new checkpoint in place, in the middle of deleting the oldest one (keep_last);
* ``swap``: a directory that exists being replaced (``final/`` written again by a resumed run): the old one
  renamed aside, the new one not yet renamed in;
* ``none``: no kill (the uninterrupted and the resumed runs under torchrun go through the same driver).

Under torchrun every rank runs the driver, but only rank 0 writes checkpoints, so only rank 0 is killed.
"""

import os
import signal
import sys
from pathlib import Path


def _kill() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    point, target, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[4:]
    import shutil

    import safetensors.torch
    import torch

    import ssmkit.models.io as io
    from ssmkit.cli import main as cli_main

    writes = {"n": 0}
    real_save_file, real_torch_save, real_replace, real_rmtree = (safetensors.torch.save_file, torch.save,
                                                                 os.replace, shutil.rmtree)

    def truncate_and_kill(path):
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size // 2)
            f.flush()
            os.fsync(f.fileno())
        _kill()

    def save_file(tensors, filename, metadata=None):  # the first file of every checkpoint write
        writes["n"] += 1
        real_save_file(tensors, filename, metadata=metadata)
        if point == "weights" and writes["n"] == target:
            truncate_and_kill(filename)

    def torch_save(obj, f, *args, **kwargs):
        real_torch_save(obj, f, *args, **kwargs)
        if point == "trainer_state" and writes["n"] == target and str(f).endswith("trainer_state.pt"):
            truncate_and_kill(f)

    def replace(src, dst):
        if point == "rename" and writes["n"] == target and ".tmp-" in Path(src).name:
            _kill()
        done = real_replace(src, dst)
        if point == "swap" and writes["n"] == target and ".old-" in Path(dst).name:
            _kill()  # the old directory is aside, the new one still under its temporary name
        return done

    def rmtree(path, *args, **kwargs):
        name = Path(path).name  # a pruned checkpoint: step-* (deleted in place) or its hidden new name
        if point == "prune" and writes["n"] == target and (name.startswith("step-") or ".deleting-" in name):
            files = sorted(p for p in Path(path).iterdir() if p.is_file())
            if files:
                files[0].unlink()  # part of the old checkpoint gone, the rest still there
            _kill()
        return real_rmtree(path, *args, **kwargs)

    io.safetensors.torch.save_file = save_file
    torch.save = torch_save
    os.replace = replace
    shutil.rmtree = rmtree
    return cli_main(["train", *overrides])


if __name__ == "__main__":
    raise SystemExit(main())
