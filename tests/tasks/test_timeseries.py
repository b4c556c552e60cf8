"""The real time-series tasks (ssmkit.tasks.timeseries): data read from inside the aeon and statsmodels wheels,
deterministic batches of the documented shapes, reversible scaling, the metrics, and no network at all."""

import socket

import numpy as np
import pytest
import torch

from ssmkit.tasks import make_task
from ssmkit.tasks import timeseries
from ssmkit.tasks.timeseries import ForecastBatch, mase_denominator, seasonal_naive, smape
from ssmkit.train import model_config_for
from ssmkit.train.config import ModelSpec

if timeseries.importlib.util.find_spec("aeon") is None or timeseries.importlib.util.find_spec("statsmodels") is None:
    pytest.skip("the timeseries extra (aeon, statsmodels) is not installed", allow_module_level=True)


class NetworkUsed(AssertionError):
    pass


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test here fails if anything creates a socket (the data must come from inside the wheels)."""
    def refuse(self, *args, **kwargs):
        raise NetworkUsed(f"a socket was opened: socket.socket{args}")

    monkeypatch.setattr(socket.socket, "__init__", refuse)
    yield


def test_the_network_guard_catches_a_socket():
    with pytest.raises(NetworkUsed):
        socket.create_connection(("127.0.0.1", 9))


# --------------------------------------------------------------------------------------------------
# UCR / UEA classification
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset", sorted(timeseries.UCR_SETS))
def test_ucr_shapes_and_splits(dataset):
    length, channels, classes, n_train, n_test = timeseries.UCR_SETS[dataset]
    task = make_task("ucr", dataset=dataset)
    assert (task.default_length, task.input_dim, task.num_classes) == (length, channels, classes)
    assert task.num_examples("train") == n_train and task.num_examples("test") == n_test
    assert task.num_examples("val") == 0
    batch = task.batch("test", 0, 5)
    assert batch.inputs.shape == (5, length, channels) and batch.inputs.dtype == torch.float32
    assert batch.targets.shape == (5,) and batch.targets.dtype == torch.int64
    x, y = task.data["train"]
    assert set(y.tolist()) == set(range(classes))  # every class occurs in the official train split
    # z-normalised per case and channel (the archive's convention)
    assert torch.allclose(x.mean(1), torch.zeros(()), atol=1e-5)
    assert torch.allclose(x.std(1, unbiased=False), torch.ones(()), atol=1e-4)


def test_ucr_is_deterministic_and_test_is_read_in_order():
    a, b = make_task("ucr", dataset="GunPoint", seed=3), make_task("ucr", dataset="GunPoint", seed=3)
    for split, index in (("train", 0), ("train", 7), ("test", 1)):
        first, second = a.batch(split, index, 16), b.batch(split, index, 16)
        assert torch.equal(first.inputs, second.inputs) and torch.equal(first.targets, second.targets)
    other_seed = make_task("ucr", dataset="GunPoint", seed=4)
    assert not torch.equal(a.batch("train", 0, 16).inputs, other_seed.batch("train", 0, 16).inputs)
    test_x, test_y = a.data["test"]
    batch = a.batch("test", 1, 16)
    assert torch.equal(batch.inputs, test_x[16:32]) and torch.equal(batch.targets, test_y[16:32])
    with pytest.raises(IndexError):
        a.batch("test", 10, 16)  # 150 test series make 10 batches of 16


def test_ucr_val_fraction_holds_out_train_cases():
    task = make_task("ucr", dataset="OSULeaf", val_fraction=0.25)
    train_rows, val_rows = set(task._rows["train"].tolist()), set(task._rows["val"].tolist())
    assert len(val_rows) == 50 and len(train_rows) == 150 and not train_rows & val_rows
    assert train_rows | val_rows == set(range(200))
    x, _ = task.data["train"]
    val = task.batch("val", 0, 50)
    assert torch.equal(val.inputs, x[sorted(val_rows)])


def test_ucr_refuses_bad_arguments():
    with pytest.raises(ValueError, match="dataset"):
        make_task("ucr", dataset="NoSuchSet")
    with pytest.raises(ValueError, match="length 150"):
        make_task("ucr", dataset="GunPoint").batch("train", 0, 2, length=100)


def test_a_missing_extra_is_named(monkeypatch):
    real = timeseries.importlib.util.find_spec
    monkeypatch.setattr(timeseries.importlib.util, "find_spec",
                        lambda name, *a: None if name == "aeon" else real(name, *a))
    with pytest.raises(ImportError, match=r"ssmkit\[timeseries\]"):
        timeseries.package_file("aeon", "datasets/data/GunPoint/GunPoint_TRAIN.ts")


def test_read_ts_file_parses_channels_labels_and_missing_values(tmp_path):
    path = tmp_path / "toy.ts"
    path.write_text("# comment\n@problemName toy\n@classLabel true a b\n@data\n1,2,3:4,5,6:a\n\n7,?,9:1,1,1:b\n")
    values, labels = timeseries.read_ts_file(path)
    assert values.shape == (2, 2, 3) and labels == ["a", "b"]
    assert values[0, 1].tolist() == [4, 5, 6] and np.isnan(values[1, 0, 1])


# --------------------------------------------------------------------------------------------------
# Forecasting
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("series,log", [("airline", True), ("co2", False), ("sunspots", False)])
def test_forecast_windows_shapes_and_reversible_scaling(series, log):
    task = make_task("forecast", series=series, log=log)
    context, horizon = task.default_length, task.horizon
    batch = task.batch("train", 3, 8)
    assert isinstance(batch, ForecastBatch)
    assert batch.inputs.shape == (8, context, 1) and batch.targets.shape == (8, horizon)
    # scaled by each window's own context: mean 0 and deviation 1 over the context
    assert torch.allclose(batch.inputs.mean(1), torch.zeros(()), atol=1e-5)
    assert torch.allclose(batch.inputs.std(1, unbiased=False), torch.ones(()), atol=1e-4)
    # to_original_units inverts it: the raw series values of each window come back
    for row in range(8):
        start = int(batch.start[row])
        expected = task.values[start:start + context + horizon]
        restored = torch.cat([task.to_original_units(batch.inputs[row:row + 1], _row(batch, row))[0, :, 0],
                              task.to_original_units(batch.targets[row:row + 1], _row(batch, row))[0]])
        np.testing.assert_allclose(restored.numpy(), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # train targets end before the val targets begin; val and test are the last two horizons
    assert int(batch.start.max()) + context + horizon <= task.train_end
    test, val = task.batch("test", 0, 4), task.batch("val", 0, 4)
    assert test.inputs.shape[0] == val.inputs.shape[0] == 1
    assert int(test.start[0]) + context == len(task.values) - horizon
    assert int(val.start[0]) + context == len(task.values) - 2 * horizon


def _row(batch, row):
    return ForecastBatch(batch.inputs[row:row + 1], batch.targets[row:row + 1], None, batch.offset[row:row + 1],
                         batch.scale[row:row + 1], batch.start[row:row + 1])


def test_forecast_is_deterministic_and_keeps_its_scale_through_to():
    a, b = make_task("forecast", series="airline", seed=1), make_task("forecast", series="airline", seed=1)
    first, second = a.batch("train", 5, 16), b.batch("train", 5, 16)
    assert torch.equal(first.inputs, second.inputs) and torch.equal(first.targets, second.targets)
    moved = first.to("cpu")
    assert isinstance(moved, ForecastBatch) and torch.equal(moved.scale, first.scale)


def test_forecast_metrics_are_in_the_series_units():
    task = make_task("forecast", series="airline", log=True)
    batch = task.batch("test", 0, 1)
    truth = task.values[-12:]
    naive = task.values[-24:-12]  # the seasonal-naive forecast of the last year is the year before
    metrics = task.metrics(task.seasonal_naive_forecast(batch), batch)
    mae = np.mean(np.abs(truth - naive))
    assert metrics["mae"] == pytest.approx(mae, rel=1e-5)
    assert metrics["mase"] == pytest.approx(mae / mase_denominator(task.values[:task.train_end], 12), rel=1e-5)
    assert metrics["smape"] == pytest.approx(smape(truth, naive), rel=1e-4)
    # a perfect forecast scores zero
    perfect = task.metrics(batch.targets, batch)
    assert perfect["mase"] < 1e-5 and perfect["smape"] < 1e-4


def test_forecast_helpers():
    history = np.array([1.0, 2, 3, 4, 5, 6])
    assert seasonal_naive(history, 5, 3).tolist() == [4, 5, 6, 4, 5]
    assert mase_denominator(history, 2) == 2.0
    assert smape([100.0, 0.0], [50.0, 0.0]) == pytest.approx(200 * 50 / 150 / 2)
    with pytest.raises(ValueError, match="period"):
        seasonal_naive(history, 2, 7)


def test_forecast_refuses_bad_arguments():
    with pytest.raises(ValueError, match="series"):
        make_task("forecast", series="nope")
    with pytest.raises(ValueError, match="too few"):
        make_task("forecast", series="airline", context=130)
    with pytest.raises(TypeError, match="log"):
        make_task("forecast", series="airline", log="yes")


# --------------------------------------------------------------------------------------------------
# Heads: the task decides them, and the loss/metrics read the model's outputs
# --------------------------------------------------------------------------------------------------
def test_heads_forecast_and_classify():
    import ssmkit

    forecast = make_task("forecast", series="airline", log=True)
    config = model_config_for(forecast, ModelSpec(d_model=16, n_layers=1, mixer="s4d"))
    assert (config.head, config.output_dim, config.input_dim) == ("regression", 12, 1)
    model = ssmkit.from_config(config)
    batch = forecast.batch("train", 0, 4)
    out = model(inputs=batch.inputs).logits                     # (B, context, horizon): read at the last step
    assert out.shape == (4, 36, 12)
    loss = forecast.loss(out, batch)
    loss.backward()
    assert torch.isfinite(loss) and model.regressor.weight.grad.abs().sum() > 0

    classify = make_task("ucr", dataset="BasicMotions")
    config = model_config_for(classify, ModelSpec(d_model=16, n_layers=1, mixer="s4d"))
    assert (config.head, config.num_classes, config.input_dim) == ("classifier", 4, 6)
    model = ssmkit.from_config(config)
    batch = classify.batch("train", 0, 4)
    logits = model(inputs=batch.inputs).logits
    assert logits.shape == (4, 4)
    assert set(classify.metrics(logits, batch)) == {"loss", "accuracy", "count"}


# --------------------------------------------------------------------------------------------------
# End to end: a short run from each kind of config, then `ssmkit viz --checkpoint` beside its reports
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", ["forecast_airline", "ucr_italypower"])
def test_train_then_viz_writes_the_pictures(config, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from pathlib import Path

    from ssmkit.cli import main
    from ssmkit.train import load_run_config, train

    repo = Path(__file__).resolve().parents[2]
    run = load_run_config(repo / "configs" / f"{config}.yaml",
                          ["train.steps=3", "train.warmup_steps=1", "train.progress=false", "train.tensorboard=false",
                           "model.d_model=8", "model.mlp_hidden=8", f"train.out_dir={tmp_path / 'run'}",
                           "train.threads=1", "train.eval_batches=1"])
    result = train(run)
    assert (tmp_path / "run" / "curves.png").is_file()
    assert main(["viz", "--checkpoint", str(result.checkpoint_dir)]) == 0
    shown = capsys.readouterr().out
    for name in ("curves", "kernels", "states", "task"):
        path = tmp_path / "run" / f"{name}.png"
        assert name in shown and path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 2000, name
