#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install landmark_plugin into it.
# usage: scripts/install.sh [--test]      VENV=path overrides the location (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip setuptools wheel
# torch first, pinned with its matching torchvision: left to nerfstudio's loose requirement
# pip would pick a torchvision that may not import beside the torch it picks.  These builds
# run on CPU and use CUDA when a GPU is present.
if ! "$py" -c "import torch, torchvision" 2>/dev/null; then
  case "$(uname -m)" in
    aarch64|arm64) "$py" -m pip install -q torch==2.9.1 torchvision==0.24.1 ;;
    *)             "$py" -m pip install -q torch==2.14.1 torchvision==0.29.1 ;;
  esac
fi
"$py" -m pip install -q -e ".$extras"
# nerfstudio pulls nuscenes-devkit, which asks for the GUI opencv-python; both wheels install
# cv2 and overwrite each other.  Keep only the pinned headless build.
if "$py" -m pip show -q opencv-python >/dev/null 2>&1; then
  "$py" -m pip uninstall -q -y opencv-python
  "$py" -m pip install -q --force-reinstall --no-deps opencv-python-headless==4.10.0.84
fi
# ns-render writes video through an `ffmpeg` found on PATH; without a system one, link the
# static build that the imageio-ffmpeg wheel ships into the environment's bin/.
if ! command -v ffmpeg >/dev/null 2>&1 && [ ! -e "$venv/bin/ffmpeg" ]; then
  ln -s "$("$py" -c 'import imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())')" "$venv/bin/ffmpeg"
fi
"$py" - <<'PY'
from importlib.metadata import version
import torch
print(f"installed: torch {torch.__version__} (CUDA available: {torch.cuda.is_available()}), nerfstudio "
      f"{version('nerfstudio')}, gsplat {version('gsplat')}, viser {version('viser')}")
PY
