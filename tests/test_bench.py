"""bench.py: nnU-Net's stride rule for DynUNet. Its smallest CPU run end to end is the benchmark step
of gpu_check.py's --dry-run, whose JSON tests/test_gpu_check.py checks in full."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the project is a set of scripts, not an installed package
    sys.path.insert(0, str(REPO))

from bench import dynunet_strides  # noqa: E402


def test_dynunet_strides_follow_nnunet():
    assert dynunet_strides((256, 256, 128)) == [[1, 1, 1]] + [[2, 2, 2]] * 5
    # An axis stops halving once it would fall below 4 voxels (or become odd).
    assert dynunet_strides((64, 64, 32)) == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 1], [1, 1, 1]]
