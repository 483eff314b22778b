#!/usr/bin/env bash
# GPU check in one go, for the lent GPU machine (torch + torchvision + timm preinstalled, no
# Ray, no package index). Built here first, carried there as one archive:
#   python bench/gpu_bundle.py            # -> .gpu_bundle/site-cp312.tar.xz (~30 MiB)
# then, on the machine (device tool: carry [".gpu_bundle"]):
#   OUT=$OUT bash bench/gpu_check.sh
# Steps (about 6 minutes on one H200):
#   1. unpacks the bundle for this python3 into /tmp/site, checks `import ray, ray.train`;
#   2. the GPU tests: NCCL with one Ray Train worker, bf16 + channels_last, device JPEG
#      decode, no host-device synchronisation inside training steps;
#   3. a short training on synthetic shards through `rp2k train` (1 GPU worker, NCCL);
#   4. bench/train_throughput.py for ResNet-34 @ 224 and InceptionV3 @ 299: compute bound
#      vs timm's step, CPU decode, device decode; Ray Train 1 worker vs the engine alone.
# Logs and JSON land in $OUT (default bench/out); the summary table is printed last.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
BUNDLE="${BUNDLE:-.gpu_bundle}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
tag=$(python3 -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
if [ -f "$BUNDLE/site-$tag.tar.xz" ]; then
  mkdir -p /tmp/site
  tar -xJf "$BUNDLE/site-$tag.tar.xz" -C /tmp/site
  # the working tree first: its rp2k_dist wins over the bundle's wheel
  export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
elif python3 -c 'import ray' 2>/dev/null; then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no Ray here and no $BUNDLE/site-$tag.tar.xz: build it with 'python bench/gpu_bundle.py --python ${tag:2:1}.${tag:3}'" >&2
  exit 2
fi
rp2k() { python3 -m rp2k_dist.cli "$@"; }
python3 - <<'PY' | tee "$OUT/env.txt"
import torch, torchvision, ray, ray.train, webdataset
try:
    import timm
    timm_version = timm.__version__
except ImportError:
    timm_version = "absent"
print("torch", torch.__version__, "torchvision", torchvision.__version__, "timm", timm_version, "ray", ray.__version__, "from", ray.__file__)
print("device", torch.cuda.get_device_name(), "bf16", torch.cuda.is_bf16_supported())
PY

echo "== GPU tests"
python3 -m pytest -q -p no:cacheprovider -o addopts="-ra" tests/test_gpu.py tests/test_step_sync.py 2>&1 | tee "$OUT/gpu_tests.log" || true

echo "== short training on synthetic shards (rp2k train, 1 GPU worker, NCCL)"
DATA=/tmp/rp2k-gpu-check
rp2k synth "$DATA/rp2k" --classes 48 --images-per-class 60 --image-size 400 > /dev/null
rp2k pack "$DATA/rp2k" "$DATA/shards" --shard-size-mb 16 > /dev/null
rp2k train jobs/smoke.yaml --shards "$DATA/shards" --storage-path "$DATA/runs" --name gpu-smoke \
  --workers 1 --gpus-per-worker 1 --set optim.epochs=2 --set data.batch_size=128 --set model.crop_size=224 \
  --set data.loader_workers=8 --set run.cpus_per_worker=8 --set model.channels_last=true 2>&1 | tail -30 | tee "$OUT/train.log" || true
python3 -c "import json;[print('epoch', m['epoch'], 'img/s', round(m['images_per_second'])) for m in map(json.loads, open('$DATA/runs/gpu-smoke/metrics.jsonl'))]" | tee -a "$OUT/train.log" || true

echo "== training throughput: compute bound vs timm, CPU decode, device decode; Ray Train vs engine"
python3 bench/train_throughput.py --device cuda --model resnet34 --batch-size 256 --steps 30 --repeats 2 --workers 8 \
  --shards "$DATA/shards" --ray-overhead --ray-epochs 2 --json "$OUT/throughput_resnet34.json" 2>&1 | tee "$OUT/throughput_resnet34.log" || true
python3 bench/train_throughput.py --device cuda --model inception_v3 --batch-size 128 --steps 20 --repeats 2 --workers 8 \
  --shards "$DATA/shards" --json "$OUT/throughput_inception_v3.json" 2>&1 | tee "$OUT/throughput_inception_v3.log" || true

echo "== summary"
grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -1 || true
tail -2 "$OUT/train.log" || true
for model in resnet34 inception_v3; do
  sed -n '/^'"$model"' @/,$p' "$OUT/throughput_$model.log" || true
done
