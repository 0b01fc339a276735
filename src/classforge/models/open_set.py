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
        whiten = whitening(x - means[y])  # (x @ whiten) has identity covariance
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
    a, b = shrunk_covariance(centred)
    return a * np.eye(centred.shape[1]) + b * (centred.T @ centred)


def shrunk_covariance(centred: np.ndarray) -> tuple[float, float]:
    """(a, b) such that the Ledoit-Wolf covariance of (N, D) centred rows X is a * I + b * X.T @ X. Computed from
    the (N, N) Gram matrix X @ X.T: the traces and norms the shrinkage needs are the same there, so nothing of
    size D x D is formed."""
    n, d = centred.shape
    gram = centred @ centred.T
    trace = np.trace(gram) / n  # of the sample covariance S = X.T @ X / n
    mu = trace / d
    frobenius2 = np.sum(gram * gram) / (n * n)  # ||S||^2
    # squared distance of the sample covariance to mu * I, and the variance of the sample covariance's entries
    delta = (frobenius2 - 2 * mu * trace + d * mu * mu) / d
    beta = (np.sum(np.diag(gram) ** 2) / n - frobenius2) / (n * d)
    shrinkage = 0.0 if delta == 0 else min(beta, delta) / delta
    return shrinkage * mu, (1 - shrinkage) / n


def whitening(centred: np.ndarray) -> np.ndarray:
    """(D, D) W with W @ W.T the inverse of the Ledoit-Wolf covariance of (N, D) centred rows: x @ W has identity
    covariance, and squared distances between whitened rows are Mahalanobis distances.

    With fewer rows than dimensions (a few hundred files, a thousand features) the covariance is a * I plus a
    matrix of rank below N, so its inverse square root follows from the N x N Gram matrix's eigenvectors
    (X = U s V.T): W = I / sqrt(a) + V diag(1 / sqrt(a + b s^2) - 1 / sqrt(a)) V.T, about ten times faster than
    a Cholesky factor and its inverse. Otherwise W is the inverse of the Cholesky factor, transposed."""
    n, d = centred.shape
    a, b = shrunk_covariance(centred)
    if n >= d or a <= 0:
        lower = np.linalg.cholesky(a * np.eye(d) + b * (centred.T @ centred))  # covariance = lower @ lower.T
        return np.linalg.inv(lower).T
    eigenvalues, u = np.linalg.eigh(centred @ centred.T)  # s^2 and U
    kept = eigenvalues > eigenvalues.max() * 1e-12  # the rows' span (centring removes a dimension per class)
    s2 = eigenvalues[kept]
    v = centred.T @ (u[:, kept] / np.sqrt(s2))  # (D, k), orthonormal columns
    whiten = (v * (1 / np.sqrt(a + b * s2) - 1 / np.sqrt(a))) @ v.T
    whiten[np.diag_indices(d)] += 1 / np.sqrt(a)
    return whiten


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
