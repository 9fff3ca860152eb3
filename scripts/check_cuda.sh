#!/usr/bin/env bash
# GPU check of csrc/ in one command: build the kernels (cached in TORCH_EXTENSIONS_DIR),
# run the kernel-vs-twin and clip-mode tests, compute-sanitizer memcheck on a small case,
# then the micro-benchmarks: rasterisers (2M Gaussians, 1080p, tree depth 0 / 2 / 4), the fused
# grid feature kernel, and viewer frames/s at 1080p (tables + JSON).
#
#   bash scripts/check_cuda.sh [OUT_DIR]        # default OUT_DIR: ${OUT:-/tmp/check_cuda}
#   PYTHON=python3 BENCH_ARGS="--repeats 5" bash scripts/check_cuda.sh
#
# Uses the installed landmark_plugin (run it from the repository root so pytest finds tests/).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT_DIR=${1:-${OUT:-/tmp/check_cuda}}
mkdir -p "$OUT_DIR"
status=0
step() { echo; echo "=== $* ==="; }

step "build csrc/ (JIT, cached)"
start=$(date +%s)
if ! $PY -P -c "import landmark_plugin.cuda as c; c.load(verbose=False); print('built', c.EXTENSION_NAME, 'from', c.csrc_dir())"; then
    echo "FAILED: the kernels do not build (the reason is printed above)"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s"

step "tests: kernel vs twin, clip mode, twins on CUDA"
$PY -P -m pytest -q -rs -p no:cacheprovider tests/test_clip_cuda.py tests/test_clip.py tests/test_bench_clip.py \
    tests/test_grid_kernel_cuda.py tests/test_grid_kernel.py \
    2>&1 | tee "$OUT_DIR/pytest.txt" | grep -v "^$" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "compute-sanitizer memcheck (small case)"
SAN=$(command -v compute-sanitizer || true)
[ -z "$SAN" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/compute-sanitizer" ] && SAN=$CUDA_HOME/bin/compute-sanitizer
[ -z "$SAN" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && SAN=/usr/local/cuda/bin/compute-sanitizer
if [ -n "$SAN" ]; then
    "$SAN" --tool memcheck --error-exitcode 3 --print-limit 20 $PY -P scripts/bench_clip.py --memcheck \
        > "$OUT_DIR/memcheck.txt" 2>&1
    rc=$?
    tail -5 "$OUT_DIR/memcheck.txt"
    [ "$rc" -eq 0 ] || { echo "FAILED: memcheck exit code $rc (see memcheck.txt)"; status=1; }
else
    echo "SKIPPED: compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)"
fi

step "benchmark: forward + backward vs gsplat rasterize_to_pixels"
$PY -P scripts/bench_clip.py --json "$OUT_DIR/bench_clip.json" ${BENCH_ARGS:-} || status=1

step "benchmark: fused grid feature kernel vs torch paths"
$PY -P scripts/bench_grid_kernel.py --out "$OUT_DIR/bench_grid_kernel.json" || status=1

step "benchmark: viewer frames/s at 1080p"
$PY -P scripts/bench_render.py --json "$OUT_DIR/bench_render.json" ${RENDER_ARGS:-} || status=1

echo; echo "check_cuda: $([ $status -eq 0 ] && echo OK || echo FAILED); outputs in $OUT_DIR"
exit $status
