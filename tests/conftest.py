"""Shared test setup.

Every test process sees 8 simulated CPU devices so that the data-parallel tests
(pmap / shard_map over a named axis) run on a laptop or a CI machine without a GPU.
The flag must be set before JAX initialises its backends, hence here, at import.
"""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

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
