"""The scenes of scripts/bench_gaussians.py by name: synthetic cities generated on first use, and
the real captures under ``--data-root`` (bench_grid's definitions)."""

from __future__ import annotations

from pathlib import Path


def scene_dataparser(scene: str, data_root: Path, work: Path):
    """(dataparser config, description) for a named scene."""

    from landmark_plugin.data.city import CityConfig
    from landmark_plugin.data.synthetic_city import SyntheticCityDataParserConfig

    if scene == "cup":  # bench_grid's definition of the real captures (folder, images_<N>, held-out split)
        from bench_grid import real_scene_parser  # scripts/ is on the path (bench_gaussians puts it there)

        try:
            return real_scene_parser("cup", data_root)
        except FileNotFoundError as error:
            raise SystemExit(str(error)) from error
    if scene == "lego":
        from nerfstudio.data.dataparsers.blender_dataparser import BlenderDataParserConfig

        path = data_root / "lego_synthetic"
        if not path.exists():
            raise SystemExit(f"{path} is missing: pass --data-root pointing at the shared data folder")
        return BlenderDataParserConfig(data=path), "lego_synthetic (400x400, 87 train, random init)"
    if scene == "city":
        city = CityConfig(num_images=120, width=320, height=240)
        return SyntheticCityDataParserConfig(data=work / "city-bench", city=city), "synthetic city, 120 images 320x240"
    if scene == "city-appearance":  # light, exposure and white balance change per image
        city = CityConfig(num_images=120, width=320, height=240, vary_appearance=True)
        return (SyntheticCityDataParserConfig(data=work / "city-appearance", city=city),
                "synthetic city with per-image appearance, 120 images 320x240")
    if scene == "city-1080":
        city = CityConfig(num_images=40, width=1920, height=1080)
        return SyntheticCityDataParserConfig(data=work / "city-1080", city=city), "synthetic city, 40 images 1920x1080"
    if scene == "small-city-appearance":  # the appearance city at half resolution, for CPU runs
        city = CityConfig(num_images=120, width=160, height=120, vary_appearance=True)
        return (SyntheticCityDataParserConfig(data=work / "city-appearance-160", city=city),
                "synthetic city with per-image appearance, 120 images 160x120")
    if scene == "tiny-city-appearance":  # CPU checks of the appearance protocol
        city = CityConfig(num_images=10, width=96, height=72, vary_appearance=True)
        return SyntheticCityDataParserConfig(data=work / "city-tiny-appearance", city=city), "tiny synthetic city, per-image appearance"
    if scene == "tiny-city":
        city = CityConfig(num_images=10, width=96, height=72)
        return SyntheticCityDataParserConfig(data=work / "city-tiny", city=city), "tiny synthetic city"
    raise SystemExit(f"unknown scene {scene}")
