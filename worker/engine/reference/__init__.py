"""Reference subjects: small MLP/LeNet/VGG/ResNet classifiers trained on the embedded datasets,
with their per-epoch history, in the formats a DARE job takes."""
from .models import ARCHS, build
from .train import train_reference

__all__ = ["ARCHS", "build", "train_reference"]
