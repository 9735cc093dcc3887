"""Small networks shared by the Guidance tests."""

from torch import nn


class CountForwards(nn.Module):
    """Wraps a model and counts how many times its forward runs."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


def mlp():
    """Flatten 1×8×8 → Linear 32 → BN → ReLU → Linear 32 → BN → ReLU → Linear 3."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3),
    )


def cnn(channels: int = 4):
    """Two 3×3 conv + BN + ReLU blocks of ``channels`` on 1×8×8, global pooling, Linear 3."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 3),
    )
