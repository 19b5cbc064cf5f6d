"""A user's own model for dsdtune: a small CNN, built as factory(input_shape=..., num_classes=..., **model_args)."""
from torch import nn


def small_cnn(input_shape, num_classes, width: int = 16) -> nn.Module:
    channels = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),           # first layer: stays dense
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )
