"""An "unknown" score that travels inside the model: how far an input's features lie from every class.

The score is the Mahalanobis distance (Lee et al., 2018) from the backbone's features to the nearest class mean,
with one covariance shared by all classes, estimated with Ledoit-Wolf shrinkage so that a few hundred files in a
thousand dimensions still give a usable inverse. The shrinkage is computed here in a few lines of numpy rather
than with scikit-learn's LedoitWolf (the same figures; a test checks them against it), because importing
scikit-learn would add a second to every linear run, which otherwise never loads it. It is stored as a whitening matrix and the
whitened class means, so a forward pass (PyTorch or the exported ONNX graph) returns it beside the logits.

Why not a score from the logits (maximum softmax, energy): on frozen pretrained features a linear head gives
foreign inputs logits as large as its classes' (hymenoptera against sprites, CIFAR-10 and photos: AUROC 0.40 for
maximum softmax, 0.99 for this distance; benchmarks/results has the comparison)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class MahalanobisScore(nn.Module):
    """features (B, D) -> (B,) root-mean-square whitened distance to the nearest class mean: near 1 for inputs
    like the training files, larger for foreign ones."""

    def __init__(self, num_classes: int, feature_dim: int):
        super().__init__()
        self.register_buffer("whiten", torch.eye(feature_dim))  # (D, D): x @ whiten has identity covariance
        self.register_buffer("means", torch.zeros(num_classes, feature_dim))  # (C, D) class means, whitened

    @classmethod
    def fit(cls, features: np.ndarray, y: np.ndarray, num_classes: int) -> MahalanobisScore:
        """From (N, D) training features and their classes. A class without files gets no mean (an infinite
        distance), so it never makes an input look known."""
        x = np.asarray(features, np.float64)
        means = np.full((num_classes, x.shape[1]), np.inf)
        for c in np.unique(y):
            means[c] = x[y == c].mean(0)
        lower = np.linalg.cholesky(ledoit_wolf(x - means[y]))  # covariance = lower @ lower.T
        whiten = np.linalg.inv(lower).T  # (x @ whiten) has identity covariance
        score = cls(num_classes, x.shape[1])
        finite = np.isfinite(means).all(1)
        means_w = np.full_like(means, 1e6)  # far from anything: a class without files is never nearest
        means_w[finite] = means[finite] @ whiten
        score.whiten.copy_(torch.from_numpy(whiten).float())
        score.means.copy_(torch.from_numpy(means_w).float())
        return score

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = features.float() @ self.whiten  # (B, D)
        # ||z - m||^2 = ||z||^2 - 2 z.m + ||m||^2 for every class at once: (B, C)
        d2 = (z * z).sum(1, keepdim=True) - 2 * z @ self.means.T + (self.means * self.means).sum(1)
        return torch.sqrt(d2.min(1).values.clamp(min=0) / z.shape[1])


def ledoit_wolf(centred: np.ndarray) -> np.ndarray:
    """(D, D) covariance of (N, D) centred rows, shrunk towards a scaled identity by the Ledoit-Wolf (2004)
    amount, which minimises the expected squared error of the estimate."""
    n, d = centred.shape
    sample = centred.T @ centred / n
    mu = np.trace(sample) / d
    # squared distance of the sample covariance to mu * I, and the variance of the sample covariance's entries
    delta = (np.sum(sample * sample) - 2 * mu * np.trace(sample) + d * mu * mu) / d
    sq_norms = np.sum(centred * centred, 1)
    beta = (np.sum(sq_norms ** 2) / n - np.sum(sample * sample)) / (n * d)
    shrinkage = 0.0 if delta == 0 else min(beta, delta) / delta
    return (1 - shrinkage) * sample + shrinkage * mu * np.eye(d)


class WithUnknownScore(nn.Module):
    """What a run with an open-set score ships: (B, C) logits and the (B,) unknown score from one pass. One
    (B, C + 1) tensor by default (the score last); `named_outputs()` makes it two outputs, for ONNX files whose
    users read `logits` and `unknown_score` by name."""

    output_names = ("logits",)

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier
        self.backbone = classifier.backbone  # what engines ask (bf16_safe, spec)
        self.separate = False

    def named_outputs(self) -> WithUnknownScore:
        self.separate = True
        self.output_names = ("logits", "unknown_score")
        return self

    def forward(self, x: torch.Tensor):
        c = self.classifier
        features = c.backbone(x)
        logits = c.head(c.dropout(features))
        score = c.open_set(features)
        if self.separate:
            return logits, score
        return torch.cat([logits, score[:, None].to(logits.dtype)], 1)


def shipped(model: nn.Module) -> nn.Module:
    """The module a run's predictions come from: the classifier, with its unknown score when it has one."""
    return WithUnknownScore(model) if getattr(model, "open_set", None) is not None else model
