"""FID, Inception Score and precision/recall, the way `vqtok eval-fid` and `vqtok eval-tokenizer` compute them.

How these numbers relate to the ADM TensorFlow evaluator (openai/guided-diffusion
`evaluations/evaluator.py`, which LlamaGen, VAR and RAR report):
- Same network: torch-fidelity's port of the TF 2015-12-05 Inception graph, same TF1 bilinear resize to
  299, same pool_3 features (2048-d) for FID and the same unbiased logits for IS. The port is close but
  not bit-identical to TF, so expect differences in the second decimal of FID, more for small sets.
- Same formulas: FID = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) in float64 with covariances over
  N-1; IS = exp(E_x KL(p(y|x) || p(y))) over 10 contiguous splits (ADM: splits of 5,000 of 50,000,
  reporting the mean); precision/recall = ADM's k-NN manifolds (k = 3) over pool_3 features.
- An ADM reference batch's `mu`/`sigma` were computed by TF. Using them against torch-fidelity sample
  features mixes the two networks; the difference is small but real. For paper-comparable numbers run
  the ADM evaluator itself (`python evaluator.py REF.npz SAMPLES.npz`) on the .npz vqtok writes.

Tr (S1 S2)^1/2 is computed through eigen-decompositions of symmetric matrices (the sum of
sqrt(eig(L^T S2 L)) with S1 = L L^T), which stays real and finite for the singular covariances of small
sets, where scipy.linalg.sqrtm needs the usual "add eps to the diagonal" and "drop the imaginary part"
guards. With fewer images than the 2048 feature dimensions the same eigenvalues come from an N x N
matrix instead (see `trace_sqrt_product`), which is exact and much cheaper.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vqtok.errors import UserError
from vqtok.eval.image_sources import ImageSet
from vqtok.eval.inception import InceptionFeatures, weights_identity

IS_SPLITS = 10
PR_NEIGHBOURS = 3  # ADM's ManifoldEstimator default


# ---------------------------------------------------------------- math on features


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rows are samples, N-1 normalisation) in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise UserError(f"FID needs at least 2 images, got {features.shape[0] if features.ndim == 2 else 0}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def covariance_factor(features: np.ndarray) -> np.ndarray | None:
    """F with F^T F = the covariance of `features`, when that is cheaper than the d x d matrix (N <= d)."""
    features = np.asarray(features, dtype=np.float64)
    n, d = features.shape
    if n > d or n < 2:
        return None
    return (features - features.mean(axis=0)) / math.sqrt(n - 1)


def trace_sqrt_product(
    sigma1: np.ndarray, sigma2: np.ndarray, factor1: np.ndarray | None = None, factor2: np.ndarray | None = None
) -> float:
    """Tr((S1 S2)^1/2) for covariance matrices S1, S2.

    With low-rank factors (S = F^T F, F of shape (n, d), n < d: fewer images than feature dimensions)
    the non-zero eigenvalues of S1 S2 are those of a small n x n matrix, which is exact and avoids
    d x d eigen-decompositions: both factors -> the nuclear norm of F1 F2^T; one -> eig(F S_other F^T).
    """
    if factor1 is not None and factor2 is not None:
        return float(np.linalg.svd(factor1 @ factor2.T, compute_uv=False).sum())
    if factor1 is not None or factor2 is not None:
        factor, other = (factor1, sigma2) if factor1 is not None else (factor2, sigma1)
        small = factor @ other @ factor.T
        vals = np.linalg.eigvalsh((small + small.T) / 2.0)
        return float(np.sqrt(np.clip(vals, 0.0, None)).sum())
    # S1 = L L^T with L = V diag(sqrt(w)); L^T S2 L is similar to S1 S2, symmetric and PSD.
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2.0)
    root = v * np.sqrt(np.clip(w, 0.0, None))
    middle = root.T @ sigma2 @ root
    vals = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    return float(np.sqrt(np.clip(vals, 0.0, None)).sum())


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    factor1: np.ndarray | None = None,
    factor2: np.ndarray | None = None,
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    `factor1`/`factor2` (optional, from `covariance_factor`) only make small sets faster; the value is the same.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise UserError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape} "
            "(were they computed with different feature extractors?)"
        )
    for name, arr in (("mu", mu1), ("mu", mu2), ("sigma", sigma1), ("sigma", sigma2)):
        if not np.all(np.isfinite(arr)):
            raise UserError(f"FID statistics contain NaN or inf in {name}; the images or the reference are broken")
    diff = mu1 - mu2
    tr_covmean = trace_sqrt_product(sigma1, sigma2, factor1, factor2)
    fid = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    return max(fid, 0.0)  # it is a squared distance; rounding can leave -1e-12


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    mu1, s1 = feature_statistics(features1)
    mu2, s2 = feature_statistics(features2)
    return frechet_distance(mu1, s1, mu2, s2, covariance_factor(features1), covariance_factor(features2))


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS) -> tuple[float, float]:
    """(mean, std) of exp(E KL(p(y|x) || p(y))) over `splits` contiguous chunks (ADM: chunks of 5,000)."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise UserError("Inception Score needs at least one image")
    logits = logits - logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for part_p, part_log_p in zip(np.array_split(p, min(splits, len(p))), np.array_split(log_p, min(splits, len(p)))):
        log_py = np.log(part_p.mean(axis=0, keepdims=True))
        kl = (part_p * (part_log_p - log_py)).sum(axis=1).mean()
        scores.append(math.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def _pairwise_sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.pow(2).sum(1, keepdim=True) - 2.0 * a @ b.T + b.pow(2).sum(1)[None]).clamp_min(0.0)


def knn_radii(features: torch.Tensor, k: int = PR_NEIGHBOURS, chunk: int = 4096) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest other point (the ADM manifold radius)."""
    if features.shape[0] <= k:
        raise UserError(f"precision/recall need more than {k} images per set, got {features.shape[0]}")
    out = []
    for start in range(0, features.shape[0], chunk):
        d = _pairwise_sq_dists(features[start : start + chunk], features)
        out.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself sits at distance 0
    return torch.cat(out)


def _fraction_inside(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 4096) -> float:
    inside = 0
    for start in range(0, queries.shape[0], chunk):
        d = _pairwise_sq_dists(queries[start : start + chunk], centres)
        inside += int((d <= radii[None]).any(dim=1).sum())
    return inside / queries.shape[0]


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_NEIGHBOURS) -> tuple[float, float]:
    """Improved precision/recall (Kynkaanniemi et al.): fake inside the real manifold, real inside the fake one."""
    real_t = torch.from_numpy(np.asarray(real, np.float64))
    fake_t = torch.from_numpy(np.asarray(fake, np.float64))
    precision = _fraction_inside(fake_t, real_t, knn_radii(real_t, k))
    recall = _fraction_inside(real_t, fake_t, knn_radii(fake_t, k))
    return precision, recall


# ---------------------------------------------------------------- statistics files


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray, meta: dict) -> Path:
    """Write reference statistics as .npz (`mu`, `sigma`, plus a JSON `meta` string) via a temp file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma, meta=np.array(json.dumps(meta)))
    tmp.replace(path)
    return path


def load_stats_meta(path: Path) -> dict:
    with np.load(path) as data:
        if "meta" not in data.files:
            return {}
        try:
            return json.loads(str(data["meta"]))
        except json.JSONDecodeError:
            return {}


def stats_cache_path(ref: Path) -> Path:
    """`ref/` -> `ref.inception-stats.npz`, `ref.npz` -> `ref.inception-stats.npz`, beside the reference."""
    name = ref.name[: -len(".npz")] if ref.suffix.lower() == ".npz" and ref.is_file() else ref.name
    return ref.with_name(f"{name}.inception-stats.npz")


# ---------------------------------------------------------------- running Inception over image sets


@dataclass
class Activations:
    pool: np.ndarray  # (N, 2048)
    logits: np.ndarray  # (N, 1008)
    seconds: float = 0.0


def compute_activations(extractor: InceptionFeatures, images: ImageSet, batch_size: int, progress=None) -> Activations:
    pools, logits = [], []
    start = time.perf_counter()
    for batch in images.batches(batch_size):
        pool, logit = extractor(batch)
        pools.append(pool.astype(np.float32))  # float32 storage: 50k x 2048 is 400 MB, not 800
        logits.append(logit.astype(np.float32))
        if progress is not None:
            progress(len(batch))
    return Activations(np.concatenate(pools), np.concatenate(logits), time.perf_counter() - start)


@dataclass
class FidResult:
    fid: float
    inception_score: float
    inception_score_std: float
    num_samples: int
    num_reference: int | None
    reference_stats: str  # where the reference mu/sigma came from
    precision: float | None = None
    recall: float | None = None
    notes: list[str] = field(default_factory=list)
    weights: str = ""

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def reference_statistics(
    ref: ImageSet,
    extractor: InceptionFeatures,
    batch_size: int,
    cache: bool,
    need_features: bool,
    progress_factory=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str, int | None]:
    """(mu, sigma, pool features or None, how they were obtained, reference image count)."""
    notes_source = ""
    if ref.stats is not None:
        mu, sigma = ref.stats
        features = None
        if need_features and ref.has_images:
            features = _run(extractor, ref, batch_size, progress_factory, "reference").pool
        n = len(ref) if ref.has_images else None
        return mu, sigma, features, f"precomputed mu/sigma in {ref.path}", n
    cache_path = stats_cache_path(ref.path)
    identity = {"weights": weights_identity(extractor.weights_path), "num_images": len(ref), "source": str(ref.path.resolve())}
    if cache and cache_path.is_file() and not need_features:
        meta = load_stats_meta(cache_path)
        if meta.get("weights") == identity["weights"] and meta.get("num_images") == identity["num_images"]:
            with np.load(cache_path) as data:
                return data["mu"], data["sigma"], None, f"cached {cache_path}", len(ref)
        notes_source = " (cache was stale, recomputed)"
    acts = _run(extractor, ref, batch_size, progress_factory, "reference")
    mu, sigma = feature_statistics(acts.pool)
    source = f"computed from {len(ref)} images{notes_source}"
    if cache:
        save_stats(cache_path, mu, sigma, identity)
        source += f", cached to {cache_path}"
    return mu, sigma, acts.pool, source, len(ref)


def _run(extractor, images: ImageSet, batch_size: int, progress_factory, label: str) -> Activations:
    if progress_factory is None:
        return compute_activations(extractor, images, batch_size)
    with progress_factory(label, len(images)) as advance:
        return compute_activations(extractor, images, batch_size, advance)


def evaluate_fid(
    samples: str | Path,
    ref: str | Path,
    inception_weights: str | Path | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    cache_ref: bool = False,
    with_precision_recall: bool = False,
    progress_factory=None,
    extractor: InceptionFeatures | None = None,
) -> FidResult:
    """FID and IS of `samples` against `ref` (each an ADM .npz or an image folder)."""
    sample_set = ImageSet(samples)
    if not sample_set.has_images:
        raise UserError(f"samples {samples} hold only statistics; pass the generated images (.npz arr_0 or a folder)")
    ref_set = ImageSet(ref)
    extractor = extractor or InceptionFeatures(inception_weights, device)
    notes: list[str] = []
    want_pr = with_precision_recall and ref_set.has_images
    if with_precision_recall and not ref_set.has_images:
        notes.append("precision/recall skipped: the reference holds only mu/sigma, no images")
    mu_r, sigma_r, ref_pool, ref_source, n_ref = reference_statistics(
        ref_set, extractor, batch_size, cache_ref, want_pr, progress_factory
    )
    if ref_set.stats is not None:
        notes.append(
            "the reference's precomputed mu/sigma were used as given; ADM reference batches hold TensorFlow "
            "Inception statistics, so this FID differs slightly from the ADM evaluator's"
        )
    acts = _run(extractor, sample_set, batch_size, progress_factory, "samples")
    mu_s, sigma_s = feature_statistics(acts.pool)
    # The factor must describe sigma_r itself: not when sigma_r came precomputed from the file.
    ref_factor = covariance_factor(ref_pool) if ref_pool is not None and ref_set.stats is None else None
    fid = frechet_distance(mu_s, sigma_s, mu_r, sigma_r, covariance_factor(acts.pool), ref_factor)
    is_mean, is_std = inception_score(acts.logits)
    precision = recall = None
    if want_pr and ref_pool is not None:
        precision, recall = precision_recall(ref_pool, acts.pool)
    if len(sample_set) < 10_000:
        notes.append(f"only {len(sample_set)} samples: FID is biased upwards for small sets (papers use 50,000)")
    return FidResult(
        fid=fid,
        inception_score=is_mean,
        inception_score_std=is_std,
        num_samples=len(sample_set),
        num_reference=n_ref,
        reference_stats=ref_source,
        precision=precision,
        recall=recall,
        notes=notes,
        weights=str(extractor.weights_path),
    )
