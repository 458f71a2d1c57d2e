"""Video and audio I/O with PyAV: probe, decode to RGB, read audio, write video with the audio copied back.

Everything goes through PyAV (libav* in-process); no ffmpeg subprocess. Errors a user can cause (missing,
corrupt or unusable files, bad sizes) raise `BBFInputError` naming the file, what was found and what is
allowed; PyAV/FFmpeg exceptions never leak out of the reading functions.

Timestamps are exact `Fraction`s of a second. Frames are (H, W, 3) uint8 RGB: whatever the stored pixel
format (yuv420p, yuv444p, gray, rgb24, 10-bit, ...), libswscale converts it to rgb24.
"""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from numbers import Rational
from types import TracebackType

import av
import numpy as np

from bbf_rt.errors import BBFError, BBFInputError

log = logging.getLogger(__name__)

MIN_SIDE = 16
MAX_SIDE = 8192
MAX_PIXELS = 8192 * 4320  # 8K UHD full-frame; larger frames are refused as "enormous"

# Encoders that understand the `crf` option; for others `crf` is ignored.
_CRF_CODECS = {"libx264", "libx265", "libvpx", "libvpx-vp9", "libaom-av1", "libsvtav1"}


@dataclass(frozen=True)
class VideoInfo:
    """What `probe` found. fps is the average frame rate; duration_s the video stream's length."""

    path: str
    width: int
    height: int
    fps: Fraction
    time_base: Fraction
    n_frames: int
    duration_s: float
    pix_fmt: str
    codec: str
    has_audio: bool
    audio_sample_rate: int | None
    audio_channels: int | None


def check_frame_size(width: int, height: int, *, what: str) -> None:
    """Raise BBFInputError unless MIN_SIDE <= width, height <= MAX_SIDE and width*height <= MAX_PIXELS.

    Odd sizes are allowed. `what` names the source in the message (a file, an argument).
    """
    if width < MIN_SIDE or height < MIN_SIDE:
        raise BBFInputError(f"{what}: frame size {width}x{height} is too small; each side must be >= {MIN_SIDE} px")
    if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
        raise BBFInputError(f"{what}: frame size {width}x{height} is enormous; allowed is at most {MAX_SIDE} px "
                            f"per side and {MAX_PIXELS} pixels (8192x4320)")


def _require_file(path: str | os.PathLike, what: str = "video file") -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise BBFInputError(f"{what} {path!r} does not exist")
    if not os.path.isfile(path):
        raise BBFInputError(f"{what} {path!r} is not a regular file (a directory?); expected a media file")
    return path


def _mp4_missing_moov(path: str) -> bool:
    """True for an ISO-BMFF file (mp4/mov/m4a) whose top-level boxes have no 'moov' (its index).

    Walks box headers (4-byte size, 4-byte type; size 1 = 64-bit size follows, 0 = to end of file)
    without reading payloads, so it is cheap even for large files.
    """
    types: list[bytes] = []
    with open(path, "rb") as f:
        total = os.fstat(f.fileno()).st_size
        pos = 0
        while pos + 8 <= total and len(types) < 10_000:
            f.seek(pos)
            size, typ = struct.unpack(">I4s", f.read(8))
            if size == 1:
                size = struct.unpack(">Q", f.read(8))[0]
            elif size == 0:
                size = total - pos
            if size < 8:
                break
            types.append(typ)
            pos += size
    return bool(types) and types[0] == b"ftyp" and b"moov" not in types


def _open(path: str) -> av.container.InputContainer:
    """av.open for reading, with FFmpeg's errors turned into BBFInputError."""
    try:
        return av.open(path, "r")
    except av.FFmpegError as e:
        if os.path.getsize(path) == 0:
            raise BBFInputError(f"{path!r} is empty (0 bytes); expected a video file") from e
        if _mp4_missing_moov(path):
            raise BBFInputError(f"{path!r} is truncated or was never finalised: it has no 'moov' atom (the "
                                "mp4/mov index), so no frame can be located; re-encode or re-download it") from e
        raise BBFInputError(f"{path!r} is not a readable media file or is corrupt (FFmpeg: {e.strerror or e}); "
                            "expected a video container such as .mp4, .mkv, .mov or .webm") from e


def _video_stream(container: av.container.InputContainer, path: str) -> av.video.stream.VideoStream:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise BBFInputError(f"{path!r} has no video stream (streams found: {', '.join(kinds)}); "
                            "a video stream is required")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        name = stream.codec_parameters.name
        raise BBFInputError(f"{path!r}: video codec {name!r} has no decoder in this FFmpeg build")
    stream.thread_type = "AUTO"  # frame + slice threads; frames still come out in presentation order
    return stream


def _frames(container: av.container.InputContainer, stream, path: str) -> Iterator[av.VideoFrame]:
    """Decoded frames of `stream`. A decode error before the first frame is a BBFInputError; after it,
    the file is damaged at the end: log one warning and stop, so the frames that exist are still used."""
    it = container.decode(stream)
    n = 0
    while True:
        try:
            frame = next(it)
        except StopIteration:
            return
        except av.FFmpegError as e:
            if n == 0:
                raise BBFInputError(f"{path!r}: cannot decode any video frame (FFmpeg: {e.strerror or e})") from e
            log.warning("%r: decoding stopped after %d frames (FFmpeg: %s); the file is truncated or corrupt, "
                        "using the frames decoded so far", path, n, e.strerror or e)
            return
        n += 1
        yield frame


def _to_rgb(frame: av.VideoFrame, path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB via libswscale, whatever the stored pixel format."""
    try:
        return frame.to_ndarray(format="rgb24")
    except (av.FFmpegError, ValueError) as e:
        raise BBFInputError(f"{path!r}: pixel format {frame.format.name!r} cannot be converted to rgb24 ({e}); "
                            "re-encode the video to a common format such as yuv420p") from e


def _tail_complete(path: str, index: int) -> bool:
    """Cheap check that the last packet the container declares is really in the file: seek to the last
    keyframe and demux to the end. False means "count frames by decoding" (unknown or truncated)."""
    with _open(path) as c:
        vs = c.streams[index]
        if vs.duration is None:
            return False
        end = (vs.start_time or 0) + vs.duration
        reached = None
        try:
            c.seek(max(end - 1, 0), stream=vs, backward=True, any_frame=False)
            for p in c.demux(vs):
                if p.pts is not None:
                    stop = p.pts + (p.duration or 0)
                    reached = stop if reached is None else max(reached, stop)
        except av.FFmpegError:
            return False
        return reached is not None and reached >= end


def _count_frames(path: str, index: int) -> int:
    with _open(path) as c:
        vs = c.streams[index]
        vs.thread_type = "AUTO"
        return sum(1 for _ in _frames(c, vs, path))


def probe(path: str | os.PathLike) -> VideoInfo:
    """Describe a video file, checking it can be interpolated: at least 2 decodable frames, a frame size
    within [MIN_SIDE, MAX_SIDE] (odd is fine) and a pixel format convertible to RGB.

    n_frames is the container's count when its last packet is present, else counted by decoding (a file
    cut short reports the frames that really decode, with a warning).
    """
    path = _require_file(path)
    with _open(path) as c:
        vs = _video_stream(c, path)
        cc = vs.codec_context
        if cc.width and cc.height:  # refuse before decoding a huge frame
            check_frame_size(cc.width, cc.height, what=f"video {path!r}")
        first: list[av.VideoFrame] = []
        for frame in _frames(c, vs, path):
            _to_rgb(frame, path)
            first.append(frame)
            if len(first) == 2:
                break
        if len(first) < 2:
            raise BBFInputError(f"{path!r} has {len(first)} decodable video frame(s); at least 2 are needed "
                                "to interpolate")
        check_frame_size(first[0].width, first[0].height, what=f"video {path!r}")
        index, declared, rate, tb = vs.index, vs.frames, vs.average_rate or vs.guessed_rate, vs.time_base
        duration = vs.duration * Fraction(tb) if vs.duration else None
        audio = c.streams.audio[0] if c.streams.audio else None
        codec = cc.name
    if declared > 0 and _tail_complete(path, index):
        n_frames = declared
    else:
        n_frames = _count_frames(path, index)
        if declared > 0 and n_frames < declared:
            log.warning("%r declares %d video frames but only %d decode; the file is truncated", path,
                        declared, n_frames)
            duration = None
    if rate:
        fps = Fraction(rate)
    elif duration:
        fps = (n_frames / duration).limit_denominator(1001)
    else:
        raise BBFInputError(f"{path!r}: the video stream declares neither a frame rate nor a duration")
    return VideoInfo(
        path=path, width=first[0].width, height=first[0].height, fps=fps, time_base=Fraction(tb),
        n_frames=n_frames, duration_s=float(duration if duration is not None else n_frames / fps),
        pix_fmt=first[0].format.name, codec=codec, has_audio=audio is not None,
        audio_sample_rate=audio.sample_rate if audio is not None else None,
        audio_channels=audio.channels if audio is not None else None,
    )


def iter_frames(path: str | os.PathLike) -> Iterator[tuple[Fraction, np.ndarray]]:
    """Yield (t, rgb) per frame in presentation order: t in seconds (Fraction) relative to the first
    frame, rgb (H, W, 3) uint8. Timestamps are checked to increase strictly (B-frames are reordered by
    the decoder); a frame without a timestamp is placed 1/fps after the previous one, with a warning.
    """
    path = _require_file(path)
    with _open(path) as c:
        vs = _video_stream(c, path)
        tb = Fraction(vs.time_base)
        step = 1 / Fraction(vs.average_rate or vs.guessed_rate or 25)
        declared = vs.frames
        t0: Fraction | None = None
        prev: Fraction | None = None
        n = 0
        warned = False
        for frame in _frames(c, vs, path):
            if n == 0:
                check_frame_size(frame.width, frame.height, what=f"video {path!r}")
            if frame.pts is None:
                if not warned:
                    log.warning("%r: frame %d has no timestamp; assuming a constant %s fps", path, n, 1 / step)
                    warned = True
                t = (prev + step) if prev is not None else Fraction(0)
            else:
                t = frame.pts * tb
            if t0 is None:
                t0 = t
            if prev is not None and t <= prev:
                raise BBFInputError(f"{path!r}: frame {n} has timestamp {float(t - t0):.6f} s, not after the "
                                    f"previous frame's {float(prev - t0):.6f} s; timestamps must increase strictly")
            prev = t
            yield t - t0, _to_rgb(frame, path)
            n += 1
        if declared > 0 and n < declared:
            log.warning("%r declares %d video frames but only %d decoded; the file is truncated", path,
                        declared, n)


def _first_video_time(path: str) -> Fraction | None:
    """Presentation time (s) of the first decodable video frame, or None when there is no video."""
    with _open(path) as c:
        if not c.streams.video or c.streams.video[0].codec_context is None:
            return None
        vs = c.streams.video[0]
        for frame in _frames(c, vs, path):
            if frame.pts is not None:
                return frame.pts * Fraction(vs.time_base)
            break
        return Fraction(vs.start_time or 0) * Fraction(vs.time_base)


def read_audio(path: str | os.PathLike, sample_rate: int = 16000, *,
               duration_s: float | None = None) -> np.ndarray:
    """The first audio stream as float32 mono in [-1, 1] (mean of the channels), shape (S,), resampled to
    `sample_rate` by libswresample.

    Sample 0 is at the time of the first video frame (of the first audio frame in an audio-only file):
    audio that starts later is preceded by zeros, audio that starts earlier is trimmed. The end is the
    audio stream's end, or exactly round(duration_s * sample_rate) samples (zero-padded) if given.
    Gaps inside the audio stream are not filled (samples are concatenated).
    """
    path = _require_file(path)
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or not 1000 <= sample_rate <= 384000:
        raise BBFInputError(f"read_audio(sample_rate): got {sample_rate!r}; expected an int in [1000, 384000]")
    with _open(path) as c:
        if not c.streams.audio:
            raise BBFInputError(f"{path!r} has no audio stream; read_audio needs a file with one")
    origin = _first_video_time(path)
    # Planar float at the source layout; channels are averaged below (librosa-style mono: a centred
    # source keeps its level, unlike libswresample's -3 dB-per-channel stereo-to-mono matrix).
    resampler = av.AudioResampler(format="fltp", rate=sample_rate)
    chunks: list[np.ndarray] = []
    start: Fraction | None = None
    with _open(path) as c:
        ast = c.streams.audio[0]
        if ast.codec_context is None:
            raise BBFInputError(f"{path!r}: audio codec {ast.codec_parameters.name!r} has no decoder here")
        tb = Fraction(ast.time_base)
        end = (ast.start_time or 0) + ast.duration if ast.duration else None
        try:
            for frame in c.decode(ast):
                if start is None:
                    start = frame.pts * tb if frame.pts is not None else Fraction(ast.start_time or 0) * tb
                chunks.extend(f.to_ndarray().mean(axis=0) for f in resampler.resample(frame))
        except av.FFmpegError as e:
            if start is None:
                raise BBFInputError(f"{path!r}: cannot decode the audio stream (FFmpeg: {e.strerror or e})") from e
            log.warning("%r: audio decoding stopped early (FFmpeg: %s); using what was decoded", path,
                        e.strerror or e)
        chunks.extend(f.to_ndarray().mean(axis=0) for f in resampler.resample(None))
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if start is None:
        start = Fraction(0)
    if end is not None:
        # Decoders emit whole codec frames; the container's duration says where the real audio ends.
        audio = audio[:max(round((end * tb - start) * sample_rate), 0)]
    if origin is None:
        origin = start
    offset = round((start - origin) * sample_rate)  # > 0: audio starts after the first video frame
    if offset > 0:
        audio = np.concatenate([np.zeros(offset, np.float32), audio])
    elif offset < 0:
        audio = audio[-offset:]
    if duration_s is not None:
        n = round(duration_s * sample_rate)
        audio = np.pad(audio[:n], (0, max(n - len(audio), 0)))
    return np.clip(audio, -1.0, 1.0).astype(np.float32, copy=False)


class VideoWriter:
    """Encode RGB frames at timestamps k/fps into `path`, atomically, copying the audio of `audio_from`.

    Frames go to a hidden temporary file next to `path` (".name.tmp-XXXXXXXX.ext"); `close()` (or a
    clean exit from the with-block) copies every audio stream of `audio_from` packet by packet (no
    re-encode: same samples, same duration, same offset to the first video frame), then renames the
    temporary file onto `path`. On an exception the temporary file is deleted and `path` is untouched.
    Outside a with-block, end with `close()` (keep) or `abort()` (discard).

    Odd width or height with a chroma-subsampled `pix_fmt` (yuv420p needs even sizes) switches to
    yuv444p, with a warning: no padding or cropping, at the cost of a High 4:4:4 stream some players
    cannot play. `crf` applies to the encoders in `_CRF_CODECS` and is ignored by others (ffv1, ...).
    Audio copied across container types keeps its sync, but e.g. AAC from .mp4 into .mkv loses the
    encoder-priming trim (about 21 ms of near-silence decode first); write the input's container type
    to get the very same decoded samples.
    """

    def __init__(self, path: str | os.PathLike, width: int, height: int, fps: Fraction, *,
                 audio_from: str | os.PathLike | None = None, codec: str = "libx264", crf: int = 16,
                 pix_fmt: str = "yuv420p") -> None:
        self.path = os.fspath(path)
        for name, v in (("width", width), ("height", height)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise BBFInputError(f"VideoWriter({name}): got {v!r}; expected an int")
        self.width, self.height = int(width), int(height)
        check_frame_size(self.width, self.height, what="VideoWriter(width, height)")
        if isinstance(fps, bool) or not isinstance(fps, Rational) or not 0 < fps <= 1000:
            raise BBFInputError(f"VideoWriter(fps): got {fps!r}; expected an int or Fraction in (0, 1000], "
                                "e.g. Fraction(30000, 1001)")
        self.fps = Fraction(fps)
        if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 63:
            raise BBFInputError(f"VideoWriter(crf): got {crf!r}; expected an int in [0, 63] (lower = better)")
        directory, base = os.path.split(os.path.abspath(self.path))
        if not base or os.path.isdir(self.path):
            raise BBFInputError(f"VideoWriter(path): {self.path!r} is a directory; expected a file name")
        if not os.path.isdir(directory):
            raise BBFInputError(f"VideoWriter(path): output directory {directory!r} does not exist")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise BBFInputError(f"VideoWriter(path): output directory {directory!r} is not writable")
        ext = os.path.splitext(base)[1]
        try:
            encoder = av.codec.Codec(codec, "w")
        except ValueError as e:  # UnknownCodecError is a ValueError
            raise BBFInputError(f"VideoWriter(codec): {codec!r} is not an encoder in this FFmpeg build") from e
        if encoder.type != "video":
            raise BBFInputError(f"VideoWriter(codec): {codec!r} is a {encoder.type} encoder; expected video")
        supported = [f.name for f in encoder.video_formats or []]
        if supported and pix_fmt not in supported:
            raise BBFInputError(f"VideoWriter(pix_fmt): {codec} cannot encode {pix_fmt!r}; allowed: {supported}")
        if self.width % 2 or self.height % 2:
            chroma = av.video.format.VideoFormat(pix_fmt, 2, 2).components
            if any(comp.width == 1 or comp.height == 1 for comp in chroma):
                log.warning("VideoWriter: %dx%d is odd and %s subsamples chroma; writing yuv444p instead",
                            self.width, self.height, pix_fmt)
                pix_fmt = "yuv444p"
        self.pix_fmt = pix_fmt
        self.audio_from = _require_file(audio_from, "VideoWriter(audio_from)") if audio_from else None
        self.n_written = 0
        self._closed = False
        self._in: av.container.InputContainer | None = None
        self.tmp_path = os.path.join(directory, f".{base}.tmp-{secrets.token_hex(4)}{ext}")
        # O_EXCL: never clobber; mode 0o666 so the umask applies as for any new file.
        os.close(os.open(self.tmp_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        try:
            self._setup(codec, crf, ext)
        except BaseException:
            self.abort()
            raise

    def _setup(self, codec: str, crf: int, ext: str) -> None:
        try:
            self._out = av.open(self.tmp_path, "w")
        except (av.FFmpegError, ValueError) as e:
            raise BBFInputError(f"VideoWriter(path): no container format for extension {ext!r} of {self.path!r} "
                                f"({e}); use .mp4, .mkv, .mov or .webm") from e
        vs = self._out.add_stream(codec, rate=self.fps)
        vs.width, vs.height, vs.pix_fmt = self.width, self.height, self.pix_fmt
        vs.codec_context.time_base = 1 / self.fps
        if codec in _CRF_CODECS:
            vs.options = {"crf": str(crf)}
        self._vs = vs
        self._audio_map: dict[int, av.stream.Stream] = {}
        self._pending: av.Packet | None = None
        self._shift = Fraction(0)
        if self.audio_from is None:
            return
        self._in = _open(self.audio_from)
        if not self._in.streams.audio:
            log.info("VideoWriter: %r has no audio stream; writing video only", self.audio_from)
            return
        for ast in self._in.streams.audio:
            try:
                self._audio_map[ast.index] = self._out.add_stream_from_template(ast)
            except ValueError as e:
                raise BBFInputError(f"VideoWriter(audio_from): audio codec {ast.codec_parameters.name!r} of "
                                    f"{self.audio_from!r} cannot be copied into a {ext} file ({e}); use .mkv") from e
        # Keep the audio's offset to the source's first video frame, which becomes our frame 0.
        self._shift = _first_video_time(self.audio_from) or Fraction(0)
        self._audio_iter = self._in.demux(*self._in.streams.audio)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, frame: np.ndarray) -> None:
        """Append one (H, W, 3) uint8 RGB frame at time n_written / fps."""
        if self._closed:
            raise BBFError(f"VideoWriter({self.path!r}): write() after close()/abort()")
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.shape != (
                self.height, self.width, 3):
            got = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
            raise BBFInputError(f"VideoWriter.write(frame): got {got}; expected uint8 "
                                f"({self.height}, {self.width}, 3) RGB")
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        vf.pts, vf.time_base = self.n_written, 1 / self.fps
        try:
            for pkt in self._vs.encode(vf):
                self._out.mux(pkt)
            self._mux_audio(until=(self.n_written + 1) / self.fps)
        except av.FFmpegError as e:
            raise BBFError(f"VideoWriter({self.path!r}): writing frame {self.n_written} failed: {e}") from e
        self.n_written += 1

    def _mux_audio(self, until: Fraction | None) -> None:
        """Copy audio packets up to `until` seconds (all if None), interleaved with the video."""
        if not self._audio_map:
            return
        while True:
            pkt = self._pending
            if pkt is None:
                try:
                    pkt = next(self._audio_iter)
                except StopIteration:
                    self._audio_map = {}
                    return
                except av.FFmpegError as e:
                    log.warning("VideoWriter: reading audio of %r stopped early (FFmpeg: %s)", self.audio_from, e)
                    self._audio_map = {}
                    return
                if pkt.dts is None:  # demux's end-of-stream flush packets carry no data
                    continue
                # Shift into our timeline (in the packet's own time base; mux rescales to the output's).
                shift = round(self._shift / pkt.time_base)
                pkt.pts = pkt.pts - shift if pkt.pts is not None else None
                pkt.dts -= shift
            if until is not None and pkt.dts * pkt.time_base > until:
                self._pending = pkt
                return
            self._pending = None
            pkt.stream = self._audio_map[pkt.stream_index]
            self._out.mux(pkt)

    def close(self) -> None:
        """Flush the encoder, copy the remaining audio and move the file onto `path`."""
        if self._closed:
            return
        try:
            if self.n_written == 0:
                raise BBFInputError(f"VideoWriter({self.path!r}): no frames were written; {self.path!r} "
                                    "is left untouched")
            for pkt in self._vs.encode():
                self._out.mux(pkt)
            self._mux_audio(until=None)
            self._out.close()
            if self._in is not None:
                self._in.close()
            os.replace(self.tmp_path, self.path)
        except BaseException as e:
            self.abort()
            if isinstance(e, av.FFmpegError):
                raise BBFError(f"VideoWriter({self.path!r}): finishing the file failed: {e}") from e
            raise
        self._closed = True

    def abort(self) -> None:
        """Discard everything: close the containers and delete the temporary file."""
        self._closed = True
        for c in (getattr(self, "_out", None), self._in):
            if c is not None:
                with contextlib.suppress(av.FFmpegError, OSError, ValueError):  # already failing
                    c.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp_path)
