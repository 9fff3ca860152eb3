"""scripts/bench_render.py --smoke: the viewer render-speed benchmark's code path on CPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_render.py"


def test_bench_render_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_render", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "bench.json"
    assert module.main(["--smoke", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["gaussians"], r["method"]) for r in rows} == {(n, m) for n in (300, 600) for m in ("gsplat", "one-pass", "clip")}
    for r in rows:
        assert r["fps"] > 0 and r["max_abs_diff_vs_gsplat"] == r["max_abs_diff_vs_gsplat"]  # not NaN
        if r["method"] == "clip":  # clip mode is the unpartitioned render exactly (plain mode is not)
            assert r["max_abs_diff_vs_gsplat"] <= 1e-5, r
    assert "summary" in capsys.readouterr().out
