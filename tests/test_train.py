"""Training loop: data-parallel equivalence, resume, learning, config and run-folder checks.

Runs on the 8 simulated CPU devices of conftest.py with the small ``homebrew`` net and
tiny synthetic batches.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmetric import train
from jaxmetric.data import CIFAR10_MEAN, CIFAR10_STD, Dataset, Split
from jaxmetric.losses import registry
from jaxmetric.models import create_model
from jaxmetric.train import monitor
from jaxmetric.train.config import TrainConfig

NUM_CLASSES = 4
WIDTHS = (8, 16)  # homebrew widths for the step tests: fast to compile and run


def mesh_of(n):
    return Mesh(np.array(jax.devices()[:n]), ("batch",))


def synthetic(n, seed=0, noise=40):
    """Class c is a flat colour plus noise: separable, but not trivially so."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int32) % NUM_CLASSES
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])
    images = colours[labels][:, None, None, :] + rng.normal(0, noise, (n, 32, 32, 3))
    return np.clip(images, 0, 255).astype(np.uint8), labels


def random_batch(n, seed=0):
    """Noise images with arbitrary labels: every loss term is active at initialisation."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return images, rng.permutation(np.arange(n, dtype=np.int32) % NUM_CLASSES)


def tiny_dataset(n=64):
    images, labels = synthetic(n)
    test_images, test_labels = synthetic(16, seed=1)
    return Dataset(Split(images, labels), Split(test_images, test_labels),
                   tuple(f"c{i}" for i in range(NUM_CLASSES)))


def tiny_config(tmp_path, **kw):
    base = dict(model="homebrew", embed_dim=16, batch_size=16, epochs=2, warmup_epochs=0.5,
                lr=0.05, log_every=3, eval_every=1, out=str(tmp_path / "run"))
    return TrainConfig(**(base | kw))


INPUTS = train.InputSpec((32, 32, 3), CIFAR10_MEAN, CIFAR10_STD)


def fresh_state(config, bn_axis_name="batch", steps_per_epoch=4):
    model = create_model("homebrew", embed_dim=16, widths=WIDTHS, bn_axis_name=bn_axis_name)
    return train.create_train_state(jax.random.key(0), model, config, steps_per_epoch, INPUTS,
                                    num_classes=NUM_CLASSES)


def assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
    flat_a, tree_a = jax.tree.flatten(jax.device_get(a))
    flat_b, tree_b = jax.tree.flatten(jax.device_get(b))
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b, strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


# ------------------------------------------------------------------- data parallelism


@pytest.mark.parametrize("loss,extra", [
    ("contrastive", {}),
    ("triplet", {"mining": "semihard"}),
    ("contrastive", {"xbm_size": 24, "xbm_start_epochs": 0.0}),  # the memory's term too
    ("proxy_anchor", {"loss_lr_multiplier": 2.0}),  # learned proxies, their own optimizer
])
def test_eight_devices_equal_one_device(tmp_path, loss, extra):
    config = tiny_config(tmp_path, loss=loss, lr=0.5, warmup_epochs=0.0, **extra)
    loss_fn = train.make_loss_fn(config)
    images, labels = random_batch(16)
    key = jax.random.key(7)
    batches = [np.arange(16, dtype=np.int32), np.arange(16, dtype=np.int32)[::-1].copy()]

    # Reference: the pure step on one device, on the whole batch, no mapped axis.
    ref = fresh_state(config, bn_axis_name=None)
    ref_step = jax.jit(lambda s, b, r: train.train_step(s, b, r, loss_fn=loss_fn))
    ref_metrics = []
    for idx in batches:
        ref, m = ref_step(ref, {"images": images[idx], "labels": labels[idx]},
                          jax.random.fold_in(key, ref.step))
        ref_metrics.append(m)
        assert m["loss"] > 0 and m["active_fraction"] > 0  # a real gradient to compare

    for n in (1, 8):
        mesh = mesh_of(n)
        replicated = NamedSharding(mesh, P())
        state = jax.device_put(fresh_state(config), replicated)
        step = train.make_train_step(loss_fn, mesh)
        data = jax.device_put((images, labels), replicated)
        for idx, ref_m in zip(batches, ref_metrics, strict=True):
            state, m = step(state, *data, jax.device_put(idx, NamedSharding(mesh, P("batch"))),
                            key)
            assert_trees_close(m, ref_m)
        assert_trees_close(state.params, ref.params)
        assert_trees_close(state.batch_stats, ref.batch_stats)
        assert_trees_close(state.opt_state, ref.opt_state)
        # The proxies step at lr 0.5 x 2: a float32 sum over 8 devices in another order
        # moves them by a few 1e-6 (seen on some x86 CPUs), hence the wider atol here.
        assert_trees_close((state.memory, state.loss_params, state.loss_opt_state),
                           (ref.memory, ref.loss_params, ref.loss_opt_state), atol=1e-5)
    if "xbm_size" in extra:  # two batches of 16 went in; the 24 newest rows are kept
        assert int(ref.memory.valid.sum()) == 24 and int(ref.memory.next) == 32 % 24
    # The update is not a no-op: the params moved.
    assert not np.allclose(ref.params["head"]["Dense_0"]["kernel"],
                           fresh_state(config).params["head"]["Dense_0"]["kernel"])


def test_train_step_refuses_untyped_mapping(tmp_path):
    """Without check_vma the gradient cannot be summed right: a clear error, not a bug."""
    config = tiny_config(tmp_path)
    state = fresh_state(config)
    images, labels = synthetic(16)
    fn = jax.shard_map(
        lambda s, b: train.train_step(s, b, jax.random.key(0),
                                      loss_fn=train.make_loss_fn(config), axis_name="batch"),
        mesh=mesh_of(8), in_specs=(P(), P("batch")), out_specs=(P(), P()), check_vma=False)
    with pytest.raises(ValueError, match="check_vma=True"):
        fn(state, {"images": images, "labels": labels})


def test_loss_falls_on_separable_data(tmp_path):
    config = tiny_config(tmp_path, lr=0.1, warmup_epochs=0.0, epochs=3)
    images, labels = synthetic(64)
    mesh = mesh_of(2)
    replicated = NamedSharding(mesh, P())
    state = jax.device_put(fresh_state(config, steps_per_epoch=4), replicated)
    step = train.make_train_step(train.make_loss_fn(config), mesh)
    data = jax.device_put((images, labels), replicated)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(12):
        idx = rng.permutation(64)[:16].astype(np.int32)
        state, m = step(state, *data, jax.device_put(idx, NamedSharding(mesh, P("batch"))),
                        jax.random.key(1))
        losses.append(m)
    losses = [float(m["loss"]) for m in jax.device_get(losses)]
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses


# ----------------------------------------------------------------- fit, resume, folder


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A complete 2-epoch run on 2 devices: (config, out_dir, final state)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    config = tiny_config(tmp)
    state = train.fit(config, tiny_dataset(), tmp / "run", mesh=mesh_of(2), progress=False)
    return config, tmp / "run", state


def read_records(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_fit_writes_records_and_checkpoints(uninterrupted):
    config, out_dir, state = uninterrupted
    records = read_records(out_dir)
    assert [r["epoch"] for r in records] == [1, 2]
    assert [r["step"] for r in records] == [4, 8]
    for r in records:
        assert {"loss", "active_fraction", "mean_pos_distance", "mean_neg_distance", "lr",
                "images_per_second", "epoch_seconds"} <= set(r)
        assert np.isfinite(r["loss"]) and r["images_per_second"] > 0
    assert TrainConfig.from_dict(json.loads((out_dir / "config.json").read_text())) == config
    assert train.finalized_epochs(out_dir / "checkpoints") == [1, 2]
    assert int(state.step) == 8


def test_resume_after_crash_equals_uninterrupted(uninterrupted, tmp_path):
    config, ref_dir, ref_state = uninterrupted
    out_dir = tmp_path / "run"
    calls = []

    def crash_at_epoch_2(state, epoch):
        calls.append(epoch)
        if epoch == 2:
            raise RuntimeError("simulated crash")
        return {"hook_value": float(epoch)}

    with pytest.raises(RuntimeError, match="simulated crash"):
        train.fit(config, tiny_dataset(), out_dir, mesh=mesh_of(2), progress=False,
                  eval_hook=crash_at_epoch_2)
    assert calls == [1, 2]
    assert [r["epoch"] for r in read_records(out_dir)] == [1]
    assert read_records(out_dir)[0]["hook_value"] == 1.0
    # A checkpoint write interrupted mid-way leaves an orbax temporary directory; it is
    # not a checkpoint and must never be restored.
    junk = out_dir / "checkpoints" / "2.orbax-checkpoint-tmp-1700000000"
    junk.mkdir()
    (junk / "garbage").write_text("half-written")
    assert train.finalized_epochs(out_dir / "checkpoints") == [1]

    state = train.fit(config, tiny_dataset(), out_dir, resume=True, mesh=mesh_of(2),
                      progress=False)
    assert int(state.step) == int(ref_state.step) == 8
    assert_trees_close(state.params, ref_state.params, rtol=0, atol=1e-6)
    assert_trees_close(state.batch_stats, ref_state.batch_stats, rtol=0, atol=1e-6)
    assert_trees_close(state.opt_state, ref_state.opt_state, rtol=0, atol=1e-6)
    ref_losses = [r["loss"] for r in read_records(ref_dir)]
    np.testing.assert_allclose([r["loss"] for r in read_records(out_dir)], ref_losses, rtol=1e-6)
    assert not junk.exists()  # cleaned up when the manager opened
    assert train.finalized_epochs(out_dir / "checkpoints") == [1, 2]


@pytest.mark.parametrize("loss,extra", [
    ("proxy_anchor", {}),
    ("contrastive", {"xbm_size": 32, "xbm_start_epochs": 1.0}),
])
def test_loss_state_is_checkpointed_and_resumed(tmp_path, loss, extra):
    """Proxies (and their optimizer state) and the memory survive a crash and a resume."""
    config = tiny_config(tmp_path, loss=loss, **extra)
    ref = train.fit(config, tiny_dataset(), tmp_path / "ref", mesh=mesh_of(2), progress=False)

    def crash_at_epoch_2(state, epoch):
        if epoch == 2:
            raise RuntimeError("simulated crash")
        return {}

    with pytest.raises(RuntimeError, match="simulated crash"):
        train.fit(config, tiny_dataset(), tmp_path / "run", mesh=mesh_of(2), progress=False,
                  eval_hook=crash_at_epoch_2)
    state = train.fit(config, tiny_dataset(), tmp_path / "run", resume=True, mesh=mesh_of(2),
                      progress=False)
    kept = lambda s: (s.params, s.loss_params, s.loss_opt_state, s.memory)  # noqa: E731
    assert_trees_close(kept(state), kept(ref), rtol=0, atol=1e-6)
    if loss == "proxy_anchor":  # the proxies learned: they moved from their start
        start = fresh_state(config).loss_params
        assert state.loss_params.shape == (NUM_CLASSES, 16)
        assert not np.allclose(state.loss_params, start)
    else:
        assert int(state.memory.valid.sum()) == 32
    _, restored, _ = train.restore_state(tmp_path / "run", mesh=mesh_of(1))
    assert_trees_close(kept(restored), kept(ref), rtol=0, atol=1e-6)


def test_refuses_to_overwrite_a_run(uninterrupted, tmp_path):
    config, out_dir, _ = uninterrupted
    before = (out_dir / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match="resume"):
        train.fit(config, tiny_dataset(), out_dir, mesh=mesh_of(2), progress=False)
    assert (out_dir / "metrics.jsonl").read_text() == before
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train.fit(config, tiny_dataset(), tmp_path / "empty", resume=True, mesh=mesh_of(2),
                  progress=False)
    changed = TrainConfig(**(config.to_dict() | {"lr": 0.2}))
    with pytest.raises(ValueError, match="lr: saved 0.05, now 0.2"):
        train.fit(changed, tiny_dataset(), out_dir, resume=True, mesh=mesh_of(2),
                  progress=False)


def test_embed_fn_pads_and_matches_model(uninterrupted):
    _, _, state = uninterrupted
    images, _ = synthetic(5, seed=3)
    emb = train.make_embed_fn(state)(images)  # 5 rows on a 2-device mesh: padded
    assert emb.shape == (5, 16) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    model = create_model("homebrew", embed_dim=16)
    from jaxmetric.train.augment import normalize
    # The state normalises with the training data's statistics (computed: no preset ones).
    mean, std = tiny_dataset().normalization
    assert state.inputs == train.InputSpec((32, 32, 3), mean, std)
    expected = model.apply(variables, normalize(jnp.asarray(images), mean, std), train=False)
    np.testing.assert_allclose(emb, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        train.make_embed_fn(state)(images.astype(np.float32))


def test_checkpoints_record_the_inputs_and_older_ones_take_them(uninterrupted, tmp_path):
    config, out_dir, state = uninterrupted
    _, restored, epoch = train.restore_state(out_dir, mesh=mesh_of(2))
    assert epoch == 2 and restored.inputs == state.inputs  # from the checkpoint alone
    assert_trees_close(restored.params, state.params, rtol=0, atol=0)
    # A checkpoint written before the inputs were recorded: they must be passed.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((out_dir / "config.json").read_text())
    manager = train.checkpoints.checkpoint_manager(legacy / "checkpoints", 1)
    train.checkpoints.save_checkpoint(manager, 2, state.replace(inputs=None),
                                      jax.random.key_data(jax.random.key(0)))
    manager.wait_until_finished()
    manager.close()
    with pytest.raises(ValueError, match="does not record"):
        train.restore_state(legacy, mesh=mesh_of(2))
    _, restored, _ = train.restore_state(legacy, mesh=mesh_of(2), inputs=tiny_dataset())
    assert restored.inputs == state.inputs
    assert_trees_close(restored.params, state.params, rtol=0, atol=0)


def test_a_state_needs_its_inputs(tmp_path):
    config = tiny_config(tmp_path)
    state = fresh_state(config, bn_axis_name=None).replace(inputs=None)
    images, labels = synthetic(4)
    with pytest.raises(ValueError, match="state.inputs"):
        train.train_step(state, {"images": images, "labels": labels}, jax.random.key(0),
                         loss_fn=train.make_loss_fn(config))
    with pytest.raises(ValueError, match="one mean and one std per channel"):
        train.InputSpec((32, 32, 3), (0.5,), (0.2,))


# ------------------------------------------------------------------------ validation


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss="arc_face"), "unknown loss 'arc_face'"),
    (dict(loss="supcon", margin=0.5), "has no margin"),
    (dict(loss="triplet", temperature=0.1),
     "supcon, ntxent, normalized_softmax and smooth_ap loss only"),
    (dict(loss="supcon", reduction="sum"), "contrastive, snr_contrastive and triplet loss only"),
    (dict(loss="triplet", soft_margin=True, mining="semihard"), "soft_margin works with"),
    (dict(loss="contrastive", soft_margin=True), "triplet loss only"),
    (dict(loss="contrastive", loss_lr_multiplier=10.0), "learns no parameters"),
    (dict(loss="proxy_anchor", xbm_size=4096), "pair-based losses"),
    (dict(loss="contrastive", batch_size=64, xbm_size=32), "xbm_size must be >= 64"),
    (dict(loss="contrastive", loss_options="margin=2"), "with --margin"),
    (dict(loss="triplet", loss_options="alpha=2"), "has no option 'alpha'"),
    (dict(loss="triplet", loss_options="alpha"), "k=v,k=v"),
    (dict(model="vgg"), "unknown model 'vgg'"),
    (dict(optimizer="lion"), "unknown optimizer"),
    (dict(dtype="float16"), "unknown dtype"),
    (dict(batch_size=100, classes_per_batch=8), "not divisible by classes_per_batch"),
    (dict(batch_size=16, classes_per_batch=16), "fewer than 2 images per class"),
    (dict(loss="contrastive", mining="hard"), "triplet loss only"),
    (dict(loss="triplet", mining="hardish"), "unknown mining"),
    (dict(loss="triplet", pos_margin=0.1),
     "contrastive, lifted_structure and snr_contrastive loss only"),
    (dict(loss="circle", power=2.0), "contrastive and snr_contrastive loss only"),
    (dict(warmup_epochs=5, epochs=5), "warmup_epochs"),
    (dict(lr=0.0), "lr must be"),
    (dict(margin=-1.0), "margin must be"),
    (dict(momentum=1.0), "momentum must be < 1"),
    (dict(epochs=0), "epochs must be >= 1"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_config_defaults_and_resolution():
    c = TrainConfig()
    assert (c.model, c.run_optimizer, c.batch_size) == ("resnet18", "sgd", 512)
    assert c.peak_lr == pytest.approx(0.2) and c.decay == 5e-4 and c.loss_margin == 1.0
    t = TrainConfig(loss="triplet", optimizer="adamw")
    assert t.loss_margin == 0.2 and t.peak_lr == 1e-3 and t.decay == 0.05
    with pytest.raises(TypeError, match="batch_size must be an int"):
        TrainConfig(batch_size=16.0)
    with pytest.raises(ValueError, match="unknown TrainConfig fields: bogus"):
        TrainConfig.from_dict({"bogus": 1})


def test_a_loss_trains_with_its_training_defaults_unless_a_setting_overrides_them(monkeypatch):
    real = registry.get("arcface")
    entry = registry.LossEntry(real.fn, "margin", 0.35, learned="weights", pairs=False,
                               optimizer="adamw", lr_factor=0.5, options={"scale": 24.0})
    get = registry.get
    monkeypatch.setattr(registry, "get", lambda name: entry if name == "arcface" else get(name))
    c = TrainConfig(loss="arcface", batch_size=256)
    assert (c.optimizer, c.run_optimizer, c.decay) == (None, "adamw", 0.05)
    assert c.base_lr == pytest.approx(1e-3) and c.peak_lr == pytest.approx(5e-4)
    assert c.loss_kwargs["scale"] == 24.0 and c.loss_kwargs["margin"] == 0.35
    # Another optimizer gets its usual rate, not the factor tuned for AdamW.
    s = TrainConfig(loss="arcface", batch_size=256, optimizer="sgd", margin=0.5,
                    loss_options="scale=64")
    assert (s.peak_lr, s.decay) == (pytest.approx(0.1), 5e-4)
    assert (s.loss_kwargs["scale"], s.loss_kwargs["margin"]) == (64, 0.5)
    assert TrainConfig(loss="arcface", optimizer="adamw").peak_lr == pytest.approx(5e-4)
    assert TrainConfig(loss="arcface", lr=0.01).peak_lr == 0.01
    assert TrainConfig(loss="triplet").run_optimizer == "sgd"
    with pytest.raises(ValueError, match="has no keyword 'nope'"):
        registry.LossEntry(real.fn, options={"nope": 1.0})
    with pytest.raises(ValueError, match="has no keyword 'valid'"):
        registry.LossEntry(real.fn, options={"valid": None})
    with pytest.raises(ValueError, match="optimizer"):
        registry.LossEntry(real.fn, optimizer="rmsprop")
    with pytest.raises(ValueError, match="lr_factor"):
        registry.LossEntry(real.fn, lr_factor=0.0)


def test_the_snr_contrastive_loss_takes_the_hinge_settings():
    c = TrainConfig(loss="snr_contrastive", pos_margin=0.1, power=2.0, reduction="mean")
    kwargs = c.loss_kwargs
    assert (kwargs["pos_margin"], kwargs["power"], kwargs["reduction"]) == (0.1, 2.0, "mean")
    assert TrainConfig(loss="snr_contrastive").loss_kwargs["power"] == 1.0


def test_batch_must_split_over_devices(tmp_path):
    config = tiny_config(tmp_path, batch_size=12)
    with pytest.raises(ValueError, match="not divisible by the number of devices 8"):
        train.fit(config, tiny_dataset(), tmp_path / "run", mesh=mesh_of(8), progress=False)
    assert not (tmp_path / "run").exists()


def test_diverging_run_stops_with_a_clear_error_and_saves_nothing(tmp_path, monkeypatch):
    """A loss that turns NaN stops training; no checkpoint of that epoch is written.

    (L2-normalised embeddings keep the loss bounded even at absurd learning rates, so
    the divergence is injected into the loss.)
    """
    make_loss_fn = train.make_loss_fn

    def diverging(config):
        loss_fn = make_loss_fn(config)

        def poisoned(embeddings, labels, **kw):
            loss, info = loss_fn(embeddings, labels, **kw)
            return loss * jnp.float32(jnp.nan), info

        return poisoned

    monkeypatch.setattr(train.loop, "make_loss_fn", diverging)  # where fit looks it up
    config = tiny_config(tmp_path, epochs=2, log_every=1)
    with pytest.raises(FloatingPointError, match="loss became .* in epoch 1"):
        train.fit(config, tiny_dataset(), tmp_path / "run", mesh=mesh_of(1), progress=False)
    assert not list((tmp_path / "run" / "checkpoints").glob("[0-9]*"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_checkpoint_every_saves_the_chosen_epochs_and_the_last(tmp_path):
    config = tiny_config(tmp_path, epochs=3, checkpoint_every=2)
    train.fit(config, tiny_dataset(32), tmp_path / "run", mesh=mesh_of(1), progress=False)
    saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()
                   if p.name.isdigit())
    assert saved == [2, 3]
    assert [r["epoch"] for r in read_records(tmp_path / "run")] == [1, 2, 3]


def _poisoned_loss_fn(monkeypatch, poison):
    """Replace the configured loss by ``poison(loss, info, embeddings, axis_name)``."""
    make_loss_fn = train.make_loss_fn

    def patched(config):
        loss_fn = make_loss_fn(config)

        def poisoned(embeddings, labels, **kw):
            loss, info = loss_fn(embeddings, labels, **kw)
            return poison(loss, info, embeddings, kw["axis_name"])

        return poisoned

    monkeypatch.setattr(train.loop, "make_loss_fn", patched)  # where fit looks it up


def test_nan_gradient_behind_a_finite_loss_stops_the_run(tmp_path, monkeypatch):
    """The loss value stays finite but its gradient is NaN (a masked NaN): caught by the
    gradient check, with the last good checkpoint named."""

    def poison(loss, info, embeddings, axis_name):
        # where() with a NaN branch: finite value, NaN gradient (0 * inf in the chain rule).
        hidden = jnp.sqrt(-jax.lax.psum(jnp.sum(embeddings ** 2), axis_name))
        return jnp.where(jnp.ones((), bool), loss, hidden), info

    _poisoned_loss_fn(monkeypatch, poison)
    config = tiny_config(tmp_path, epochs=2, log_every=1)
    with pytest.raises(FloatingPointError, match="the gradient norm became nan") as e:
        train.fit(config, tiny_dataset(), tmp_path / "run", mesh=mesh_of(1), progress=False)
    assert "loss became" not in str(e.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_divergence_in_a_later_epoch_names_the_last_checkpoint(tmp_path, monkeypatch):
    """From the first step of epoch 2 on, the optimizer's updates are inf: the parameters
    go non-finite, the run stops and names epoch 1's checkpoint, which stays."""
    import optax

    steps_per_epoch = 64 // 16
    make_optimizer = train.make_optimizer

    def blow_up_after_epoch_1(count, updates):
        factor = jnp.where(count >= steps_per_epoch, jnp.inf, 1.0)
        return jax.tree.map(lambda u: factor * u, updates)

    def bad_optimizer(config, schedule):
        blow = optax.GradientTransformation(
            lambda params: optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32)),
            lambda u, s, p=None: (blow_up_after_epoch_1(s.count, u),
                                  optax.ScaleByScheduleState(count=s.count + 1)))
        return optax.chain(make_optimizer(config, schedule), blow)

    monkeypatch.setattr(train.state, "make_optimizer", bad_optimizer)  # create_train_state's
    config = tiny_config(tmp_path, epochs=3, log_every=1)
    with pytest.raises(FloatingPointError,
                       match=r"parameter norm became (inf|nan) in epoch 2.*last checkpoint is "
                             r"epoch 1"):
        train.fit(config, tiny_dataset(), tmp_path / "run", mesh=mesh_of(1), progress=False)
    assert [r["epoch"] for r in read_records(tmp_path / "run")] == [1]
    assert train.restore_state(tmp_path / "run", mesh=mesh_of(1))[2] == 1


def test_fit_says_what_it_does_and_warns_of_collapse(tmp_path, monkeypatch, caplog):
    def collapse(loss, info, embeddings, axis_name):
        return loss, info | {"mean_pos_distance": 0.0 * loss, "mean_neg_distance": 0.0 * loss}

    _poisoned_loss_fn(monkeypatch, collapse)
    monkeypatch.setattr(monitor, "SLOW_RUN_SECONDS", 0.0)
    config = tiny_config(tmp_path, epochs=2, log_every=2)
    with caplog.at_level("INFO", logger="jaxmetric.train"):
        train.fit(config, tiny_dataset(), tmp_path / "run", mesh=mesh_of(1), progress=False,
                  slow_cpu_hint="python -m experiments.cifar10 --small")
    text = caplog.text
    assert "training homebrew" in text and "64 training / 16 test images" in text
    assert f"loss {config.loss}_loss(" in text and "sgd at peak lr" in text
    assert "estimated training time" in text
    assert "no GPU or TPU found" in text and "--small" in text
    assert text.count("look collapsed") == 1
    assert "epoch 1/2: loss" in text and "epoch 2/2: loss" in text


def test_use_cpu_devices_splits_the_cpu_before_jax_starts():
    code = ("from jaxmetric.train import use_cpu_devices, make_mesh; use_cpu_devices(3); "
            "print(make_mesh().size)")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True)
    assert out.stdout.strip() == "3"
    # Here JAX has started: the same count is fine, another one is refused clearly.
    train.use_cpu_devices(len(jax.local_devices(backend="cpu")))
    with pytest.raises(RuntimeError, match="already set up its devices"):
        train.use_cpu_devices(len(jax.local_devices(backend="cpu")) + 1)
    with pytest.raises(ValueError, match="int >= 1"):
        train.use_cpu_devices(0)


def test_default_cpu_devices_is_the_largest_divisor_of_the_batch_within_the_cores():
    from jaxmetric.train.mesh import default_cpu_devices

    assert default_cpu_devices(256, cores=2) == 2
    assert default_cpu_devices(100, cores=8) == 5
    assert default_cpu_devices(7, cores=4) == 1
    assert default_cpu_devices(3, cores=16) == 3
    with pytest.raises(ValueError):
        default_cpu_devices(0, cores=2)


def test_the_command_line_uses_every_core_by_default_and_respects_xla_flags():
    import pathlib

    code = ("from experiments import driver; from jaxmetric.train.mesh import "
            "default_cpu_devices as d; n = driver.split_cpu_by_default(6); import jax; "
            "print(n, d(6), len(jax.devices()))")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True, cwd=pathlib.Path(__file__).parents[1])
    chosen, expected, devices = out.stdout.split()
    assert chosen == expected == devices
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=3"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True, cwd=pathlib.Path(__file__).parents[1])
    assert out.stdout.split()[0] == "None" and out.stdout.split()[2] == "3"
