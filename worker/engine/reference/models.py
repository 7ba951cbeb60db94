"""Reference subjects: small classifiers of the four families the paper evaluates.

Plain ``nn.Module``s built for any (C, H, W) input; sizes are kept small so that training on the
embedded datasets takes seconds on a CPU. Every Linear has a bias, and every module has a stable
attribute name, so state-dict names (the ``.pt2`` canonical names) and ONNX initializer names
(the legacy exporter names initializers after the state dict) coincide.
"""
from __future__ import annotations

import torch
import torch.nn as nn

ARCHS = ("mlp", "lenet", "vgg", "resnet")  # small: seconds on a CPU, what the tests train
# The paper's architectures (section 4.1: VGG16, VGG19, AlexNet) and ResNet-18, as the usual
# small-image (CIFAR) variants; ``width`` scales every channel and hidden count (1.0 = full).
PAPER_ARCHS = ("vgg16", "vgg19", "alexnet", "resnet18")
ALL_ARCHS = ARCHS + PAPER_ARCHS


def build(arch: str, in_shape, num_classes: int, width: float = 1.0) -> nn.Module:
    """A fresh (randomly initialised, seed it first) model for inputs (N, *in_shape).
    ``width`` applies to the paper architectures only."""
    in_shape = tuple(int(d) for d in in_shape)
    if len(in_shape) != 3:
        raise ValueError(f"in_shape must be (C, H, W), got {in_shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if arch == "mlp":
        return MLP(in_shape, num_classes)
    if arch == "lenet":
        return LeNet(in_shape, num_classes)
    if arch == "vgg":
        return VGG(in_shape, num_classes)
    if arch == "resnet":
        return ResNet(in_shape, num_classes)
    if not 0 < width <= 4:
        raise ValueError(f"width must be in (0, 4], got {width}")
    if arch in VGG_CFGS:
        return VGGDeep(in_shape, num_classes, VGG_CFGS[arch], width)
    if arch == "alexnet":
        return AlexNet(in_shape, num_classes, width)
    if arch == "resnet18":
        return ResNet18(in_shape, num_classes, width)
    raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ALL_ARCHS)}")


def _scaled(n: int, width: float) -> int:
    return max(4, int(round(n * width)))


def _flat_size(features: nn.Module, in_shape) -> int:
    was_training = features.training
    features.eval()  # BatchNorm refuses a batch of one 1x1 map in training mode
    try:
        with torch.no_grad():
            return int(features(torch.zeros(1, *in_shape)).numel())
    finally:
        features.train(was_training)


class MLP(nn.Module):
    """Flatten -> 128 -> 64 -> K with ReLU."""

    def __init__(self, in_shape, num_classes: int, hidden=(128, 64)) -> None:
        super().__init__()
        c, h, w = in_shape
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c * h * w, hidden[0])
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(hidden[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.fc1(self.flatten(x)))
        return self.fc3(self.relu2(self.fc2(x)))


class LeNet(nn.Module):
    """LeNet-5 layout: two conv + max-pool stages, then 120 -> 84 -> K.

    5x5 kernels for MNIST-sized inputs (the classic net), 3x3 with padding for small ones (8x8
    digits would vanish under two unpadded 5x5 convolutions).
    """

    def __init__(self, in_shape, num_classes: int) -> None:
        super().__init__()
        c, h, w = in_shape
        k, pad1, pad2 = (5, 2, 0) if min(h, w) >= 20 else (3, 1, 1)
        self.conv1 = nn.Conv2d(c, 6, k, padding=pad1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, k, padding=pad2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        feats = nn.Sequential(self.conv1, self.relu1, self.pool1, self.conv2, self.relu2, self.pool2)
        self.fc1 = nn.Linear(_flat_size(feats, in_shape), 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(self.flatten(x)))
        return self.fc3(self.relu4(self.fc2(x)))


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]


class VGG(nn.Module):
    """VGG-style: [conv-BN-ReLU x2, max-pool], [conv-BN-ReLU x2, max-pool], then a dropout
    classifier head (dropout -> 128 -> ReLU -> dropout -> K)."""

    def __init__(self, in_shape, num_classes: int, widths=(16, 32), dropout: float = 0.3) -> None:
        super().__init__()
        c = in_shape[0]
        layers: list[nn.Module] = []
        for w in widths:
            layers += _conv_bn_relu(c, w) + _conv_bn_relu(w, w) + [nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(_flat_size(self.features, in_shape), 128),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN plus a shortcut, then ReLU. The shortcut is the
    identity when shapes agree, else a strided 1x1 conv with BN."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(y + self.shortcut(x))


class ResNet(nn.Module):
    """A tiny ResNet: stem conv-BN-ReLU (16), block 16->16 (identity shortcut), block 16->32
    stride 2 (1x1-conv shortcut), global average pooling, Linear -> K."""

    def __init__(self, in_shape, num_classes: int, widths=(16, 32)) -> None:
        super().__init__()
        c = in_shape[0]
        self.conv1 = nn.Conv2d(c, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = BasicBlock(widths[0], widths[0], stride=1)
        self.layer2 = BasicBlock(widths[0], widths[1], stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(self.flatten(self.pool(x)))


# VGG configurations D (16 weight layers) and E (19) of Simonyan & Zisserman, "M" a 2x2 max-pool.
VGG_CFGS = {
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"),
}


class VGGDeep(nn.Module):
    """VGG16/19 as adapted to 32x32 images (the common CIFAR variant): 3x3 conv-BN-ReLU stacks,
    five max-pools, one Linear on the flattened features. On 28x28 input the fifth pool would
    meet a 1x1 map; a pool that would shrink the map below 1x1 is left out."""

    def __init__(self, in_shape, num_classes: int, cfg, width: float = 1.0) -> None:
        super().__init__()
        c, h, w = in_shape
        layers: list[nn.Module] = []
        for v in cfg:
            if v == "M":
                if min(h, w) >= 2:
                    layers.append(nn.MaxPool2d(2))
                    h, w = h // 2, w // 2
                continue
            out = _scaled(v, width)
            layers += _conv_bn_relu(c, out)
            c = out
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(_flat_size(self.features, in_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


class AlexNet(nn.Module):
    """AlexNet for small images (the usual CIFAR adaptation): five 3x3 conv layers
    (64-192-384-256-256) with ReLU and three max-pools, then dropout -> 4096 -> 4096 -> K; no
    BatchNorm, as in the original."""

    def __init__(self, in_shape, num_classes: int, width: float = 1.0, dropout: float = 0.5) -> None:
        super().__init__()
        c = in_shape[0]
        a, b, d, e, f = (_scaled(n, width) for n in (64, 192, 384, 256, 256))
        self.features = nn.Sequential(
            nn.Conv2d(c, a, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(a, b, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(b, d, 3, padding=1), nn.ReLU(),
            nn.Conv2d(d, e, 3, padding=1), nn.ReLU(),
            nn.Conv2d(e, f, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        hidden = _scaled(4096, width)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout), nn.Linear(_flat_size(self.features, in_shape), hidden), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images (He et al.'s basic blocks, [2, 2, 2, 2], widths 64-512, the
    CIFAR stem: one 3x3 conv, no max-pool), global average pooling, Linear -> K."""

    def __init__(self, in_shape, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        widths = [_scaled(n, width) for n in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_shape[0], widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        blocks: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks += [BasicBlock(cin, w, stride), BasicBlock(w, w, 1)]
            cin = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.flatten(self.pool(x)))
