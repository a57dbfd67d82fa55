"""Multi-process (multi-host) set-up: :func:`initialize` and small helpers.

One process per host (or several per host), each driving its local devices; together
they form one global device mesh over ``jax.devices()``. Call :func:`initialize` first
thing, before any other JAX call::

    from jaxmetric import distributed
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)

**Where the settings come from.** Each of ``coordinator_address`` (``"host:port"`` of
process 0), ``num_processes`` and ``process_id`` is taken from the argument, else from
the environment variables ``JAXMETRIC_COORDINATOR``, ``JAXMETRIC_NUM_PROCESSES`` and
``JAXMETRIC_PROCESS_ID``. If none of them is given:

* inside a multi-process cluster job that JAX recognises by itself (SLURM ``srun``
  steps, Open MPI ``mpirun``, Cloud TPU pods, Kubernetes JobSets: the cluster
  environments ``jax.distributed.initialize()`` auto-detects) and only when that
  environment reports **more than one** process, ``jax.distributed.initialize()`` is
  called without arguments and JAX fills everything in. A single-task allocation is
  left alone, so a one-process run inside ``sbatch``/``salloc`` keeps seeing all its
  GPUs (JAX's SLURM detection would otherwise restrict it to one). Set
  ``JAXMETRIC_CLUSTER_DETECTION=off`` to switch this detection off;
* otherwise nothing happens: a plain single-process run.

``num_processes=1`` is also a single-process run (no coordination service is started).

**CPU.** Cross-process collectives on CPU go through gloo over TCP
(``jax_cpu_collectives_implementation="gloo"``, set here before initialising unless
``JAX_CPU_COLLECTIVES_IMPLEMENTATION`` says otherwise), which is how the tests run 2
processes x 4 simulated CPU devices on one machine.

**Failures** (measured with jax 0.10.2 on CPU, ``tests/test_distributed.py``). JAX's
coordination service, run by process 0, expects heartbeats from every process. When a
process dies (crash, SIGKILL, OOM killer, lost host), each survivor either gets an
error from a collective at once (gloo: ``Connection reset by peer``, raised in Python)
and then waits in JAX's shutdown barrier, or stays blocked in the collective (which has
no timeout of its own); either way, ``heartbeat_timeout_s`` after the death the
service declares the process dead and JAX *terminates* every survivor: SIGABRT (exit
status 134 / -6) with ``Terminating process because the JAX distributed service
detected fatal errors ... heartbeat`` on stderr, and, since :func:`initialize` enables
:mod:`faulthandler`, the Python stack it was waiting in. If process 0 (the
coordinator) dies, the others lose the service and are terminated within about a
second. A process that raises and exits while the others carry on waits up to
``shutdown_timeout_s`` in the shutdown barrier, then all are terminated the same way.
So after a failure every process is gone within about ``max(heartbeat_timeout_s,
shutdown_timeout_s)``, and the job can be relaunched with ``--resume`` from the last
complete checkpoint. (A process that hangs *alive*, e.g. on a stuck file system, still
sends heartbeats and is not detected.) The bounds come from the arguments, else
``JAXMETRIC_HEARTBEAT_TIMEOUT`` / ``JAXMETRIC_SHUTDOWN_TIMEOUT`` (seconds), else
:data:`DEFAULT_HEARTBEAT_TIMEOUT_S` / :data:`DEFAULT_SHUTDOWN_TIMEOUT_S` (JAX's
defaults, 100 s and 300 s). ``timeout_s`` (``JAXMETRIC_INIT_TIMEOUT``) bounds how long
:func:`initialize` waits for all processes to connect.

The shutdown barrier has a flip side: if process 0 works alone at the end (metrics, a
report) for longer than ``shutdown_timeout_s`` while the others have already exited,
JAX terminates process 0 too. End such programs with :func:`barrier` on every process.

**Every cross-process call of the package lives here**, so the rest reads as
single-process code with a few named agreement points: :func:`put` (host values to a
global array), :func:`agree` (one verdict of a start-up check on every process),
:func:`check_same_data`, :func:`check_same_value`, :func:`check_mesh_spans_processes`,
:func:`broadcast_from_primary`, :func:`to_host` and :func:`barrier`. Each is a no-op (or
plain single-process JAX) in a single-process run.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence

from jaxmetric.utils import check_positive_int

__all__ = [
    "AGREED_ERRORS",
    "DEFAULT_BARRIER_TIMEOUT_S",
    "DEFAULT_HEARTBEAT_TIMEOUT_S",
    "DEFAULT_INIT_TIMEOUT_S",
    "DEFAULT_SHUTDOWN_TIMEOUT_S",
    "ENV_COORDINATOR",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "agree",
    "broadcast_from_primary",
    "check_mesh_spans_processes",
    "check_same_data",
    "check_same_value",
    "initialize",
    "is_multiprocess",
    "is_primary",
    "process_count",
    "process_index",
    "barrier",
    "put",
    "to_host",
]

log = logging.getLogger(__name__)

ENV_COORDINATOR = "JAXMETRIC_COORDINATOR"
ENV_NUM_PROCESSES = "JAXMETRIC_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXMETRIC_PROCESS_ID"
ENV_INIT_TIMEOUT = "JAXMETRIC_INIT_TIMEOUT"
ENV_HEARTBEAT_TIMEOUT = "JAXMETRIC_HEARTBEAT_TIMEOUT"
ENV_SHUTDOWN_TIMEOUT = "JAXMETRIC_SHUTDOWN_TIMEOUT"
ENV_CLUSTER_DETECTION = "JAXMETRIC_CLUSTER_DETECTION"

DEFAULT_INIT_TIMEOUT_S = 300
"""Seconds :func:`initialize` waits for every process to connect (JAX's default)."""
DEFAULT_HEARTBEAT_TIMEOUT_S = 100
"""Seconds without a heartbeat after which a process counts as dead (JAX's default)."""
DEFAULT_SHUTDOWN_TIMEOUT_S = 300
"""Seconds an exiting process waits at the shutdown barrier for the others (JAX's)."""
DEFAULT_BARRIER_TIMEOUT_S = 3600
"""Seconds :func:`barrier` waits for the other processes."""


def _from_env(value, env: str, convert, what: str):
    if value is not None:
        return value
    raw = os.environ.get(env, "").strip()
    if not raw:
        return None
    try:
        return convert(raw)
    except ValueError:
        raise ValueError(f"${env}={raw!r} is not a valid {what}") from None


def _detected_cluster() -> str | None:
    """Name of a JAX-recognised cluster environment with more than one process, or None.

    Uses the cluster classes behind ``jax.distributed.initialize()``'s own
    auto-detection (a private JAX module: any failure means "no cluster").
    """
    if os.environ.get(ENV_CLUSTER_DETECTION, "").strip().lower() in ("off", "0", "false", "no"):
        return None
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:  # pragma: no cover - moved in a future JAX
        return None
    for env in ClusterEnv._cluster_types:
        if getattr(env, "opt_in_only_method", False):  # e.g. mpi4py: only on request
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # k8s: "kubernetes package missing"
                if env.is_env_present() and int(env.get_process_count()) > 1:
                    return getattr(env, "name", "") or env.__name__
        except Exception:  # noqa: BLE001 - a half-configured environment is "no cluster"
            continue
    return None


def _use_gloo_on_cpu() -> None:
    import jax

    if os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        return  # the user chose (e.g. mpi)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *,
               local_device_ids: int | Sequence[int] | None = None,
               timeout_s: int | None = None, heartbeat_timeout_s: int | None = None,
               shutdown_timeout_s: int | None = None) -> bool:
    """Join (or start) a multi-process JAX job; do nothing for a single process.

    Must be called before any other JAX call (``jax.devices()``, computations, ...).

    Args:
      coordinator_address: ``"host:port"`` where process 0 runs the coordination
        service; every process passes the same value (else ``$JAXMETRIC_COORDINATOR``).
      num_processes: total number of processes (else ``$JAXMETRIC_NUM_PROCESSES``).
      process_id: this process, ``0 <= process_id < num_processes`` (else
        ``$JAXMETRIC_PROCESS_ID``).
      local_device_ids: restrict this process to these local accelerators (e.g. one GPU
        per process); default: all local devices.
      timeout_s: how long to wait for all processes to connect.
      heartbeat_timeout_s: a process silent this long is declared dead and the others
        are terminated (see the module docstring).
      shutdown_timeout_s: how long an exiting process waits for the others.

    Returns:
      True when running as one of several processes (``jax.process_count() > 1`` is
      then true), False for a single-process run.

    Raises:
      ValueError: inconsistent or incomplete settings (e.g. a coordinator without a
        process id outside a recognised cluster).
    """
    import jax

    coordinator_address = _from_env(coordinator_address, ENV_COORDINATOR, str, "host:port")
    num_processes = _from_env(num_processes, ENV_NUM_PROCESSES, int, "process count")
    process_id = _from_env(process_id, ENV_PROCESS_ID, int, "process id")
    timeout_s = check_positive_int("timeout_s", _from_env(
        timeout_s, ENV_INIT_TIMEOUT, int, "timeout (s)") or DEFAULT_INIT_TIMEOUT_S)
    heartbeat_timeout_s = check_positive_int("heartbeat_timeout_s", _from_env(
        heartbeat_timeout_s, ENV_HEARTBEAT_TIMEOUT, int, "timeout (s)")
        or DEFAULT_HEARTBEAT_TIMEOUT_S)
    shutdown_timeout_s = check_positive_int("shutdown_timeout_s", _from_env(
        shutdown_timeout_s, ENV_SHUTDOWN_TIMEOUT, int, "timeout (s)")
        or DEFAULT_SHUTDOWN_TIMEOUT_S)

    if jax.distributed.is_initialized():
        if num_processes is not None and num_processes != jax.process_count():
            raise ValueError(f"jax.distributed is already initialised with "
                             f"{jax.process_count()} processes, not {num_processes}")
        return jax.process_count() > 1

    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    kwargs = dict(local_device_ids=local_device_ids, initialization_timeout=timeout_s,
                  heartbeat_timeout_seconds=heartbeat_timeout_s,
                  shutdown_timeout_seconds=shutdown_timeout_s)
    if all(v is None for v in given.values()):
        cluster = _detected_cluster()
        if cluster is None:
            return False
        log.info("multi-process cluster environment detected (%s): "
                 "jax.distributed.initialize() with auto-detected settings", cluster)
        _use_gloo_on_cpu()
        jax.distributed.initialize(**kwargs)
        _show_python_stack_on_abort()
        return jax.process_count() > 1

    if num_processes is not None:
        check_positive_int("num_processes", num_processes)
    if process_id is not None and (isinstance(process_id, bool)
                                   or not isinstance(process_id, int) or process_id < 0):
        raise ValueError(f"process_id must be an int >= 0; got {process_id!r}")
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise ValueError(f"process_id {process_id} must be < num_processes {num_processes}")
    if num_processes == 1:
        return False  # one process: nothing to coordinate
    if coordinator_address is not None:
        host, _, port = coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"coordinator address must be HOST:PORT; got {coordinator_address!r}")
    missing = [k for k, v in given.items() if v is None]
    if missing and _detected_cluster() is None:
        names = {"coordinator_address": f"--coordinator / ${ENV_COORDINATOR}",
                 "num_processes": f"--num-processes / ${ENV_NUM_PROCESSES}",
                 "process_id": f"--process-id / ${ENV_PROCESS_ID}"}
        raise ValueError("multi-process run is missing " + ", ".join(names[k] for k in missing)
                         + " (all three are needed outside a recognised cluster job)")
    _use_gloo_on_cpu()
    log.info("joining %s processes via %s as process %s (heartbeat timeout %ds)",
             num_processes, coordinator_address, process_id, heartbeat_timeout_s)
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)
    _show_python_stack_on_abort()
    return jax.process_count() > 1


def _show_python_stack_on_abort() -> None:
    """When JAX terminates this process (a peer died), print where Python was."""
    import faulthandler
    import sys

    if not faulthandler.is_enabled() and sys.stderr is not None:
        try:
            faulthandler.enable()
        except (OSError, ValueError, AttributeError):  # stderr without a file descriptor
            pass


def process_count() -> int:
    """Number of processes of the job (1 without :func:`initialize`)."""
    import jax

    return jax.process_count()


def process_index() -> int:
    """This process's index, 0 for the primary."""
    import jax

    return jax.process_index()


def is_multiprocess() -> bool:
    return process_count() > 1


def is_primary() -> bool:
    """True on process 0: the one that writes logs, metrics and reports."""
    return process_index() == 0


def barrier(name: str, *, timeout_s: float | None = None) -> None:
    """Returns once every process has called ``barrier(name)``; no-op for one process.

    Waits on JAX's coordination service (no device work, so a long wait is fine) for up
    to ``timeout_s`` (default :data:`DEFAULT_BARRIER_TIMEOUT_S`), then raises
    ``jax.errors.JaxRuntimeError`` (DEADLINE_EXCEEDED). The same name may be used again.

    Use it before a program's end when process 0 still has work to do alone (writing a
    report): a process that exits waits at most ``shutdown_timeout_s`` at JAX's own
    shutdown barrier, after which JAX terminates *every* process, process 0 included.
    """
    if not is_multiprocess():
        return
    timeout_s = DEFAULT_BARRIER_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        from jax._src.distributed import global_state

        client = global_state.client
    except ImportError:  # pragma: no cover - private JAX module moved
        client = None
    if client is not None and hasattr(client, "wait_at_barrier"):
        client.wait_at_barrier(f"jaxmetric:{name}", int(timeout_s * 1000))
    else:  # pragma: no cover - a device all-reduce as a barrier (no timeout of its own)
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def to_host(tree):
    """numpy copy of a pytree of jax arrays, on every process.

    Works for arrays that span several processes: a replicated one is read from a local
    copy; a sharded one is all-gathered (``process_allgather``), which is a collective,
    so then every process must call this at the same point.
    """
    import jax
    import numpy as np

    def local(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                return x.addressable_data(0)
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return x

    return jax.device_get(jax.tree.map(local, tree))


# ----------------------------------------------------------------- agreement points

AGREED_ERRORS = (FileExistsError, FileNotFoundError, ValueError, RuntimeError)
"""The error types :func:`agree` reproduces on the other processes (others: the last)."""


def agree(error: BaseException | None) -> None:
    """Raise ``error`` here and an error of the same type on every other process.

    Checks that may fail on one process only (a file system not shared by all of them)
    must fail everywhere, or the others would wait in the next collective until JAX's
    timeouts kill them. A collective itself: every process must call it (with None when
    its own check passed), so ``agree(None)`` on every process is also a barrier. In a
    single-process run it just raises ``error`` if there is one.
    """
    import jax
    import numpy as np

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        code = 0
        if error is not None:
            code = 1 + next((i for i, t in enumerate(AGREED_ERRORS) if isinstance(error, t)),
                            len(AGREED_ERRORS) - 1)
        codes = np.asarray(multihost_utils.process_allgather(np.int32(code)))
        if error is None and codes.any():
            first = int(np.flatnonzero(codes)[0])
            raise AGREED_ERRORS[codes[first] - 1](
                f"process {first} failed a start-up check (see its error message); "
                f"failed processes: {np.flatnonzero(codes).tolist()}")
    if error is not None:
        raise error


def check_same_data(images, labels) -> None:
    """Every process must hold the same training set, in the same order (a collective).

    Compares the size and the crc32 of the labels and of the images of every process;
    raises ``ValueError`` on all of them when they differ. No-op for one process.
    """
    import jax

    if jax.process_count() == 1:
        return
    import zlib

    import numpy as np
    from jax.experimental import multihost_utils

    digest = np.array([len(labels) % 2**32, zlib.crc32(np.ascontiguousarray(labels)),
                       zlib.crc32(np.ascontiguousarray(images))], np.uint32)
    digests = np.asarray(multihost_utils.process_allgather(digest))
    if not (digests == digests[:1]).all():
        raise ValueError(
            "the training set differs between processes (size, crc32 of labels, crc32 of "
            f"images per process: {digests.tolist()}): every process must load the same "
            "data in the same order")


def check_same_value(value: int, what: str) -> None:
    """Raise ``RuntimeError`` on every process unless all passed the same int (a collective).

    ``what`` names the value in the message, e.g. ``"latest checkpoints in DIR (it must
    be on a shared file system)"``. No-op for one process.
    """
    import jax

    if jax.process_count() == 1:
        return
    import numpy as np
    from jax.experimental import multihost_utils

    seen = np.asarray(multihost_utils.process_allgather(np.int32(value)))
    if (seen != seen[0]).any():
        raise RuntimeError(f"processes see different {what}: {seen.tolist()}")


def check_mesh_spans_processes(mesh) -> None:
    """Raise ``ValueError`` if a multi-process run's ``mesh`` leaves out some process."""
    import jax

    if jax.process_count() > 1 and {d.process_index for d in mesh.devices.flat} != set(
            range(jax.process_count())):
        raise ValueError(f"in a {jax.process_count()}-process run the mesh must hold devices "
                         "of every process: use make_mesh(jax.devices())")


def broadcast_from_primary(tree):
    """Process 0's value of ``tree`` on every process (a collective); as is for one.

    E.g. a state initialised from the same seed everywhere: process 0's values win, so
    the replicas are bit-identical even if hosts' CPUs round differently; or a metric
    computed on process 0 alone.
    """
    import jax

    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return multihost_utils.broadcast_one_to_all(tree)


def put(tree, sharding):
    """``jax.device_put`` that also works when ``sharding`` spans several processes.

    Every process passes the same global host value; each one puts only the slices that
    belong to its own devices (``jax.make_array_from_callback``), so nothing crosses
    processes here and the result is a valid global ``jax.Array``. Arrays that already
    span processes are resharded by ``jax.device_put``. On a single-process mesh this is
    plain ``jax.device_put``.
    """
    import jax
    import numpy as np

    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree)
