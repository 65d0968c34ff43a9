"""Time the paper's linear-probe protocol (C sweep + refit) per solver on synthetic features.

Synthetic features: a Gaussian mixture (unit-variance clusters around random class means of norm
about ``--separation``) with
``--n`` training samples, ``n // 4`` validation and ``n // 5`` test samples. For each solver the
full :func:`clipbench.tasks.linear_probe.linear_probe` runs once; the table gives the total time,
the time per fit (sweep points + final refit), the chosen C, the test accuracy and the fraction of
test predictions equal to the first solver's.

    python benchmarks/linear_probe_sweep.py                                    # 10k x 512, 100 classes
    python benchmarks/linear_probe_sweep.py --n 100000 --dim 768 --classes 1000 \\
        --solvers torch --device cuda                                          # ImageNet-like, on a GPU

Solvers: ``sklearn`` (the paper's; ``--n-jobs`` threads for independent sweep points),
``torch-cpu`` (float64) and ``torch-cuda`` (float32), the latter only where CUDA is available.
"""

from __future__ import annotations

import argparse
import logging
import math
import time

import numpy as np
import torch

from clipbench.tasks.linear_probe import linear_probe


def synthetic_features(n: int, dim: int, classes: int, separation: float, seed: int):
    """float32 (train, val, test) features and int64 labels; sizes n, n // 4, n // 5."""
    rng = np.random.default_rng(seed)
    means = (rng.normal(size=(classes, dim)) * separation / math.sqrt(dim)).astype(np.float32)
    out = []
    for size in (n, n // 4, n // 5):
        y = rng.integers(0, classes, size)
        x = means[y] + rng.normal(size=(size, dim)).astype(np.float32)
        out += [x, y]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="training samples")
    parser.add_argument("--dim", type=int, default=512, help="feature dimension")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--separation", type=float, default=4.0,
                        help="class-mean norm in noise standard deviations (sets difficulty)")
    parser.add_argument("--solvers", default="sklearn,torch", help="comma list of sklearn, torch")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="torch solver device(s): auto = cpu, plus cuda when available")
    parser.add_argument("--n-jobs", type=int, default=None, help="sklearn: threads per sweep batch")
    parser.add_argument("--max-iter", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    data = synthetic_features(args.n, args.dim, args.classes, args.separation, args.seed)
    runs = []
    for solver in args.solvers.split(","):
        if solver == "sklearn":
            runs.append(("sklearn", "sklearn", "cpu"))
            continue
        devices = {"cpu": ["cpu"], "cuda": ["cuda"]}.get(args.device, ["cpu"] + ["cuda"] * torch.cuda.is_available())
        runs += [(f"torch-{d}", "torch", d) for d in devices]

    print(f"train {args.n} x {args.dim}, {args.classes} classes; val {args.n // 4}, test {args.n // 5}; "
          f"torch threads {torch.get_num_threads()}, cuda {torch.cuda.is_available()}")
    header = f"{'solver':<11} {'fits':>4} {'s/fit':>8} {'total s':>9} {'C':>10} {'test acc':>9} {'agree':>7}"
    print(header)
    print("-" * len(header))
    first = None
    for label, solver, device in runs:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = linear_probe(*data, "accuracy", solver=solver, device=device, max_iter=args.max_iter, n_jobs=args.n_jobs)
        seconds = time.perf_counter() - start
        first = result if first is None else first
        fits = len(result.sweep) + 1
        agree = float(np.mean(result.predictions == first.predictions))
        print(f"{label:<11} {fits:>4} {seconds / fits:>8.2f} {seconds:>9.1f} {result.C:>10.3g} "
              f"{result.metrics['accuracy']:>9.4f} {agree:>7.4f}", flush=True)


if __name__ == "__main__":
    main()
