"""`landmark-city`: write a synthetic-city dataset (nerfstudio-data format) to a folder."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import tyro
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from landmark_plugin.data.city import CityConfig, write_city

CONSOLE = Console()


@dataclass
class WriteCity:
    """Generate a procedural city: posed images, a sparse point cloud and a train/test split."""

    output_dir: Path = Path("data/synthetic-city")
    """Folder to write images/, transforms.json and sparse_pc.ply into (created if missing)."""
    city: tyro.conf.OmitArgPrefixes[CityConfig] = field(default_factory=CityConfig)
    """Scene, camera and image parameters; the same values always give the same files."""
    overwrite: bool = False
    """Write even if output_dir already holds a transforms.json."""

    def main(self) -> Path:
        transforms = self.output_dir / "transforms.json"
        if transforms.exists() and not self.overwrite:
            raise SystemExit(f"{transforms} exists; pass --overwrite to replace it.")
        columns = (TextColumn("[bold blue]rendering"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=CONSOLE) as progress:
            task = progress.add_task("render", total=self.city.num_images)
            write_city(self.output_dir, self.city, on_image=lambda done, _: progress.update(task, completed=done))
        meta = json.loads(transforms.read_text())
        street = sum(frame["street_level"] for frame in meta["frames"])
        CONSOLE.print(
            f"[green]wrote {self.output_dir.resolve()}[/green]: {len(meta['frames'])} images of "
            f"{self.city.width}x{self.city.height} ({len(meta['train_filenames'])} train, "
            f"{len(meta['test_filenames'])} test; {street} street-level), {self.city.num_points} points"
        )
        return self.output_dir


def entrypoint() -> None:
    """Console script: parse the command line with tyro and write the city."""
    tyro.extras.set_accent_color("bright_yellow")
    tyro.cli(WriteCity).main()


if __name__ == "__main__":
    entrypoint()
