"""Helper for the two-processes-one-run tests of the scripts (not a test itself).

The first process is held right after it has passed common.start_run (it owns the run's lock):
the launcher replaces one function the script calls after start-up (`hook`) by a wrapper that
prints "started" and waits for a file to appear. The second contender, the test process itself
(one torch import less), then runs the same run name with other settings and must be refused
while the first holds the run; then the first is released and finishes normally. Nothing in the
scripts knows about this: the hook is set from outside.
"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAUNCHER = """
import os, sys, time
sys.path[:0] = [{root!r}, {tests!r}]
{prelude}
import {module} as script
from common import run_cli

real = script.{hook}


def held(*args, **kwargs):
    print("started", flush=True)
    while not os.path.exists({go!r}):
        time.sleep(0.05)
    return real(*args, **kwargs)


script.{hook} = held
run_cli(script.main, script.build_parser())
"""


def race(tmp_path, module, hook, first_argv, second):
    """Start `module` with first_argv and hold it inside its run; call `second()` meanwhile (in this
    process); then release the first. Returns (first returncode, first stderr, first pid, second())."""
    go = str(tmp_path / "go")
    launcher = tmp_path / f"launch_{module}.py"
    launcher.write_text(LAUNCHER.format(root=ROOT, tests=os.path.join(ROOT, "tests"), prelude=prelude_for(module),
                                        module=module, hook=hook, go=go))
    first = subprocess.Popen([sys.executable, str(launcher), *map(str, first_argv)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        if first.stdout.readline().strip() != "started":  # it failed before the hook: show why
            first.wait(timeout=60)
            raise AssertionError(f"first process did not start: {first.stderr.read()[-2000:]}")
        result = second()
    finally:
        open(go, "w").close()
    first.stdout.read()
    code = first.wait(timeout=120)
    return code, first.stderr.read(), first.pid, result


def prelude_for(module):
    """The CIFAR fixture's md5 sums differ from the real files' (see tests/cifar_fixture.py)."""
    if module == "cifar_sweep":
        return "from cifar_fixture import allow_fixture_checksums\nallow_fixture_checksums()"
    return ""
