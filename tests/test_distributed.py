"""Multi-process training on one machine: 2 processes x 4 simulated CPU devices.

Each process runs ``tests/distributed_worker.py`` (gloo collectives over 127.0.0.1, a
free port picked at run time, settings in ``JAXMETRIC_*`` environment variables) and
must train exactly what 1 process x 8 devices (this pytest process, conftest.py) trains
on the same global batches. A second job loses process 1 to SIGKILL after its first
checkpoint: process 0 must die of JAX's heartbeat timeout (5 s here) instead of hanging,
and a relaunch with ``--resume`` must finish with the uninterrupted job's params.

Every child has a timeout and is killed in ``finally``: a hang fails a test, never CI.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from jaxmetric import distributed, train

import distributed_worker as worker

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_worker.py")
NUM_PROCESSES = 2
LOCAL_DEVICES = 4
HEARTBEAT_S = 5       # JAXMETRIC_HEARTBEAT_TIMEOUT of the children
JOB_TIMEOUT_S = 150   # a whole job (start-up, compilation, 3 epochs) on 2 shared cores
DEATH_BOUND_S = 45    # survivor must be gone this long after its peer was killed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """``NUM_PROCESSES`` worker processes; use as a context manager (kills leftovers)."""

    def __init__(self, tmp_path, name, out_dir, *args, env=None):
        """``out_dir``: the run folder, or a list of one per process."""
        out_dirs = out_dir if isinstance(out_dir, list) else [out_dir] * NUM_PROCESSES
        self.logs = [tmp_path / f"{name}-{i}.log" for i in range(NUM_PROCESSES)]
        self.prefix = str(tmp_path / name)
        base = {k: v for k, v in os.environ.items() if not k.startswith("JAXMETRIC_")}
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                       base.get("XLA_FLAGS", ""))
        base |= {
            "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={LOCAL_DEVICES}",
            "JAX_PLATFORMS": "cpu",
            "JAXMETRIC_COORDINATOR": f"127.0.0.1:{free_port()}",
            "JAXMETRIC_NUM_PROCESSES": str(NUM_PROCESSES),
            "JAXMETRIC_INIT_TIMEOUT": "60",
            "JAXMETRIC_HEARTBEAT_TIMEOUT": str(HEARTBEAT_S),
            "JAXMETRIC_SHUTDOWN_TIMEOUT": "10",
            "PYTHONUNBUFFERED": "1",
        } | (env or {})
        self.procs = []
        for i in range(NUM_PROCESSES):
            with open(self.logs[i], "w") as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, WORKER, str(out_dirs[i]), self.prefix, *args],
                    env=base | {"JAXMETRIC_PROCESS_ID": str(i)}, stdout=log,
                    stderr=subprocess.STDOUT))

    def log(self, i) -> str:
        text = self.logs[i].read_text(errors="replace")
        return "\n".join(line for line in text.splitlines() if not line.startswith("[Gloo]"))

    def wait(self, timeout) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for i, p in enumerate(self.procs):
            try:
                codes.append(p.wait(timeout=max(deadline - time.monotonic(), 0.1)))
            except subprocess.TimeoutExpired:
                pytest.fail(f"process {i} still running after {timeout} s:\n{self.log(i)[-3000:]}")
        return codes

    def result(self, i) -> dict[str, np.ndarray]:
        with np.load(f"{self.prefix}-{i}.npz") as f:
            return dict(f)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)


def records(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def assert_close(a: dict, b: dict, rtol, atol):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


def params_of(result):
    return {k: v for k, v in result.items() if k.startswith(("params/", "batch_stats/"))}


# ------------------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """1 process x 8 devices, in this process: (out_dir, params, embeddings)."""
    out_dir = tmp_path_factory.mktemp("reference") / "run"
    data = worker.dataset()
    mesh = Mesh(np.array(jax.devices()[:8]), ("batch",))
    state = train.fit(worker.config(out_dir), data, out_dir, mesh=mesh, progress=False,
                      eval_hook=worker.embed_hook(data))
    flat = {"params/" + k: v for k, v in worker.flat(state.params).items()}
    flat |= {"batch_stats/" + k: v for k, v in worker.flat(state.batch_stats).items()}
    return out_dir, flat, train.make_embed_fn(state)(data.test.images)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """An uninterrupted 2-process x 4-device job: (out_dir, [result of each process])."""
    tmp = tmp_path_factory.mktemp("two_processes")
    out_dir = tmp / "run"
    with Job(tmp, "job", out_dir) as job:
        codes = job.wait(JOB_TIMEOUT_S)
        assert codes == [0, 0], "\n\n".join(job.log(i)[-3000:] for i in range(NUM_PROCESSES))
        return out_dir, [job.result(i) for i in range(NUM_PROCESSES)]


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_eight_devices(reference, two_processes):
    ref_dir, ref_params, ref_emb = reference
    out_dir, results = two_processes
    for r in results:
        assert (int(r["process_count"]), int(r["local_devices"]), int(r["mesh_size"])) == (
            NUM_PROCESSES, LOCAL_DEVICES, NUM_PROCESSES * LOCAL_DEVICES)
        assert int(r["step"]) == worker.EPOCHS * 2
    # Replicated state: both processes hold the same params and get the same embeddings.
    assert_close(params_of(results[0]), params_of(results[1]), rtol=0, atol=0)
    np.testing.assert_array_equal(results[0]["embeddings"], results[1]["embeddings"])
    # ... which are those of one process with 8 devices on the same global batches, up to
    # the order of the sums: across processes the all-reduce adds the devices' partial sums
    # in another order than within one, and on some CPUs (other vector widths) that
    # leaves parameters of size ~0.1 differing by up to ~6e-5 after six steps.
    assert_close(params_of(results[0]), ref_params, rtol=1e-3, atol=2e-4)
    assert results[0]["embeddings"].shape == ref_emb.shape == (12, 16)
    np.testing.assert_allclose(results[0]["embeddings"], ref_emb, rtol=1e-3, atol=2e-4)

    # metrics.jsonl: written once (by process 0), same losses and eval-hook embeddings.
    got, want = records(out_dir), records(ref_dir)
    assert [r["epoch"] for r in got] == [1, 2, 3]
    assert all(r["active_fraction"] > 0 for r in got)  # a real gradient all along
    for key in ("loss", "active_fraction", "mean_pos_distance", "mean_neg_distance", "lr",
                "emb_sum"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want],
                                   rtol=1e-4, atol=1e-6, err_msg=key)
    assert json.loads((out_dir / "config.json").read_text()) == worker.config(out_dir).to_dict()
    assert train.finalized_epochs(out_dir / "checkpoints") == [1, 2, 3]


@pytest.mark.slow
def test_two_processes_embed_a_gallery_like_one(two_processes):
    """Embedder.embed_shared: each process decodes and embeds its share of the stream;
    every process ends with all the embeddings, in order, equal to one process's."""
    from jaxmetric.search import Embedder

    out_dir, results = two_processes
    np.testing.assert_array_equal(results[0]["search_embeddings"],
                                  results[1]["search_embeddings"])
    one = Embedder.from_run(out_dir, batch_size=8).embed_items(
        worker.png_items(worker.dataset().test.images), progress=False)
    assert one.embeddings.shape == results[0]["search_embeddings"].shape == (12, 16)
    np.testing.assert_allclose(results[0]["search_embeddings"], one.embeddings,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_multi_process_checkpoint_restores_on_one_process(two_processes):
    out_dir, results = two_processes
    _, state, epoch = train.restore_state(out_dir, mesh=Mesh(np.array(jax.devices()[:8]),
                                                             ("batch",)))
    assert epoch == worker.EPOCHS
    assert_close({"params/" + k: v for k, v in worker.flat(state.params).items()},
                 {k: v for k, v in results[0].items() if k.startswith("params/")},
                 rtol=0, atol=0)


@pytest.mark.slow
def test_killed_process_fails_fast_and_job_resumes(two_processes, tmp_path):
    ref_dir, ref_results = two_processes
    out_dir = tmp_path / "run"
    ckpt_dir = out_dir / "checkpoints"
    # Each epoch's hook sleeps, so the job is still running when checkpoint 1 appears.
    with Job(tmp_path, "killed", out_dir, env={"WORKER_HOOK_SLEEP": "1.5"}) as job:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not train.finalized_epochs(ckpt_dir):
            assert time.monotonic() < deadline, job.log(0)[-3000:]
            assert all(p.poll() is None for p in job.procs), job.log(0)[-3000:]
            time.sleep(0.05)
        job.procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        try:
            code = job.procs[0].wait(timeout=DEATH_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process 0 still running {DEATH_BOUND_S} s after process 1 died "
                        f"(heartbeat timeout {HEARTBEAT_S} s):\n{job.log(0)[-3000:]}")
        waited = time.monotonic() - killed
        log0 = job.log(0)
    print(f"survivor exited with {code} {waited:.1f} s after its peer was killed")
    assert code != 0, log0[-3000:]
    # JAX's coordination service noticed the missing heartbeats and terminated it ...
    assert "JAX distributed service detected fatal errors" in log0, log0[-3000:]
    assert "heartbeat" in log0, log0[-3000:]
    # ... and faulthandler (enabled by distributed.initialize) shows where it was stuck.
    # (Either a gloo collective failed at once with "Connection reset by peer" and the
    # exit then waited at JAX's shutdown barrier, or the process sat in a collective;
    # both end when the heartbeat times out.)
    assert "Fatal Python error: Aborted" in log0 and "in fit" in log0, log0[-3000:]

    # The last complete checkpoint survives (and no later one claims to exist).
    done = train.finalized_epochs(ckpt_dir)
    assert done and done[-1] < worker.EPOCHS, done
    _, _, epoch = train.restore_state(out_dir, mesh=Mesh(np.array(jax.devices()[:8]),
                                                         ("batch",)))
    assert epoch == done[-1]
    before = records(out_dir)

    # Relaunch both processes with resume: the job ends where the uninterrupted one did.
    with Job(tmp_path, "resumed", out_dir, "--resume") as job:
        codes = job.wait(JOB_TIMEOUT_S)
        assert codes == [0, 0], "\n\n".join(job.log(i)[-3000:] for i in range(NUM_PROCESSES))
        resumed = [job.result(i) for i in range(NUM_PROCESSES)]
    for r in resumed:
        assert int(r["step"]) == worker.EPOCHS * 2
        assert_close(params_of(r), params_of(ref_results[0]), rtol=0, atol=1e-6)
    got, want = records(out_dir), records(ref_dir)
    assert [r["epoch"] for r in got] == [1, 2, 3]
    assert got[:done[-1]] == before[:done[-1]]  # epochs up to the checkpoint: not re-run
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-6)
    assert train.finalized_epochs(ckpt_dir)[-1] == worker.EPOCHS


@pytest.mark.slow
def test_run_folder_not_shared_fails_on_every_process(tmp_path):
    """Per-host run folders (no shared file system): a clear error everywhere, no hang."""
    with Job(tmp_path, "unshared", [tmp_path / "host0" / "run", tmp_path / "host1" / "run"]
             ) as job:
        codes = job.wait(JOB_TIMEOUT_S)
        logs = [job.log(i) for i in range(NUM_PROCESSES)]
    assert codes == [3, 3], "\n\n".join(log[-3000:] for log in logs)
    assert "FileNotFoundError" in logs[1] and "file system shared by every process" in logs[1]
    assert "FileNotFoundError: process 1 failed a start-up check" in logs[0]


# -------------------------------------------------------------------- initialize API


@pytest.fixture
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("JAXMETRIC_", "SLURM_", "OMPI_")):
            monkeypatch.delenv(k)
    return monkeypatch


def test_initialize_without_settings_is_single_process(clean_env):
    assert distributed.initialize() is False
    assert distributed.initialize(num_processes=1, process_id=0) is False
    assert not jax.distributed.is_initialized()
    assert distributed.is_primary() and not distributed.is_multiprocess()
    distributed.barrier("no-op alone", timeout_s=1)


@pytest.mark.parametrize("args,env,match", [
    (("127.0.0.1:1234", None, None), {}, "--num-processes / \\$JAXMETRIC_NUM_PROCESSES, "
                                         "--process-id / \\$JAXMETRIC_PROCESS_ID"),
    ((None, 2, 0), {}, "--coordinator / \\$JAXMETRIC_COORDINATOR"),
    (("127.0.0.1:1234", 2, 2), {}, "process_id 2 must be < num_processes 2"),
    (("127.0.0.1", 2, 0), {}, "HOST:PORT"),
    ((None, None, None), {"JAXMETRIC_NUM_PROCESSES": "two"}, "JAXMETRIC_NUM_PROCESSES"),
    ((None, None, None), {"JAXMETRIC_COORDINATOR": "h:1", "JAXMETRIC_NUM_PROCESSES": "2",
                          "JAXMETRIC_PROCESS_ID": "-1"}, "process_id must be"),
    (("127.0.0.1:1234", 0, 0), {}, "num_processes must be"),
])
def test_initialize_rejects_bad_settings(clean_env, args, env, match):
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        distributed.initialize(*args)
    assert not jax.distributed.is_initialized()


def test_cluster_detection_needs_more_than_one_process(clean_env):
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node1", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0"}
    for k, v in slurm.items():
        clean_env.setenv(k, v)
    clean_env.setenv("SLURM_NTASKS", "1")
    assert distributed._detected_cluster() is None  # one task: leave the run alone
    assert distributed.initialize() is False
    clean_env.setenv("SLURM_NTASKS", "2")
    assert distributed._detected_cluster() == "slurm"
    clean_env.setenv("JAXMETRIC_CLUSTER_DETECTION", "off")
    assert distributed._detected_cluster() is None


def test_importing_the_package_leaves_the_backend_alone():
    """initialize() must come before any JAX backend use: imports must not start one."""
    code = ("import jaxmetric.distributed, jaxmetric.train\n"
            "from jax._src import xla_bridge\n"
            "raise SystemExit(int(xla_bridge.backends_are_initialized()))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=os.environ | {"JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, (
        "importing jaxmetric initialises the JAX backend (a jnp array created at import "
        "time?), so jax.distributed.initialize() can no longer run:\n" + proc.stderr[-2000:])
