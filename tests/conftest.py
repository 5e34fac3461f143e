import os
import sys

import pytest

# The scripts live at the repository root and are imported as modules by the tests.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Shared fixtures of the generator tests (tiny trained tokenizers and their token dumps).
pytest_plugins = ("generator_fixture",)


@pytest.fixture
def real_weights(monkeypatch):
    """The real LPIPS backbones and FID Inception, converted by `evaluate.py weights` (see
    tests/real_weights.py): TORCH_HOME points at them; returns their hub/checkpoints folder."""
    from real_weights import converted_torch_home

    home = converted_torch_home()
    monkeypatch.setenv("TORCH_HOME", home)
    monkeypatch.delenv("DQ_INCEPTION_WEIGHTS", raising=False)
    return os.path.join(home, "hub", "checkpoints")
