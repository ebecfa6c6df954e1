"""Measure 3: representation similarity by linear CKA (Kornblith, Norouzi, Lee & Hinton, 2019).

Each layer at each kept step is compared with the same layer at the final step and at the previous
kept step, on one fixed sample of tokens (`sample_features`: the same words at every step, so the
rows of the two matrices correspond). Linear CKA is invariant to orthogonal transforms and isotropic
scaling of either representation, not to arbitrary invertible linear maps, which is what makes it
meaningful for representations wider than the sample is informative about.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bertjax.embryology import features as features_lib


def linear_cka(x, y) -> float:
    """Centred linear CKA of x [N, D1] and y [N, D2]: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F).

    The feature-space form (Kornblith et al., eq. 5), in float64: D x D products, never N x N Grams.
    NaN when either representation is constant over the sample (CKA is undefined there).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka: need [N, D1] and [N, D2] with the same N, got {x.shape} and {y.shape}")
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    denominator = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    if denominator == 0.0:
        return float("nan")
    return float(np.linalg.norm(y.T @ x) ** 2 / denominator)


def per_layer(a, b) -> list[float]:
    """CKA of each layer of a [L+1, N, H] with the same layer of b [L+1, N, H] (layer 0 = embeddings)."""
    if np.shape(a)[:2] != np.shape(b)[:2]:
        raise ValueError(f"per_layer: the samples differ in layers or tokens: {np.shape(a)} and {np.shape(b)}")
    return [linear_cka(x, y) for x, y in zip(a, b)]


def sample_features(model: features_lib.Model, sentences: Sequence[Sequence[str]], max_tokens: int, seed: int, *, max_seq_length: int = 128, batch_size: int = 32) -> np.ndarray:
    """[L+1, N, H] float32: every layer at the first piece of each word of a fixed sample of whole
    sentences (about max_tokens words; the same words for every checkpoint of a run)."""
    sentences = [getattr(sentence, "words", sentence) for sentence in sentences]
    return model.word_features(sentences, max_tokens, seed, max_seq_length=max_seq_length, batch_size=batch_size)[0]
