"""Reference subjects: small MLP/LeNet/VGG/ResNet classifiers and the paper's VGG16/VGG19/AlexNet (plus ResNet-18) trained on the embedded datasets,
with their per-epoch history, in the formats a DARE job takes."""
from .models import ALL_ARCHS, ARCHS, PAPER_ARCHS, build
from .train import train_reference

__all__ = ["ALL_ARCHS", "ARCHS", "PAPER_ARCHS", "build", "train_reference"]
