"""The benchmark scripts run end to end on CPU at tiny sizes, so they cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_gaussians_smoke(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_gaussians.py"), "--smoke", "--work", str(tmp_path), "--json", str(out),
         "--sync-audit", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert rows and rows[0]["method"] == "retina-gs" and rows[0]["steps"] == 3
    # The audit names the step's one deliberate read-back (the non-finite check) by its line.
    assert "calls that would synchronise on a GPU per step" in result.stdout
    assert "step_guard.py" in result.stdout
    assert 0.0 < rows[0]["psnr"] < 60.0
    assert "ms/step" in result.stdout  # the table is printed last


def _bench_module():
    """scripts/bench_gaussians.py as a module (scripts/ is not a package)."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import bench_gaussians
    finally:
        sys.path.pop(0)
    return bench_gaussians


def test_bench_gaussians_variants_change_one_thing(tmp_path):
    """Each variant is its base method's config with its one change, applied after the render
    mode so that a variant may set its own (retina-gs-torch keeps the bench's mode: on one process clip
    is the ordinary render on either backend)."""
    bench = _bench_module()
    from landmark_plugin.data.city import CityConfig
    from landmark_plugin.data.synthetic_city import SyntheticCityDataParserConfig

    parser = SyntheticCityDataParserConfig(data=tmp_path / "city", city=CityConfig(num_images=4, width=16, height=12))
    base = bench.method_config("retina-gs", parser, 10, tmp_path, retina_mode="clip").pipeline.model
    torch_ref = bench.method_config("retina-gs-torch", parser, 10, tmp_path, retina_mode="clip").pipeline.model
    assert (base.backend, base.mode) == ("auto", "clip")
    assert (torch_ref.backend, torch_ref.mode) == ("torch", "clip")
    visible = bench.method_config("retina-gs-visible", parser, 10, tmp_path, retina_mode="clip").pipeline.model
    assert visible.visible_adam and not base.visible_adam and visible.mode == "clip"
    stream = bench.method_config("retina-gs-stream", parser, 10, tmp_path, retina_mode="clip").pipeline.model
    assert (stream.offload, stream.visible_adam, stream.mode) == ("stream", True, "clip")


def test_bench_appearance_lr_and_splatfacto_mcmc_variants(tmp_path):
    """retina-gs-appearance-lr5 is retina-gs-appearance with only its two appearance groups' learning
    rates (and their schedules' final rates) times 5; splatfacto-mcmc swaps in the bench's MCMC
    adapter (scripts/splatfacto_mcmc.py) with the --cap budget and splatfacto's other settings."""
    bench = _bench_module()
    from landmark_plugin.data.city import CityConfig
    from landmark_plugin.data.synthetic_city import SyntheticCityDataParserConfig

    parser = SyntheticCityDataParserConfig(data=tmp_path / "city", city=CityConfig(num_images=4, width=16, height=12))
    plain = bench.method_config("retina-gs-appearance", parser, 10, tmp_path)
    fast = bench.method_config("retina-gs-appearance-lr5", parser, 10, tmp_path)
    assert fast.pipeline.model.appearance_features == plain.pipeline.model.appearance_features == 16
    for name, group in fast.optimizers.items():
        before = plain.optimizers[name]
        factor = 5 if name in ("appearance", "appearance_features") else 1
        assert group["optimizer"].lr == pytest.approx(factor * before["optimizer"].lr), name
        if group["scheduler"] is not None and hasattr(group["scheduler"], "lr_final"):
            assert group["scheduler"].lr_final == pytest.approx(factor * before["scheduler"].lr_final), name
    mcmc = bench.method_config("splatfacto-mcmc", parser, 10, tmp_path, cap=1234).pipeline.model
    splatfacto = bench.method_config("splatfacto", parser, 10, tmp_path).pipeline.model
    assert mcmc.mcmc_cap_max == 1234 and mcmc.sh_degree == splatfacto.sh_degree
    assert type(mcmc).__name__ == "SplatfactoMCMCModelConfig"
