"""landmark_plugin: nerfstudio methods for scenes that do not fit one GPU.

retina-gs (partitioned Gaussian splatting) and landmark-grid (multi-branch grid NeRF)
share one distributed core.  Importing this package never builds CUDA code.
"""

from landmark_plugin.checkpoints import allow_nerfstudio_checkpoints
from landmark_plugin.errors import install_excepthook

__version__ = "0.1.0"

# nerfstudio's ns-render / ns-eval / ns-viewer import this package while reading config.yml,
# before they torch.load the checkpoint: register the numpy types it holds once, here.
allow_nerfstudio_checkpoints()

# Errors the user causes end with one message and exit status 1 in every command that loads
# this package (ns-train, ns-eval, ns-render, ours); other exceptions keep their traceback.
install_excepthook()
