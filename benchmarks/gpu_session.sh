#!/usr/bin/env bash
# One prepared session on a GPU machine (run from the repository root): environment, the scale benchmark's
# GPU rows for docs/benchmarks.md, the calibration loop on the device, and the device-sensitive unit tests. Writes logs to $OUT (or /tmp/gpu_out).
#
# The machine has no package index: where `.whl/` exists (wheels of the packages missing there, see
# docs/benchmarks.md) they are installed into /tmp/site first. scar-jax itself runs from src/.
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/env.txt"
SITE=""
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  SITE=/tmp/site:
  PYTHONPATH=/tmp/site python3 -c "import flax.linen" 2>/dev/null || rm -rf /tmp/site/flax /tmp/site/flax-*
fi
export PYTHONPATH="${SITE}$PWD/src"
python3 -c "import jax, flax, numpyro, optax, anndata, scar_jax.model as m; print('jax', jax.__version__, jax.devices(), \
'flax', flax.__version__, 'numpyro', numpyro.__version__, 'optax', optax.__version__, 'anndata', anndata.__version__)" \
  2>&1 | tee -a "$OUT/env.txt"
nproc | tee -a "$OUT/env.txt"
cd benchmarks
timeout "${SCALE_S:-200}" python3 scale.py --sizes 1000000x2000:3 10000x2000:5 --inference-max-cells 100000 \
  2>&1 | tee "$OUT/scale.txt"
timeout "${VARIANTS_S:-110}" python3 scale.py --sizes 200000x2000:3 --inference-max-cells 20000 \
  --precision tensorfloat32 bfloat16 --unroll 8 2>&1 | tee "$OUT/variants.txt"
timeout "${WIDE_S:-90}" python3 scale.py --sizes 100000x33000:2 --inference-max-cells 20000 2>&1 | tee "$OUT/scale_33k.txt"
[ "${CALIB_S:-60}" = 0 ] || timeout "${CALIB_S:-60}" python3 calibration_speed.py --sizes 20000x2000 100000x2000 \
  --reference-max-entries 0 2>&1 | tee "$OUT/calibration.txt"
cd ..
[ "${TESTS_S:-80}" = 0 ] || timeout "${TESTS_S:-80}" python3 -m pytest -q -p no:cacheprovider tests/test_counts.py tests/test_likelihoods.py 2>&1 \
  | tail -15 | tee "$OUT/tests.txt"
