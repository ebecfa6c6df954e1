"""Shared test set-up: 8 fake CPU devices for sharding tests, and the real data under ../shared/data."""

import os
import pathlib

# Must be set before jax is first imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def shared_data_dir() -> pathlib.Path:
    """The real data sets: $BERTJAX_SHARED_DATA, else ../shared/data beside the clone."""
    return pathlib.Path(os.environ.get("BERTJAX_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real data sets not found at {path} (set BERTJAX_SHARED_DATA); CI always has them")
    return path


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """A module whose runs share a program (a resumed run, another mesh) compiles it once."""
    import jax

    previous = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield
    jax.config.update("jax_compilation_cache_dir", previous[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])
