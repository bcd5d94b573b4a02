#!/usr/bin/env bash
# Run the official singd package's own optimizer tests (test/optim of f-dangel/singd)
# against singd_functional.SINGD, OUTSIDE this repository. Nothing of that suite is
# copied into the repository: this script exports it from a checkout you give it into
# a scratch folder, changes only the import lines of SINGD, and puts an offline
# stand-in for the MNIST download in front of torchvision.
#
#   scripts/run_official_suite.sh SINGD_GIT [REF] [-- pytest args]
#
#   SINGD_GIT  a clone (bare or not) of https://github.com/f-dangel/singd
#   REF        its tag or commit (default v0.0.5)
# Environment:
#   SUITE_DIR  scratch folder (default /tmp/official_suite; deleted and recreated)
#   PYTHON     interpreter with torch, pytest, einops (default: python)
#   TARGET     "ours" (default): import singd_functional.SINGD; "official": leave the
#              imports alone (a control run of the official package on the same data)
#   LIN2023_GIT a clone of f-dangel/StructuredNGD-DL (the suite's git submodule,
#              needed by test_lin2023simplifying.py; without it that test fails)
#   EXTRA_PATH prepended to PYTHONPATH (e.g. a --target folder with codetiming and
#              memory_profiler, which test_utils.py imports)
#   REPO       the singd_functional checkout under test (default: this script's repository)
set -euo pipefail

src=${1:?usage: run_official_suite.sh SINGD_GIT [REF] [-- pytest args]}
shift
ref=v0.0.5
if [[ $# -gt 0 && $1 != -- ]]; then ref=$1; shift; fi
[[ $# -gt 0 && $1 == -- ]] && shift
repo=${REPO:-$(cd "$(dirname "$0")/.." && pwd)}
suite=${SUITE_DIR:-/tmp/official_suite}
python=${PYTHON:-python}
target=${TARGET:-ours}

rm -rf "$suite"
mkdir -p "$suite"
git --git-dir="$(git -C "$src" rev-parse --absolute-git-dir)" archive "$ref" test pytest.ini \
    | tar -x -C "$suite"
if [[ -n ${LIN2023_GIT:-} ]]; then
    sub=$(git --git-dir="$(git -C "$src" rev-parse --absolute-git-dir)" ls-tree "$ref" \
          lin2023simplifying | awk '{print $3}')
    mkdir -p "$suite/lin2023simplifying"
    git --git-dir="$(git -C "$LIN2023_GIT" rev-parse --absolute-git-dir)" archive "$sub" \
        | tar -x -C "$suite/lin2023simplifying"
fi

if [[ $target == ours ]]; then
    # the only change to the suite: where SINGD is imported from
    grep -rl --include='*.py' '^from singd.optim.optimizer import SINGD$' "$suite/test" \
        | xargs sed -i 's/^from singd.optim.optimizer import SINGD$/from singd_functional import SINGD/'
fi

# offline stand-ins: torchvision.datasets.MNIST (fixed random digits-shaped images), and
# ipdb, which the original work of Lin et al. imports without using it
stubs="$suite/_offline_stubs"
stub="$stubs/torchvision"
mkdir -p "$stub"
echo "def set_trace(*args, **kwargs):
    pass" > "$stubs/ipdb.py"
cat > "$stub/__init__.py" <<'PY'
"""Offline stand-in for the two torchvision names the official suite uses."""
PY
cat > "$stub/transforms.py" <<'PY'
import torch


class ToTensor:
    """uint8 (H, W) image -> float (1, H, W) in [0, 1], as torchvision's ToTensor."""

    def __call__(self, image):
        return image.unsqueeze(0).to(torch.float32).div(255)
PY
cat > "$stub/datasets.py" <<'PY'
import torch


class MNIST(torch.utils.data.Dataset):
    """60,000 (10,000 with train=False) random 28x28 uint8 images, about a fifth of the
    pixels lit as in MNIST, with random labels; the same data in every process."""

    def __init__(self, root, train=True, download=False, transform=None):
        n = 60_000 if train else 10_000
        gen = torch.Generator().manual_seed(0 if train else 1)
        lit = torch.rand(n, 28, 28, generator=gen) < 0.19
        values = torch.randint(1, 256, (n, 28, 28), generator=gen, dtype=torch.uint8)
        self.data = values * lit
        self.targets = torch.randint(0, 10, (n,), generator=gen)
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        image = self.data[i]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[i])
PY

cd "$suite"
export PYTHONPATH="$stubs:$suite:${EXTRA_PATH:+$EXTRA_PATH:}$repo"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"$python" -c "import singd_functional, sys; print('singd_functional from', singd_functional.__file__, file=sys.stderr)"
exec "$python" -m pytest test/optim -p no:cacheprovider -p no:randomly --continue-on-collection-errors "$@"
