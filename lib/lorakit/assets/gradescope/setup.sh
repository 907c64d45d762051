#!/usr/bin/env bash
# Gradescope runs this once, as root, when it builds the autograder's image from the zip that
# `lorakit gradescope LESSON` wrote (unpacked in /autograder/source). Three steps:
#   1. a Python the kit supports (3.11 or newer): the image's own, else Ubuntu's python3.11 package;
#   2. the kit at the versions CI tested: the wheel in wheels/ with tested.txt as constraints, installed by the
#      kit's own installer (tooling/bootstrap.py, what `make` runs, with the install.py it imports from above) into $LORAKIT_VENV;
#   3. the lesson's key registered in the course's gradebook, then made readable by root only.
# Knobs (the kit's tests set them; Gradescope needs none): AUTOGRADER (the root, default /autograder),
# LORAKIT_VENV, LORAKIT_PYTHON (the Python to use) and LORAKIT_PIP_ARGS (extra pip arguments).
set -euo pipefail
AUTOGRADER="${AUTOGRADER:-/autograder}"
SOURCE="$AUTOGRADER/source"
VENV="${LORAKIT_VENV:-$AUTOGRADER/lorakit-venv}"

supported_python() {
    local py
    for py in ${LORAKIT_PYTHON:-} python3.13 python3.12 python3.11 python3; do
        if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$py"
            return 0
        fi
    done
    return 1
}

echo "lorakit setup: 1/3 a Python 3.11 or newer"
if ! PY="$(supported_python)"; then
    echo "lorakit setup: no Python 3.11+ in the image: installing Ubuntu's python3.11"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3.11 python3.11-venv
    PY="$(supported_python)" || { echo "lorakit setup: python3.11 did not install: pick a newer base image" >&2; exit 1; }
fi
echo "lorakit setup: using $PY ($("$PY" --version))"

echo "lorakit setup: 2/3 the kit at the tested versions into $VENV"
WHEELS=("$SOURCE"/wheels/lorakit-*.whl)
# shellcheck disable=SC2086  # LORAKIT_PIP_ARGS is a list of arguments
"$PY" "$SOURCE/tooling/bootstrap.py" venv --venv "$VENV" --extra instructor --lock "$SOURCE/tested.txt" \
    --kit "${WHEELS[0]}" --root "$SOURCE" --python-name "$PY" -- ${LORAKIT_PIP_ARGS:-}

echo "lorakit setup: 3/3 the lesson's key"
LORAKIT_COURSE_DIR="$SOURCE/course" HF_HUB_OFFLINE=1 "$VENV/bin/python" -m lorakit.grading.gradescope prepare \
    --autograder "$AUTOGRADER"
