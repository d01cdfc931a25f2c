#!/usr/bin/env bash
# A separate virtual environment, .venv-peer, holding the peer we measure ourselves
# against: dalle-pytorch==1.6.6 on the same torch 2.13.0 CPU build as .venv.
# scripts/bench.py runs its peer half with .venv-peer/bin/python. The project itself is
# not installed here: the two sides share nothing but the machine.
#
# Idempotent: a stamp (the hash of this script) marks a finished install, and a rerun
# with the stamp in place only checks that dalle_pytorch's files are there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-peer
stamp=$VENV/.peer-install-stamp
want="$(sha256sum scripts/setup_peer.sh | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x $VENV/bin/python ] \
    && [ -f "$(echo $VENV/lib/python3*/site-packages/dalle_pytorch/__init__.py)" ]; then
    exit 0
fi
start=$SECONDS
if [ ! -x $VENV/bin/python ]; then
    echo "[setup_peer] creating $VENV" >&2
    "$PYTHON" -m venv $VENV
fi
# Our constraints go in with -c, which pip adds to a constraint file set in pip.conf
# (such as /etc/xdg/pip/pip.conf here); PIP_CONSTRAINT would replace that one instead.
# torch is pinned so that no requirement can swap the CPU build for CUDA wheels;
# setuptools<81 still ships pkg_resources, which dalle_pytorch/__init__.py imports.
cat > $VENV/constraints.txt <<'EOF'
torch==2.13.0
setuptools<81
EOF
pip=($VENV/bin/python -m pip install -q --disable-pip-version-check -c $VENV/constraints.txt)
# This machine's pip.conf names local package folders that are partly missing; pip warns
# once per package about them, which buries everything else.
quiet() { "$@" 2> >(grep -v 'neither a file nor a directory' >&2); }
echo "[setup_peer] installing torch==2.13.0 and youtokentome's build tools" >&2
quiet "${pip[@]}" torch==2.13.0 "setuptools<81" wheel Cython
# youtokentome ships no wheel for this Python; its setup.py imports Cython at the top,
# so it is built against the Cython above, without build isolation.
echo "[setup_peer] building youtokentome" >&2
quiet "${pip[@]}" --no-build-isolation youtokentome==1.0.6
echo "[setup_peer] installing dalle-pytorch==1.6.6 and its requirements" >&2
quiet "${pip[@]}" dalle-pytorch==1.6.6
# torchvision from PyPI is a CUDA build that fails to load its operators against the
# CPU torch; nothing the benchmark runs needs it (taming's VQGAN chain is replaced by
# a stand-in in scripts/bench.py), so it goes.
$VENV/bin/python -m pip uninstall -q -y torchvision
if $VENV/bin/python -m pip list 2>/dev/null | grep -qi '^nvidia-'; then
    echo "[setup_peer] error: CUDA wheels were pulled into $VENV" >&2
    exit 1
fi
$VENV/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$want" > "$stamp"
echo "[setup_peer] done in $((SECONDS - start)) s" >&2
