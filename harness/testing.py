"""What the test files share (each names this module in `pytest_plugins`): where the test data is,
tiny data files, the JAX settings for tests, and checks that run in a subprocess of their own.

A test marked `@pytest.mark.subprocess(name, argv, env={...})` reads that command's result with
`subprocess_result(name)`. The commands run one at a time from the start of the session, in the
order of the tests, so these fresh processes use the second core while the in-process tests use the first;
the tests that read them run after all the others.
(PYTEST_DONT_REWRITE: no asserts here, and the test files import it before pytest loads it.)
"""
import os
import subprocess
import sys
import tempfile
import threading

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the real MNIST, when present; NOPROP_TEST_DATA=/nowhere runs the suite as a fresh clone would
DATA = os.environ.get("NOPROP_TEST_DATA", os.path.join(ROOT, "..", "shared", "data"))
needs_mnist = pytest.mark.skipif(not os.path.exists(os.path.join(DATA, "mnist.npz")), reason=f"{DATA}/mnist.npz not present")
FAST_COMPILE = "--xla_backend_optimization_level=0"  # for subprocess checks of meaning, not speed
TMP = "{tmp}"  # in a marker's argv: the session's folder for that command's files

# tiny training runs compile the same programs again; share them through jax's disk cache (the
# subprocess checks too: processes of one command, and the next session, find them there)
CACHE = os.path.join(tempfile.gettempdir(), "noprop-test-jax-cache")
jax.config.update("jax_compilation_cache_dir", CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
# the tests check meaning on tiny programs, where XLA's compile time dwarfs the run time
jax.config.update("jax_disable_most_optimizations", True)


def pytest_collection_modifyitems(items):
    """Tests that read a subprocess's result run last, in their order: the in-process tests fill the wait."""
    items.sort(key=lambda item: item.get_closest_marker("subprocess") is not None)  # a stable sort


def pytest_configure(config):
    config.addinivalue_line("markers", "subprocess(name, argv, env={}): `python argv` in a fresh process, started with "
                                       "the session; the test reads it by subprocess_result(name)")


def write_npz(path, **over):
    """A tiny MNIST-shaped dataset file (4 training, 2 test images); `over` replaces any of its arrays."""
    arrays = dict(x_train=np.zeros((4, 28, 28, 1), np.uint8), y_train=np.arange(4, dtype=np.uint8),
                  x_test=np.zeros((2, 28, 28, 1), np.uint8), y_test=np.arange(2, dtype=np.uint8))
    np.savez(path, **{**arrays, **over})


@pytest.fixture(scope="session", autouse=True)
def _subprocesses(request, tmp_path_factory):
    """The commands of the selected tests' `subprocess` markers (one per name), run one after another in
    the order the tests come, by a thread started with the session: one subprocess at a time beside the
    in-process tests keeps both cores busy without crowding them."""
    tmp, todo = str(tmp_path_factory.mktemp("subprocess")), {}
    for item in request.session.items:
        for mark in item.iter_markers("subprocess"):
            todo.setdefault(mark.args[0], ([a.replace(TMP, tmp) for a in mark.args[1]], mark.kwargs.get("env", {})))
    done, stop, procs = {name: threading.Event() for name in todo}, threading.Event(), {}

    def run_all():
        for name, (argv, env) in todo.items():
            if stop.is_set():  # the session ended early: start nothing more
                return
            logs = [open(os.path.join(tmp, f"{name}.{s}"), "w+") for s in ("out", "err")]
            procs[name] = (subprocess.Popen([sys.executable] + argv, stdout=logs[0], stderr=logs[1], cwd=ROOT, text=True,
                                            env={**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": CACHE, **env}), logs)
            procs[name][0].wait()
            done[name].set()

    threading.Thread(target=run_all, daemon=True).start()
    yield procs, done
    stop.set()
    for proc, logs in list(procs.values()):
        proc.kill()
        for f in logs:
            f.close()


@pytest.fixture
def subprocess_result(_subprocesses):
    """result(name): the finished command of the `subprocess` marker of that name, as a CompletedProcess."""
    procs, done = _subprocesses

    def result(name):
        done[name].wait(timeout=900)
        proc, logs = procs[name]
        out, err = (f.seek(0) or f.read() for f in logs)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    return result
