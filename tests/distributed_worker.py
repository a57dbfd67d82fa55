"""One process of the multi-process tests (tests/test_distributed.py runs several).

Usage: ``python tests/distributed_worker.py OUT_DIR RESULT_PREFIX [--resume]``; exits
with 3 if ``fit`` refuses the run folder (FileExistsError / FileNotFoundError).

The process joins the job through :func:`jaxmetric.distributed.initialize` with no
arguments, so the settings come from the ``JAXMETRIC_*`` environment variables (the
test sets them, and ``XLA_FLAGS`` for the number of simulated CPU devices). It trains
:func:`config` on :func:`dataset` with :func:`jaxmetric.train.fit` over the global mesh,
with :func:`embed_hook` as evaluation hook, and writes ``RESULT_PREFIX-<process>.npz``:
the final params and BatchNorm statistics, the step, the test-set embeddings, and the
test images embedded again by :class:`jaxmetric.search.Embedder` from the run folder,
each process decoding its share (:meth:`~jaxmetric.search.Embedder.embed_shared`).
``WORKER_HOOK_SLEEP`` (seconds) slows every epoch down (for the kill test).

The test imports this module for :func:`config`, :func:`dataset`, :func:`embed_hook`
and :func:`flat` so that its single-process reference trains exactly the same thing.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

NUM_CLASSES = 4
EPOCHS = 3


def config(out_dir):
    from jaxmetric.train.config import TrainConfig

    return TrainConfig(model="homebrew", embed_dim=16, batch_size=16, epochs=EPOCHS,
                       warmup_epochs=0.5, lr=0.1, log_every=1, eval_every=1,
                       loss="triplet", mining="semihard", out=str(out_dir))


def dataset(n=32):
    """Noise images with arbitrary labels: the loss stays active for the whole run.

    Normalised with CIFAR-10's statistics, as the test's tolerances were set with them
    (with the noise's own statistics a few parameters of the 2-process run end up to
    2e-5 away from the 1-process ones, just past them)."""
    from jaxmetric.data import CIFAR10_MEAN, CIFAR10_STD, Dataset, Split

    def noise(n, seed):
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        return images, rng.permutation(np.arange(n, dtype=np.int32) % NUM_CLASSES)

    return Dataset(Split(*noise(n, 0)), Split(*noise(12, 1)),
                   tuple(f"c{i}" for i in range(NUM_CLASSES)), mean=CIFAR10_MEAN, std=CIFAR10_STD)


def embed_hook(data, sleep=0.0):
    """Eval hook: embeds the test split over the whole mesh (a collective)."""
    from jaxmetric import train

    def hook(state, epoch):
        emb = train.make_embed_fn(state)(data.test.images)
        if sleep:
            time.sleep(sleep)
        return {"emb_sum": float(np.abs(emb).sum()), "emb_rows": int(len(emb))}

    return hook


def flat(tree) -> dict[str, np.ndarray]:
    import jax

    from jaxmetric import distributed

    leaves = jax.tree_util.tree_flatten_with_path(distributed.to_host(tree))[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def png_items(images):
    """The images as in-memory PNG files (:class:`jaxmetric.search.sources.ImageItem`)."""
    import io

    from PIL import Image

    from jaxmetric.search.sources import ImageItem

    items = []
    for k, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        items.append(ImageItem(f"test/{k:04d}.png", None, buffer.getvalue()))
    return items


def main(argv) -> int:
    out_dir, prefix = argv[0], argv[1]
    resume = "--resume" in argv[2:]
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a survivor aborts: no core file

    from jaxmetric import distributed

    assert distributed.initialize(), "expected a multi-process run from JAXMETRIC_* env"

    import jax

    from jaxmetric import train

    data = dataset()
    sleep = float(os.environ.get("WORKER_HOOK_SLEEP", "0"))
    try:
        state = train.fit(config(out_dir), data, out_dir, resume=resume, progress=False,
                          eval_hook=embed_hook(data, sleep))
    except (FileExistsError, FileNotFoundError) as e:  # as experiments/cifar10.py does
        print(f"error: {type(e).__name__}: {e}", flush=True)
        return 3
    emb = train.make_embed_fn(state)(data.test.images)
    from jaxmetric.search import Embedder

    shared = Embedder.from_run(out_dir, batch_size=8).embed_shared(png_items(data.test.images))
    result = {"params/" + k: v for k, v in flat(state.params).items()}
    result |= {"batch_stats/" + k: v for k, v in flat(state.batch_stats).items()}
    result |= {"step": np.asarray(distributed.to_host(state.step)), "embeddings": emb,
               "search_embeddings": shared.embeddings,
               "process_count": np.int32(jax.process_count()),
               "local_devices": np.int32(jax.local_device_count()),
               "mesh_size": np.int32(train.make_mesh().size)}
    if distributed.is_primary():
        time.sleep(1.0)  # process 0 alone still busy (a report): the others must wait
    np.savez(f"{prefix}-{jax.process_index()}.npz", **result)
    distributed.barrier("worker done", timeout_s=60)
    print(f"process {jax.process_index()}: done at step {int(result['step'])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
