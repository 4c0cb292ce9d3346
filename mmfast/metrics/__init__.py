"""Quality metrics for AR image generation: digit classifier, class consistency, Fréchet distance, token TV.

Real weights for Inception / CLIP cannot be fetched offline, so image quality is measured on the domain the zoo's
``tiny-ar`` generator is trained on, scikit-learn's real handwritten digits, with a small CNN that mmfast trains
itself on digits the generator never sees. Every accelerated decoder is compared against the baseline decoder of
the same model with these numbers, each with a bootstrap interval and, for the Fréchet distance, the real-vs-real
floor that a perfect generator would reach.

Data (:func:`digit_splits`)
    The 1797 digits of ``sklearn.datasets.load_digits`` are split per class (seeded permutation, numpy PCG64) into
    ``generator_train`` (50%, the only digits tiny-ar may train on), ``classifier_train`` (25%) and ``heldout``
    (25%, the "real" reference for Fréchet distance and classifier accuracy). Sizes for seed 0: 898 / 450 / 449.

Preprocessing (:func:`digits_to_images`, :func:`images_to_tensor`) -- the one path every image takes
    Raw 8x8 digits (16 grey levels, 0 = background) -> ``v / 16`` (ink is bright: white digit on black) ->
    bilinear upsampling to ``size`` (align_corners=False) -> clamp to [0, 1] -> rounded to uint8 levels (k / 255),
    so a real digit survives the round trip through an RGB PIL image bit for bit. Generated images (RGB PIL, uint8
    or float tensors) come back through :func:`images_to_tensor`: channel mean (exact inverse of the grey -> RGB
    replication), then bilinear resizing to the classifier's 32x32 if needed. When generated images are not 32x32,
    the real reference digits are rendered at the generated size and pushed through the same resize, so real and
    generated images are always processed identically.

Classifier (:class:`DigitClassifier`, shipped in ``mmfast/zoo/digit_classifier``)
    Three conv blocks (16/32/64 channels, BN, ReLU, 2x2 max-pool) -> 64-d linear "feature" layer -> ReLU -> 10
    logits. Trained on ``classifier_train`` only, with random affine augmentation (rotation, scale, shift, shear)
    and contrast jitter so that small generator artefacts do not flip its decisions. Fréchet features are the
    64-d pre-activation of the feature layer (closer to Gaussian than post-ReLU values, no dead dimensions).

Fréchet distance (:func:`frechet_distance`)
    ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` in float64 with unbiased covariances (as torchmetrics).
    The trace term is computed as ``sum sqrt(eig(S_a^(1/2) S_b S_a^(1/2)))``: that matrix is symmetric PSD, has the
    same eigenvalues as ``S_a S_b``, and ``eigh`` on it stays real and stable when the covariances are rank
    deficient (fewer images than feature dimensions), where scipy's ``sqrtm(S_a S_b)`` of a non-symmetric product
    returns complex results whose imaginary part must be dropped (pytorch-fid adds ``eps * I`` when it is not
    finite) and gives slightly negative distances of a set to itself. It agrees with torchmetrics'
    ``FrechetInceptionDistance`` fed with this
    classifier as a custom feature module (:func:`fid_metric`, checked in the tests); the function form exists
    because the bootstrap re-uses features: images go through the CNN once, resamples only re-estimate moments.
    Intervals (:func:`frechet_bootstrap`): resampling the generated set with replacement duplicates images, which
    shifts every bootstrap FD upwards (the raw percentile interval often excludes the estimate), so the percentile
    interval is re-centred on the estimate. FD also depends on the set size, so a generator is compared with the
    real-vs-real floor (:func:`frechet_floor`: real ``generator_train`` digits, same size, same procedure).

Token TV (:func:`token_marginal_tv`, :func:`token_tv_test`)
    A classifier-free distribution check on VQ token sequences: total variation between the per-position token
    marginals of two sample sets. Finite-sample TV is biased upwards (two sets from one distribution do not have
    TV 0), so the test reports the permutation null: the TV between random re-splits of the pooled sets, whose
    mean is the noise floor for these sample sizes, and a permutation p-value.

Determinism: every random draw uses an explicit seed (numpy ``default_rng`` or a local ``torch.Generator``; the
global RNGs are left untouched), so results are a pure function of inputs and seeds on a given machine.
"""

from mmfast.metrics.digits import (
    CLASSIFIER_DIR,
    DIGIT_SIZE,
    SPLIT_FRACTIONS,
    SPLIT_NAMES,
    DigitClassifier,
    class_consistency,
    class_consistency_ci,
    classifier_accuracy,
    digit_features,
    digit_splits,
    digits_to_images,
    digits_to_pil,
    images_to_tensor,
    load_digit_classifier,
    predict_digits,
)
from mmfast.metrics.frechet import (
    digit_frechet,
    fid_metric,
    frechet_bootstrap,
    frechet_distance,
    frechet_floor,
    gaussian_stats,
)
from mmfast.metrics.tokens import TVTestResult, token_marginal_tv, token_marginals, token_tv_test

__all__ = [
    "CLASSIFIER_DIR",
    "DIGIT_SIZE",
    "SPLIT_FRACTIONS",
    "SPLIT_NAMES",
    "DigitClassifier",
    "TVTestResult",
    "class_consistency",
    "class_consistency_ci",
    "classifier_accuracy",
    "digit_features",
    "digit_frechet",
    "digit_splits",
    "digits_to_images",
    "digits_to_pil",
    "fid_metric",
    "frechet_distance",
    "frechet_bootstrap",
    "frechet_floor",
    "gaussian_stats",
    "images_to_tensor",
    "load_digit_classifier",
    "predict_digits",
    "token_marginal_tv",
    "token_marginals",
    "token_tv_test",
]
