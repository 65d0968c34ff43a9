"""A killed run leaves no process behind: DataLoader workers die with their parent, and the probe's
sweep has no worker processes at all (tests/test_probe_determinism.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import child_pids

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process table from /proc")

# Encodes a split whose images load slowly, with 2 DataLoader workers, until it is killed.
SCRIPT = textwrap.dedent("""
    import time
    import numpy as np
    import torch
    from PIL import Image
    from clipbench.data.base import Samples
    from clipbench.features import encode_image_batches

    class SlowImages:
        def __call__(self, i):
            time.sleep(0.2)
            return Image.new("RGB", (8, 8), (i % 255, 0, 0))

    class Model:
        device = "cpu"
        preprocess = staticmethod(lambda image: torch.zeros(3, 8, 8))
        def autocast(self):
            import contextlib
            return contextlib.nullcontext()
        def encode_images(self, pixels):
            return pixels.flatten(1), pixels.flatten(1)

    samples = Samples(load_image=SlowImages(), size=100_000, targets=np.zeros(100_000, np.int64))
    encode_image_batches(Model(), samples, batch_size=4, workers=2)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_dataloader_workers_exit_when_the_run_is_killed(sig):
    parent = subprocess.Popen([sys.executable, "-c", SCRIPT], env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        deadline = time.monotonic() + 120
        workers: set[int] = set()
        while len(workers) < 2 and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.5)
            workers = {pid for pid in child_pids(parent.pid) if _alive(pid)}
        assert len(workers) >= 2, "the DataLoader workers never started"
        parent.send_signal(sig)
        parent.wait(timeout=60)
        deadline = time.monotonic() + 30  # torch's workers check on their parent every 5 s
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [pid for pid in workers if _alive(pid)]
    finally:
        if parent.poll() is None:
            parent.kill()
