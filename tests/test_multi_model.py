"""Several models in one `clipbench run`: ``--model A B``, ``--models FILE``, one model at a time,
and a model that cannot be loaded reported while the others still run.

The multi-model run is compared with separate single-model runs of the same models, each with its
own feature cache, so every number on both sides is computed independently. The two models are the
embedded tiny CLIP with its trained weights (``synthetic``) and with random weights (``none``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from clipbench.cli import _build_parser, config_from_args, main
from clipbench.config import ModelChoice, RunConfig, read_models_file
from clipbench.errors import ClipbenchError

from conftest import COLOURS_SPEC, watch_model_loads, write_imagefolder

TINY = "clipbench-tiny"
MISSING = "/nonexistent/clipbench-weights.pt"
FAST = ["--tasks", "zeroshot,linear_probe", "--device", "cpu", "--precision", "fp32", "--workers", "0",
        "--batch-size", "8", "--bootstrap", "0", "--probe-jobs", "1"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------- naming the models


def test_a_models_file_reads_clip_benchmark_lines_comments_and_defaults(tmp_path):
    path = tmp_path / "models.txt"
    path.write_text("# leaderboard\n\nViT-B-32,laion2b_s34b_b79k\n  RN50 , openai  \n"
                    "clipbench-tiny\n   # indented comment\ntimm:resnet50.a1_in1k\n", encoding="utf-8")
    assert read_models_file(path) == [ModelChoice("ViT-B-32", "laion2b_s34b_b79k"), ModelChoice("RN50", "openai"),
                                      ModelChoice(TINY, None), ModelChoice("timm:resnet50.a1_in1k", None)]
    # --pretrained fills in the lines that give none, never the ones that do
    assert [c.pretrained for c in read_models_file(path, "none")] == ["laion2b_s34b_b79k", "openai", "none", "none"]


@pytest.mark.parametrize("line", ["ViT-B-32,", ",openai", "ViT-B-32,openai,extra", "  ,  "])
def test_a_malformed_models_line_is_refused_naming_file_and_line(tmp_path, line):
    path = tmp_path / "models.txt"
    path.write_text(f"# header\nRN50,openai\n{line}\n", encoding="utf-8")
    with pytest.raises(ClipbenchError) as info:
        read_models_file(path)
    assert f"--models {path} line 3" in str(info.value) and "model,pretrained" in str(info.value)


def test_an_empty_or_missing_models_file_is_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n\n", encoding="utf-8")
    with pytest.raises(ClipbenchError, match="names no model"):
        read_models_file(empty)
    with pytest.raises(ClipbenchError, match=r"absent\.txt cannot be read"):
        read_models_file(tmp_path / "absent.txt")


def test_a_bad_models_file_through_the_cli_is_exit_2_before_any_work(tmp_path, capsys):
    path = tmp_path / "models.txt"
    path.write_text("RN50,openai\nViT-B-32 laion2b,x,y\n", encoding="utf-8")
    code = main(["run", "--models", str(path), "--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and f"{path} line 2" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def _config(*argv: str) -> RunConfig:
    return config_from_args(_build_parser().parse_args(["run", *argv]))


def test_model_flags_build_one_model_as_before_or_a_list(tmp_path):
    one = _config("--model", "ViT-B-32", "--pretrained", "openai")
    assert (one.model, one.pretrained, one.models) == ("ViT-B-32", "openai", None)
    own = _config("--model", "ViT-B-32,openai")
    assert (own.model, own.pretrained, own.models) == ("ViT-B-32", "openai", None)
    path = tmp_path / "more.txt"
    path.write_text("RN50,yfcc15m\nRN101\n", encoding="utf-8")
    several = _config("--model", "ViT-B-32", "ViT-L-14,laion2b_s32b_b82k", "--models", str(path), "--pretrained", "x")
    assert (several.model, several.pretrained) == (None, None)
    assert several.models == [ModelChoice("ViT-B-32", "x"), ModelChoice("ViT-L-14", "laion2b_s32b_b82k"),
                              ModelChoice("RN50", "yfcc15m"), ModelChoice("RN101", "x")]
    assert not several.embedded and several.resolved().datasets == ["paper", "retrieval"]
    assert _config().resolved().models == [ModelChoice(TINY, "synthetic")]  # the embedded default
    with pytest.raises(ClipbenchError, match="--model: 'RN50,openai,' is not a model"):
        _config("--model", "RN50,openai,", "RN101")


@pytest.mark.parametrize("config, message", [
    (RunConfig(models=[]), "the model list is empty"),
    (RunConfig(models=[ModelChoice("RN50", "openai"), ModelChoice("RN50", "openai")]), "RN50,openai more than once"),
    (RunConfig(model="RN50", models=[ModelChoice("RN101")]), "given beside the model list"),
    (RunConfig(pretrained="openai", models=[ModelChoice("RN101")]), "given beside the model list"),
])
def test_inconsistent_model_lists_are_refused(config, message):
    with pytest.raises(ClipbenchError, match=message):
        config.validate()


# ------------------------------------------------------------------------- running them


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("colours")
    spec = root / "colours.yaml"
    spec.write_text(COLOURS_SPEC.format(root=write_imagefolder(root / "folder")), encoding="utf-8")
    return spec


def _records(output: Path) -> dict[tuple[str, ...], dict]:
    """Every record under ``output`` by (model folder, dataset, task), without its timings."""
    found = {}
    for path in output.rglob("*.json"):
        if path.name.count(".") > 1:  # per-class / per-sample sidecars, compared through their record
            continue
        record = json.loads(path.read_text())
        record.pop("seconds")
        record.pop("created", None)
        sidecars = {p.name: json.loads(p.read_text()) for p in path.parent.glob(f"{path.stem}.*.json")}
        found[(*path.relative_to(output).parent.parts, path.stem)] = {**record, "sidecars": sidecars}
    return found


@pytest.fixture(scope="module")
def combined(colours, tmp_path_factory):
    """One run of two tiny models and one whose weights are missing, in the middle of the list."""
    base = tmp_path_factory.mktemp("combined")
    models = base / "models.txt"
    models.write_text(f"# two weight sets of the tiny CLIP\n{TINY},synthetic\n{TINY},{MISSING}\n", encoding="utf-8")
    argv = ["run", "--model", f"{TINY},none", "--models", str(models), "--datasets", str(colours),
            "--output", str(base / "out"), "--cache-dir", str(base / "cache"), *FAST]
    return base, argv


@pytest.mark.slow
def test_each_model_of_one_run_gets_the_records_of_its_own_run(combined, colours, tmp_path, capsys):
    base, argv = combined
    code = main(argv)
    captured = capsys.readouterr()
    together = _records(base / "out")
    alone = {}
    for pretrained in ("none", "synthetic"):
        out = tmp_path / pretrained
        assert main(["run", "--model", TINY, "--pretrained", pretrained, "--datasets", str(colours),
                     "--output", str(out), "--cache-dir", str(tmp_path / f"cache-{pretrained}"), *FAST]) == 0
        alone.update(_records(out))
    assert sorted(together) == sorted(alone) and len(together) == 4  # 2 models x (zeroshot, linear_probe)
    for key, record in together.items():
        assert record == alone[key], key
    accuracy = {key[0]: rec["metrics"]["accuracy"] for key, rec in together.items() if key[-1] == "zeroshot"}
    assert accuracy[f"{TINY}__synthetic"] != accuracy[f"{TINY}__none"]  # two different weight sets

    # the model with missing weights: listed, named, and the run exits non-zero
    assert code == 2
    assert f"- {TINY},{MISSING}: could not be loaded:" in captured.err and MISSING in captured.err
    assert captured.out.count("| clipbench-tiny |") == 4  # the summary lists the others' records


@pytest.mark.slow
def test_a_model_that_fails_to_load_is_a_failure_and_models_are_resident_one_at_a_time(
        colours, tmp_path, monkeypatch):
    from clipbench.pipeline import Failure, run

    alive_at_load, loaded = watch_model_loads(monkeypatch)
    config = RunConfig(models=[ModelChoice(TINY, MISSING), ModelChoice(TINY, "synthetic"), ModelChoice(TINY, "none")],
                       datasets=[str(colours)], tasks=["zeroshot"], output=tmp_path / "out",
                       cache_dir=tmp_path / "cache", device="cpu", precision="fp32", workers=0, batch_size=8,
                       n_bootstrap=0, shared_decode=False)  # kept together otherwise: test_shared_decode.py
    outcome = run(config)
    assert [(r.model, r.pretrained, r.task) for r in outcome.records] == [(TINY, "synthetic", "zeroshot"),
                                                                          (TINY, "none", "zeroshot")]
    (failure,) = outcome.failures
    assert failure[:2] == ("*", "load") and failure.model == f"{TINY},{MISSING}" and MISSING in failure.message
    assert isinstance(failure, Failure)
    # the failed load held nothing; the second model loaded after the first was released
    assert alive_at_load == [0, 0, 0] and len(loaded) == 2


@pytest.mark.slow
def test_two_ranks_run_several_models_like_one_process(colours, tmp_path):
    import subprocess
    import sys

    from test_distributed import _env, _free_port

    def argv(name: str) -> list[str]:
        return ["-m", "clipbench", "run", "--model", f"{TINY},none", f"{TINY},{MISSING}", f"{TINY},synthetic",
                "--datasets", str(colours), "--output", str(tmp_path / name / "out"),
                "--cache-dir", str(tmp_path / name / "cache"), *FAST, "--tasks", "zeroshot"]

    single = subprocess.run([sys.executable, *argv("single")], env=_env(), capture_output=True, text=True,
                            timeout=300)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    ranks = subprocess.run([*launcher, *argv("ranks")], env=_env(), capture_output=True, text=True, timeout=300)
    for proc in (single, ranks):  # the missing weights fail that model only, on every rank
        assert proc.returncode != 0 and f"{TINY},{MISSING}: could not be loaded" in proc.stderr, proc.stderr[-3000:]
        assert "DistributedError" not in proc.stderr
    assert "Traceback" not in single.stderr
    # torchrun's summary: the first rank to exit, with clipbench's exit code 2 (both ranks fail the
    # model and exit 2; which is observed first is a race, and torchrun then stops the other)
    assert re.search(r"rank\s+: [01] \(local_rank: [01]\)", ranks.stderr), ranks.stderr[-3000:]
    assert "exitcode  : 2" in ranks.stderr
    together, alone = _records(tmp_path / "ranks" / "out"), _records(tmp_path / "single" / "out")
    assert len(together) == 2 and together == alone
