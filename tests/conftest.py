import os
import sys

# The scripts live at the repository root and are imported as modules by the tests.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Shared fixtures of the generator tests (tiny trained tokenizers and their token dumps).
pytest_plugins = ("generator_fixture",)
