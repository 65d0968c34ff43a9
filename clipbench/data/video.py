"""Storage format ``video`` (UCF101, Kinetics700): each clip is represented by its middle frame.

The CLIP paper (appendix A.1) evaluates UCF101 and Kinetics700 on the middle frame of every clip.
This format reads a split list, decodes each listed clip's middle frame with PyAV (the optional
``av`` package, extra ``video``) the first time it is needed, and caches it as a PNG so later runs
never decode video again.

Layout::

    <root>/<split list>           # one clip per line: "<class dir>/<file>" plus optional fields
    <root>/<class dir>/<file>     # the videos; "<class dir>" names the class

This matches UCF101's ``ucfTrainTestlist/trainlist01.txt`` lines (``ApplyEyeMakeup/v_..._c01.avi 1``)
when the videos sit under ``<root>/ApplyEyeMakeup/...``. A class directory matches a class name
when both agree after lower-casing and dropping everything but letters and digits
(``ApplyEyeMakeup`` = ``Apply Eye Makeup``, ``passing_American_football_(in_game)`` =
``passing American football (in game)``).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from clipbench.atomic import atomic_open
from clipbench.data.base import FileStats, Samples, class_key, to_rgb
from clipbench.data.formats import SourceFormat, register_format
from clipbench.errors import ClipbenchError

if TYPE_CHECKING:
    from clipbench.specs import DatasetSpec

log = logging.getLogger(__name__)

__all__ = ["VideoFormat", "load_video_split", "middle_frame", "MiddleFrameLoader", "class_key"]


@register_format
class VideoFormat(SourceFormat):
    """``source.path``: the folder of class directories; a split value: its split list file."""

    type = "video"
    no_download_reason = "it must be downloaded by hand"

    def load(self, spec: "DatasetSpec", role: str, data_root: Path, cache_dir: Path,
             allow_download: bool) -> Samples:
        root = self.require_local(spec, role, data_root)
        return load_video_split(root, root / str(spec.split(role)), list(spec.classnames or ()),
                                cache_dir / "video-frames" / spec.name)


def _import_av():
    try:
        import av
    except ImportError:
        raise ClipbenchError(
            "Reading video datasets needs PyAV, which is not installed. Install it with "
            "`pip install 'clipbench[video]'` (or `pip install av`) and run again."
        ) from None
    return av


def middle_frame(video: Path) -> Image.Image:
    """Decode the middle frame of a video file.

    With ``n`` frames (from the container header, or counted from the demuxed packets when the
    header has no count) the frame at 0-based presentation index ``n // 2`` is returned, i.e. the
    later of the two middle frames when ``n`` is even.

    Returns:
        An RGB PIL image at the video's resolution.

    Raises:
        ClipbenchError: the file cannot be opened or holds no video frames.
    """
    av = _import_av()
    try:
        with av.open(str(video)) as container:
            if not container.streams.video:
                raise ClipbenchError(f"{video} has no video stream; remove it from the split list.")
            stream = container.streams.video[0]
            count = stream.frames
            if count <= 0:
                count = sum(1 for packet in container.demux(stream) if packet.size > 0)
                container.seek(0)
            target = count // 2
            last = None
            for index, frame in enumerate(container.decode(stream)):
                last = frame
                if index == target:
                    return to_rgb(frame.to_image())
    except av.error.FFmpegError as exc:
        raise ClipbenchError(f"Cannot decode video {video}: {exc}. Re-download or remove the file.") from None
    if last is None:
        raise ClipbenchError(f"{video} has no decodable frames; re-download or remove the file.")
    # the header over-counted (truncated file): the last decodable frame is the best stand-in
    log.warning("%s: header says %d frames but fewer decode; using the last one", video, count)
    return to_rgb(last.to_image())


def _atomic_save_png(image: Image.Image, path: Path) -> None:
    with atomic_open(path, "wb") as handle:
        image.save(handle, format="PNG")


class MiddleFrameLoader:
    """``loader(i)`` -> the cached middle frame of ``videos[i]``, decoding it on first use.

    Picklable (plain paths only), so DataLoader workers can share the cache; concurrent writers
    of one frame are safe because each PNG is written to a temporary file and renamed into place.
    """

    def __init__(self, videos: list[Path], frames: list[Path]):
        self.videos = [str(v) for v in videos]
        self.frames = [str(f) for f in frames]

    def __call__(self, i: int) -> Image.Image:
        frame_path = Path(self.frames[i])
        if not frame_path.is_file():
            _atomic_save_png(middle_frame(Path(self.videos[i])), frame_path)
        with Image.open(frame_path) as img:
            return to_rgb(img)


def _frame_path(cache_dir: Path, relpath: str, video: Path) -> Path:
    # keyed by path, size and mtime, so a replaced video does not reuse a stale frame
    st = video.stat()
    digest = hashlib.sha256(f"{relpath}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir / f"{Path(relpath).stem}-{digest}.png"


def load_video_split(root: Path, split_file: Path, classnames: list[str], cache_dir: Path) -> Samples:
    """Samples of the clips listed in ``split_file``, each as its middle frame.

    Args:
        root: directory holding ``<class dir>/<video>`` files.
        split_file: text file, one clip per line: a path relative to ``root`` whose first component
            is the class directory, optionally followed by whitespace and ignored fields.
        classnames: class names in label order; label ``i`` is ``classnames[i]``.
        cache_dir: where middle frames are cached as PNG files.

    Returns:
        :class:`Samples` with ``targets`` (N,) int64 and ``ids`` = the relative video paths.

    Raises:
        ClipbenchError: missing split list or video, unknown class directory, empty split.
    """
    root, split_file, cache_dir = Path(root), Path(split_file), Path(cache_dir)
    if not split_file.is_file():
        raise ClipbenchError(
            f"Split list {split_file} does not exist. Put the split list (e.g. UCF101's "
            f"ucfTrainTestlist/testlist01.txt) at that path, or fix `splits` in the dataset spec."
        )
    keys: dict[str, int] = {}
    for index, name in enumerate(classnames):
        keys.setdefault(class_key(name), index)
    videos: list[Path] = []
    frames: list[Path] = []
    targets: list[int] = []
    ids: list[str] = []
    for number, line in enumerate(split_file.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        relpath = fields[0].replace("\\", "/")
        class_dir = relpath.split("/", 1)[0]
        label = keys.get(class_key(class_dir))
        if label is None or "/" not in relpath:
            raise ClipbenchError(
                f"{split_file}, line {number}: '{relpath}' does not start with a class directory "
                f"that matches one of the {len(classnames)} class names (e.g. '{classnames[0]}'). "
                "Each line must be '<class dir>/<video file>'; fix the list or the classnames file."
            )
        video = root / relpath
        if not video.is_file():
            raise ClipbenchError(
                f"{split_file}, line {number}: video {video} is missing. Download the dataset's "
                f"videos into {root} (one folder per class) or remove the line."
            )
        videos.append(video)
        frames.append(_frame_path(cache_dir, relpath, video))
        targets.append(label)
        ids.append(relpath)
    if not videos:
        raise ClipbenchError(f"Split list {split_file} lists no videos.")
    return Samples(
        load_image=MiddleFrameLoader(videos, frames),
        size=len(videos),
        targets=np.asarray(targets, dtype=np.int64),
        ids=ids,
        description=f"video middle frames of {split_file}",
        fingerprint=FileStats(videos, relative_to=root),
    )
