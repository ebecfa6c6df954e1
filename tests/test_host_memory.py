"""bertjax.host_memory: after keep(), a compiled program's temporaries are reused, not faulted in again;
release_if_tight() undoes it."""

import os
import subprocess
import sys
import textwrap

import pytest

from bertjax import cli, host_memory
from tests.conftest import REPO_ROOT

# A jitted call whose 256 MB temporary (the [8192, 8192] product) XLA:CPU allocates and frees on every call.
# Printed: whether keep() applied (None when not called) and the minor page faults of the third call.
PROBE = textwrap.dedent(
    """
    import resource, sys
    from bertjax import host_memory
    applied = host_memory.keep() if sys.argv[1] in ("keep", "release") else None
    import jax, jax.numpy as jnp
    f = jax.jit(lambda a: (a @ a.T).max())
    a = jnp.ones((8192, 8))
    for _ in range(2):
        f(a).block_until_ready()
    if sys.argv[1] == "release":
        assert not host_memory.release_if_tight(fraction=1.0)  # this process holds less than the whole machine
        applied = not host_memory.release_if_tight(fraction=0.0)  # ... and more than none of it
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(a).block_until_ready()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _faults_of_third_call(mode: str, **env) -> tuple[str, int]:
    environment = {key: value for key, value in os.environ.items() if key != host_memory.ENV} | env
    environment["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    run = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    applied, faults = run.stdout.split()[-2:]
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is what keep() sets; elsewhere it does nothing")
def test_keep_stops_each_call_faulting_its_temporaries_in_again():
    page = os.sysconf("SC_PAGE_SIZE")
    _, default = _faults_of_third_call("default")
    applied, kept = _faults_of_third_call("keep")
    applied_off, turned_off = _faults_of_third_call("keep", **{host_memory.ENV: "0"})
    # 256 MB of fresh pages without keep(); with it the call reuses the memory the last call freed.
    assert default >= 0.9 * 256 * 2**20 / page, default
    assert applied == "True" and kept < 0.05 * default, (applied, kept, default)
    # BERTJAX_KEEP_HOST_MEMORY=0 leaves glibc as it was.
    assert applied_off == "False" and turned_off >= 0.9 * default, (applied_off, turned_off)
    # release_if_tight (the trainers' guard after their first step) gives glibc its defaults back.
    still_kept, released = _faults_of_third_call("release")
    assert still_kept == "False" and released >= 0.9 * default, (still_kept, released)


def test_the_cli_keeps_host_memory_before_a_verb_runs(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "keep", lambda: calls.append("keep") or True)
    monkeypatch.setitem(cli.VERBS, "plot", lambda argv: calls.append("verb") or 0)
    assert cli.main(["plot", "anything"]) == 0
    assert calls == ["keep", "verb"]
