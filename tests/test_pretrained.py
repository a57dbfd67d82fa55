"""torchvision ImageNet ResNet weights in the Flax ResNet, and fine-tuning from them.

The conversion is checked against torchvision itself: a randomly initialised
``torchvision.models.resnet18`` / ``resnet50`` (random BatchNorm statistics too), saved
as ``.pth`` and ``.safetensors``, loaded into the ImageNet-stem model; the Flax forward
pass (eval mode, float32) must give torchvision's last feature map and, with the Flax
head's Dense copied into torchvision's ``fc``, the same embeddings. Nothing is
downloaded (``weights=None``).
"""

import contextlib
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmetric import train
from jaxmetric.models import BottleneckResNetBlock, ResNetBlock, create_model
from jaxmetric.models.pretrained import (
    describe_state_dict,
    load_torchvision_resnet,
    read_state_dict,
    torchvision_name,
)
from jaxmetric.train.augment import normalize
from jaxmetric.train.config import TrainConfig

torch = pytest.importorskip("torch")

EMBED_DIM = 16
IMAGE = (64, 64, 3)  # even sizes everywhere: where "SAME" and torch's padding differ


@contextlib.contextmanager
def _skip_missing_operator_registrations():
    """Let ``import torchvision`` through when its compiled operators cannot load.

    The Linux torchvision wheels on PyPI are built against a CUDA build of torch; next to
    a CPU-only torch their compiled operators (``torchvision._C``: nms, roi_align, ...)
    do not load, and torchvision >= 0.2x then fails at import while registering fake
    kernels for those missing operators. The models are plain torch modules that use
    none of them, so here registering a kernel for an operator that does not exist is
    skipped (the operators themselves stay unavailable).
    """
    original = torch.library.register_fake

    def lenient(op, *args, **kwargs):
        try:
            register = original(op, *args, **kwargs)
        except RuntimeError:
            return lambda fn: fn

        def apply(fn):
            try:
                return register(fn)
            except RuntimeError:
                return fn

        return apply

    torch.library.register_fake = lenient
    try:
        yield
    finally:
        torch.library.register_fake = original


@functools.cache
def torchvision():
    if "torchvision" not in sys.modules:
        with _skip_missing_operator_registrations():
            try:
                import torchvision as tv  # noqa: F401
            except ImportError:
                pytest.skip("torchvision is not installed (pip install -e '.[dev]')")
    return sys.modules["torchvision"]


def random_torchvision(name: str, seed: int = 0):
    """torchvision's ``name`` with random weights and random BatchNorm parameters and
    running statistics (its init leaves them at 1, 0, 0, 1), in eval mode."""
    torch.manual_seed(seed)
    model = getattr(torchvision().models, name)(weights=None)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.2, generator=g)
                m.running_mean.normal_(0.0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.num_batches_tracked.fill_(1000)
    return model.eval()


def abstract_variables(model):
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((1, *IMAGE)))


def flax_model(name: str):
    """The ImageNet-stem model and variables of its shapes filled with random values
    (the trunk's are replaced by the file's; compiling ``model.init`` would take longer
    than the rest of a test)."""
    model = create_model(name, embed_dim=EMBED_DIM, stem="imagenet")
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
        lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype),
        abstract_variables(model))
    return model, variables


def save(state_dict, path):
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state_dict, str(path))
    else:
        torch.save(state_dict, path)
    return path


def flax_forward(model, variables, x):
    """``(last block's feature map (B, h, w, C), embeddings)`` in eval mode."""
    blocks = (ResNetBlock, BottleneckResNetBlock)
    emb, state = model.apply(variables, jnp.asarray(x), train=False, mutable=["intermediates"],
                             capture_intermediates=lambda m, _: isinstance(m, blocks))
    inter = state["intermediates"]
    last = max(inter, key=lambda k: int(k.rsplit("_", 1)[1]))
    return np.asarray(inter[last]["__call__"][0]), np.asarray(emb)


def torch_forward(tv, head_kernel, head_bias, x):
    """torchvision's layer4 output (NHWC) and, with ``fc`` replaced by the Flax head's
    Dense, the L2-normalised embeddings."""
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    trunk = torch.nn.Sequential(tv.conv1, tv.bn1, tv.relu, tv.maxpool,
                                tv.layer1, tv.layer2, tv.layer3, tv.layer4)
    fc = torch.nn.Linear(head_kernel.shape[0], head_kernel.shape[1])
    with torch.no_grad():
        fc.weight.copy_(torch.from_numpy(np.array(head_kernel).T))
        fc.bias.copy_(torch.from_numpy(np.array(head_bias)))
        features = trunk(t)
        emb = torch.nn.functional.normalize(fc(torch.flatten(tv.avgpool(features), 1)), dim=1)
    return features.permute(0, 2, 3, 1).numpy(), emb.numpy()


def assert_close_relative(actual, expected, rtol=1e-4):
    """Element-wise, to ``rtol`` of the largest magnitude (float32 sums in a different
    order: exact up to rounding, relative to the scale of the tensor)."""
    scale = float(np.max(np.abs(expected)))
    assert scale > 0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


# --------------------------------------------------------------- conversion, exactly


@pytest.mark.parametrize("name,suffix", [("resnet18", ".safetensors"), ("resnet50", ".pth")])
def test_forward_equals_torchvision(tmp_path, name, suffix):
    tv = random_torchvision(name)
    path = save(tv.state_dict(), tmp_path / f"{name}{suffix}")
    model, init = flax_model(name)
    variables, report = load_torchvision_resnet(path, model, init)

    x = np.random.default_rng(0).standard_normal((2, *IMAGE)).astype(np.float32)
    features, emb = flax_forward(model, variables, x)
    head = variables["params"]["head"]["Dense_0"]
    tv_features, tv_emb = torch_forward(tv, head["kernel"], head["bias"], x)
    assert features.shape == tv_features.shape == (2, 2, 2, 512 if name == "resnet18" else 2048)
    assert_close_relative(features, tv_features)
    assert_close_relative(emb, tv_emb)

    # What was loaded, skipped and left alone.
    state = tv.state_dict()
    counters = {k for k in state if k.endswith("num_batches_tracked")}
    assert set(report.ignored) == counters | {"fc.weight", "fc.bias"}
    assert set(report.loaded) == set(state) - set(report.ignored)
    assert report.fresh == ("params/head/Dense_0/bias", "params/head/Dense_0/kernel")
    np.testing.assert_array_equal(head["kernel"], init["params"]["head"]["Dense_0"]["kernel"])


def test_state_dict_of_arrays_and_the_read_file_agree(tmp_path):
    tv = random_torchvision("resnet18", seed=3)
    state = tv.state_dict()
    from_pth = read_state_dict(save(state, tmp_path / "w.pth"))
    from_st = read_state_dict(save(state, tmp_path / "w.safetensors"))
    assert sorted(from_pth) == sorted(from_st) == sorted(state)
    for k, v in state.items():
        np.testing.assert_array_equal(from_pth[k], v.numpy())
        np.testing.assert_array_equal(from_st[k], v.numpy())
    # A mapping of tensors loads as the file does.
    model, init = flax_model("resnet18")
    a, _ = load_torchvision_resnet(state, model, init)
    b, report = load_torchvision_resnet(tmp_path / "w.safetensors", model, init)
    assert report.summary() == (
        f"{len(state) - 22} arrays loaded; ignored: fc.bias, fc.weight, 20 num_batches_tracked;"
        " kept as initialised: params/head/Dense_0/bias, params/head/Dense_0/kernel")
    jax.tree.map(np.testing.assert_array_equal, a, b)
    conv1 = a["params"]["conv_init"]["kernel"]
    np.testing.assert_array_equal(conv1, state["conv1.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(a["batch_stats"]["ResNetBlock_2"]["norm_proj"]["var"],
                                  state["layer2.0.downsample.1.running_var"].numpy())


def test_torchvision_names():
    blocks = {"BottleneckResNetBlock_3": "layer2.0"}
    assert torchvision_name(("params", "conv_init", "kernel"), blocks) == "conv1.weight"
    assert torchvision_name(("batch_stats", "bn_init", "var"), blocks) == "bn1.running_var"
    assert (torchvision_name(("params", "BottleneckResNetBlock_3", "Conv_2", "kernel"), blocks)
            == "layer2.0.conv3.weight")
    assert (torchvision_name(("batch_stats", "BottleneckResNetBlock_3", "norm_proj", "mean"),
                             blocks) == "layer2.0.downsample.1.running_mean")
    assert torchvision_name(("params", "head", "Dense_0", "kernel"), blocks) is None
    with pytest.raises(ValueError, match="no torchvision counterpart"):
        torchvision_name(("params", "ResNetBlock_0", "Conv_0", "kernel"), blocks)


# ------------------------------------------------------------------- what is refused


def test_resnet18_weights_into_resnet50_name_the_problem():
    state = random_torchvision("resnet18").state_dict()
    model = create_model("resnet50", embed_dim=EMBED_DIM, stem="imagenet")
    with pytest.raises(ValueError) as e:
        load_torchvision_resnet(state, model, abstract_variables(model))
    message = str(e.value)
    assert "does not fit resnet50" in message
    assert "missing: layer1.0.bn3.bias" in message  # sorted: the first missing name
    assert "mis-shaped" in message and "torchvision resnet18" in message


def test_misshaped_entry_is_named():
    state = dict(random_torchvision("resnet18").state_dict())
    state["layer3.1.conv2.weight"] = torch.zeros(256, 256, 1, 1)
    model = create_model("resnet18", embed_dim=EMBED_DIM, stem="imagenet")
    with pytest.raises(ValueError, match=r"1 mis-shaped: layer3\.1\.conv2\.weight "
                                         r"\(256, 256, 1, 1\) \(expected \(256, 256, 3, 3\)\)"):
        load_torchvision_resnet(state, model, abstract_variables(model))
    del state["layer3.1.conv2.weight"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"1 missing: layer3\.1\.conv2\.weight; "
                                         r"1 unexpected: layer5\.0\.conv1\.weight"):
        load_torchvision_resnet(state, model, abstract_variables(model))


def test_non_resnet_files(tmp_path):
    model = create_model("resnet18", embed_dim=EMBED_DIM, stem="imagenet")
    variables = abstract_variables(model)
    linear = save(torch.nn.Linear(4, 2).state_dict(), tmp_path / "linear.pth")
    with pytest.raises(ValueError, match="not a torchvision ResNet") as e:
        load_torchvision_resnet(linear, model, variables)
    assert "linear.pth" in str(e.value) and "unexpected: bias, weight" in str(e.value)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth.*cannot read"):
        load_torchvision_resnet(garbage, model, variables)
    bad_st = tmp_path / "garbage.safetensors"
    bad_st.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        load_torchvision_resnet(bad_st, model, variables)

    whole = tmp_path / "whole_model.pth"
    torch.save(torch.nn.Linear(4, 2), whole)  # the module object, not its state dict
    with pytest.raises(ValueError, match=r"model\.state_dict\(\)"):
        load_torchvision_resnet(whole, model, variables)
    not_a_dict = save([torch.zeros(3)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        load_torchvision_resnet(not_a_dict, model, variables)

    with pytest.raises(ValueError, match="suffix '.npz'"):
        load_torchvision_resnet(tmp_path / "weights.npz", model, variables)
    with pytest.raises(FileNotFoundError, match="nothing is fetched"):
        load_torchvision_resnet(tmp_path / "absent.pth", model, variables)


def test_only_imagenet_stem_resnets_take_torchvision_weights():
    state = random_torchvision("resnet18").state_dict()
    cifar = create_model("resnet18", embed_dim=EMBED_DIM, stem="cifar")
    with pytest.raises(ValueError, match="stem='imagenet', not 'cifar'"):
        load_torchvision_resnet(state, cifar, abstract_variables(cifar))
    homebrew = create_model("homebrew", embed_dim=EMBED_DIM)
    with pytest.raises(ValueError, match="resnet18/34/50 model; got HomebrewNet"):
        load_torchvision_resnet(state, homebrew, abstract_variables(homebrew))


def test_describe_state_dict():
    assert describe_state_dict(random_torchvision("resnet18").state_dict()) == (
        "a torchvision resnet18 (BasicBlock stages (2, 2, 2, 2))")
    assert describe_state_dict(torch.nn.Linear(4, 2).state_dict()).startswith(
        "not a torchvision ResNet")


# ----------------------------------------------------------------------- fine-tuning

INPUTS = train.InputSpec((32, 32, 3), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def homebrew_state(**config):
    config = TrainConfig(**({"model": "homebrew", "embed_dim": 8, "batch_size": 8,
                             "epochs": 2, "lr": 0.1, "warmup_epochs": 0.0} | config))
    model = create_model("homebrew", embed_dim=8, widths=(8, 16))
    return config, train.create_train_state(jax.random.key(0), model, config, 4, INPUTS)


def one_step(config, state, freeze_bn=False):
    rng = np.random.default_rng(0)
    batch = {"images": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
             "labels": np.arange(8, dtype=np.int32) % 2}
    step = jax.jit(functools.partial(train.train_step, loss_fn=train.make_loss_fn(config),
                                     augment=False, freeze_bn=freeze_bn))
    return (*step(state, batch, jax.random.key(1)), batch)


def test_freeze_bn_keeps_and_uses_the_running_statistics():
    config, state = homebrew_state()
    # Running statistics that differ from a batch's, so eval mode makes a difference.
    state = state.replace(batch_stats=jax.tree.map(lambda s: s + 0.3, state.batch_stats))
    frozen, metrics, batch = one_step(config, state, freeze_bn=True)
    jax.tree.map(np.testing.assert_array_equal, frozen.batch_stats, state.batch_stats)
    assert not np.allclose(frozen.params["conv0"]["kernel"], state.params["conv0"]["kernel"])
    # The loss was computed with eval-mode BatchNorm.
    x = normalize(batch["images"], INPUTS.mean, INPUTS.std)
    emb = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, x,
                         train=False)
    expected, _ = train.make_loss_fn(config)(emb, batch["labels"], axis_name=None)
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
    # Without freezing, the same step moves the statistics.
    moving, _, _ = one_step(config, state, freeze_bn=False)
    assert not np.allclose(moving.batch_stats["bn0"]["mean"], state.batch_stats["bn0"]["mean"])


def test_trunk_lr_multiplier_zero_freezes_the_trunk_only():
    config, state = homebrew_state(trunk_lr_multiplier=0.0)
    after, metrics, _ = one_step(config, state)
    assert metrics["grad_norm"] > 0
    for name in ("conv0", "bn0", "conv1", "bn1"):
        jax.tree.map(np.testing.assert_array_equal, after.params[name], state.params[name])
    assert not np.allclose(after.params["head"]["Dense_0"]["kernel"],
                           state.params["head"]["Dense_0"]["kernel"])


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_trunk_lr_multiplier_scales_the_trunk_updates(optimizer):
    """Over three steps on the same parameters, the trunk's updates (weight decay and
    momentum included) are m times those at m = 1 and the head's are the same: a
    per-group learning rate."""
    rng = np.random.default_rng(0)
    params = {"conv": {"kernel": rng.standard_normal((3, 3, 2, 4)), "bias": rng.random(4)},
              "head": {"Dense_0": {"kernel": rng.standard_normal((4, 3)),
                                   "bias": rng.random(3)}}}
    grads = [jax.tree.map(lambda p, i=i: np.cos(p + i), params) for i in range(3)]

    def optimizer_of(multiplier):
        config = TrainConfig(model="homebrew", optimizer=optimizer, lr=0.1, weight_decay=0.01,
                             trunk_lr_multiplier=multiplier, epochs=10, warmup_epochs=0)
        return train.make_optimizer(config, train.make_schedule(config, 2))

    base, scaled = optimizer_of(1.0), optimizer_of(0.25)
    base_state, scaled_state, p = base.init(params), scaled.init(params), params
    for g in grads:
        u1, base_state = base.update(g, base_state, p)
        um, scaled_state = scaled.update(g, scaled_state, p)
        assert np.any(np.asarray(u1["conv"]["kernel"]) != 0)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(b, 0.25 * a, rtol=1e-6),
                     u1["conv"], um["conv"])
        jax.tree.map(np.testing.assert_array_equal, u1["head"], um["head"])
        p = optax.apply_updates(p, um)


def test_state_from_pretrained_holds_the_files_weights(tmp_path):
    tv = random_torchvision("resnet18", seed=5)
    path = save(tv.state_dict(), tmp_path / "resnet18.safetensors")
    config = TrainConfig(model="resnet18", stem="imagenet", embed_dim=EMBED_DIM,
                         pretrained=str(path), freeze_bn=True, trunk_lr_multiplier=0.1)
    model = create_model("resnet18", embed_dim=EMBED_DIM, stem="imagenet")
    state = train.create_train_state(jax.random.key(0), model, config, 4, INPUTS)
    sd = tv.state_dict()
    np.testing.assert_array_equal(state.params["ResNetBlock_7"]["Conv_1"]["kernel"],
                                  sd["layer4.1.conv2.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(state.params["bn_init"]["bias"], sd["bn1.bias"].numpy())
    np.testing.assert_array_equal(state.batch_stats["ResNetBlock_4"]["BatchNorm_0"]["mean"],
                                  sd["layer3.0.bn1.running_mean"].numpy())


def test_config_checks_the_finetuning_fields():
    with pytest.raises(ValueError, match="stem='imagenet'"):
        TrainConfig(model="resnet18", pretrained="w.pth")
    with pytest.raises(ValueError, match="stem='imagenet'"):
        TrainConfig(model="homebrew", stem="imagenet", pretrained="w.pth")
    with pytest.raises(ValueError, match="trunk_lr_multiplier"):
        TrainConfig(trunk_lr_multiplier=-0.1)
    with pytest.raises(TypeError, match="freeze_bn"):
        TrainConfig(freeze_bn="yes")
    config = TrainConfig(model="resnet50", stem="imagenet", pretrained="w.pth", freeze_bn=True,
                         trunk_lr_multiplier=0.1)
    assert TrainConfig.from_dict(config.to_dict()) == config
