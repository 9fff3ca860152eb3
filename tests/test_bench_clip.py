"""scripts/bench_clip.py --smoke: the micro-benchmark's code path on CPU with the torch twins."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_clip.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_clip", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_clip_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert _load().main(["--smoke", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["depth"], r["method"]) for r in rows} == {(d, m) for d in (0, 2) for m in ("gsplat", "one-pass", "clip")}
    for r in rows:
        assert r["raster_ms"] > 0 and r["entries"] >= 0
        if r["method"] == "clip" or r["depth"] == 0:  # clip mode renders exactly what gsplat renders
            assert r["max_abs_diff_vs_gsplat"] <= 1e-5, r
    assert "x gsplat" in capsys.readouterr().out
