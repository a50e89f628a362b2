"""The embedding network f_θ of PAPER.md §7: a backbone's convolutional feature map, globally pooled,
then one bias-free linear layer to d = 128 dimensions initialised Glorot-uniform (the MLRC protocol).
It returns raw f(x): the normalisation n of PAPER.md §3 is the loss's and train.py's (docs/DESIGN.md).

Owns the backbones (BN-Inception with the layer names of the common PyTorch port of the Caffe model,
torchvision's ResNet-50, the small TinyCNN and MLP of the digits demo), frozen BatchNorm (`freeze_bn`,
the paper's setting), pretrained-weight loading and `build_model`, whose weights are a pure function
of its arguments. BN-Inception's reference forward, in the port's layer order, comes first; its fast
path (BatchNorm folded into the convs, a block's 1×1 convs run as one) follows it and moves results by
float32 rounding only. Neither the fast path nor channels_last changes the state_dict.
"""
from __future__ import annotations

import difflib
import inspect
import os
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

POOLINGS = ("avg", "max")
# classifier heads of the ImageNet files (the BN-Inception port's, torchvision's): never loaded
CLASSIFIER_PREFIXES = ("last_linear.", "fc.")
BNINCEPTION_URL = "http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth"
BNINCEPTION_SOURCE = "the pretrained-models project for PyTorch (github.com/Cadene/pretrained-models.pytorch)"


# ----------------------------------------------------------------------------------------------
# BN-Inception (Ioffe & Szegedy 2015), Caffe model as ported to PyTorch

class _Block(NamedTuple):
    """One inception block: output widths of its conv units, keyed as in the Caffe names."""
    name: str
    in_channels: int
    n1x1: int            # 0: no 1x1 branch (the reduction blocks 3c and 4e)
    n3x3_reduce: int
    n3x3: int
    n_double_reduce: int
    n_double: int        # both 3x3 convs of the double_3x3 branch
    pool_proj: int       # 0: the pooled input is concatenated unprojected (reduction blocks)
    pool: str            # "avg" | "max" (3×3, stride 1, pad 1) | "max_s2" (3×3, stride 2: reduction)


def _pool(kind: str, x: torch.Tensor) -> torch.Tensor:
    # the port's pooling branches; count_include_pad=True and ceil_mode=True match Caffe's output
    if kind == "avg":
        return F.avg_pool2d(x, 3, stride=1, padding=1, ceil_mode=True, count_include_pad=True)
    if kind == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1, ceil_mode=True)
    return F.max_pool2d(x, 3, stride=2, ceil_mode=True)


class BNInception(nn.Module):
    """BN-Inception with the PyTorch port's flat Caffe layer names (no classifier `last_linear`), so the
    port's ImageNet file (bn_inception-52deb4733.pth) loads without renaming.

    Every conv `<name>` (with bias) is followed by BatchNorm `<name>_bn` (eps 1e-5, affine, tracked
    statistics) and a ReLU. Expects BGR images in 0–255 minus the mean (104, 117, 128) (data.CaffeBGR).
    fold_bn=False runs every BatchNorm as its own op (the fast path below is off).
    """

    feature_dim = 1024
    BLOCKS = (
        _Block("inception_3a", 192, 64, 64, 64, 64, 96, 32, "avg"),
        _Block("inception_3b", 256, 64, 64, 96, 64, 96, 64, "avg"),
        _Block("inception_3c", 320, 0, 128, 160, 64, 96, 0, "max_s2"),
        _Block("inception_4a", 576, 224, 64, 96, 96, 128, 128, "avg"),
        _Block("inception_4b", 576, 192, 96, 128, 96, 128, 128, "avg"),
        _Block("inception_4c", 576, 160, 128, 160, 128, 160, 128, "avg"),
        _Block("inception_4d", 608, 96, 128, 192, 160, 192, 128, "avg"),
        _Block("inception_4e", 608, 0, 128, 192, 192, 256, 0, "max_s2"),
        _Block("inception_5a", 1056, 352, 192, 320, 160, 224, 128, "avg"),
        _Block("inception_5b", 1024, 352, 192, 320, 192, 224, 128, "max"),
    )

    def __init__(self, fold_bn: bool = True) -> None:
        super().__init__()
        self.fold_bn = fold_bn
        self._add_unit("conv1_7x7_s2", 3, 64, 7, stride=2, padding=3)
        self._add_unit("conv2_3x3_reduce", 64, 64, 1)
        self._add_unit("conv2_3x3", 64, 192, 3, padding=1)
        for b in self.BLOCKS:
            self._add_block(b)

    def _add_unit(self, name: str, c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0) -> None:
        # registered flat (not in a sub-module) so that state_dict keys are the port's Caffe names
        self.add_module(name, nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding))
        self.add_module(name + "_bn", nn.BatchNorm2d(c_out, eps=1e-5))

    def _add_block(self, b: _Block) -> None:
        stride = 2 if b.pool == "max_s2" else 1
        if b.n1x1:
            self._add_unit(f"{b.name}_1x1", b.in_channels, b.n1x1, 1)
        self._add_unit(f"{b.name}_3x3_reduce", b.in_channels, b.n3x3_reduce, 1)
        self._add_unit(f"{b.name}_3x3", b.n3x3_reduce, b.n3x3, 3, stride=stride, padding=1)
        self._add_unit(f"{b.name}_double_3x3_reduce", b.in_channels, b.n_double_reduce, 1)
        self._add_unit(f"{b.name}_double_3x3_1", b.n_double_reduce, b.n_double, 3, padding=1)
        self._add_unit(f"{b.name}_double_3x3_2", b.n_double, b.n_double, 3, stride=stride, padding=1)
        if b.pool_proj:
            self._add_unit(f"{b.name}_pool_proj", b.in_channels, b.pool_proj, 1)

    # -- the reference forward, in the port's layer order (each stem unit is followed by a max pool)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, 1024, H', W'); 7×7 for H = W = 224 or 227."""
        x = self.unit_max_pooled("conv1_7x7_s2", x)
        x = self.unit_max_pooled("conv2_3x3", self.unit("conv2_3x3_reduce", x))
        for b in self.BLOCKS:
            x = self.block(b, x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def block(self, b: _Block, x: torch.Tensor) -> torch.Tensor:
        """Inception block `b`: its 1x1, 3x3, double 3x3 and pool branches, concatenated along channels."""
        n = b.name
        if self.fuses_heads(b):  # fast path: the 1×1 convs that read x run as one conv (below)
            one, reduced, double_reduced, pool_branch = self.folded_heads(b, x)
        else:
            one = [self.unit(f"{n}_1x1", x)] if b.n1x1 else []
            reduced, double_reduced = self.unit(f"{n}_3x3_reduce", x), self.unit(f"{n}_double_3x3_reduce", x)
            pool_branch = None
        three = self.unit(f"{n}_3x3", reduced)
        double = self.unit(f"{n}_double_3x3_2", self.unit(f"{n}_double_3x3_1", double_reduced))
        if pool_branch is None:
            pooled = _pool(b.pool, x)
            pool_branch = self.unit(f"{n}_pool_proj", pooled) if b.pool_proj else pooled
        return torch.cat(one + [three, double, pool_branch], dim=1)

    def unit(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Caffe's conv → BatchNorm → ReLU unit `name`."""
        return F.relu(self.conv_bn(name, x), inplace=True)

    def conv_bn(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Caffe's conv `name` and its BatchNorm (as one conv where it `folds`: fast path, below)."""
        conv, bn = getattr(self, name), getattr(self, name + "_bn")
        if self.folds(bn):
            return F.conv2d(x, *fold_batchnorm(conv, bn), conv.stride, conv.padding)
        return bn(conv(x))

    # -- fast path: the same function in fewer passes over the activations (benchmarks/bench_step.py).
    # Sums are formed in another order, so results move by float32 rounding, no more.

    def folds(self, bn: _BatchNorm) -> bool:
        """Whether `bn` runs folded into its conv: asked for, and BatchNorm in eval mode (frozen, or evaluating)."""
        return self.fold_bn and not bn.training

    def unit_max_pooled(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The stem's unit `name`, then its 3×3 stride-2 max pool, the pool before the ReLU: max and ReLU
        commute (ReLU is monotone), so values and gradients are the same bits, and the ReLU touches a
        quarter of the values."""
        return F.relu(_pool("max_s2", self.conv_bn(name, x)), inplace=True)

    @staticmethod
    def heads(b: _Block) -> list[str]:
        """The 1×1 units that read the block's input: 1x1, both reduces and, after an average pool, pool_proj."""
        names = [f"{b.name}_1x1"] if b.n1x1 else []
        names += [f"{b.name}_3x3_reduce", f"{b.name}_double_3x3_reduce"]
        return names + ([f"{b.name}_pool_proj"] if b.pool == "avg" else [])

    def fuses_heads(self, b: _Block) -> bool:
        """Whether block `b`'s heads run as one conv: every one of them folds."""
        return all(self.folds(getattr(self, name + "_bn")) for name in self.heads(b))

    def folded_heads(self, b: _Block, x: torch.Tensor) -> tuple:
        """Block `b`'s 1x1 outputs (a list, empty in reduction blocks), both reduces and, after an average
        pool, its whole pool branch (else None), BatchNorm folded, with fewer passes over the activations:

        - the heads run as one 1×1 conv with their weights stacked: one pass over x forward, and x's
          gradient comes out of one conv instead of being summed from four;
        - the average pool's projection runs before the pool: a bias-free 1×1 conv and a zero-padded 3×3
          mean (always divided by 9) are both linear, so they commute, and the pool then averages
          pool_proj's channels instead of the block's; the bias joins after it.
        """
        weights, biases = zip(*(fold_batchnorm(getattr(self, name), getattr(self, name + "_bn"))
                                for name in self.heads(b)))
        projects = b.pool == "avg"
        conv_biases = biases[:-1] + (torch.zeros_like(biases[-1]),) if projects else biases
        pieces = F.conv2d(x, torch.cat(weights), torch.cat(conv_biases)).split([w.shape[0] for w in weights], dim=1)
        outputs = [F.relu(piece) for piece in pieces[:-1 if projects else None]]
        pool_branch = F.relu(_pool("avg", pieces[-1]) + biases[-1][:, None, None], inplace=True) if projects else None
        return outputs[:-2], outputs[-2], outputs[-1], pool_branch


def fold_batchnorm(conv: nn.Conv2d, bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the one conv that equals eval-mode bn(conv(x)), differentiable in all four tensors.

    bn(W∗x + b) = s·(W∗x + b − μ) + β with s = γ/√(σ² + ε): a conv with W' = s·W and b' = s·(b − μ) + β.
    Saves BatchNorm's pass over the activations forward and backward; the state_dict is unchanged.
    """
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return conv.weight * scale[:, None, None, None], (conv.bias - bn.running_mean) * scale + bn.bias


# ----------------------------------------------------------------------------------------------
# ResNet-50 (torchvision) and the small networks of the digits demo

class ResNet50(nn.Module):
    """torchvision's ResNet-50 up to layer4 (no pooling, no `fc`), with torchvision's key names."""

    feature_dim = 2048
    PARTS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")

    def __init__(self) -> None:
        super().__init__()
        net = torchvision.models.resnet50(weights=None)
        for name in self.PARTS:
            self.add_module(name, getattr(net, name))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, 2048, H/32, W/32)."""
        for name in self.PARTS:
            x = getattr(self, name)(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class TinyCNN(nn.Module):
    """Two conv → BatchNorm → ReLU layers with a 2×2 max pool between: (B, C, 8, 8) → (B, 2w, 4, 4)."""

    def __init__(self, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.feature_dim = 2 * width
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        return F.relu(self.bn2(self.conv2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class MLP(nn.Module):
    """Two ReLU layers on the flattened input; `features` gives (B, hidden, 1, 1) like a conv map."""

    def __init__(self, in_features: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.feature_dim = hidden
        self.layer1 = nn.Linear(in_features, hidden)
        self.layer2 = nn.Linear(hidden, hidden)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.layer2(F.relu(self.layer1(x.flatten(1)))))
        return h[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


BACKBONES = {"bninception": BNInception, "resnet50": ResNet50, "tiny_cnn": TinyCNN, "mlp": MLP}


# ----------------------------------------------------------------------------------------------
# The embedding model f_θ (PAPER.md §7)

def global_pool(features: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, C, H, W) → (B, C): mean (MLRC's, the paper's) or max over the spatial positions."""
    return features.mean(dim=(2, 3)) if pooling == "avg" else features.amax(dim=(2, 3))


def batchnorm_parameter_names(model: nn.Module) -> set[str]:
    """Names (as in model.named_parameters()) of every BatchNorm γ and β: no weight decay on them (PAPER.md §2)."""
    return {f"{module_name}.{name}" if module_name else name
            for module_name, module in model.named_modules() if isinstance(module, _BatchNorm)
            for name, _ in module.named_parameters(recurse=False)}


class EmbeddingModel(nn.Module):
    """f(x) = W · pool(backbone.features(x)), W a bias-free (d × feature_dim) Glorot-uniform matrix.

    Returns raw embeddings (no normalisation). With `freeze_bn` every BatchNorm is frozen: its γ, β
    have requires_grad False and the module stays in eval mode under `train()`, so its running
    statistics never change (PAPER.md §7). With `channels_last` 4-D input is converted to channels_last
    memory before the backbone (build_model converts the weights), so the result does not depend on
    the layout the input comes in.
    """

    def __init__(self, backbone: nn.Module, embedding_dim: int = 128, pooling: str = "avg",
                 freeze_bn: bool = True, channels_last: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.freeze_bn = freeze_bn
        self.channels_last = channels_last
        self.feature_dim = backbone.feature_dim
        self.embedding_dim = embedding_dim
        self.embedding = nn.Linear(backbone.feature_dim, embedding_dim, bias=False)
        nn.init.xavier_uniform_(self.embedding.weight)
        if freeze_bn:
            for name in batchnorm_parameter_names(self):
                self.get_parameter(name).requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> EmbeddingModel:
        super().train(mode)
        if self.freeze_bn:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()  # eval mode: normalise with, and never update, the running statistics
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, ...) → raw embeddings f(x), (B, embedding_dim)."""
        if self.channels_last and x.dim() == 4:  # the layout of the fastest CPU convolutions (NCHW: a reorder each)
            x = x.contiguous(memory_format=torch.channels_last)
        return self.embedding(global_pool(self.backbone.features(x), self.pooling))


# ----------------------------------------------------------------------------------------------
# Pretrained weights

def _squeeze_leading_singletons(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    # the BN-Inception file stores some vectors as (1, C): drop leading 1s down to the module's rank
    while tensor.dim() > len(shape) and tensor.shape[0] == 1:
        tensor = tensor.squeeze(0)
    return tensor


def _listing(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}]"


def load_pretrained(module: nn.Module, path: str | os.PathLike,
                    skip_prefixes: tuple[str, ...] = CLASSIFIER_PREFIXES) -> None:
    """Load a state_dict file into `module`, exactly or not at all.

    Squeezes leading singleton dimensions where the module's tensor has fewer, skips the ImageNet
    classifier (keys starting with `skip_prefixes`), and tolerates missing BatchNorm
    `num_batches_tracked` counters (files saved before PyTorch 0.4.1 have none; they are unused).
    Any other missing or unexpected key or shape mismatch raises ValueError listing them all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_pretrained: no weight file at {path}")
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated downloads and foreign files fail in many ways inside torch/pickle
        raise ValueError(f"load_pretrained: cannot read {path} as a PyTorch weight file: {err}") from None
    if not isinstance(stored, dict) or not all(isinstance(v, torch.Tensor) for v in stored.values()):
        raise ValueError(f"load_pretrained: expected {path} to hold a state_dict (dict of name → tensor), "
                         f"got {type(stored).__name__}")
    expected = module.state_dict()
    state, unexpected, mismatched = {}, [], []
    for key, tensor in stored.items():
        if key.startswith(skip_prefixes):
            continue
        if key not in expected:
            unexpected.append(key)
            continue
        tensor = _squeeze_leading_singletons(tensor, expected[key].shape)
        if tensor.shape != expected[key].shape:
            mismatched.append(f"{key}: file {tuple(tensor.shape)} vs model {tuple(expected[key].shape)}")
            continue
        state[key] = tensor
    missing = [k for k in expected if k not in stored and not k.endswith(".num_batches_tracked")]
    if missing or unexpected or mismatched:
        raise ValueError(f"load_pretrained: {path} does not fit {type(module).__name__}: "
                         f"{len(missing)} missing keys {_listing(missing)}, "
                         f"{len(unexpected)} unexpected keys {_listing(unexpected)}, "
                         f"{len(mismatched)} shape mismatches {_listing(mismatched)}")
    module.load_state_dict(state, strict=False)


def hub_checkpoint_dir() -> Path:
    """Where named weights are looked for and downloaded to: torch.hub's cache ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def known_weights(backbone: str) -> dict[str, tuple[str, str]]:
    """Weight names accepted as `pretrained` for `backbone`: name → (url, where the file comes from)."""
    if backbone == "bninception":
        return {"imagenet": (BNINCEPTION_URL, BNINCEPTION_SOURCE)}
    if backbone == "resnet50":
        return {name: (w.url, f"torchvision's ResNet50_Weights.{name}")
                for name, w in torchvision.models.ResNet50_Weights.__members__.items()}
    return {}


def resolve_pretrained(backbone: str, pretrained: str | os.PathLike) -> Path:
    """A known weight name (found in, or downloaded to, hub_checkpoint_dir()) or a local file → its path."""
    known = known_weights(backbone)
    if str(pretrained) not in known:
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights for {backbone}: no file at {path}, and {str(pretrained)!r} "
                                    f"is not a known weight name (known: {sorted(known) or 'none'})")
        return path
    url, source = known[str(pretrained)]
    target = hub_checkpoint_dir() / os.path.basename(urlparse(url).path)
    if not target.is_file():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(target))
        except OSError as err:  # offline, server gone, unwritable cache: never fall back to random weights
            raise FileNotFoundError(
                f"pretrained weights {pretrained!r} for {backbone}: {target.name} is not in {target.parent} "
                f"and downloading it from {url} failed ({err}). Put {target.name} (from {source}) in "
                f"{target.parent}, or set pretrained to the file's path.") from err
    return target


def _check_arguments(backbone: str, embedding_dim: int, pooling: str, kwargs: dict) -> None:
    if backbone not in BACKBONES:
        close = difflib.get_close_matches(str(backbone), list(BACKBONES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"build_model: unknown backbone {backbone!r}, expected one of {tuple(BACKBONES)}{hint}")
    accepted = list(inspect.signature(BACKBONES[backbone]).parameters)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"build_model: {backbone} takes backbone_kwargs {accepted}, got unknown {unknown}")
    if pooling not in POOLINGS:
        raise ValueError(f"build_model: pooling must be one of {POOLINGS}, got {pooling!r}")
    if not isinstance(embedding_dim, int) or embedding_dim < 1:
        raise ValueError(f"build_model: embedding_dim must be a positive int, got {embedding_dim!r}")


def build_model(backbone: str, embedding_dim: int = 128, pretrained: str | os.PathLike | None = None,
                pooling: str = "avg", freeze_bn: bool = True, seed: int = 0,
                backbone_kwargs: dict | None = None, channels_last: bool = False,
                fold_bn: bool = True) -> EmbeddingModel:
    """The embedding model of PAPER.md §7: a pure function of its arguments (and the weight file).

    `pretrained`: None (initialised from `seed`), a weight file, or a known name ("imagenet" for
    bninception; "IMAGENET1K_V1" / "IMAGENET1K_V2" for resnet50), loaded into the backbone only.
    `backbone_kwargs` go to the backbone's constructor, e.g. {"in_channels": 3} for tiny_cnn.
    `channels_last`: weights and input in channels_last memory (faster on CPU; the state_dict is the same).
    `fold_bn`: BN-Inception's fast path (BNInception; the other backbones have none).
    """
    kwargs = dict(backbone_kwargs or {})
    if "fold_bn" in kwargs:  # it would be overridden below
        raise ValueError("build_model: pass fold_bn as build_model's own argument, not in backbone_kwargs")
    if backbone == "bninception":
        kwargs["fold_bn"] = fold_bn
    _check_arguments(backbone, embedding_dim, pooling, kwargs)
    with torch.random.fork_rng(devices=[]):  # the caller's CPU RNG state is left untouched
        torch.default_generator.manual_seed(seed)
        model = EmbeddingModel(BACKBONES[backbone](**kwargs), embedding_dim, pooling, freeze_bn, channels_last)
    if pretrained is not None:
        load_pretrained(model.backbone, resolve_pretrained(backbone, pretrained))
    return model.to(memory_format=torch.channels_last) if channels_last else model
