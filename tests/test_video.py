"""Video adapter: the middle frame of each clip is extracted, labelled and cached."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clipbench.data.video import class_key, load_video_split, middle_frame
from clipbench.errors import ClipbenchError

av = pytest.importorskip("av")

SIZE = 32


def _grey(index: int) -> int:
    return 20 * index + 10  # frame index painted as a grey level: 10, 30, 50, ...


def _write_video(path: Path, n_frames: int, codec: str = "mpeg4", container_format: str | None = None) -> None:
    """A tiny clip whose frame i is a flat grey image of level 20*i+10."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=10)
        stream.width = SIZE
        stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        for i in range(n_frames):
            pixels = np.full((SIZE, SIZE, 3), _grey(i), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _decoded_index(image) -> int:
    level = float(np.asarray(image, dtype=np.float64).mean())
    return int(round((level - 10) / 20))


@pytest.mark.parametrize("n_frames, expected", [(9, 4), (10, 5), (1, 0)])
def test_middle_frame_is_picked(tmp_path, n_frames, expected):
    video = tmp_path / f"clip{n_frames}.avi"
    _write_video(video, n_frames)
    image = middle_frame(video)
    assert image.size == (SIZE, SIZE) and image.mode == "RGB"
    assert _decoded_index(image) == expected
    assert abs(np.asarray(image, dtype=np.float64).mean() - _grey(expected)) < 4


def test_load_split_labels_caches_and_reads_ucf_style_lists(tmp_path):
    root = tmp_path / "ucf"
    _write_video(root / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g01_c01.avi", 7)
    _write_video(root / "YoYo" / "v_YoYo_g01_c01.avi", 5)
    _write_video(root / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g02_c01.avi", 3)
    split = root / "testlist01.txt"
    split.write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi 1\n"
        "YoYo/v_YoYo_g01_c01.avi 3\n\n"
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g02_c01.avi\n"
    )
    classnames = ["Apply Eye Makeup", "Archery", "Yo Yo"]
    cache = tmp_path / "cache"
    samples = load_video_split(root, split, classnames, cache)

    assert len(samples) == 3
    np.testing.assert_array_equal(samples.targets, [0, 2, 0])
    assert samples.targets.dtype == np.int64
    assert samples.ids[1] == "YoYo/v_YoYo_g01_c01.avi"
    assert [_decoded_index(samples[i][0]) for i in range(3)] == [3, 2, 1]
    assert samples[1][1] == 2
    assert len(list(cache.glob("*.png"))) == 3
    assert not list(cache.glob("*.tmp"))

    # cached frames are served without touching the videos again
    for video in root.rglob("*.avi"):
        video.write_bytes(b"not a video any more")
    assert _decoded_index(samples[0][0]) == 3


def test_unknown_class_and_missing_video_are_reported(tmp_path):
    root = tmp_path / "v"
    _write_video(root / "Archery" / "a.avi", 3)
    bad_class = root / "bad.txt"
    bad_class.write_text("Bowling/a.avi\n")
    with pytest.raises(ClipbenchError, match="line 1.*class directory"):
        load_video_split(root, bad_class, ["Archery"], tmp_path / "c")
    missing = root / "missing.txt"
    missing.write_text("Archery/b.avi\n")
    with pytest.raises(ClipbenchError, match="missing"):
        load_video_split(root, missing, ["Archery"], tmp_path / "c")
    with pytest.raises(ClipbenchError, match="does not exist"):
        load_video_split(root, root / "nope.txt", ["Archery"], tmp_path / "c")


def test_class_key_matches_ucf_and_kinetics_folder_names():
    assert class_key("ApplyEyeMakeup") == class_key("Apply Eye Makeup")
    assert class_key("passing_American_football_(in_game)") == class_key("passing American football (in game)")
    assert class_key("passing American football (in game)") != class_key("passing American football (not in game)")
