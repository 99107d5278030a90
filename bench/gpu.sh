#!/usr/bin/env bash
# The GPU checks CI cannot run, in one go on a machine with a CUDA GPU (bench/RESULTS.md, "GPU").
#
#   bench/gpu.sh MNIST_ROOT REFERENCES_DIR OUT_DIR
#
# MNIST_ROOT holds MNIST/raw/ (torchvision's layout), REFERENCES_DIR raw_loop.py,
# tutorial_recipe.py and reference_model.py (../shared/bench). Runs with $PYTHON (python3 when
# unset) from the repository root. Each part writes OUT_DIR/<part>.txt, has its own time limit
# (a GPU is lent for minutes; together at most 560 s; 385 s on an H200 in session 4), and the
# next part runs whatever the last one did.
set -u
mnist=$(realpath "$1") refs=$(realpath "$2") out=$(realpath -m "$3")
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # components/ and tests/ importable
mkdir -p "$out"

part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name, at most ${limit}s, from $(date +%T)"
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1
    echo "== $name: exit $? at $(date +%T)"
    grep -E '"summary"|"variant"|passed|failed|error' "$out/$name.txt" | cut -c1-600 | tail -n 12
}

part env 20 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  $py -c 'import torch, timm, sys; print(sys.version.split()[0], torch.__version__, \
  torch.version.cuda, timm.__version__, torch.cuda.get_device_name(), torch.cuda.is_bf16_supported())'; \
  nproc"
part cuda_paths 110 "$py" bench/bench_cuda.py --mnist "$mnist"
bench=("$py" bench/bench_train.py --device cuda --mnist "$mnist" --references "$refs")
part train_overhead 80 "${bench[@]}" --only overhead --repeats 1
part train_tutorial 60 "${bench[@]}" --only tutorial --repeats 1
part train_target 45 "${bench[@]}" --only target --repeats 2
part train_resnet_cifar 140 "${bench[@]}" --only resnet_cifar
part augment 30 "$py" bench/bench_augment.py --repeats 5
# The command-line entry point tracks with MLflow; where MLflow is not installed (a bare GPU
# image), its two tests are left out: the rest run the train step on the GPU.
part pytest 75 "$py" -m pytest -q -p no:cacheprovider tests/test_train.py tests/test_augment.py \
  -k "cuda or (test_train and not entry_point and not sigkill)"
