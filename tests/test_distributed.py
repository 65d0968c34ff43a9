"""Data-parallel runs (torchrun, SLURM-style launch) against a single process, on CPU with gloo.

The end-to-end tests launch real processes: one single-process ``clipbench run``, one
``torchrun --nproc_per_node 2`` run, one torchrun run in which rank 1 dies after the first dataset,
and a SLURM-style rerun (two processes with ``SLURM_PROCID``/``SLURM_NTASKS``) that resumes it.
Every process runs with ``OMP_NUM_THREADS=1`` (torchrun's own default per process), because the
CPU thread count changes the last bits of some kernels (text features here).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from clipbench.distributed import DistContext, shard_range
from clipbench.errors import ClipbenchError

# --------------------------------------------------------------------------------------------
# shard layout


@pytest.mark.parametrize("n", [0, 1, 3, 4, 9, 15, 17, 1000])
@pytest.mark.parametrize("batch_size", [1, 4, 7])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_cover_every_index_once_in_whole_single_process_batches(n, batch_size, world):
    shards = [shard_range(n, batch_size, r, world) for r in range(world)]
    joined = [i for s in shards for i in s]
    assert joined == list(range(n))  # disjoint, in rank order, nothing dropped or repeated
    batches = [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    for batch in batches:  # each single-process batch lies inside exactly one shard
        owners = [r for r, s in enumerate(shards) if batch.start in s]
        assert len(owners) == 1 and batch[-1] in shards[owners[0]]
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= batch_size


def test_shard_range_rejects_bad_arguments():
    with pytest.raises(ValueError):
        shard_range(10, 4, 2, 2)
    with pytest.raises(ValueError):
        shard_range(10, 0, 0, 1)


# --------------------------------------------------------------------------------------------
# environment


def test_from_env_without_launcher_is_a_single_process():
    ctx = DistContext.from_env("cpu", environ={})
    assert (ctx.rank, ctx.world_size, ctx.distributed, ctx.is_main) == (0, 1, False, True)
    assert DistContext.from_env("cpu", environ={"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}).world_size == 1
    assert ctx.device("cpu") == "cpu" and ctx.device("auto") == "auto"
    assert ctx.main_first(lambda: 7) == 7
    ctx.close()  # nothing to leave


@pytest.mark.parametrize("environ, expected", [
    ({"CLIPBENCH_DIST_TIMEOUT": "soon"}, "CLIPBENCH_DIST_TIMEOUT"),
    ({"CLIPBENCH_DIST_IDLE_TIMEOUT": "-1"}, "CLIPBENCH_DIST_IDLE_TIMEOUT"),
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "1"}, "MASTER_ADDR"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "outside a world of 2"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE"),
])
def test_from_env_bad_values_name_the_variable(environ, expected):
    with pytest.raises(ClipbenchError, match=expected):
        DistContext.from_env("cpu", environ=environ)


# --------------------------------------------------------------------------------------------
# the exchange itself: two gloo processes, tiny gather chunks


def _exchange_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    import clipbench.distributed as cd

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    ctx = cd.DistContext(rank=rank, world_size=2, _control=dist.new_group(backend="gloo"))
    cd.GATHER_CHUNK_BYTES = 4 * 3 * 5  # five rows of three floats per message
    results = {}
    for name, counts in (("uneven", [13, 4]), ("rank0_empty", [0, 3]), ("none", [0, 0])):
        local = (np.arange(counts[rank] * 3, dtype=np.float32).reshape(-1, 3) + 1000 * rank + 0.25)
        gathered = ctx._gather_rows(name, local, counts, 3)
        if rank == 0:
            results[name] = gathered
    request = {"spec": type("Spec", (), {"name": "toy"})(), "role": "test", "n": 6, "batch_size": 2, "workers": 0}
    error = "rank 1 could not load toy/test: no such file" if rank else "rank 0 failed decoding toy/test: bad JPEG"
    try:
        outcome = repr(ctx._encode_shard(None, None, request, error=error))
    except ClipbenchError as exc:
        outcome = f"raised: {exc}"
    if rank:
        # receive rank 0's "stop" as a serving rank would, so close() does not race a pending send
        box = [None]
        dist.broadcast_object_list(box, src=0, group=ctx._control)
        assert box[0] == {"op": "stop"}
    ctx.close()
    np.savez(Path(out_dir) / f"rank{rank}.npz", outcome=np.array(outcome), **results)


def test_gather_keeps_rank_order_across_chunks_and_reports_every_rank_error(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_exchange_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    with np.load(tmp_path / "rank0.npz") as r0, np.load(tmp_path / "rank1.npz") as r1:
        def rows(rank: int, n: int) -> np.ndarray:
            return np.arange(n * 3, dtype=np.float32).reshape(-1, 3) + 1000 * rank + 0.25

        assert np.array_equal(r0["uneven"], np.concatenate([rows(0, 13), rows(1, 4)]))
        assert np.array_equal(r0["rank0_empty"], rows(1, 3))
        assert r0["none"].shape == (0, 3)
        # both ranks failed: rank 0 raises (failing that dataset) with every rank's message
        assert str(r0["outcome"]).startswith("raised: ") and "rank 1 could not load toy/test" in str(r0["outcome"])
        assert "rank 0 failed decoding toy/test" in str(r0["outcome"])
        assert str(r1["outcome"]) == "None"


# --------------------------------------------------------------------------------------------
# end to end

SPEC = """
name: {name}
title: Colours
tasks: [zeroshot]
primary_metric: accuracy
num_classes: 3
source:
  type: imagefolder
  path: {root}
  class_folders: [a_red, b_green, c_blue]
splits:
  test: {split}
subsample: {subsample}
classnames: [red, green, blue]
templates: ["a photo of a {{c}}.", "a {{c}} picture."]
"""

#: (dataset, imagefolder split, subsample): 9 images (batches 4+4+1 -> shards 4 | 5),
#: 15 images (4+4+4+3 -> 8 | 7), 3 images (one batch -> rank 1's shard is empty).
DATASETS = [("colours_a", "test", "null"), ("colours_b", "train", "null"),
            ("colours_c", "test", "{test: 3, seed: 1}")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "CLIPBENCH_TEST_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


class Runs:
    def __init__(self, root: Path, spec_files: list[Path]):
        self.root = root
        self.spec_files = spec_files

    def args(self, name: str) -> list[str]:
        return ["run", "--model", "ViT-S-32-alt", "--pretrained", "none", "--precision", "fp32",
                "--device", "cpu", "--workers", "0", "--batch-size", "4", "--tasks", "zeroshot",
                "--bootstrap", "50", "--data-root", str(self.root / "data"),
                "--output", str(self.root / name / "out"), "--cache-dir", str(self.root / name / "cache"),
                "--datasets", *map(str, self.spec_files)]

    def single(self, name: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "clipbench", *self.args(name)], env=_env(),
                              capture_output=True, text=True, timeout=300)

    def torchrun(self, name: str, **env: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "clipbench", *self.args(name)]
        return subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=300)

    def slurm(self, name: str) -> list[subprocess.CompletedProcess]:
        """Two processes started the way ``srun --ntasks 2`` starts them."""
        base = {"SLURM_NTASKS": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
        procs = [subprocess.Popen([sys.executable, "-m", "clipbench", *self.args(name)],
                                  env=_env(**base, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r in range(2)]
        done = []
        for p in procs:
            out, err = p.communicate(timeout=300)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
        return done

    def records(self, name: str) -> dict[str, dict]:
        """Every record and sidecar under the run's output, minus the fields that must differ."""
        found = {}
        for path in sorted((self.root / name / "out").rglob("*.json")):
            data = json.loads(path.read_text())
            data.pop("seconds", None)
            data.pop("created", None)
            found[str(path.relative_to(self.root / name / "out"))] = data
        return found

    def features(self, name: str) -> dict[str, dict[str, np.ndarray]]:
        found = {}
        for path in sorted((self.root / name / "cache" / "features").rglob("*.npz")):
            with np.load(path) as data:
                found[path.name] = {k: data[k] for k in data.files}
        return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    from conftest import make_image

    root = tmp_path_factory.mktemp("dist")
    folder = root / "folder"
    for split, n in (("train", 5), ("test", 3)):
        for label, cls in enumerate(("a_red", "b_green", "c_blue")):
            (folder / split / cls).mkdir(parents=True)
            for i in range(n):
                make_image(label, i + (100 if split == "test" else 0)).save(folder / split / cls / f"{i:03d}.png")
    spec_files = []
    for name, split, subsample in DATASETS:
        path = root / f"{name}.yaml"
        path.write_text(textwrap.dedent(SPEC.format(name=name, root=folder, split=split, subsample=subsample)))
        spec_files.append(path)
    runs = Runs(root, spec_files)
    proc = runs.single("single")
    assert proc.returncode == 0, proc.stderr
    return runs


@pytest.mark.slow
def test_two_ranks_give_the_records_and_features_of_one_process(runs):
    proc = runs.torchrun("torchrun")
    assert proc.returncode == 0, proc.stderr
    expected = runs.records("single")
    assert len(expected) == 2 * len(DATASETS)  # a record and a per-class sidecar each
    assert runs.records("torchrun") == expected
    assert [r["n_samples"] for k, r in expected.items() if k.endswith("zeroshot.json")] == [9, 15, 3]
    single, dist = runs.features("single"), runs.features("torchrun")
    assert single.keys() == dist.keys() and len(single) == len(DATASETS) + 1  # + the shared prompts
    for key, arrays in single.items():
        for name, array in arrays.items():
            # bit-identical: every image is encoded in the same batch as in one process
            assert np.array_equal(dist[key][name], array), (key, name)
    assert proc.stdout.count("colours_") == len(DATASETS)  # the summary table, printed once (rank 0)


@pytest.mark.slow
def test_a_dead_rank_fails_the_job_naming_it_and_a_rerun_resumes(runs):
    proc = runs.torchrun("killed", CLIPBENCH_TEST_FAIL_RANK="1")
    assert proc.returncode != 0
    assert "rank      : 1 (local_rank: 1)" in proc.stderr and "exitcode  : 1" in proc.stderr
    out = runs.root / "killed" / "out" / "ViT-S-32-alt__none"
    first = out / "colours_a" / "zeroshot.json"
    assert first.is_file() and not (out / "colours_b").exists()  # the finished dataset is kept
    created = json.loads(first.read_text())["created"]
    assert len(runs.features("killed")) == 2  # colours_a's images and the prompts, cached by rank 0

    rank0, rank1 = runs.slurm("killed")  # resume, launched the SLURM way
    assert rank0.returncode == 0 and rank1.returncode == 0, rank0.stderr + rank1.stderr
    assert json.loads(first.read_text())["created"] == created  # reused, not recomputed
    assert runs.records("killed") == runs.records("single")
    assert "colours_c" in rank0.stdout and rank1.stdout == ""  # only rank 0 reports
