"""Data for gatesearch: synthetic moving-shape clips and real video IO.

Only torch and numpy are imported here; PyAV is imported lazily by the video
functions so that importing the package stays cheap.
"""

from gatesearch.data.synthetic import SyntheticConfig, SyntheticVideo, make_clip
from gatesearch.data.video import (
    VideoDecodeError,
    iter_frames,
    read_frames,
    video_info,
    write_video,
)

__all__ = [
    "SyntheticConfig",
    "SyntheticVideo",
    "make_clip",
    "read_frames",
    "iter_frames",
    "write_video",
    "VideoDecodeError",
    "video_info",
]
