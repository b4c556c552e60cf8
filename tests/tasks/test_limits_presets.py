"""The honest-limits presets of ``ssmkit compare`` and the string-copy task behind them (issue 17)."""

import json

import pytest
import torch

from ssmkit.compare import LIMIT_TASKS, run_compare
from ssmkit.tasks import make_task


def test_string_copy_layout():
    task = make_task("string_copy", vocab_size=7, length=10)
    batch = task.batch("train", 0, 3)
    x, y = batch.inputs, batch.targets
    assert x.shape == y.shape == (3, 10)
    n = 5
    assert (y[:, :n] == -100).all()
    string = x[:, :n]
    assert (string >= 1).all() and (string < 7).all()          # data never equals the separator
    assert (x[:, n] == 0).all()                                 # separator
    assert torch.equal(y[:, n:], string)                        # each answer is the next string token
    assert torch.equal(x[:, n + 1:], string[:, :-1])            # the copy so far is read back


def test_string_copy_rejects_odd_length():
    with pytest.raises(ValueError, match="even"):
        make_task("string_copy", length=9)
    task = make_task("string_copy", length=8)
    with pytest.raises(ValueError, match="even"):
        task.batch("val", 0, 2, length=11)


@pytest.mark.parametrize("preset", sorted(LIMIT_TASKS))
def test_limit_presets_build_their_task(preset):
    settings = LIMIT_TASKS[preset]
    task = make_task(settings["task"], **settings["kwargs"], length=settings["length"])
    batch = task.batch("train", 0, 2)
    assert batch.inputs.shape == (2, settings["length"])
    assert (batch.targets != -100).any()


def test_many_keys_preset_asks_for_more_pairs_than_few_keys():
    few, many = LIMIT_TASKS["limits_mqar_few_keys"], LIMIT_TASKS["limits_mqar_many_keys"]
    assert many["kwargs"]["num_kv_pairs"] > few["kwargs"]["num_kv_pairs"]
    assert LIMIT_TASKS["limits_copy_long"]["length"] > LIMIT_TASKS["limits_copy_short"]["length"]


def test_compare_runs_a_limits_preset(tmp_path):
    rows = run_compare(task="limits_copy_short", models=["transformer"], budget=0.5, out=str(tmp_path),
                       context=32, batch_size=8)
    assert rows[0]["model"] == "transformer"
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["task"] == "string_copy" and written["train_length"] == LIMIT_TASKS["limits_copy_short"]["length"]


def test_needle_presets_hide_one_needle_at_short_and_long_context():
    short, long = LIMIT_TASKS["limits_needle_short"], LIMIT_TASKS["limits_needle_long"]
    assert short["task"] == long["task"] == "needle_haystack" and long["length"] > short["length"]
    batch = make_task("needle_haystack", **long["kwargs"], length=long["length"]).batch("test", 0, 2)
    assert int((batch.targets != -100).sum()) == 2 * long["kwargs"]["value_len"]


def test_compare_runs_the_needle_preset(tmp_path):
    rows = run_compare(task="limits_needle_short", models=["transformer"], budget=0.5, out=str(tmp_path),
                       context=32, batch_size=8)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["task"] == "needle_haystack" and written["train_length"] == 128
    assert 0.0 <= rows[0]["accuracy"]["128"] <= 1.0
