"""Tests of model.py: BN-Inception's layout against the port's state_dict listing, its blocks against
a functional reference written here, weight loading, frozen BatchNorm, the embedding head and
seeded building."""
import io
import json
import math
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

import model

# Every state_dict entry (name -> shape) of the common PyTorch port of the Caffe BN-Inception, whose
# weight file bn_inception-52deb4733.pth the configs load (docs/DATASETS.md).
PORT_JSON = Path(__file__).resolve().parent / "data" / "bninception_state_dict.json"


@pytest.fixture(scope="module")
def port_shapes() -> dict:
    return json.loads(PORT_JSON.read_text())


@pytest.fixture(scope="module")
def bninception() -> model.BNInception:
    torch.manual_seed(0)
    return model.BNInception().eval()


def port_file(shapes: dict, path: Path, seed: int) -> dict:
    """A file laid out like bn_inception-52deb4733.pth: random values, BatchNorm vectors stored as (1, C),
    no num_batches_tracked (saved before PyTorch 0.4.1), the ImageNet classifier included."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith("running_var"):
            value = torch.rand(shape, generator=g) + 0.5
        elif len(shape) > 1:
            value = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        else:
            value = torch.randn(shape, generator=g) * 0.1 + (1.0 if key.endswith("_bn.weight") else 0.0)
        if "_bn." in key:
            value = value[None]
        state[key] = value
    torch.save(state, path)
    return state


def _random_batchnorm_(net, seed):
    """Every BatchNorm's statistics and affine parameters drawn at random (in place); returns `net`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return net


# ------------------------------------------------------------------------------------------- BN-Inception

def test_bninception_state_dict_equals_the_port_without_classifier(port_shapes, bninception):
    expected = {k: v for k, v in port_shapes.items() if not k.startswith("last_linear.")}
    got = bninception.state_dict()
    assert len(port_shapes) == 485 and len(got) == 483
    assert list(got) == list(expected)
    assert {k: list(v.shape) for k, v in got.items()} == expected
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    n_parameters = sum(math.prod(s) for k, s in expected.items() if not k.endswith(buffers))
    assert sum(p.numel() for p in bninception.parameters()) == n_parameters == 10_270_240


def test_bninception_batchnorm_settings(bninception):
    bns = [m for m in bninception.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 69
    assert all(m.eps == 1e-5 and m.affine and m.track_running_stats for m in bns)


@pytest.mark.parametrize("size", [224, 227])
def test_bninception_features_are_1024x7x7(bninception, size):
    with torch.no_grad():
        out = bninception.features(torch.randn(1, 3, size, size))
    assert out.shape == (1, 1024, 7, 7) and bninception.feature_dim == 1024
    assert torch.isfinite(out).all()


def test_bninception_stem_pools_round_up(bninception):
    # floor-mode pools would give 55 and 27 here, and the reduction blocks' branches would not concatenate
    with torch.no_grad():
        x = F.max_pool2d(bninception.unit("conv1_7x7_s2", torch.randn(1, 3, 224, 224)), 3, stride=2, ceil_mode=True)
        assert x.shape[-1] == 56
        x = F.max_pool2d(bninception.unit("conv2_3x3", bninception.unit("conv2_3x3_reduce", x)), 3, stride=2,
                         ceil_mode=True)
    assert x.shape[-1] == 28


def _reference_unit(net, name, x, stride=1, padding=0):
    conv, bn = getattr(net, name), getattr(net, name + "_bn")
    y = F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=padding)
    mean, var = bn.running_mean[None, :, None, None], bn.running_var[None, :, None, None]
    y = (y - mean) / torch.sqrt(var + 1e-5) * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    return y.clamp_min(0)


def _windows(x, fill, pad_lo, pad_hi, stride):
    # all 3x3 windows of x padded with `fill`: (B, C, H', W', 9)
    x = F.pad(x, (pad_lo, pad_hi, pad_lo, pad_hi), value=fill)
    return x.unfold(2, 3, stride).unfold(3, 3, stride).flatten(-2)


# the port's pooling branches, written down independently of model.BNInception.BLOCKS
POOL_OF_BLOCK = {"inception_3a": "avg", "inception_3c": "max_s2", "inception_5b": "max"}


def _reference_block(net, n, x):
    """Caffe's inception block `n`, from the prototxt's description: branches 1x1, 3x3, double 3x3, pool."""
    pool = POOL_OF_BLOCK[n]
    reduction = pool == "max_s2"
    stride = 2 if reduction else 1
    out = [] if reduction else [_reference_unit(net, f"{n}_1x1", x)]
    out.append(_reference_unit(net, f"{n}_3x3", _reference_unit(net, f"{n}_3x3_reduce", x), stride, 1))
    d = _reference_unit(net, f"{n}_double_3x3_1", _reference_unit(net, f"{n}_double_3x3_reduce", x), 1, 1)
    out.append(_reference_unit(net, f"{n}_double_3x3_2", d, stride, 1))
    if pool == "avg":  # zero padding counted in the divisor
        pooled = _windows(x, 0.0, 1, 1, 1).sum(-1) / 9
    elif pool == "max":
        pooled = _windows(x, -math.inf, 1, 1, 1).amax(-1)
    else:  # stride 2 rounding up: the last window hangs over the edge when (H - 3) is odd
        pooled = _windows(x, -math.inf, 0, 1, 2).amax(-1)
    out.append(pooled if reduction else _reference_unit(net, f"{n}_pool_proj", pooled))
    return torch.cat(out, 1)


@pytest.fixture(scope="module")
def bninception64() -> model.BNInception:
    """A float64 BN-Inception in eval mode whose BatchNorm statistics make eps matter."""
    torch.manual_seed(1)
    net = model.BNInception().double().eval()
    with torch.no_grad():  # small running variances make eps matter, so a wrong eps fails
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(1e-4, 1e-3)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return net


@pytest.mark.parametrize("fold_bn", [True, False])
@pytest.mark.parametrize("block_name", sorted(POOL_OF_BLOCK))
def test_bninception_blocks_match_functional_reference(bninception64, monkeypatch, block_name, fold_bn):
    net = bninception64
    monkeypatch.setattr(net, "fold_bn", fold_bn)
    b = next(b for b in net.BLOCKS if b.name == block_name)
    x = torch.randn(1, b.in_channels, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        got, want = net.block(b, x), _reference_block(net, block_name, x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("fold_bn", [True, False])
def test_bninception_stem_pools_before_relu_give_the_port_order_bits(fold_bn):
    # the port's order is conv → BN → ReLU → max pool; the model pools before the ReLU (they commute).
    # Most windows of these inputs hold negative values, which the ReLU ties at 0 in the port's order.
    torch.manual_seed(2)
    net = _random_batchnorm_(model.BNInception(fold_bn=fold_bn), seed=2).eval()
    for name, shape, scale in (("conv1_7x7_s2", (2, 3, 32, 32), 50), ("conv2_3x3", (2, 64, 9, 9), 1)):
        x = (torch.randn(shape) * scale).requires_grad_()
        got = net.unit_max_pooled(name, x)
        want = F.max_pool2d(net.unit(name, x), 3, stride=2, ceil_mode=True)
        assert torch.equal(got, want)
        tensors = [x, *getattr(net, name).parameters(), *getattr(net, name + "_bn").parameters()]
        upstream = torch.randn(got.shape)
        for g, w in zip(torch.autograd.grad(got, tensors, upstream), torch.autograd.grad(want, tensors, upstream)):
            assert torch.equal(g, w)


# ------------------------------------------------------------------------------------------- loading

def test_load_pretrained_port_file_round_trips_exactly(port_shapes, tmp_path):
    path = tmp_path / "bn_inception-52deb4733.pth"
    stored = port_file(port_shapes, path, seed=3)
    net = model.BNInception()
    model.load_pretrained(net, path)
    for key, value in net.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(value, stored[key].reshape(value.shape)), key
        assert stored[key].dim() == value.dim() + ("_bn." in key)


def test_load_pretrained_lists_missing_unexpected_and_mismatched_keys(tmp_path):
    state = model.TinyCNN().state_dict()
    del state["conv2.bias"]
    state["head.weight"] = torch.zeros(3)
    state["conv1.weight"] = torch.zeros(32, 1, 5, 5)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    net = model.TinyCNN()
    original = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError) as err:
        model.load_pretrained(net, path)
    message = str(err.value)
    assert "1 missing keys [conv2.bias]" in message
    assert "1 unexpected keys [head.weight]" in message
    assert "conv1.weight: file (32, 1, 5, 5) vs model (32, 1, 3, 3)" in message
    assert str(path) in message
    assert all(torch.equal(v, original[k]) for k, v in net.state_dict().items())  # nothing half-loaded


def test_load_pretrained_skips_the_imagenet_classifiers(tmp_path):
    source = model.TinyCNN()
    state = dict(source.state_dict(), **{"last_linear.weight": torch.ones(2, 2), "fc.bias": torch.ones(2)})
    torch.save(state, tmp_path / "w.pth")
    net = model.TinyCNN()
    model.load_pretrained(net, tmp_path / "w.pth")
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize("content, pattern", [
    (b"\x80\x02truncated download", r"cannot read .*bn_inception-52deb4733\.pth as a PyTorch weight file"),
    (torch.zeros(3), r"expected .*bn_inception-52deb4733\.pth to hold a state_dict"),
], ids=["corrupt", "not-a-state-dict"])
def test_unreadable_weight_file_is_a_value_error_naming_it(tmp_path, content, pattern):
    path = tmp_path / "bn_inception-52deb4733.pth"
    path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
    with pytest.raises(ValueError, match=pattern):
        model.load_pretrained(model.TinyCNN(), path)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """torch.hub's cache in tmp_path and every download failing as it does offline."""
    calls = []

    def no_network(url, dst, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "hub" / "checkpoints", calls


@pytest.mark.parametrize("backbone, name, filename, source", [
    ("bninception", "imagenet", "bn_inception-52deb4733.pth", "pretrained-models project for PyTorch"),
    ("resnet50", "IMAGENET1K_V1", "resnet50-0676ba61.pth", "ResNet50_Weights.IMAGENET1K_V1"),
    ("resnet50", "IMAGENET1K_V2", "resnet50-11ad3fa6.pth", "ResNet50_Weights.IMAGENET1K_V2"),
])
def test_named_weights_offline_and_absent_say_where_to_put_the_file(offline_hub, backbone, name, filename, source):
    directory, calls = offline_hub
    with pytest.raises(FileNotFoundError) as err:
        model.resolve_pretrained(backbone, name)
    message = str(err.value)
    assert filename in message and str(directory) in message and source in message
    assert len(calls) == 1 and calls[0].endswith(filename)


def test_named_weights_found_in_the_hub_cache_are_used_without_download(offline_hub):
    directory, calls = offline_hub
    directory.mkdir(parents=True)
    (directory / "resnet50-0676ba61.pth").write_bytes(b"cached")
    assert model.resolve_pretrained("resnet50", "IMAGENET1K_V1") == directory / "resnet50-0676ba61.pth"
    assert calls == []


@pytest.mark.parametrize("load, pattern", [
    (lambda: model.load_pretrained(model.TinyCNN(), "nowhere.pth"), r"no weight file at nowhere\.pth"),
    (lambda: model.resolve_pretrained("resnet50", "imagenet1k"),
     r"no file at imagenet1k, and 'imagenet1k' is not a known weight name \(known: \['DEFAULT', 'IMAGENET1K_V1'"),
], ids=["load_pretrained", "unknown-name"])
def test_absent_weight_file_is_file_not_found(offline_hub, load, pattern):
    with pytest.raises(FileNotFoundError, match=pattern):
        load()


def test_build_model_loads_a_local_file_into_the_backbone(tmp_path):
    source = model.build_model("tiny_cnn", seed=7)
    torch.save(source.backbone.state_dict(), tmp_path / "tiny.pth")
    net = model.build_model("tiny_cnn", seed=8, pretrained=tmp_path / "tiny.pth")
    assert all(torch.equal(v, source.backbone.state_dict()[k]) for k, v in net.backbone.state_dict().items())
    assert not torch.equal(net.embedding.weight, source.embedding.weight)  # the head stays seed-initialised


# ------------------------------------------------------------------------------------------- small backbones

def test_resnet50_keys_and_features():
    net = model.ResNet50().eval()
    expected = [k for k in torchvision.models.resnet50(weights=None).state_dict() if not k.startswith("fc.")]
    assert list(net.state_dict()) == expected
    with torch.no_grad():
        assert net.features(torch.randn(1, 3, 64, 64)).shape == (1, 2048, 2, 2)
    assert net.feature_dim == 2048


def test_tiny_backbones_feature_maps():
    cnn, mlp = model.TinyCNN(in_channels=1), model.MLP(in_features=64, hidden=48)
    assert cnn.features(torch.randn(3, 1, 8, 8)).shape == (3, cnn.feature_dim, 4, 4)
    assert mlp.features(torch.randn(3, 1, 8, 8)).shape == (3, 48, 1, 1)
    rgb = model.build_model("tiny_cnn", backbone_kwargs={"in_channels": 3}, embedding_dim=8)
    assert rgb.backbone.features(torch.randn(2, 3, 8, 8)).shape == (2, 64, 4, 4)
    assert rgb(torch.randn(2, 3, 8, 8)).shape == (2, 8)


# ------------------------------------------------------------------------------------------- embedding model

@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_embedding_model_is_pool_then_bias_free_linear(pooling):
    net = model.build_model("tiny_cnn", embedding_dim=16, pooling=pooling)
    x = torch.randn(5, 1, 8, 8)
    fmap = net.backbone.features(x).detach()
    pooled = torch.zeros(5, fmap.shape[1])
    for i in range(5):
        for c in range(fmap.shape[1]):
            values = [fmap[i, c, h, w].item() for h in range(4) for w in range(4)]
            pooled[i, c] = sum(values) / len(values) if pooling == "avg" else max(values)
    want = pooled @ net.embedding.weight.detach().T
    torch.testing.assert_close(net(x).detach(), want, rtol=1e-5, atol=1e-6)
    assert net.embedding.bias is None and net(x).shape == (5, 16)


def test_embedding_is_glorot_uniform():
    net = model.build_model("mlp", embedding_dim=128, seed=2, backbone_kwargs={"hidden": 1024})  # BN-Inception's 1024
    w = net.embedding.weight.detach()
    bound = math.sqrt(6 / (1024 + 128))
    assert w.shape == (128, 1024)
    assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
    assert abs(w.var().item() / (bound ** 2 / 3) - 1) < 0.05  # U(-a, a) has variance a²/3
    assert abs(w.mean().item()) < 0.05 * bound


def _bn_stats(net):
    return {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}


def test_frozen_batchnorm_never_changes():
    net = model.build_model("tiny_cnn", freeze_bn=True).train()
    bn_names = model.batchnorm_parameter_names(net)
    assert bn_names == {"backbone.bn1.weight", "backbone.bn1.bias", "backbone.bn2.weight", "backbone.bn2.bias"}
    for name, p in net.named_parameters():
        assert p.requires_grad == (name not in bn_names), name
    assert net.training and all(not m.training for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = _bn_stats(net)
    x = torch.randn(6, 1, 8, 8) * 3 + 1
    out = net(x)
    out.square().sum().backward()
    after = _bn_stats(net)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(net.get_parameter(n).grad is None for n in bn_names)
    torch.testing.assert_close(out, net.eval()(x))  # train mode normalises with the running statistics


def test_unfrozen_batchnorm_updates_its_statistics():
    net = model.build_model("tiny_cnn", freeze_bn=False).train()
    assert all(p.requires_grad for p in net.parameters())
    assert all(m.training for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = _bn_stats(net)
    net(torch.randn(6, 1, 8, 8) * 3 + 1)
    after = _bn_stats(net)
    assert all(not torch.equal(before[k], after[k]) for k in before)


def test_frozen_bninception_modules_stay_in_eval_mode():
    net = model.build_model("bninception").train()
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 69 and not any(m.training for m in bns)
    names = model.batchnorm_parameter_names(net)
    assert len(names) == 138 and all(n.endswith(("_bn.weight", "_bn.bias")) for n in names)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert "embedding.weight" in trainable and not trainable & names


@pytest.mark.parametrize("backbone, kwargs", [("tiny_cnn", {"width": 2}), ("mlp", {"in_features": 16, "hidden": 8})])
@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_embedding_model_gradients(backbone, kwargs, pooling):
    net = model.build_model(backbone, embedding_dim=4, pooling=pooling, backbone_kwargs=kwargs).double()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(net, (x,))


# ------------------------------------------------------------------------------------------- building

@pytest.mark.parametrize("backbone", ["tiny_cnn", "mlp", "bninception"])
def test_build_model_is_a_pure_function_of_the_seed(backbone):
    a = model.build_model(backbone, seed=11).state_dict()
    torch.rand(100)  # the caller's RNG use in between must not matter
    state = torch.get_rng_state()
    b = model.build_model(backbone, seed=11).state_dict()
    assert torch.equal(torch.get_rng_state(), state)  # the caller's global CPU RNG is left where it was
    c = model.build_model(backbone, seed=12).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embedding.weight"], c["embedding.weight"])
    assert any(not torch.equal(a[k], c[k]) for k in a if k.startswith("backbone."))


@pytest.mark.parametrize("arguments, pattern", [
    ({"backbone": "bninceptoin"}, r"unknown backbone 'bninceptoin'.*did you mean 'bninception'"),
    ({"backbone": "mlp", "pooling": "mean"}, r"pooling must be one of \('avg', 'max'\), got 'mean'"),
    ({"backbone": "mlp", "embedding_dim": 0}, r"embedding_dim must be a positive int, got 0"),
    ({"backbone": "tiny_cnn", "backbone_kwargs": {"channels": 3}},
     r"tiny_cnn takes backbone_kwargs \['in_channels', 'width'\].*\['channels'\]"),
    ({"backbone": "bninception", "backbone_kwargs": {"fold_bn": False}},  # was overridden by fold_bn=True
     r"pass fold_bn as build_model's own argument, not in backbone_kwargs"),
], ids=["backbone", "pooling", "embedding_dim", "backbone_kwargs", "fold_bn twice"])
def test_build_model_refuses_bad_arguments(arguments, pattern):
    with pytest.raises(ValueError, match=pattern):
        model.build_model(**arguments)


# ------------------------------------------------------------------------------------------- fast path
# Folded BatchNorm and channels_last change only the order in which float32 sums are formed: results
# agree with the plain path to rounding, and each path is bit-for-bit repeatable on its own.

def test_fold_batchnorm_is_conv_then_eval_batchnorm_with_the_same_gradients():
    torch.manual_seed(2)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1).double()
    bn = _random_batchnorm_(torch.nn.BatchNorm2d(5).double(), seed=3).eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    tensors = (x, conv.weight, conv.bias, bn.weight, bn.bias)
    statistics = (bn.running_mean.clone(), bn.running_var.clone())
    # reference: (conv(x) − μ)/√(σ² + ε)·γ + β written out, with BatchNorm's own eps
    y = F.conv2d(x, conv.weight, conv.bias, padding=1)
    want = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps) \
        * bn.weight[:, None, None] + bn.bias[:, None, None]
    got = F.conv2d(x, *model.fold_batchnorm(conv, bn), padding=1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(want.shape, dtype=torch.float64)
    for g, w in zip(torch.autograd.grad(got, tensors, upstream), torch.autograd.grad(want, tensors, upstream)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert torch.equal(bn.running_mean, statistics[0]) and torch.equal(bn.running_var, statistics[1])


def _bninception_pair(fold_bn, channels_last, seed=4):
    """build_model's BN-Inception with the given fast-path choices and random BatchNorm statistics."""
    net = model.build_model("bninception", 16, seed=seed, channels_last=channels_last, fold_bn=fold_bn)
    assert net.backbone.fold_bn == fold_bn
    return _random_batchnorm_(net, seed)


def _loss(embeddings, labels):
    # squared distance to a fixed random target per class: its gradient is well conditioned, so float32
    # rounding differences stay at rounding size all the way back to the first layer
    targets = torch.randn(2, embeddings.shape[1], generator=torch.Generator().manual_seed(9))
    return (embeddings - targets[labels]).square().sum()


def test_fast_path_matches_the_plain_path_to_float32_rounding():
    plain, fast = _bninception_pair(False, False), _bninception_pair(True, True)
    assert fast.backbone.conv2_3x3.weight.is_contiguous(memory_format=torch.channels_last)
    assert plain.backbone.conv2_3x3.weight.is_contiguous()
    x, labels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 50, torch.tensor([0, 1])
    out_plain, out_fast = plain(x), fast(x)
    assert not torch.equal(out_plain, out_fast)  # the sums are formed differently ...
    # ... which moves results by ~1e-6 of their scale (both paths are that far from a float64 run)
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-4, atol=1e-5 * out_plain.abs().max().item())
    loss_plain, loss_fast = _loss(out_plain, labels), _loss(out_fast, labels)
    torch.testing.assert_close(loss_fast, loss_plain, rtol=1e-5, atol=0.0)
    loss_plain.backward()
    loss_fast.backward()
    trainable = {n: p for n, p in plain.named_parameters() if p.requires_grad}
    for name, p in fast.named_parameters():
        assert (p.grad is None) == (name not in trainable), name  # frozen BatchNorm gets no gradient
        if p.grad is not None:
            scale = trainable[name].grad.abs().max().item()
            torch.testing.assert_close(p.grad, trainable[name].grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_fast_path_does_not_depend_on_the_input_layout():
    fast = _bninception_pair(True, True).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(fast(x), fast(x.contiguous(memory_format=torch.channels_last)))


def test_batchnorm_in_training_mode_is_not_folded():
    net = model.build_model("bninception", 16, freeze_bn=False).train()
    bn = net.backbone.conv1_7x7_s2_bn
    before = bn.running_mean.clone()
    net(torch.randn(2, 3, 32, 32))
    assert not torch.equal(bn.running_mean, before) and bn.num_batches_tracked.item() == 1


def _train(net, optimizer, steps, generator):
    labels = torch.tensor([0, 1])
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        _loss(net(torch.randn(2, 3, 32, 32, generator=generator) * 50), labels).backward()
        optimizer.step()


def _run(fast):
    net = _bninception_pair(fast, fast)
    return net, torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)


@pytest.fixture
def deterministic():
    """Deterministic kernels as in a training run; each test sets fill_uninitialized_memory itself."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.utils.deterministic.fill_uninitialized_memory = saved[2]


@pytest.mark.usefixtures("deterministic")
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_training_is_bit_identical_with_nan_filled_memory_and_across_a_resume(fast):
    # Deterministic mode fills each new tensor with NaN unless told not to; a training run tells it not to
    # (bookkeeping.make_deterministic). If any kernel of a step read memory it had not written, the NaN run
    # would differ from the unfilled one (NaN, or other bits). fast: folded BatchNorm and channels_last.
    runs = []
    for fill in (True, False):
        torch.utils.deterministic.fill_uninitialized_memory = fill
        net, optimizer = _run(fast)
        initial = net.embedding.weight.detach().clone()
        _train(net, optimizer, 2, torch.Generator().manual_seed(7))
        runs.append(net.state_dict())
    # resume: 1 step, a checkpoint through a file's bytes, a fresh model and optimiser, 1 more step
    net, optimizer = _run(fast)
    generator = torch.Generator().manual_seed(7)
    _train(net, optimizer, 1, generator)
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed, optimizer = _run(fast)
    resumed.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _train(resumed, optimizer, 1, generator)
    runs.append(resumed.state_dict())
    filled = runs[0]
    assert not torch.equal(filled["embedding.weight"], initial)  # it trained
    assert all(torch.isfinite(t).all() for t in filled.values() if t.is_floating_point())
    for other in runs[1:]:
        assert list(other) == list(filled)
        assert all(torch.equal(filled[k], other[k]) for k in filled)
    assert resumed.backbone.conv1_7x7_s2.weight.is_contiguous(memory_format=torch.channels_last) == fast


@pytest.mark.parametrize("source_cl, target_cl", [(True, False), (False, True)])
def test_state_dict_does_not_depend_on_the_layout(source_cl, target_cl):
    source = model.build_model("bninception", 16, seed=8, channels_last=source_cl)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target = model.build_model("bninception", 16, seed=9, channels_last=target_cl)
    target.load_state_dict(torch.load(buffer, weights_only=True))
    got, want = target.state_dict(), source.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    layout = torch.channels_last if target_cl else torch.contiguous_format
    assert all(p.is_contiguous(memory_format=layout) for p in target.parameters() if p.dim() == 4)


@pytest.mark.parametrize("backbone, kwargs, shape", [("tiny_cnn", {"in_channels": 3}, (2, 3, 8, 8)),
                                                     ("mlp", {}, (2, 1, 8, 8)), ("resnet50", {}, (2, 3, 32, 32))])
def test_every_backbone_runs_channels_last(backbone, kwargs, shape):
    nchw = model.build_model(backbone, 8, seed=3, backbone_kwargs=kwargs).eval()
    fast = model.build_model(backbone, 8, seed=3, backbone_kwargs=kwargs, channels_last=True).eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want, got = nchw(x), fast(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
