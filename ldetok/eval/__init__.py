"""Evaluation: FID/KID with offline Inception weights, reference-statistics cache, reconstruction metrics.

Every number comes back as a ``MetricResult`` carrying its protocol (sample count, reference set,
feature extractor, resolution, ...), so a value is never separated from how it was measured.
"""

from .fid import (
    InceptionFeatures,
    MetricResult,
    default_cache_dir,
    fd_from_features,
    fid_from_stats,
    inception_score_from_logits,
    kid_from_features,
    load_reference_stats,
    lookup_reference_stats,
    reference_stats,
    save_reference_stats,
    stats_from_features,
    store_reference_stats,
    to_uint8_rgb,
)
from .classifier import ClassifierFeatures, FashionCNN, classifier_cache_dir, train_classifier
from .generation import (
    evaluate_generation,
    evaluate_generator,
    evaluate_generator_run,
    guidance_sweep,
    metric_key,
    precision_recall,
    reference_score,
    run_reference,
    write_samples_png,
)
from .reference import BadReferenceError, Reference, even_indices, file_fingerprint, is_dataset_spec
from .inception import ensure_inception_weights, inception_score_available, weights_info, weights_path
from .recon import evaluate_reconstruction, image_noise, psnr, psnr_under_noise, reconstruct_noised, ssim

__all__ = [
    "ClassifierFeatures",
    "FashionCNN",
    "classifier_cache_dir",
    "train_classifier",
    "evaluate_generation",
    "evaluate_generator",
    "evaluate_generator_run",
    "guidance_sweep",
    "metric_key",
    "precision_recall",
    "reference_score",
    "run_reference",
    "write_samples_png",
    "BadReferenceError",
    "Reference",
    "even_indices",
    "file_fingerprint",
    "is_dataset_spec",
    "InceptionFeatures",
    "MetricResult",
    "default_cache_dir",
    "fd_from_features",
    "ensure_inception_weights",
    "evaluate_reconstruction",
    "image_noise",
    "fid_from_stats",
    "inception_score_available",
    "inception_score_from_logits",
    "kid_from_features",
    "load_reference_stats",
    "lookup_reference_stats",
    "psnr",
    "psnr_under_noise",
    "reconstruct_noised",
    "reference_stats",
    "save_reference_stats",
    "ssim",
    "stats_from_features",
    "store_reference_stats",
    "to_uint8_rgb",
    "weights_info",
    "weights_path",
]
