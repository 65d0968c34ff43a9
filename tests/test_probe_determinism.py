"""The linear probe's result is a function of the data and the settings only, not of the job
count or the BLAS thread count (clipbench.tasks.linear_probe, module docstring)."""

import os

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from clipbench.tasks.linear_probe import linear_probe

from conftest import child_pids, gaussian_mixture


def _probe(x, y, n, jobs, threads, **kwargs):
    train, val, test = slice(0, n), slice(n, n + n // 3), slice(2 * n, 3 * n)
    with threadpool_limits(limits=threads):
        return linear_probe(x[train], y[train], x[val], y[val], x[test], y[test], "accuracy",
                            n_jobs=jobs, **kwargs)


@pytest.mark.slow
def test_probe_is_bit_identical_across_jobs_and_blas_threads():
    # Measured before the fix on this problem (2-core machine, OpenBLAS 0.3): the chosen C and the
    # predictions agreed, but the test decision scores differed in the last bits (max |diff|
    # ~4e-14) between one BLAS thread and two (n_jobs 1, 2 and 7 with 2 threads in the parent),
    # because the final refit ran with the process's BLAS threads; on real pre-projection
    # features such differences moved the stopping iterate and test predictions (issue 16).
    n = 600
    x, y = gaussian_mixture(3 * n, 256, 10, 0.2, seed=0)
    runs = {(jobs, threads): _probe(x, y, n, jobs, threads)
            for jobs, threads in [(1, 1), (1, 2), (2, 1), (2, 2), (7, 2)]}
    base = runs[(1, 1)]
    for setting, r in runs.items():
        assert r.C == base.C, setting
        assert r.sweep == base.sweep, setting
        np.testing.assert_array_equal(r.predictions, base.predictions, err_msg=str(setting))
        np.testing.assert_array_equal(r.scores, base.scores, err_msg=str(setting))
        assert r.convergence == base.convergence, setting


def test_convergence_is_recorded_per_fit():
    n = 120
    x, y = gaussian_mixture(3 * n, 16, 3, 1.0, seed=1)
    result = _probe(x, y, n, 1, 1)
    conv = result.record_details()["convergence"]
    assert conv["max_iter"] == 1000
    assert list(conv["n_iter"]) == [repr(c) for c in result.sweep]  # one entry per sweep fit
    # the first sweep point starts from zero: its iterations are sklearn's own on the same fit
    first = LogisticRegression(C=1e-6, max_iter=1000, tol=1e-4).fit(x[:n].astype(np.float64), y[:n])
    assert conv["n_iter"][repr(1e-6)] == int(first.n_iter_.max())
    assert conv["max_iter_reached"] == []
    assert 0 < conv["final"]["n_iter"] < 1000 and conv["final"]["max_iter_reached"] is False


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_fits_stopped_by_max_iter_are_listed():
    n = 120
    x, y = gaussian_mixture(3 * n, 16, 3, 1.0, seed=1)
    conv = _probe(x, y, n, 1, 1, max_iter=1).convergence
    assert set(conv["n_iter"].values()) == {1}
    assert conv["max_iter_reached"] == list(conv["n_iter"])
    assert conv["final"] == {"n_iter": 1, "max_iter_reached": True}


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process table from /proc")
def test_parallel_sweep_leaves_no_worker_process_behind():
    # Worker processes outlived the probe (and, killed parents, stayed blocked for an hour);
    # the sweep's workers are threads of this process, so nothing can be left behind.
    before = child_pids(os.getpid())
    x, y = gaussian_mixture(300, 16, 3, 0.5, seed=1)
    result = _probe(x, y, 100, 4, 1)
    assert 0 < result.metrics["accuracy"] <= 1
    assert child_pids(os.getpid()) - before == set()
