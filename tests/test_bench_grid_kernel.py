"""scripts/bench_grid_kernel.py --smoke: the benchmark's code path on CPU (torch paths only)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_grid_kernel.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_grid_kernel", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_grid_kernel_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert _load().main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["path"]: r for r in report["rows"]}
    assert set(rows) == {"fused", "twin", "grid_sample"} and len(report["rows"]) == 3
    assert rows["fused"]["available"] is False and "CUDA" in rows["fused"]["reason"]
    for name in ("twin", "grid_sample"):
        r = rows[name]
        assert r["forward_ms"] > 0 and r["backward_ms"] > 0 and r["points"] == 500 and r["factors"] == 2
    # the comparison path computes the twin's function (else its timing would mean nothing)
    assert rows["grid_sample"]["max_abs_err_vs_twin"] <= 1e-5
    assert rows["grid_sample"]["max_grad_rel_err_vs_twin"] <= 1e-5
    assert rows["grid_sample"]["speedup_vs_grid_sample"] == 1.0
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert lines[-1].split()[2] == "grid_sample" and "unavailable" in lines[-3]  # the table comes last
