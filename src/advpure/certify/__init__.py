"""Certified robustness by randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019), plain torch.

    smooth = SmoothedClassifier(build_base("denoised", classifier, sigma, score_net=f), sigma, num_classes=10)
    results = smooth.certify(x, idx, n0=100, n=100_000, alpha=0.001, labels=y)   # list[CertifyResult]
    certified_accuracy([r.as_record() for r in results], radii=[0, 0.25, 0.5])

No Lightning here: the run mode wires these into a store, DDP and loggers.
"""

from advpure.certify.attack import project_l2, smoothed_pgd_l2
from advpure.certify.bases import (
    BASES,
    ADPBase,
    DenoisedBase,
    DiffusionBase,
    NoisyBase,
    build_base,
    check_sigma_covered,
    score_sigma_range,
)
from advpure.certify.noise import BLOCK, KeyedNormal, block_key
from advpure.certify.smoothing import CertifyResult, PredictResult, SmoothedClassifier
from advpure.certify.stats import (
    ABSTAIN,
    certified_accuracy,
    certified_radius,
    certify_from_counts,
    lower_confidence_bound,
    predict_from_counts,
)

__all__ = [
    "ABSTAIN",
    "ADPBase",
    "BASES",
    "BLOCK",
    "CertifyResult",
    "DenoisedBase",
    "DiffusionBase",
    "KeyedNormal",
    "NoisyBase",
    "PredictResult",
    "SmoothedClassifier",
    "block_key",
    "build_base",
    "certified_accuracy",
    "certified_radius",
    "certify_from_counts",
    "check_sigma_covered",
    "lower_confidence_bound",
    "predict_from_counts",
    "project_l2",
    "score_sigma_range",
    "smoothed_pgd_l2",
]
