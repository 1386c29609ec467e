"""Calibration: does a model's own likelihood rank its own samples the way the reward does?

PLaD's aim is a student whose sequence likelihood orders its outputs by quality. Measured per test
prompt on K sampled responses `y_1..y_K` with the model's length-normalised log-likelihood
`l_k = log p(y_k | x) / |y_k|` (teacher-forced, temperature 1) and the scorer's reward `r_k`:

- `spearman`: Spearman's rank correlation of `l` and `r` (ties take their average rank), averaged
  over the prompts where both vary; a prompt whose K rewards (or likelihoods) are all equal has no
  ranking to agree with and is left out (`spearman_prompts` counts those that count).
- `best_of_k`: the mean reward of the response the model finds most likely (the reward averaged
  over ties for the top likelihood); `random_of_k`: the mean reward of a response picked at
  random (the mean of the K); `best_of_k_gain` = their difference, the reward a model gains by
  trusting its own likelihood.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def calibration(loglik, reward) -> dict:
    """The calibration metrics of `[N, K]` arrays of likelihoods and rewards (N prompts, K >= 2
    samples each); see the module docstring. `spearman` is None when no prompt counts."""
    loglik, reward = np.asarray(loglik, np.float64), np.asarray(reward, np.float64)
    if loglik.shape != reward.shape or loglik.ndim != 2 or loglik.shape[1] < 2:
        raise ValueError(
            f"calibration: likelihoods {loglik.shape} and rewards {reward.shape} must both be "
            "[prompts, K] with K >= 2"
        )
    rho = _row_spearman(loglik, reward)
    counted = ~np.isnan(rho)
    top = loglik == loglik.max(axis=1, keepdims=True)
    best = (reward * top).sum(axis=1) / top.sum(axis=1)
    random = reward.mean(axis=1)
    return {
        "k": int(loglik.shape[1]),
        "prompts": int(loglik.shape[0]),
        "spearman": float(rho[counted].mean()) if counted.any() else None,
        "spearman_prompts": int(counted.sum()),
        "best_of_k": float(best.mean()),
        "random_of_k": float(random.mean()),
        "best_of_k_gain": float((best - random).mean()),
    }


def _row_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row pair: Pearson's correlation of their average ranks; NaN where a
    row is constant."""
    ra, rb = (rankdata(x, method="average", axis=1) for x in (a, b))
    ra, rb = ra - ra.mean(axis=1, keepdims=True), rb - rb.mean(axis=1, keepdims=True)
    norm = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, (ra * rb).sum(axis=1) / np.where(norm > 0, norm, 1.0), np.nan)
