"""Video/audio I/O (PyAV) and scene-cut detection."""
from bbf_rt.io.scenecut import is_scene_cut, scene_cut_score
from bbf_rt.io.video import VideoInfo, VideoWriter, check_frame_size, iter_frames, probe, read_audio

__all__ = [
    "VideoInfo", "VideoWriter", "check_frame_size", "is_scene_cut", "iter_frames", "probe", "read_audio",
    "scene_cut_score",
]
