"""Bad flags, files and specs end in one clear message before anything is computed, not a traceback."""

from __future__ import annotations

import pytest

from clipbench.cli import main


def run(capsys, *args: str) -> tuple[int, str]:
    code = main(["run", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size 0 is invalid: expected an integer >= 1"),
    (["--batch-size", "-1"], "--batch-size -1 is invalid"),
    (["--workers", "-1"], "--workers -1 is invalid: expected an integer >= 0"),
    (["--bootstrap", "-1"], "--bootstrap -1 is invalid"),
    (["--few-shot-seeds", "0"], "--few-shot-seeds 0 is invalid"),
    (["--few-shot", "0,1"], "--few-shot [0, 1] is invalid"),
    (["--recall-k", "0"], "--recall-k [0] is invalid"),
    (["--probe-jobs", "0"], "--probe-jobs 0 is invalid: expected an integer >= 1"),
    (["--tasks", ","], "--tasks names no task"),
    (["--tasks", "zeroshots"], "unknown task 'zeroshots' (did you mean zeroshot?)"),
])
def test_bad_run_flags_are_refused_with_the_accepted_values(capsys, tmp_path, flags, message):
    code, err = run(capsys, *flags, "--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c"))
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize("flag", ["--output", "--cache-dir"])
def test_an_output_or_cache_path_that_is_a_file_is_refused_before_any_work(capsys, tmp_path, flag):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    other = "--cache-dir" if flag == "--output" else "--output"
    code, err = run(capsys, flag, str(blocker), other, str(tmp_path / "other"))
    assert code == 2 and f"{flag} {blocker} is a file, not a directory" in err


def test_an_output_below_a_file_cannot_be_written_and_says_so(capsys, tmp_path):
    (tmp_path / "a-file").write_text("x")
    code, err = run(capsys, "--output", str(tmp_path / "a-file" / "out"), "--cache-dir", str(tmp_path / "c"))
    assert code == 2 and "cannot be written" in err and "nothing was computed yet" in err


@pytest.mark.parametrize("content, message", [
    (None, "is a directory"),
    (b"\xff\xfe\x00garbage", "is not UTF-8 text"),
])
def test_a_spec_that_is_a_directory_or_binary_is_one_clear_error(capsys, tmp_path, content, message):
    spec = tmp_path / "broken.yaml"
    if content is None:
        spec.mkdir()
    else:
        spec.write_bytes(content)
    code, err = run(capsys, "--datasets", str(spec), "--cache-dir", str(tmp_path / "c"), "--output", str(tmp_path / "o"))
    assert code == 2 and message in err and str(spec) in err


@pytest.mark.slow
def test_a_templates_file_without_placeholder_fails_that_task_only(capsys, tmp_path):
    bad = tmp_path / "t.txt"
    bad.write_text("a photo\n")
    code, err = run(capsys, "--datasets", "synthetic-colors", "--tasks", "zeroshot,linear_probe", "--templates",
                    str(bad), "--cache-dir", str(tmp_path / "c"), "--output", str(tmp_path / "o"),
                    "--workers", "0", "--bootstrap", "0")
    assert code == 2 and "has no class-name placeholder" in err and "synthetic-colors/zeroshot" in err
    # the rest of the run survived: the probe's record was written
    assert (tmp_path / "o" / "clipbench-tiny__synthetic" / "synthetic-colors" / "linear_probe.json").is_file()
