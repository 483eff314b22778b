#!/usr/bin/env bash
# GPU check in one go, for a machine with an NVIDIA GPU (H100/H200 class) and torch +
# torchvision preinstalled, possibly without package-index access:
#   1. installs wheels brought along in $WHEELS (ray, webdataset, umap-learn and their
#      missing dependencies) into a private site folder, and this project (no deps);
#   2. runs the GPU tests: NCCL backend with one Ray Train worker, bf16 autocast,
#      channels_last, device JPEG decode;
#   3. a short DDP training on synthetic shards through `rp2k train` (prints img/s);
#   4. bench/train_throughput.py for ResNet-34 @ 224 and InceptionV3 @ 299.
# Results (JSON + log) land in $OUT (default bench/out). Usage:
#   WHEELS=.whl OUT=/tmp/out bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
WHEELS="${WHEELS:-.whl}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="/tmp/site/bin:$PATH"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
rp2k() { python3 -m rp2k_dist.cli "$@"; }
python3 - <<'PY' | tee "$OUT/env.txt"
import torch, torchvision, ray, webdataset
print("torch", torch.__version__, "torchvision", torchvision.__version__, "ray", ray.__version__)
print("device", torch.cuda.get_device_name(), "bf16", torch.cuda.is_bf16_supported())
PY

echo "== GPU tests"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"

echo "== short DDP training on synthetic shards (rp2k train, 1 GPU worker, NCCL)"
DATA=/tmp/rp2k-gpu-check
rp2k synth "$DATA/rp2k" --classes 48 --images-per-class 60 --image-size 400 > /dev/null
rp2k pack "$DATA/rp2k" "$DATA/shards" --shard-size-mb 16 > /dev/null
rp2k train jobs/smoke.yaml --shards "$DATA/shards" --storage-path "$DATA/runs" --name gpu-smoke \
  --workers 1 --gpus-per-worker 1 --set optim.epochs=2 --set data.batch_size=128 --set model.crop_size=224 \
  --set data.loader_workers=8 --set run.cpus_per_worker=8 --set model.channels_last=true 2>&1 | tail -30 | tee "$OUT/train.log"
python3 -c "import json;[print('epoch', m['epoch'], 'img/s', round(m['images_per_second'])) for m in map(json.loads, open('$DATA/runs/gpu-smoke/metrics.jsonl'))]" | tee -a "$OUT/train.log"

echo "== training throughput: compute bound vs CPU decode vs device decode"
python3 bench/train_throughput.py --device cuda --model resnet34 --batch-size 256 --steps 40 --workers 8 \
  --shards "$DATA/shards" --json "$OUT/throughput_resnet34.json" 2>&1 | tee "$OUT/throughput_resnet34.log"
python3 bench/train_throughput.py --device cuda --model inception_v3 --batch-size 128 --steps 30 --workers 8 \
  --shards "$DATA/shards" --json "$OUT/throughput_inception_v3.json" 2>&1 | tee "$OUT/throughput_inception_v3.log"
