#!/usr/bin/env bash
# GPU measurement in one script: loss kernels, training throughput (bare step vs whole
# loop) and the two CIFAR-10 runs with ResNet-18, on one GPU. The training recipe is the
# h200 preset (experiments/presets.py: model, dtype, batch, epochs, warm-up, loss ...;
# h200-contrastive for the contrastive run), for one H100/H200-class GPU, not yet
# measured on one; this script spells none of it out again.
#
# On a GPU machine with internet access, `pip install -e ".[all]"` and run
#   DATA=/path/to/cifar10 bash benchmarks/gpu.sh
# On one without (registry or internet), prepare on a machine that has it, from the
# repository root, and copy the repository over with these two git-ignored folders:
#   mkdir -p data && cp /path/to/cifar10-jpeg.tar.xz data/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 -d .whl \
#     faiss-cpu==1.15.1 openTSNE==1.0.4                                   # ~22 MB
# (the GPU machine then needs jax[cuda], flax, optax, orbax, tqdm, matplotlib, scikit-learn;
# the wheels in .whl/ are installed into /tmp/site by this script).
# Everything it writes is under $OUT:
#   gpu.log, losses-gpu.json, throughput.json, result-{triplet,contrastive}.json,
#   tsne-{triplet,contrastive}.png
# Copy the result JSONs to benchmarks/results/ and the figures into docs/benchmarks/gpu.md.
set -uo pipefail
# Knobs (the CPU dry run in docs/benchmarks/gpu.md shrinks them):
OUT=${OUT:-/tmp/jaxmetric-gpu}
DATA=${DATA:-data/cifar10-jpeg.tar.xz}
SIZES=${SIZES:-1024 4096 16384}   # loss kernels: batch sizes
STEPS=${STEPS:-100}               # throughput: timed steps
RUN_FLAGS=${RUN_FLAGS:-}          # appended to the preset of each run, e.g. a smaller model
THROUGHPUT_FLAGS=${THROUGHPUT_FLAGS:-}  # appended to the throughput benchmark's preset
T_KERNELS=${T_KERNELS:-150}; T_THROUGHPUT=${T_THROUGHPUT:-150}; T_RUN=${T_RUN:-240}  # seconds
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.log") 2>&1
export PYTHONUNBUFFERED=1

WHEELS=${WHEELS-.whl}         # copied cp312 wheels (faiss, openTSNE); WHEELS= : use what is installed
if [ -n "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"

echo "== loss kernels =="
timeout $T_KERNELS python3 -m benchmarks.losses --sizes $SIZES --impls jaxmetric \
  --modes all semihard batch_hard --large-modes all semihard batch_hard --repeats 5 \
  --json "$OUT/losses-gpu.json"

echo "== throughput (preset h200 $THROUGHPUT_FLAGS) =="
timeout $T_THROUGHPUT python3 -m benchmarks.throughput --preset h200 $THROUGHPUT_FLAGS \
  --steps $STEPS --json "$OUT/throughput.json"

for LOSS in triplet contrastive; do
  echo "== CIFAR-10 $LOSS =="
  RUN=/tmp/runs/$LOSS
  rm -rf "$RUN"
  PRESET=h200; [ "$LOSS" = contrastive ] && PRESET=h200-contrastive
  CMD="python3 -m experiments.cifar10 --preset $PRESET --data-dir $DATA --out $RUN --no-progress $RUN_FLAGS"
  if timeout $T_RUN $CMD; then
    python3 -m benchmarks.collect_run "$RUN" --command "$CMD" --out "$OUT/result-$LOSS.json"
    cp "$RUN/tsne.png" "$OUT/tsne-$LOSS.png"
  else
    echo "!! $LOSS run failed or timed out"
  fi
done
ls -la "$OUT"
