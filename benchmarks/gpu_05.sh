#!/usr/bin/env bash
# Lesson 05 on a GPU device machine (no network there): the solution notebook, unchanged, run with papermill
# on cuda with the embedded model (MODEL_ID default; a hub preset cannot be downloaded there either).
# Prints held-out exact match before/after, training seconds and torch.cuda.max_memory_allocated.
#
#   1. here, where PyPI is reachable, once:   bash benchmarks/gpu_05.sh fetch
#      (downloads the packages the GPU image lacks, as wheels, into build/gpu05/wheels: ~48 MB, ignored by git)
#   2. on the device machine:                 run(command="bash benchmarks/gpu_05.sh", carry=["build/gpu05"],
#                                                 timeout_s=420)
#
# The GPU image has torch, transformers, accelerate, safetensors, tokenizers, pandas, matplotlib... but not
# bitsandbytes, datasets, papermill or a Jupyter kernel. We make a venv whose base is the image's Python
# environment (a .pth file adds its site-packages after ours, so the carried versions win), install the
# wheels and the kit without the CPU constraints (`pip install -e .`, no index), then run the notebook.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=build/gpu05/wheels
LESSON=05_qlora_finetune

if [ "${1:-}" = fetch ]; then
    mkdir -p "$WHEELS"
    PIP=${PIP:-.venv/bin/pip}
    # Versions as in the course's tested CPU environment. Left out on purpose (size): jedi and debugpy,
    # both optional at run time for IPython and ipykernel.
    "$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        --platform any -d "$WHEELS" \
        bitsandbytes==0.50.2 peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
        papermill==2.7.0 entrypoints==0.4.2 tenacity==9.2.1 nbformat==5.11.1 nbclient==0.11.0 \
        fastjsonschema==2.22.3 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 \
        rpds-py==2026.9.1 jupyter_client==8.10.0 jupyter_core==5.9.1 traitlets==5.16.1 platformdirs==4.14.8 \
        ipykernel==7.4.0 comm==0.2.3 ipython==9.18.1 ipython_pygments_lexers==1.1.1 parso==0.8.7 \
        pexpect==4.9.0 ptyprocess==0.7.0 prompt_toolkit==3.0.53 wcwidth==0.9.4 stack-data==0.6.3 \
        asttokens==3.0.2 executing==2.3.0 pure_eval==0.2.4 matplotlib-inline==0.2.2 pyzmq==27.3.0 \
        tornado==6.6.1 nest-asyncio2==1.7.4
    du -sh "$WHEELS"
    exit 0
fi

t_start=$(date +%s)
OUT=${OUT:-build/gpu05/out}
mkdir -p "$OUT"
ls "$WHEELS"/*.whl >/dev/null || { echo "no wheels in $WHEELS: run 'bash benchmarks/gpu_05.sh fetch' first and carry build/gpu05"; exit 2; }
test -f lib/lorakit/assets/tiny-stories-llama/model.safetensors || { echo "the embedded model is missing (lib/lorakit/assets): pretrain it first"; exit 2; }
nvidia-smi -L || true

BASE_PY=${PYTHON:-python3}
VENV=/tmp/venv05
"$BASE_PY" -m venv --without-pip "$VENV"
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# The wheels first, into the bare venv (so pip neither skips nor uninstalls the image's own versions)...
"$BASE_PY" -m pip --python "$VENV/bin/python" install -q --no-index --no-deps --no-compile --ignore-installed "$WHEELS"/*.whl
# ...then the image's packages behind them.
"$BASE_PY" -c 'import site; print("\n".join(p for p in site.getsitepackages() if "site-packages" in p or "dist-packages" in p))' > "$SITE/gpu_image.pth"
"$BASE_PY" -m pip --python "$VENV/bin/python" install -q --no-index --no-deps --no-build-isolation -e . \
    || { echo "(pip install -e . failed: putting lib/ on the path instead)"; echo "$PWD/lib" > "$SITE/lorakit.pth"; }
"$VENV/bin/python" -m ipykernel install --sys-prefix --name python3 >/dev/null
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 LORAKIT_STATIC=1 MPLBACKEND=Agg
"$VENV/bin/python" - <<'EOF'
import torch
from lorakit.env import print_versions
print_versions()
print("cuda:", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
EOF
echo "setup took $(( $(date +%s) - t_start )) s"

t_nb=$(date +%s)
"$VENV/bin/python" -m papermill "solutions/$LESSON/$LESSON.ipynb" "$OUT/${LESSON}_gpu.ipynb" \
    -k python3 --cwd "solutions/$LESSON" --no-progress-bar --log-output \
    -p DEVICE cuda -p RESULTS_JSON "$PWD/$OUT/${LESSON}_gpu.json" 2>&1 \
    | grep -v -E "^\s*$|Loading weights|it/s\]|examples/s\]" | tail -60
nb_seconds=$(( $(date +%s) - t_nb ))

"$VENV/bin/python" - "$OUT/${LESSON}_gpu.json" "$nb_seconds" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print()
print("| model | device | dtype | steps | trainable | exact match before | after | training s | notebook s | max_memory_allocated |")
print("|---|---|---|---|---|---|---|---|---|---|")
print(f"| {r['model_id']} | {r['device']} | {r['compute_dtype']} | {r['max_steps']} | {r['trainable']:,} | "
      f"{r['before']:.1%} | {r['after']:.1%} | {r['train_seconds']:.1f} | {sys.argv[2]} | "
      f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB |")
print(f"merge into 16-bit: max logit change {r['merge16_max_logit_diff']:.3g}; into 4-bit: "
      f"{r['merge4_max_logit_diff']:.3g}; merged 16-bit exact match {r['merged16_exact_match']:.1%}")
EOF
echo "total $(( $(date +%s) - t_start )) s"
