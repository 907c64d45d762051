#!/usr/bin/env bash
# Every GPU check of the kit in one prepared run on a device machine (no network there, 10 minutes at most):
# every lesson on cuda with the embedded model, NF4 bytes vs bitsandbytes' CUDA kernels, QLoRALinear vs
# Linear4bit + peft forward+backward, peft's LoftQ on CUDA vs lorakit.loftq, paged optimizers, max_memory_allocated vs lorakit.memory.estimate, and
# lesson 05 before/after. The measurements are benchmarks/gpu_checks.py; this script prepares the machine.
#
#   1. here, where PyPI is reachable, once:   bash benchmarks/gpu_run.sh fetch
#      (the wheels the GPU image lacks, at the tested versions of lib/lorakit/tested.txt, into
#       build/gpu/wheels: ~50 MB, ignored by git)
#   2. on the device machine:                 run(command="bash benchmarks/gpu_run.sh", carry=["build/gpu"],
#                                                 timeout_s=600)
#   anywhere, to check the script itself:     bash benchmarks/gpu_run.sh --dry-run
#      (no wheels, no venv: gpu_checks.py --dry-run with this checkout's .venv, on the CPU)
#   the packages fetch asks for:              bash benchmarks/gpu_run.sh pins
#
# Options after the command go to gpu_checks.py, e.g. `bash benchmarks/gpu_run.sh --only nf4 speed` or
# `--params .ci/params.yml` (shorter lessons). GPU_BUDGET (seconds, default 450) bounds the checks so
# that the setup (about a minute) and the checks end within the device's 10 minutes.
#
# The GPU image has torch, transformers, accelerate, safetensors, tokenizers, pandas, matplotlib... but not
# bitsandbytes, peft, trl, datasets, papermill or a Jupyter kernel. We make a venv whose base is the image's Python
# environment (a .pth file adds its site-packages after ours, so the carried versions win), install the
# wheels and the kit without dependencies (no index), then run the checks.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=build/gpu/wheels
OUT=${OUT:-build/gpu/out}
# What the image lacks, by name; the versions come from the lock. Left out on purpose (size): jedi and
# debugpy, both optional at run time for IPython and ipykernel.
NEEDED="bitsandbytes peft trl datasets dill multiprocess xxhash pyarrow papermill entrypoints tenacity nbformat nbclient
fastjsonschema jsonschema jsonschema-specifications referencing rpds-py jupyter-client jupyter-core traitlets
platformdirs ipykernel comm ipython ipython-pygments-lexers parso pexpect ptyprocess prompt-toolkit wcwidth
stack-data asttokens executing pure-eval matplotlib-inline pyzmq tornado nest-asyncio2 ipywidgets
widgetsnbextension jupyterlab-widgets"

pinned() {  # NAME==VERSION for each name in $NEEDED, from the lock (fails naming a package it does not pin)
    python3 - "$@" <<'EOF'
import re, sys
lock = {}
for line in open("lib/lorakit/tested.txt"):
    line = line.split("#", 1)[0].strip()
    if line:
        name, _, version = line.partition("==")
        lock[re.sub(r"[-_.]+", "-", name).lower()] = version
missing = [n for n in sys.argv[1:] if n not in lock]
if missing:
    sys.exit(f"gpu_run: the lock does not pin {missing}: update NEEDED in benchmarks/gpu_run.sh")
print(" ".join(f"{n}=={lock[n]}" for n in sys.argv[1:]))
EOF
}

case "${1:-}" in
pins)
    pinned $NEEDED | tr ' ' '\n'
    exit 0
    ;;
fetch)
    mkdir -p "$WHEELS"
    PIP=${PIP:-.venv/bin/pip}
    # shellcheck disable=SC2046,SC2086
    "$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        --platform any -d "$WHEELS" $(pinned $NEEDED)
    du -sh "$WHEELS"
    exit 0
    ;;
--dry-run)
    shift
    pinned $NEEDED >/dev/null
    echo "gpu_run: dry run: the wheels fetch would pin $(echo $NEEDED | wc -w) packages from the lock; the checks on the CPU:"
    PY=${PYTHON:-.venv/bin/python}
    exec "$PY" benchmarks/gpu_checks.py --dry-run --out "$OUT" "$@"
    ;;
-h|--help)
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 0
    ;;
esac

t_start=$(date +%s)
mkdir -p "$OUT"
ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "gpu_run: no wheels in $WHEELS: run 'bash benchmarks/gpu_run.sh fetch' here first and carry build/gpu"; exit 2; }
test -f lib/lorakit/assets/tiny-stories-llama/model.safetensors || { echo "gpu_run: the embedded model is missing (lib/lorakit/assets)"; exit 2; }
nvidia-smi -L || { echo "gpu_run: no NVIDIA GPU here; use --dry-run on a CPU machine"; exit 2; }

BASE_PY=${PYTHON:-python3}
VENV=/tmp/lorakit-gpu-venv
"$BASE_PY" -m venv --clear --without-pip "$VENV"
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# The wheels first, into the bare venv (so pip neither skips nor uninstalls the image's own versions)...
"$BASE_PY" -m pip --python "$VENV/bin/python" install -q --no-index --no-deps --no-compile --ignore-installed "$WHEELS"/*.whl
# ...then the image's packages behind them.
"$BASE_PY" -c 'import site; print("\n".join(p for p in site.getsitepackages() if "site-packages" in p or "dist-packages" in p))' > "$SITE/gpu_image.pth"
"$BASE_PY" -m pip --python "$VENV/bin/python" install -q --no-index --no-deps --no-build-isolation -e . \
    || { echo "(pip install -e . failed: putting lib/ on the path instead)"; echo "$PWD/lib" > "$SITE/lorakit.pth"; }
"$VENV/bin/python" -m ipykernel install --sys-prefix --name python3 >/dev/null
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 LORAKIT_STATIC=1 MPLBACKEND=Agg
export TQDM_MININTERVAL=30 PATH="$VENV/bin:$PATH"
"$VENV/bin/python" -c 'import torch; print("cuda:", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))'
echo "setup took $(( $(date +%s) - t_start )) s"

set +e
"$VENV/bin/python" benchmarks/gpu_checks.py --out "$OUT" --budget "${GPU_BUDGET:-450}" "$@"
status=$?
echo "total $(( $(date +%s) - t_start )) s"
exit $status
