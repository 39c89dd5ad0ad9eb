"""Preference classes and MLE (nash_lm.learning.classes / data): checked against scipy optimisers, closed
forms (empirical win rates, Fisher information) and sampling statistics."""
import numpy as np
import pytest
from scipy import optimize

from nash_lm import learning
from nash_lm.learning.classes import LinearClass, check_features, logistic_mle, sigmoid


def _random_features(rng, X, n, k):
    psi = rng.normal(size=(X, n, k))
    return np.concatenate([learning.bt_features(psi), learning.skew_features(psi)], axis=-1)


def test_features_are_antisymmetric_and_checked():
    rng = np.random.default_rng(0)
    phi = _random_features(rng, 2, 4, 3)
    assert phi.shape == (2, 4, 4, 3 + 3)
    np.testing.assert_allclose(phi, -np.swapaxes(phi, 1, 2), atol=0)
    P = LinearClass(phi).prob(rng.normal(size=6))
    np.testing.assert_allclose(P + np.swapaxes(P, 1, 2), 1.0, atol=1e-15)
    bad = phi.copy()
    bad[0, 0, 1, 0] += 1.0
    with pytest.raises(ValueError, match="features"):
        check_features(bad)


def test_logistic_mle_matches_scipy():
    rng = np.random.default_rng(1)
    F = rng.normal(size=(400, 5))
    y = (rng.random(400) < sigmoid(F @ np.array([1.0, -0.5, 0.3, 0.0, 2.0]))).astype(float)
    ridge = 0.1
    ours = logistic_mle(F, y, ridge=ridge)

    def nll(t):
        z = F @ t
        return np.sum(np.logaddexp(0, z) - y * z) + 0.5 * ridge * t @ t

    ref = optimize.minimize(nll, np.zeros(5), method="BFGS", options={"gtol": 1e-10}).x
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_tabular_mle_is_the_win_rate_and_matches_logistic_with_one_hot_features():
    rng = np.random.default_rng(2)
    n = 4
    P = learning.tabular_features(1, n)[0] @ rng.uniform(-1, 1, size=6)
    P = sigmoid(P)
    D = learning.product_behaviour([1.0], np.array([0.4, 0.3, 0.2, 0.1]))
    data = learning.sample_dataset(P, D, 3000, rng)
    fit = learning.TabularClass(1, n).fit(data)
    for a in range(n):
        for b in range(n):
            if a == b:
                continue
            m1 = (data.a1 == a) & (data.a2 == b)
            m2 = (data.a1 == b) & (data.a2 == a)
            wins = data.y[m1].sum() + (1 - data.y[m2]).sum()
            assert fit.N[0, a, b] == m1.sum() + m2.sum()
            assert fit.P_hat[0, a, b] == pytest.approx(wins / (m1.sum() + m2.sum()), abs=1e-15)
    lin = LinearClass(learning.tabular_features(1, n), ridge=1e-9).fit(data)
    np.testing.assert_allclose(lin.P_hat, fit.P_hat, atol=1e-6)


def test_sampled_labels_follow_P():
    rng = np.random.default_rng(3)
    P = np.array([[0.5, 0.8], [0.2, 0.5]])
    data = learning.sample_dataset(P, learning.product_behaviour([1.0], [0.5, 0.5]), 40000, rng)
    m = (data.a1 == 0) & (data.a2 == 1)
    p = data.y[m].mean()
    assert abs(p - 0.8) < 4 * np.sqrt(0.16 / m.sum())
    assert abs(m.mean() - 0.25) < 4 * np.sqrt(0.25 * 0.75 / data.size)
    with pytest.raises(ValueError, match="behaviour"):
        learning.sample_dataset(P, np.ones((2, 2)), 10, rng)


def test_mle_is_consistent_at_the_root_n_rate():
    """‖θ̂ − θ*‖ shrinks like 1/√n and matches the asymptotic Fisher-information prediction."""
    rng = np.random.default_rng(4)
    X, n, k = 1, 5, 3
    phi = _random_features(rng, X, n, k)
    theta = 0.3 * rng.normal(size=phi.shape[-1])  # moderate probabilities (no separation at small n)
    cls = LinearClass(phi, ridge=1e-8)
    P = cls.prob(theta)
    D = learning.product_behaviour([1.0], np.full(n, 1.0 / n))
    # Fisher information per sample: Σ_{a,b} D(a,b) σ'(θᵀφ) φ φᵀ; E‖θ̂ − θ*‖² ≈ tr(I⁻¹)/n.
    w = (D * P * (1 - P))[..., None, None] * phi[..., :, None] * phi[..., None, :]
    info = w.sum(axis=(0, 1, 2))
    pred = np.sqrt(np.trace(np.linalg.inv(info)))
    sizes = [500, 2000, 8000, 32000]
    errs = []
    for N in sizes:
        e2 = [np.sum((cls.fit(learning.sample_dataset(P, D, N, np.random.default_rng(100 * s + N))).theta
                      - theta) ** 2) for s in range(6)]
        errs.append(np.sqrt(np.mean(e2)))
    slope = np.polyfit(np.log(sizes), np.log(errs), 1)[0]
    assert -0.7 < slope < -0.3, (slope, errs)
    ratio = errs[-1] * np.sqrt(sizes[-1]) / pred
    assert 0.6 < ratio < 1.5, ratio
