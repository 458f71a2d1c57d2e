"""Still images (reference frames) through PyAV's image decoders: PNG, JPEG, BMP, TIFF, WebP."""
from __future__ import annotations

import os

import av
import numpy as np

from bbf_rt.errors import BBFInputError


def read_image(path: str | os.PathLike) -> np.ndarray:
    """The first picture of an image file as (H, W, 3) uint8 RGB, with clear errors for bad files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BBFInputError(f"image {path!r} does not exist")
    try:
        with av.open(path) as c:
            if not c.streams.video:
                raise BBFInputError(f"image {path!r} holds no picture (no video/image stream)")
            for frame in c.decode(video=0):
                return frame.to_ndarray(format="rgb24")
    except (av.FFmpegError, ValueError) as e:
        raise BBFInputError(f"image {path!r} cannot be decoded ({e}); use PNG or JPEG") from e
    raise BBFInputError(f"image {path!r} has no decodable picture")
