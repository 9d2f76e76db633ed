#!/usr/bin/env bash
# Every GPU check in one go (one GPU, a few minutes): the gpu-marked tests, then the GPU benchmark rows into
# benchmarks/RESULTS.md. Needs the environment ./dev.sh env builds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
"$PY" -m pytest -m gpu -q -p no:cacheprovider tests
"$PY" -m benchmarks gpu_export
