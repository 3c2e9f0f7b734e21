"""The learned initial guess (``streamer.calib.learned``), its trainer (``streamer.tools.train``).

References: smiles built as exact quadratics (the features must return their coefficients), a
network evaluated by hand, a learnable toy problem for the trainer, and the known parameters
of synthetic chains for the shipped networks.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import numpy.typing as npt
import pytest

from streamer.calib.calibrator import Calibrator
from streamer.calib.data import prepare
from streamer.calib.learned import (
    NETS,
    TENOR_DAYS,
    Network,
    features,
    learned_guess,
    n_features,
    network,
    output_names,
    slice_smiles,
    smile_features,
    to_vector,
)
from streamer.calib.options import CalibConfig
from streamer.models import REGISTRY
from streamer.tools.train.data import make_set
from streamer.tools.train.mlp import TrainSettings, train
from tests.synth import make_chain

FloatArray = npt.NDArray[np.float64]
SHIPPED = ("heston", "bates", "heston-td", "bates-td")


def test_features_recover_quadratic_smiles() -> None:
    slice_T = np.array([3.0, 30.0, 180.0]) / 365.0
    coef = np.array([[0.8, -0.05, 0.02], [0.6, -0.08, 0.01], [0.55, -0.04, 0.005]])
    ks, ivs, idx, expect = [], [], [], []
    for j, t in enumerate(slice_T):
        a, b, c = coef[j]
        z = np.linspace(-2.0, 2.0, 15)  # in units of a sqrt(T)
        iv = a + b * z + c * z * z
        ks.append(z * a * math.sqrt(t))
        ivs.append(iv)
        idx.append(np.full(15, j))
        # the features standardise by a0, the median vol of the 4 quotes nearest the forward:
        # in z' = k / (a0 sqrt T) = z a / a0 the same smile is a + b (a0/a) z' + c (a0/a)^2 z'^2
        a0 = float(np.median(iv[np.argsort(np.abs(z))[:4]]))
        expect.append([a, b * a0 / a, c * (a0 / a) ** 2])
    sm = slice_smiles(np.concatenate(ks), np.concatenate(ivs), np.concatenate(idx), slice_T)
    np.testing.assert_allclose(sm, np.array(expect), rtol=1e-9, atol=1e-12)
    coef = np.array(expect)
    f = smile_features(sm, slice_T)
    assert f.shape == (n_features(),)
    G = TENOR_DAYS.shape[0]
    # flat beyond the quoted range; log-time interpolation inside
    assert f[0] == pytest.approx(math.log(0.8))  # 1 day < 3 days
    assert f[G - 1] == pytest.approx(math.log(0.55))  # 365 days > 180 days
    w = (math.log(7.0) - math.log(3.0)) / (math.log(30.0) - math.log(3.0))
    i7 = int(np.flatnonzero(TENOR_DAYS == 7.0)[0])
    assert f[G + i7] == pytest.approx((1 - w) * coef[0, 1] + w * coef[1, 1])
    assert f[-2:] == pytest.approx(np.log(slice_T[[0, -1]]))


def test_network_forward_by_hand_and_round_trip(tmp_path: object) -> None:
    rng = np.random.default_rng(0)
    W = (rng.normal(size=(4, 3)), rng.normal(size=(3, 2)))
    b = (rng.normal(size=3), rng.normal(size=2))
    net = Network(W, b, np.ones(4), 2 * np.ones(4), np.zeros(2), 3 * np.ones(2), ("v0", "rho"))
    x = rng.normal(size=4)
    by_hand = (np.tanh(((x - 1.0) / 2.0) @ W[0] + b[0]) @ W[1] + b[1]) * 3.0
    np.testing.assert_allclose(net(x)[0], by_hand, rtol=1e-12)
    from pathlib import Path

    path = Path(str(tmp_path)) / "n.npz"
    net.save(path, seed=1)
    back = Network.load(path)
    assert back.outputs == ("v0", "rho")
    np.testing.assert_allclose(back(x)[0], by_hand, rtol=1e-5)  # weights stored as float32


def test_trainer_learns_a_smooth_map_and_is_deterministic() -> None:
    rng = np.random.default_rng(1)
    X = rng.uniform(-1.0, 1.0, size=(3000, 3))
    Y = np.column_stack([np.sin(2 * X[:, 0]) + X[:, 1] ** 2, X[:, 2] * X[:, 0]])
    s = TrainSettings(hidden=(32, 32), epochs=60, seed=5)
    net, report = train(X, Y, ("a", "b"), s)
    assert report.valid_mse < 0.02  # of standardised targets (variance 1)
    net2, _ = train(X, Y, ("a", "b"), s)
    for W1, W2 in zip(net.weights, net2.weights, strict=True):
        np.testing.assert_array_equal(W1, W2)


def test_training_set_is_reproducible_and_consistent() -> None:
    X1, Y1, truth = make_set("heston", 20, 7)
    X2, Y2, _ = make_set("heston", 20, 7)
    np.testing.assert_array_equal(X1, X2)
    np.testing.assert_array_equal(Y1, Y2)
    assert X1.shape == (20, n_features())
    model = REGISTRY["heston"]()
    lo, hi = model.bounds(1)
    for (x, slice_T), y in zip(truth, Y1, strict=True):
        assert np.all((x >= lo) & (x <= hi))
        assert y[0] == pytest.approx(math.log(x[0]))  # v0 learned in log
        assert y[4] == pytest.approx(math.atanh(x[4] / 0.99))
        assert np.all(np.diff(slice_T) > 0.0)


def test_training_parameters_do_not_depend_on_the_hash_seed() -> None:
    """The same seed draws the same parameters in any process (string hashing is salted per
    process: an order taken from a set of names would not be)."""
    code = (
        "import numpy as np; from streamer.models import REGISTRY; "
        "from streamer.tools.train.data import parameters; "
        "print(parameters(REGISTRY['bates'](), np.array([0.01, 0.1, 0.5]), "
        "np.random.default_rng(3)).tolist())"
    )
    seen = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": str(h)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for h in (1, 2, 3, 4)
    }
    assert len(seen) == 1, seen


def test_piecewise_outputs_map_to_pieces() -> None:
    model = REGISTRY["heston-td"]()
    names = output_names(model)
    G = TENOR_DAYS.shape[0]
    assert len(names) == 2 + 3 * G
    grid = np.log(TENOR_DAYS / 365.0)
    out = {"v0": 0.3, "kappa": 2.0}
    for g in range(G):
        out[f"theta@{g}"] = float(np.exp(-1.0 + 0.1 * grid[g]))  # ln theta linear in ln T
        out[f"xi@{g}"] = 1.0
        out[f"rho@{g}"] = -0.5
    slice_T = np.array([5.0, 40.0, 120.0]) / 365.0
    x = to_vector(model, out, slice_T)
    rep = np.sqrt(np.array([2.5, 5.0, 40.0]) / 365.0 * slice_T)
    np.testing.assert_allclose(x[2::3][:3], np.exp(-1.0 + 0.1 * np.log(rep)), rtol=1e-12)
    np.testing.assert_allclose(x[4::3][:3], -0.5, rtol=1e-12)


def test_shipped_networks_are_small_and_load() -> None:
    total = 0
    for name in SHIPPED:
        path = NETS / f"{name}.npz"
        assert path.exists(), path
        total += path.stat().st_size
        net = network(name)
        assert net is not None
        assert net.outputs == output_names(REGISTRY[name]())
    assert total < 300_000
    assert network("svi") is None


@pytest.mark.parametrize(
    ("name", "truth"),
    [
        ("heston", np.array([0.36, 3.0, 0.25, 1.2, -0.4])),
        ("bates", np.array([0.25, 2.5, 0.3, 1.0, -0.3, 0.6, -0.25, 0.2])),
    ],
)
def test_learned_guess_then_lm_reaches_known_parameters(name: str, truth: FloatArray) -> None:
    model = REGISTRY[name]()
    days = (1, 3, 7, 14, 30, 91, 182)

    def iv_fn(k: FloatArray, T: FloatArray, j: int) -> FloatArray:
        return np.asarray(model.implied_vol(truth, k, T, np.full(k.shape, j)))

    snap = make_chain(iv_fn, days=days, n_strikes=15, half_spread_iv=0.005)
    data = prepare(snap, CalibConfig().filters, 3).data
    guess = learned_guess(model, data)
    assert guess is not None
    # the guess is near: ATM variance to 30%, the skew's sign right
    assert guess[0] == pytest.approx(truth[0], rel=0.3)
    assert guess[4] < 0.0
    fit = Calibrator(model, CalibConfig(cold_start="learned")).fit(snap)
    assert fit.success
    np.testing.assert_allclose(fit.x[0][:5], truth[:5], rtol=0.05, atol=0.02)


def test_real_chain_target_is_the_optimum_of_a_known_chain() -> None:
    """A real chain's training target (``streamer.tools.train.real.chain_target``) on a chain
    priced by Heston at known parameters: those parameters (the data cost's zero), and the
    features the run-time guess computes; far from them when the network guesses badly (a
    network that always answers the box's corner: the other starts find the optimum)."""
    from streamer.tools.train.real import box_points, chain_target

    model = REGISTRY["heston"]()
    truth = np.array([0.3, 4.0, 0.4, 2.0, -0.2])

    def iv_fn(k: FloatArray, T: FloatArray, j: int) -> FloatArray:
        return np.asarray(model.implied_vol(truth, k, T, np.full(k.shape, j)))

    snap = make_chain(iv_fn, days=(1, 7, 30, 91, 182), n_strikes=15, half_spread_iv=0.005)
    cfg = CalibConfig.for_model(model)
    data = prepare(snap, cfg.filters, 3).data
    net = network("heston")
    assert net is not None
    found = chain_target(model, data, net, cfg, np.random.default_rng(0))
    assert found is not None
    f, y, x = found
    np.testing.assert_array_equal(f, features(data))
    np.testing.assert_allclose(x, truth, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(y[0], math.log(x[0]))  # v0 on its log scale
    np.testing.assert_allclose(y[4], math.atanh(x[4] / 0.99))  # rho on atanh(rho / RHO_MAX)
    corner = Network(
        weights=(np.zeros((n_features(), len(net.outputs))),),
        biases=(np.zeros(len(net.outputs)),),
        x_mean=np.zeros(n_features()),
        x_scale=np.ones(n_features()),
        y_mean=np.array([math.log(2.5), math.log(19.0), math.log(0.01), math.log(4.9), 2.0]),
        y_scale=np.ones(len(net.outputs)),
        outputs=net.outputs,
    )
    found = chain_target(model, data, corner, cfg, np.random.default_rng(0))
    assert found is not None
    np.testing.assert_allclose(found[2], truth, rtol=2e-3, atol=2e-3)
    lo, hi = model.bounds(1)
    pts = box_points(lo, hi, 200, np.random.default_rng(1))
    assert np.all((pts >= lo) & (pts <= hi))
    # log-uniform where the bound is positive: kappa's median near the geometric mean
    assert np.median(pts[:, 1]) == pytest.approx(math.sqrt(lo[1] * hi[1]), rel=0.3)
