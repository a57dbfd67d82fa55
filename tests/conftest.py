"""Shared test setup.

Every test process sees 8 simulated CPU devices so that the data-parallel tests
(pmap / shard_map over a named axis) run on a laptop or a CI machine without a GPU.
The flag must be set before JAX initialises its backends, hence here, at import.

Compiled programs go to JAX's persistent compilation cache, in ``.cache/jax-tests``
beside the sources (git-ignored; at most 2 GB, least recently used entries dropped): the
tests, and the processes they start (command lines, multi-process runs, benchmarks),
compile the same small programs again and again, and on a CPU compiling is most of
their time. The cache is keyed by the program, the devices, the XLA flags and the JAX
version, so a hit is the program that would have been compiled.
``JAX_COMPILATION_CACHE_DIR=`` (empty) runs without it.
"""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(pathlib.Path(__file__).resolve().parents[1] / ".cache" / "jax-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
try:
    import filelock  # noqa: F401  (JAX bounds the cache's size only with it)
except ImportError:
    pass
else:
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 * 10**9))

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CIFAR_ENV = "JAXMETRIC_CIFAR10"


def find_cifar_tarball():
    """Path of the CIFAR-10 JPEG tarball, or None.

    Looked up in $JAXMETRIC_CIFAR10, then ``../shared/data/cifar10-jpeg.tar.xz`` beside
    the repository (where CI and the developers' machines keep it).
    """
    env = os.environ.get(CIFAR_ENV)
    candidates = [pathlib.Path(env)] if env else []
    candidates.append(REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.xz")
    for path in candidates:
        if path.is_file():
            return path
    return None


@pytest.fixture(scope="session")
def cifar_tarball():
    path = find_cifar_tarball()
    if path is None:
        pytest.skip(
            f"real CIFAR-10 not found: set ${CIFAR_ENV} to cifar10-jpeg.tar.xz "
            "or place it at ../shared/data/ beside the repository"
        )
    return path
