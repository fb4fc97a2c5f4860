"""The in-distribution score: a Mahalanobis distance on each member's pooled backbone features.

Fitted at export on the training images, computed inside the classifier graph (so it costs no second
pass and goes wherever the graph goes: FP16, INT8, TensorRT), thresholded at a percentile of the
validation images' scores, and stored in the manifest.

Why this method: the members end in global average pooling + a linear head, so the pooled feature
vector is what the decision is made from; an image unlike the training set lands far from the
training features' class-independent Gaussian (Lee et al. 2018, "A simple unified framework for
detecting out-of-distribution samples"). It needs no extra training, no outlier examples, and in the
graph it is one subtraction, one matrix product and a sum of squares per member. With a few hundred
training images and 512-1280 features the sample covariance is singular, so the covariance is the
Ledoit-Wolf shrinkage estimate (shrunk towards a scaled identity by the analytically optimal amount),
whose inverse always exists.

The score of an image is a weighted mean over members of ``d_m^2 / C_m`` (``C_m`` the member's
feature width), so the number reads the same across bundles. With validation features the weights
are the members' inverse validation variances (normalised to mean 1): the minimum-variance
combination of the members' scores on unseen in-distribution images. Why: a member whose distance
is unstable on radiographs it was not fitted on (a wide, small-network feature vector estimated from
a few hundred images) otherwise dominates the in-distribution tail, which sets the threshold, while
it adds little distance on non-radiographs; on the demo bundle the second member's validation and test
radiographs reached 70-300x its median, above its own score on MRI slices. Without validation
features the members weigh alike. In the graph: ``Σ_m ||(f_m - μ_m) W_m||^2`` with ``W_m`` the
whitening matrix of the shrunk covariance times ``sqrt(w_m / (C_m · M))``. numpy only: export fits it
from features it already has, and tests need no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from spine_edge.errors import SpineEdgeError

#: Validation percentile that sets the threshold: 1% of in-distribution images would be refused if
#: validation and test images were alike, inside the issue's 2% budget for false refusals.
DEFAULT_PERCENTILE = 99.0


@dataclass(frozen=True, eq=False)
class GaussianFit:
    """One member's feature Gaussian, as the graph uses it.

    Attributes:
        mean: ``[C]`` feature mean of the training images.
        whitening: ``[C, C]`` matrix ``W`` with ``||(f - mean) W||^2 = d^2 / C`` (the squared Mahalanobis
            distance under the shrunk covariance, per feature).
        shrinkage: Ledoit-Wolf weight of the scaled identity in the covariance, in [0, 1].
        n_samples: Training images it was fitted on.
        weight: The member's weight in the score (folded into ``whitening``; 1 when members weigh alike).
    """

    mean: np.ndarray
    whitening: np.ndarray
    shrinkage: float
    n_samples: int
    weight: float = 1.0

    @property
    def width(self) -> int:
        """Feature width ``C``."""
        return int(self.mean.shape[0])

    def score(self, features: np.ndarray) -> np.ndarray:
        """``d^2 / C`` of ``[N, C]`` features, float64 ``[N]``."""
        z = (np.asarray(features, np.float64) - self.mean) @ self.whitening
        out: np.ndarray = np.einsum("nc,nc->n", z, z)
        return out


def ledoit_wolf(centred: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf (2004) shrinkage covariance of centred samples ``[N, C]``.

    ``Σ = (1 - α) S + α m I`` with ``S`` the sample covariance, ``m = tr(S) / C`` and the optimal ``α``
    estimated from the data (equation 14 of the paper, as scikit-learn's ``ledoit_wolf`` computes it).

    Returns:
        ``(Σ [C, C], α)``.
    """
    x = np.asarray(centred, np.float64)
    n, c = x.shape
    sample = x.T @ x / n
    m = float(np.trace(sample)) / c
    d2 = float(((sample - m * np.eye(c)) ** 2).sum()) / c
    if d2 <= 0:  # already a multiple of the identity: nothing to shrink
        return sample, 0.0
    norms = (x**2).sum(axis=1)
    # Σ_k ||x_k x_kᵀ - S||_F² = Σ_k ||x_k||⁴ - n ||S||_F², since Σ_k x_kᵀ S x_k = n ||S||_F².
    b2_bar = float((norms**2).sum() - n * (sample**2).sum()) / (n * n * c)
    alpha = min(b2_bar, d2) / d2
    return (1 - alpha) * sample + alpha * m * np.eye(c), alpha


def fit_gaussian(features: np.ndarray, members: int = 1) -> GaussianFit:
    """Fit one member's Gaussian on training features.

    Args:
        features: ``[N, C]`` pooled backbone features of the training images (N ≥ 2).
        members: How many members the score is averaged over (folds ``1 / M`` into ``whitening``).

    Returns:
        The fit.

    Raises:
        SpineEdgeError: Too few images, or features that are not finite.
    """
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise SpineEdgeError(
            f"the in-distribution score needs pooled features of at least 2 training images as [N, C], got shape "
            f"{f.shape}; export with the training cache available (--calib-data)"
        )
    if not np.isfinite(f).all():
        raise SpineEdgeError("training features for the in-distribution score are not finite; check the checkpoints")
    mean = f.mean(axis=0)
    cov, alpha = ledoit_wolf(f - mean)
    eigenvalues, vectors = np.linalg.eigh(cov)
    # The shrunk covariance is positive definite whenever α > 0; the floor guards α = 0 with a
    # rank-deficient sample (fewer images than features and nothing to shrink).
    floor = max(float(eigenvalues.max()), 1e-12) * 1e-9
    whitening = vectors / np.sqrt(np.maximum(eigenvalues, floor))
    whitening /= np.sqrt(f.shape[1] * members)
    return GaussianFit(mean=mean, whitening=whitening, shrinkage=float(alpha), n_samples=int(f.shape[0]))


@dataclass(frozen=True, eq=False)
class OodModel:
    """The score over all members: ``Σ_m ||(f_m - μ_m) W_m||²`` (the mean of per-member ``d² / C``).

    Attributes:
        members: One fit per ensemble member, in graph order.
    """

    members: tuple[GaussianFit, ...]

    def score(self, features: Sequence[np.ndarray]) -> np.ndarray:
        """Scores of images given each member's ``[N, C_m]`` features, float64 ``[N]``."""
        if len(features) != len(self.members):
            raise ValueError(f"need features of {len(self.members)} members, got {len(features)}")
        return np.sum([fit.score(f) for fit, f in zip(self.members, features, strict=True)], axis=0)


def member_weights(val_scores: Sequence[np.ndarray]) -> np.ndarray:
    """Inverse-variance weights of the members' validation scores, normalised to mean 1.

    Of all weightings with that mean, this one gives the combined score the least variance on
    in-distribution images (members taken as independent), so the threshold, a high validation
    percentile, sits as close to the bulk as the members allow. Equal weights when a variance is
    zero or not finite (nothing to compare).

    Args:
        val_scores: Each member's ``[N]`` scores of the same validation images.
    """
    variances = np.array([np.var(np.asarray(s, np.float64), ddof=1) if np.size(s) > 1 else np.nan for s in val_scores])
    if not (np.isfinite(variances).all() and (variances > 0).all()):
        return np.ones(len(val_scores))
    inverse = 1 / variances
    out: np.ndarray = inverse * len(inverse) / inverse.sum()
    return out


def fit_ood(train_features: Sequence[np.ndarray], val_features: Sequence[np.ndarray] | None = None) -> OodModel:
    """Fit the score on the training images' pooled features, one ``[N, C_m]`` array per member.

    Args:
        train_features: What each member's Gaussian is fitted on.
        val_features: The validation images' features, per member, for :func:`member_weights`; None
            (or a single member): members weigh alike.

    Example:
        >>> model = fit_ood([np.random.default_rng(0).normal(size=(200, 16))])
        >>> float(model.score([np.zeros((1, 16))])[0]) < 1.0
        True
    """
    if not train_features:
        raise SpineEdgeError("the in-distribution score needs the features of at least one ensemble member")
    members = len(train_features)
    fits = tuple(fit_gaussian(f, members) for f in train_features)
    if val_features is None or members == 1:
        return OodModel(fits)
    if len(val_features) != members:
        raise ValueError(f"need validation features of {members} members, got {len(val_features)}")
    weights = member_weights([fit.score(f) for fit, f in zip(fits, val_features, strict=True)])
    return OodModel(
        tuple(
            replace(fit, whitening=fit.whitening * np.sqrt(w), weight=float(w))
            for fit, w in zip(fits, weights, strict=True)
        )
    )


@dataclass(frozen=True)
class OodThreshold:
    """The threshold chosen on validation images, and what it was chosen from (for the manifest).

    Attributes:
        threshold: Scores above this are out of distribution.
        percentile: The validation percentile it estimates.
        n_val: Validation images scored.
        val_median: Median validation score (about 1 when validation resembles training).
        train_median: Median training score.
        empirical: The plain sample percentile of the validation scores, for comparison.
    """

    threshold: float
    percentile: float
    n_val: int
    val_median: float
    train_median: float
    empirical: float


def _normal_quantile(p: float) -> float:
    """Φ⁻¹(p) by bisection on ``erf`` (no scipy in the export environment's required set)."""
    low, high = -10.0, 10.0
    for _ in range(100):
        mid = (low + high) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def choose_threshold(
    val_scores: np.ndarray, train_scores: np.ndarray, percentile: float = DEFAULT_PERCENTILE
) -> OodThreshold:
    """The ``percentile`` of the validation scores, estimated from a log-normal fit.

    Why a fit, not the sample percentile: a validation split holds tens of images (50 in the cpu
    profile), and the sample 99th percentile of n images is about their maximum, which a new
    in-distribution image exceeds with probability about ``1 / (n + 1)`` (5% for n = 20), far over
    the 1% aimed for. A squared Mahalanobis distance per feature is a scaled sum of many squared
    terms, whose logarithm is close to normal, so ``exp(mean + z_p * std)`` of the log scores
    estimates the percentile from all n images. The threshold is never below the sample
    percentile, so the fit cannot refuse validation images the sample says are typical.

    Validation images, not training images: training features are what the Gaussian was fitted on,
    so their distances are optimistically small (the more so the fewer the images).

    Raises:
        SpineEdgeError: Fewer than 2 validation scores, or scores that are not finite and positive.
    """
    val = np.asarray(val_scores, np.float64)
    if val.size < 2 or not (np.isfinite(val).all() and (val > 0).all()):
        raise SpineEdgeError(
            f"the in-distribution threshold needs finite positive scores of at least 2 validation images, got "
            f"{val.size} ({int(np.isfinite(val).sum())} finite); export with validation images available (--eval-data)"
        )
    if not 0 < percentile < 100:
        raise ValueError(f"percentile must be in (0, 100), got {percentile}")
    logs = np.log(val)
    fitted = float(np.exp(logs.mean() + _normal_quantile(percentile / 100) * logs.std(ddof=1)))
    empirical = float(np.percentile(val, percentile))
    return OodThreshold(
        threshold=max(fitted, empirical),
        percentile=float(percentile),
        n_val=int(val.size),
        val_median=float(np.median(val)),
        train_median=float(np.median(np.asarray(train_scores, np.float64))) if np.size(train_scores) else float("nan"),
        empirical=empirical,
    )
