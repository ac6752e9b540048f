#!/bin/bash
# The GPU check of issue 12 (point 6): `make bench step` and the test suite on
# a lent GPU machine, with that machine's own Python and jax (the pinned CUDA
# wheels are too large to carry there). What its Python lacks travels as
# wheels in $WHEELS (ml_collections, clu, mlxtend: `pip download --no-deps
# --only-binary=:all: --python-version 3.12 ...`); the repository to test is
# $SRC (a snapshot of the tree, so edits made meanwhile do not travel half
# done), with shared/ beside it for the fixtures and the idx files. Writes
# versions.txt, bench_step.txt, step.json and pytest.txt to $OUT.
cd "${SRC:-.}" || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target /tmp/site "${WHEELS:-../whl}"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false \
  PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1
{
  date -u; nvidia-smi -L; nproc
  python3 -c "import sys, jax, jaxlib, flax, optax, orbax.checkpoint as ocp; print(sys.version); print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', ocp.__version__); print(jax.devices())"
  python3 -m pip list 2>/dev/null | grep -i -E '^(jax|jaxlib|flax|optax|orbax|chex|tensorstore|numpy|clu|ml.collections|mlxtend|tensorflow|pytest) '
} > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"
echo '== make bench step'
( time timeout "${BENCH_S:-200}" python3 -m benchmarks step ) > "$OUT/bench_step.txt" 2>&1
echo "rc=$?" >> "$OUT/bench_step.txt"
cp benchmarks/results/step.json "$OUT/" 2>/dev/null
tail -25 "$OUT/bench_step.txt"
echo '== tests'
( time timeout "${TEST_S:-330}" python3 -m pytest -q -n "${WORKERS:-12}" \
    -p no:cacheprovider tests ) > "$OUT/pytest.txt" 2>&1
echo "rc=$?" >> "$OUT/pytest.txt"
grep -E '^(FAILED|ERROR)' "$OUT/pytest.txt" | cut -c1-200 | head -60
tail -8 "$OUT/pytest.txt"
