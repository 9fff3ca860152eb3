"""``landmark-viewer``: nerfstudio's ns-viewer, bound to 127.0.0.1 unless told otherwise.

ns-viewer replaces the run's viewer settings with its own, whose default host is 0.0.0.0
(every interface), so a run trained with our localhost default would be served to the
network when reopened.  This is the same command with the host default changed; reach it
from another machine through an SSH tunnel (ssh -L 7007:127.0.0.1:7007 host), or pass
``--viewer.websocket-host 0.0.0.0`` knowingly::

    landmark-viewer --load-config outputs/.../config.yml
"""

from __future__ import annotations

from dataclasses import dataclass, field

import tyro
from nerfstudio.scripts.viewer.run_viewer import RunViewer, ViewerConfigWithoutNumRays

LOCALHOST = "127.0.0.1"


@dataclass
class LocalRunViewer(RunViewer):
    """Load a checkpoint and start the viewer on 127.0.0.1."""

    viewer: ViewerConfigWithoutNumRays = field(
        default_factory=lambda: ViewerConfigWithoutNumRays(websocket_host=LOCALHOST)
    )
    """Viewer configuration (host 127.0.0.1 by default: tunnel over SSH to reach it)."""


def entrypoint() -> None:
    tyro.extras.set_accent_color("bright_yellow")
    tyro.cli(tyro.conf.FlagConversionOff[LocalRunViewer]).main()


if __name__ == "__main__":
    entrypoint()
