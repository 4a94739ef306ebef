"""A feature ensemble of source models: their penultimate features side by side, one linear head on top.

    transferkit train --target data/t --model tf_efficientnet_lite0+tf_efficientnet_lite1 --out runs/e

Each member sees the same resized image and applies its own mean/std inside the graph (so the exported
ONNX model takes one input, normalised with mean 0 / std 1, and needs no per-member preprocessing). With
equal input size and interpolation, a member's features here equal its features on its own, which is why
the embedding cache can serve an ensemble by concatenating its members' cached features
(`transferkit.models.embed.compute_embeddings`) instead of running the members again.

The module speaks the part of timm's model interface the stages use (`forward_features`, `forward_head`,
`get_classifier`, `reset_classifier`, `num_classes`, `num_features`, `pretrained_cfg`), so a linear probe,
a full fine-tune, BatchNorm handling, checkpoints and ONNX export treat it like any timm model. It has no
stage structure (`group_matcher`), so `partial` fine-tuning refuses it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class FeatureEnsemble(nn.Module):
    def __init__(self, members: list[nn.Module], norms: list[tuple], num_classes: int = 0, drop_rate: float = 0.0):
        """`members`: timm models without a classifier (num_classes 0); `norms`: each one's (mean, std)."""
        super().__init__()
        self.members = nn.ModuleList(members)
        for i, (mean, std) in enumerate(norms):
            # persistent buffers: a checkpoint carries each member's preprocessing with its weights
            self.register_buffer(f"mean{i}", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer(f"std{i}", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.num_features = sum(int(m.num_features) for m in members)
        self.drop_rate = drop_rate
        cfg = dict(getattr(members[0], "pretrained_cfg", {}) or {})
        self.pretrained_cfg = {**cfg, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "num_classes": num_classes}
        self.reset_classifier(num_classes)  # sets num_classes and head

    def reset_classifier(self, num_classes: int, *args) -> None:
        self.num_classes = int(num_classes)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for i, m in enumerate(self.members):
            z = (x - getattr(self, f"mean{i}")) / getattr(self, f"std{i}")
            feats.append(m.forward_head(m.forward_features(z), pre_logits=True))
        return torch.cat(feats, dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = F.dropout(x, p=self.drop_rate, training=self.training) if self.drop_rate > 0 else x
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build(members: list[nn.Module], norms: list[tuple], num_classes: int, drop_rate: float) -> FeatureEnsemble:
    """Members lose their own classifiers (the ensemble's head replaces them)."""
    for m in members:
        m.reset_classifier(0)
    return FeatureEnsemble(members, norms, num_classes, drop_rate)
