"""Video/audio I/O (PyAV) and scene-cut detection."""
from bbf_rt.io.scenecut import SceneCuts, is_scene_cut, scene_cut_score

# the PyAV-backed names load on first use, so frame-only users (the player, scene cuts) run without PyAV
_VIDEO_NAMES = ("VideoInfo", "VideoWriter", "check_frame_size", "iter_frames", "probe", "read_audio")


def __getattr__(name: str):
    if name in _VIDEO_NAMES:
        from bbf_rt.io import video

        return getattr(video, name)
    raise AttributeError(f"module 'bbf_rt.io' has no attribute {name!r}")


__all__ = [
    "SceneCuts", "VideoInfo", "VideoWriter", "check_frame_size", "is_scene_cut", "iter_frames", "probe", "read_audio",
    "scene_cut_score",
]
