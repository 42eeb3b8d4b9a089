"""Training clips from real video files.

:class:`VideoClipDataset` turns a folder of videos (one ``<name>.txt`` caption
next to each) or a ``.csv`` / ``.jsonl`` manifest into map-style items::

    {"frames": uint8 (T, H, W, 3), "prompt": str, "seed": int, "path": str, "actions"?: int64 (T,)}

``"actions"`` is there when the source gives per-frame integer actions (a game's controls, a
camera's motion class): one per *source* frame, taken at the same frame indices as the frames, so
resampling and stride keep frames and actions aligned. A folder gives them in a sidecar
``<name>.actions.json`` (a JSON list) or ``<name>.actions.npy`` (a 1-D integer array), a manifest
in an ``actions`` csv column (a JSON list in the cell; empty: none) or jsonl key.

Item ``i`` is a pure function of ``i``: always the first clip of the file
(frame 0 onwards), so runs are reproducible and resumable without RNG state.

Every file is opened once in ``__init__`` to learn its frame count and rate,
so a corrupt or too-short file fails at construction (``on_error="raise"``)
or is left out and recorded in :attr:`VideoClipDataset.skipped`
(``on_error="skip"``), instead of crashing a worker hours into training.

Timing assumes a constant frame rate starting at t=0: source frame ``j`` is
at ``j / source_fps``.  Variable-frame-rate files are resampled as if they
were constant-rate at their average rate.
"""

from __future__ import annotations

import csv
import logging
import json
import math
import os
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import av
import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from streamkd.data.toyworld import ToyWorldConfig

log = logging.getLogger(__name__)

__all__ = ["VIDEO_EXTENSIONS", "VideoClipDataset", "clip_frame_indices", "write_toy_videos"]

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".webm", ".avi")

try:
    import decord

    _HAVE_DECORD = True
except ImportError:  # optional: PyAV decodes everything decord does, only slower
    decord = None
    _HAVE_DECORD = False


def clip_frame_indices(
    num_frames: int, stride: int, source_fps: Fraction, fps: Fraction | None
) -> list[int]:
    """Source frame index for each of the ``num_frames`` clip frames.

    Clip frame ``k`` sits at time ``k * stride / fps`` and takes the nearest
    source frame (ties round up); with ``fps=None`` this is ``k * stride``.
    Fractions keep e.g. 24 -> 12 fps exact instead of landing on .4999.
    """
    if fps is None:
        return [k * stride for k in range(num_frames)]
    return [math.floor(Fraction(k * stride) * source_fps / fps + Fraction(1, 2)) for k in range(num_frames)]


def _resize_center_crop(frames_THWC: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale so both sides cover (height, width), bilinear + antialias, then center-crop."""
    _, h, w, _ = frames_THWC.shape
    if (h, w) != (height, width):
        scale = max(height / h, width / w)
        # max(...) guards against rounding the covering side one pixel short.
        new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
        x_TCHW = frames_THWC.permute(0, 3, 1, 2).float()
        x_TCHW = F.interpolate(x_TCHW, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        frames_THWC = x_TCHW.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        h, w = new_h, new_w
    top, left = (h - height) // 2, (w - width) // 2
    return frames_THWC[:, top : top + height, left : left + width].contiguous()


class _SourceActions(NamedTuple):
    values: np.ndarray
    """int64 (source frames,): one action per frame of the file."""
    where: str
    """The sidecar file or manifest line they came from, for error messages."""


def _check_actions(raw: object, where: str) -> np.ndarray:
    """``raw`` (a list or array of non-negative ints) as int64 (N,), or ValueError naming ``where``."""
    values = np.asarray(raw)
    if values.ndim != 1 or len(values) == 0 or values.dtype.kind not in "iu":
        raise ValueError(f"{where}: actions must be a non-empty list of integers, one per source frame; "
                         f"got {type(raw).__name__} of shape {values.shape} and dtype {values.dtype}")
    if values.min() < 0:
        raise ValueError(f"{where}: actions must be >= 0 (action ids), got {int(values.min())}")
    return values.astype(np.int64)


def _read_sidecar_actions(video: Path) -> _SourceActions | None:
    """Actions from ``<name>.actions.json`` or ``<name>.actions.npy`` next to ``video``, or None."""
    sidecars = [p for p in (video.with_suffix(".actions.json"), video.with_suffix(".actions.npy")) if p.is_file()]
    if not sidecars:
        return None
    if len(sidecars) == 2:
        raise ValueError(f"{str(video)!r} has two action sidecars, {str(sidecars[0])!r} and {str(sidecars[1])!r}; keep one")
    sidecar = sidecars[0]
    try:
        raw = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.suffix == ".json" else np.load(sidecar, allow_pickle=False)
    except (json.JSONDecodeError, ValueError, OSError) as err:
        raise ValueError(f"cannot read action sidecar {str(sidecar)!r} ({err}); write a JSON list of ints or a 1-D int .npy") from err
    return _SourceActions(_check_actions(raw, repr(str(sidecar))), repr(str(sidecar)))


class VideoClipDataset(torch.utils.data.Dataset):
    """Map-style dataset of fixed-length RGB clips with captions.

    Args:
        source: a folder of video files (captions from a sibling ``<name>.txt``, optional
            actions from ``<name>.actions.json`` / ``.npy``), or a ``.csv`` (header
            ``path,caption[,actions]``) / ``.jsonl`` (``{"path", "caption"[, "actions"]}`` per
            line) manifest whose paths are relative to the manifest's folder.
        num_frames: frames per clip.
        height, width: output size; frames are resized so the shorter side fits,
            then center-cropped.
        fps: resample to this rate (nearest source frame); ``None`` keeps the file's rate.
        stride: take every ``stride``-th frame (after resampling).
        decoder: ``"auto"`` (decord if importable, else PyAV), ``"decord"`` or ``"av"``.
        on_error: ``"raise"`` fails on the first bad entry; ``"skip"`` leaves it out
            and records ``path -> reason`` in :attr:`skipped`.
        first_frame_only: items hold clip frame 0 alone, ``frames`` uint8 (1, H, W, 3), and
            only it is decoded (the image condition of distillation needs no more); the clip's
            length is still checked and ``actions`` still cover all ``num_frames``.
    """

    def __init__(
        self,
        source: str | os.PathLike[str],
        num_frames: int,
        height: int,
        width: int,
        fps: float | None = None,
        stride: int = 1,
        decoder: str = "auto",
        on_error: str = "raise",
        first_frame_only: bool = False,
    ) -> None:
        for name, value in (("num_frames", num_frames), ("height", height), ("width", width), ("stride", stride)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if fps is not None and not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a positive finite number or None (keep the file's rate), got {fps!r}")
        if decoder not in ("auto", "decord", "av"):
            raise ValueError(f"decoder must be 'auto', 'decord' or 'av', got {decoder!r}")
        if decoder == "decord" and not _HAVE_DECORD:
            raise ValueError("decoder='decord' but decord is not importable; pip install decord or use decoder='av'")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.num_frames, self.height, self.width, self.stride = num_frames, height, width, stride
        self.fps = None if fps is None else Fraction(fps).limit_denominator(1_000_000)
        self.decoder = "decord" if decoder == "decord" or (decoder == "auto" and _HAVE_DECORD) else "av"
        self.on_error = on_error
        self.first_frame_only = first_frame_only
        self.skipped: dict[str, str] = {}
        self._pyav_only: set[Path] = set()  # files decord refuses at their width (see _decode)
        # (path, caption, source frame indices, clip actions or None) per usable file.
        self._items: list[tuple[Path, str, list[int], np.ndarray | None]] = []

        source = Path(source)
        for path, caption, problem, actions in self._list_entries(source):
            try:
                if problem is not None:
                    raise ValueError(problem)
                indices, count = self._scan(path)
                if actions is not None and len(actions.values) != count:
                    raise ValueError(
                        f"{actions.where} gives {len(actions.values)} actions but video {str(path)!r} has {count} frames; "
                        "give one action per source frame"
                    )
            except ValueError as err:
                if on_error == "raise":
                    raise
                self.skipped[str(path)] = str(err)
                continue
            self._items.append((path, caption, indices, None if actions is None else actions.values[indices]))
        if not self._items:
            detail = f"; all {len(self.skipped)} were skipped, e.g. {next(iter(self.skipped.values()))}" if self.skipped else ""
            raise ValueError(f"no usable videos in {str(source)!r}{detail}")

    # -- listing ---------------------------------------------------------------

    @staticmethod
    def _list_entries(source: Path) -> list[tuple[Path, str, str | None, _SourceActions | None]]:
        """(video path, caption, problem or None, per-source-frame actions or None) for every listed video."""
        if source.is_dir():
            entries = []
            for path in sorted(p for p in source.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS):
                txt = path.with_suffix(".txt")
                if not txt.is_file():
                    entries.append((path, "", f"{str(path)!r} has no caption: expected {str(txt)!r} next to it", None))
                    continue
                caption = txt.read_text(encoding="utf-8").strip()
                problem = None if caption else f"caption file {str(txt)!r} for {str(path)!r} is empty; write the caption into it"
                try:
                    actions = _read_sidecar_actions(path)
                except ValueError as err:
                    problem, actions = problem or str(err), None
                entries.append((path, caption, problem, actions))
            if not entries:
                raise ValueError(f"folder {str(source)!r} has no video files ({', '.join(VIDEO_EXTENSIONS)})")
            return entries
        if not source.is_file():
            raise ValueError(f"video source {str(source)!r} does not exist; pass a folder of videos or a .csv/.jsonl manifest")
        suffix = source.suffix.lower()
        if suffix == ".csv":
            rows = VideoClipDataset._read_csv(source)
        elif suffix == ".jsonl":
            rows = VideoClipDataset._read_jsonl(source)
        else:
            raise ValueError(f"manifest {str(source)!r} must end in .csv or .jsonl (or pass a folder of videos)")
        entries = []
        for where, rel, caption, raw_actions in rows:
            path = source.parent / rel
            problem = None if caption.strip() else f"{where} ({rel!r}) has no caption; fill in its caption field"
            actions = None
            if raw_actions is not None:
                try:
                    actions = _SourceActions(_check_actions(raw_actions, where), where)
                except ValueError as err:
                    problem = problem or str(err)
            entries.append((path, caption.strip(), problem, actions))
        if not entries:
            raise ValueError(f"manifest {str(source)!r} lists no videos")
        return entries

    @staticmethod
    def _read_csv(manifest: Path) -> list[tuple[str, str, str, object]]:
        with open(manifest, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"path", "caption"} <= set(reader.fieldnames):
                raise ValueError(f"manifest {str(manifest)!r} needs a header row with columns 'path,caption', got {reader.fieldnames}")
            rows = []
            for row in reader:
                where = f"{manifest}:{reader.line_num}"
                if not row["path"]:
                    raise ValueError(f"{where} has an empty path; give each row a video path relative to the manifest")
                cell = (row.get("actions") or "").strip()
                try:
                    actions = json.loads(cell) if cell else None
                except json.JSONDecodeError as err:
                    raise ValueError(f"{where}: the actions cell is not a JSON list ({err}); write e.g. \"[0, 1, 1]\" or leave it empty") from err
                rows.append((where, row["path"], row["caption"] or "", actions))
        return rows

    @staticmethod
    def _read_jsonl(manifest: Path) -> list[tuple[str, str, str, object]]:
        rows = []
        for line_num, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{manifest}:{line_num}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where} is not valid JSON ({err}); each line must be {{\"path\": ..., \"caption\": ...}}") from err
            if not isinstance(record, dict) or not isinstance(record.get("path"), str) or not record["path"]:
                raise ValueError(f"{where} needs a string \"path\" (relative to the manifest), got {line.strip()!r}")
            caption = record.get("caption")
            rows.append((where, record["path"], caption if isinstance(caption, str) else "", record.get("actions")))
        return rows

    # -- scanning and decoding -------------------------------------------------

    def _scan(self, path: Path) -> tuple[list[int], int]:
        """Open ``path`` once; return the source indices of its first clip and its frame count, or raise ValueError."""
        if not path.is_file():
            raise ValueError(f"video {str(path)!r} does not exist; fix the path in the manifest or remove the entry")
        count, source_fps = self._probe_decord(path) if self.decoder == "decord" else self._probe_av(path)
        if count == 0 or source_fps <= 0:
            raise ValueError(f"video {str(path)!r} has no readable frames or no frame rate; re-encode it (e.g. ffmpeg -i in out.mp4)")
        indices = clip_frame_indices(self.num_frames, self.stride, source_fps, self.fps)
        needed = indices[-1] + 1
        if needed > count:
            at = f"{float(self.fps):g} fps" if self.fps is not None else f"its own {float(source_fps):g} fps"
            raise ValueError(
                f"video {str(path)!r} has {count} frames but {self.num_frames} frames with stride {self.stride} at {at} "
                f"need {needed}; use a longer video, or lower num_frames/stride"
            )
        return indices, count

    @staticmethod
    def _probe_av(path: Path) -> tuple[int, Fraction]:
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise ValueError(f"video {str(path)!r} has no video stream; remove it or re-encode it")
                stream = container.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate
                # Count demuxed packets instead of trusting the header's frame count,
                # which a truncated file still reports in full.
                count = sum(1 for pkt in container.demux(stream) if pkt.size > 0)
        except av.FFmpegError as err:
            raise ValueError(f"cannot read video {str(path)!r} ({err}); the file is corrupt or truncated, re-encode or remove it") from err
        return count, Fraction(rate) if rate else Fraction(0)

    @staticmethod
    def _probe_decord(path: Path) -> tuple[int, Fraction]:
        try:
            reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        except RuntimeError as err:  # decord raises a bare RuntimeError for unreadable files
            raise ValueError(f"cannot read video {str(path)!r} ({err}); the file is corrupt or truncated, re-encode or remove it") from err
        # decord reports the rate as a float; 30000/1001-style rates survive limit_denominator.
        return len(reader), Fraction(reader.get_avg_fps()).limit_denominator(1_000_000)

    def _decode(self, path: Path, indices: list[int]) -> np.ndarray:
        """RGB uint8 (T, H, W, 3) frames at ``indices`` (sorted, possibly repeated)."""
        if self.decoder == "decord" and path not in self._pyav_only:
            try:
                reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
                return reader.get_batch(indices).asnumpy()
            except (RuntimeError, decord.DECORDError) as err:
                if "must exactly match" not in str(err):
                    raise ValueError(f"failed to decode {str(path)!r} ({err}); the file is corrupt, re-encode or remove it") from err
                # decord copies frames assuming rows without padding; at widths whose RGB rows
                # FFmpeg pads (e.g. 48 px: 144 bytes padded to 192) it refuses a valid file. PyAV
                # gives the same frames (tests/test_video_dataset.py): this file is read with it.
                log.warning("decord cannot copy the frames of %s (padded rows); reading it with PyAV", path)
                self._pyav_only.add(path)
        wanted = set(indices)
        last = indices[-1]
        by_index: dict[int, np.ndarray] = {}
        try:
            with av.open(str(path)) as container:
                for j, frame in enumerate(container.decode(video=0)):
                    if j in wanted:
                        by_index[j] = frame.to_ndarray(format="rgb24")
                    if j >= last:
                        break
        except av.FFmpegError as err:
            raise ValueError(f"failed to decode {str(path)!r} ({err}); the file is corrupt, re-encode or remove it") from err
        if last not in by_index:
            raise ValueError(
                f"video {str(path)!r} decoded only {len(by_index)} of the frames up to index {last} it reported; "
                "the file is corrupt or truncated, re-encode or remove it"
            )
        return np.stack([by_index[j] for j in indices])

    # -- Dataset ---------------------------------------------------------------

    @property
    def captions(self) -> list[str]:
        """Every usable video's caption, in item order."""
        return [caption for _, caption, _, _ in self._items]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self._items):
            # Negative indices would make "seed" disagree with the item's position.
            raise IndexError(f"index {i} out of range for {len(self._items)} videos")
        path, caption, indices, actions = self._items[i]
        frames_THWC = torch.from_numpy(self._decode(path, indices[:1] if self.first_frame_only else indices))
        item = {
            "frames": _resize_center_crop(frames_THWC, self.height, self.width),
            "prompt": caption,
            "seed": i,
            "path": str(path),
        }
        if actions is not None:
            item["actions"] = torch.from_numpy(actions)
        return item


def write_toy_videos(
    out: str | os.PathLike[str], clips: int, num_frames: int = 16, world: ToyWorldConfig | None = None,
    base_seed: int = 0, fps: int = 16,
) -> list[Path]:
    """Write toy-world training episodes as a video folder that :class:`VideoClipDataset` reads.

    Episode ``i`` becomes ``clip-{i:05d}.mp4`` (H.264), ``clip-{i:05d}.txt`` (its prompt, the
    caption) and ``clip-{i:05d}.actions.json`` (its per-frame actions). The caption and actions go
    first and the mp4 is renamed into place last, so an interrupted run never leaves a video
    without its caption. ``world``: a ``ToyWorldConfig`` (default: the toy teacher's world).
    """
    from streamkd.data.toyworld import ToyClipDataset, ToyWorldConfig
    from streamkd.media.video import VideoWriter

    if not (isinstance(clips, int) and clips >= 1):
        raise ValueError(f"clips must be a positive int, got {clips!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    episodes = ToyClipDataset(world or ToyWorldConfig(), num_frames, base_seed=base_seed)
    paths = []
    for i in range(clips):
        item = episodes[i]
        path = out / f"clip-{i:05d}.mp4"
        path.with_suffix(".txt").write_text(item["prompt"] + "\n", encoding="utf-8")
        path.with_suffix(".actions.json").write_text(json.dumps(item["actions"].tolist()) + "\n")
        with VideoWriter(path, fps=fps) as writer:
            writer.write(item["frames"])
        paths.append(path)
    return paths
