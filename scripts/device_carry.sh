#!/usr/bin/env bash
# Make .devcarry/ (git-ignored), what a device call carries: the wheels the device image lacks,
# gsplat's build cache, the real captures, and two scripts.  On the device:
#
#   . .devcarry/enter.sh && . .devcarry/stage.sh && TESTS="tests/test_offload.py" BENCH="python -P scripts/..." bash .devcarry/run.sh
#
#   bash scripts/device_carry.sh [SHARED_DIR]   # default ../shared; BEER_REPO=<git dir of YhuoyuH/NeRF-Database> adds beer
#
# stage.sh installs this checkout into /tmp/site and restores csrc/'s build cache
# (.devcarry/lpcsrc.tgz, which run.sh writes to $OUT/lpcsrc.tgz after every build: copy it back
# into .devcarry).  Both caches live in enter.sh's TORCH_EXTENSIONS_DIR (/tmp/tex): setting
# another one makes gsplat rebuild for minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${1:-../shared}
PY=${PYTHON:-.venv/bin/python}
grep -qx "/.devcarry/" .git/info/exclude 2>/dev/null || echo "/.devcarry/" >> .git/info/exclude
mkdir -p .devcarry/data
cp "$SHARED"/device/enter.sh "$SHARED"/device/gsplat-1.4.0_*.tgz .devcarry/
"$SHARED"/device/fetch-wheels.sh .devcarry/wheels
# pip install of this checkout on the device needs a build backend, offline
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --no-deps -d .devcarry/wheels "setuptools>=77" wheel
cp -r "$SHARED"/data/cup_colmap .devcarry/data/
if [ -n "${BEER_REPO:-}" ]; then  # 71 frames of the beer capture at 360x640 (scripts/bench_grid.py's beer_colmap)
    commit=83b34224ffb43e34e48db8137b3f95f8e7059cc3 out=.devcarry/data/beer_colmap
    mkdir -p "$out/sparse/0" "$out/images_2"
    for f in cameras images points3D; do git -C "$BEER_REPO" show "$commit:sparse/0/$f.bin" > "$out/sparse/0/$f.bin"; done
    for i in $(seq -w 0 70); do git -C "$BEER_REPO" show "$commit:images/00$i.jpg" > "$out/images_2/00$i.jpg"; done
    "$PY" -c "
import glob; from PIL import Image
for f in glob.glob('$out/images_2/*.jpg'):
    Image.open(f).resize((360, 640), Image.LANCZOS).save(f, quality=95)"
fi
cat > .devcarry/stage.sh <<'EOF'
# source after enter.sh: this checkout into /tmp/site, csrc/'s build cache restored
pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site . 2>&1 | grep -vi warn | tail -3
find /tmp/site/landmark_plugin/csrc -type f -exec touch -d 2000-01-01 {} +  # older than the cached objects
# The cache is used only if it was built from these very sources (CSRC_KEY, which run.sh stores
# in it as SOURCES): the sources are dated back, so ninja alone would not see a changed kernel.
# Its log records each object's build time, and ninja rebuilds when any header of the image is
# newer than that (a rebuilt image): the restored log is dated now, which the key makes safe.
export CSRC_KEY=$(cd csrc && LC_ALL=C cat $(LC_ALL=C ls) | sha256sum | cut -c1-16)
_cache="$TORCH_EXTENSIONS_DIR"/landmark_plugin_csrc
if [ -f .devcarry/lpcsrc.tgz ]; then
    tar xzf .devcarry/lpcsrc.tgz -C /tmp
    if [ "$(cat "$_cache"/SOURCES 2>/dev/null)" = "$CSRC_KEY" ]; then
        awk -v now="$(date +%s%N)" 'BEGIN { FS = OFS = "\t" } NR > 1 { $3 = now } { print }' "$_cache"/.ninja_log > "$_cache"/.ninja_log.new \
            && mv "$_cache"/.ninja_log.new "$_cache"/.ninja_log
        find "$_cache" -type f -exec touch {} +
        echo "csrc cache restored ($CSRC_KEY)"
    else
        echo "csrc cache is of other sources: full build"; rm -rf "$_cache"
    fi
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
EOF
cat > .devcarry/run.sh <<'EOF'
# build csrc/ (its cache back as $OUT/lpcsrc.tgz), run the GPU tests in $TESTS (at most T1 s),
# then $BENCH in what is left of BUDGET s; logs under $OUT
set -u
t0=$(date +%s)
python -P -c "import landmark_plugin.cuda as c; c.load(); print('csrc built')" 2>&1 | tail -3
echo "build $(( $(date +%s) - t0 )) s"
echo "${CSRC_KEY:-}" > "$TORCH_EXTENSIONS_DIR"/landmark_plugin_csrc/SOURCES  # stage.sh's key of these sources
tar czf "$OUT"/lpcsrc.tgz -C "$(dirname "$TORCH_EXTENSIONS_DIR")" "$(basename "$TORCH_EXTENSIONS_DIR")"/landmark_plugin_csrc
if [ -n "${TESTS:-}" ]; then
    timeout "${T1:-200}" python -P -m pytest -q -rs -p no:cacheprovider -m gpu $TESTS > "$OUT"/gpu_tests.log 2>&1
    echo "tests rc=$?"; tail -25 "$OUT"/gpu_tests.log
fi
left=$(( ${BUDGET:-560} - ($(date +%s) - t0) ))
if [ -n "${BENCH:-}" ] && [ "$left" -gt 30 ]; then
    timeout "$left" bash -c "$BENCH" > "$OUT"/bench.log 2>&1; echo "bench rc=$?"
    grep -v "^\s*$" "$OUT"/bench.log | grep -vi warn | tail -60
fi
EOF
du -sh .devcarry
