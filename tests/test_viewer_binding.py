"""The viewer listens on 127.0.0.1 unless told otherwise: in training (every method's config),
in `ns-train <method> --help`, and when a finished run is reopened (landmark-viewer; nerfstudio's own
ns-viewer defaults to 0.0.0.0 and needs --viewer.websocket-host 127.0.0.1, as the README says)."""

from __future__ import annotations

import pytest
import tyro


def test_every_method_binds_localhost():
    from landmark_plugin.method_configs.landmark_grid import landmark_grid
    from landmark_plugin.method_configs.retina_gs import retina_gs, retina_gs_small
    from landmark_plugin.trainer import LandmarkTrainerConfig

    assert LandmarkTrainerConfig().viewer.websocket_host == "127.0.0.1"
    for spec in (retina_gs, retina_gs_small, landmark_grid):
        assert spec.config.viewer.websocket_host == "127.0.0.1", spec.config.method_name


def test_landmark_viewer_binds_localhost_unless_told(tmp_path):
    from landmark_plugin.viewer.local import LocalRunViewer

    config = tmp_path / "config.yml"
    parse = lambda *args: tyro.cli(tyro.conf.FlagConversionOff[LocalRunViewer], args=["--load-config", str(config), *args])  # noqa: E731
    viewer = parse()
    assert viewer.viewer.websocket_host == "127.0.0.1"
    assert viewer.viewer.as_viewer_config().websocket_host == "127.0.0.1"  # what ns-viewer hands to viser
    assert parse("--viewer.websocket-host", "0.0.0.0").viewer.websocket_host == "0.0.0.0"


def test_help_shows_localhost(capsys):
    """What `ns-train retina-gs --help` prints for the host (same tyro rendering, in process)."""
    from landmark_plugin.method_configs.retina_gs import retina_gs

    with pytest.raises(SystemExit):
        tyro.cli(type(retina_gs.config), default=retina_gs.config, args=["--help"])
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if "--viewer.websocket-host STR" in line)
    option = " ".join(lines[at : at + 4])
    assert "(default: 127.0.0.1)" in option, option
