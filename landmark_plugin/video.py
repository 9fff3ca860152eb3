"""Video writing without a system ffmpeg.

ns-render writes mp4 through mediapy, which calls an ``ffmpeg`` executable.  Machines without
one (fresh containers, CI) get the static build that the imageio-ffmpeg wheel ships.
"""

from __future__ import annotations

import shutil


def use_bundled_ffmpeg_if_missing() -> None:
    """Point mediapy at imageio-ffmpeg's binary when no ffmpeg is on PATH."""
    if shutil.which("ffmpeg") is not None:
        return
    try:
        import imageio_ffmpeg
        import mediapy
    except ImportError:
        return
    mediapy.set_ffmpeg(imageio_ffmpeg.get_ffmpeg_exe())
