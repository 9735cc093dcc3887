"""Slow float64 reference implementations of the similarity measures (tests only).

Written straight from the definitions, with explicit matrices (centering matrix H = I - 11^T/n,
Gram matrices, pairwise-distance loops), independently of ``repguide.similarity``. Never imported
by the library.

Convention shared with the library: a constant input (all rows identical) has no structure, and
the similarity is defined as exactly 0.0.
"""

from __future__ import annotations

import numpy as np

MEASURES = ("cka", "cka_rbf", "cka_unbiased", "procrustes", "rsa")


def _as64(a) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor
        a = a.detach().to("cpu").double().numpy()
    a = np.asarray(a, dtype=np.float64)
    assert a.ndim == 2
    return a


def _is_constant(a: np.ndarray) -> bool:
    return bool(np.all(a == a[0:1, :]))


def centering_matrix(n: int) -> np.ndarray:
    return np.eye(n) - np.ones((n, n)) / n


def sq_dists(a: np.ndarray) -> np.ndarray:
    """D_ij = ||a_i - a_j||^2, one row at a time (differences, never the Gram expansion)."""
    n = a.shape[0]
    d = np.zeros((n, n))
    for i in range(n):
        diff = a - a[i]
        d[i, :] = np.sum(diff * diff, axis=1)
    return d


def hsic_biased(k: np.ndarray, l: np.ndarray) -> float:
    """tr(K H L H) (the 1/(n-1)^2 factor cancels in CKA and is dropped)."""
    h = centering_matrix(k.shape[0])
    return float(np.trace(k @ h @ l @ h))


def hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012) unbiased HSIC estimator."""
    n = k.shape[0]
    kt = k.copy()
    lt = l.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    one = np.ones(n)
    term1 = np.trace(kt @ lt)
    term2 = (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (one @ kt @ lt @ one)
    return float((term1 + term2 - term3) / (n * (n - 3)))


def _cka_from_kernels(k, l, hsic) -> float:
    kl = hsic(k, l)
    kk = hsic(k, k)
    ll = hsic(l, l)
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 -> nan: caller decides
        return float(kl / np.sqrt(kk * ll))


def ref_cka(x, y) -> float:
    x, y = _as64(x), _as64(y)
    if _is_constant(x) or _is_constant(y):
        return 0.0
    return _cka_from_kernels(x @ x.T, y @ y.T, hsic_biased)


def ref_cka_unbiased(x, y) -> float:
    x, y = _as64(x), _as64(y)
    if x.shape[0] < 4:
        raise ValueError("unbiased HSIC needs n >= 4")
    if _is_constant(x) or _is_constant(y):
        return 0.0
    return _cka_from_kernels(x @ x.T, y @ y.T, hsic_unbiased)


def rbf_sigma2(a: np.ndarray, bandwidth: float = 1.0) -> float:
    """bandwidth^2 * (lower) median of the off-diagonal squared distances, i < j."""
    d = sq_dists(a)
    n = a.shape[0]
    vals = sorted(d[i, j] for i in range(n) for j in range(i + 1, n))
    med = vals[(len(vals) - 1) // 2]  # torch.median: lower of the two middles
    return bandwidth**2 * med


def rbf_kernel(a: np.ndarray, bandwidth: float = 1.0) -> np.ndarray:
    s2 = rbf_sigma2(a, bandwidth)
    return np.exp(-sq_dists(a) / (2.0 * s2))


def ref_cka_rbf(x, y, bandwidth: float = 1.0) -> float:
    x, y = _as64(x), _as64(y)
    if _is_constant(x) or _is_constant(y):
        return 0.0
    return _cka_from_kernels(rbf_kernel(x, bandwidth), rbf_kernel(y, bandwidth), hsic_biased)


def ref_rsa(x, y) -> float:
    x, y = _as64(x), _as64(y)
    n = x.shape[0]
    if n < 3:
        raise ValueError("rsa needs n >= 3")
    if _is_constant(x) or _is_constant(y):
        return 0.0
    dx, dy = sq_dists(x), sq_dists(y)
    iu = [(i, j) for i in range(n) for j in range(i + 1, n)]
    a = np.array([dx[i, j] for i, j in iu])
    b = np.array([dy[i, j] for i, j in iu])
    a = a - a.mean()
    b = b - b.mean()
    return float((a @ b) / np.sqrt((a @ a) * (b @ b)))


def ref_procrustes(x, y) -> float:
    x, y = _as64(x), _as64(y)
    if _is_constant(x) or _is_constant(y):
        return 0.0
    h = centering_matrix(x.shape[0])
    xc, yc = h @ x, h @ y
    xn = xc / np.linalg.norm(xc, "fro")
    yn = yc / np.linalg.norm(yc, "fro")
    return float(np.linalg.svd(xn.T @ yn, compute_uv=False).sum())


def ref_procrustes_distance_form(x, y) -> float:
    """1 - d^2/2 with d = min_Q ||Xn - Yn Q||_F over orthogonal Q (padding to equal widths)."""
    x, y = _as64(x), _as64(y)
    h = centering_matrix(x.shape[0])
    xc, yc = h @ x, h @ y
    xn = xc / np.linalg.norm(xc, "fro")
    yn = yc / np.linalg.norm(yc, "fro")
    d = max(xn.shape[1], yn.shape[1])
    xn = np.pad(xn, ((0, 0), (0, d - xn.shape[1])))
    yn = np.pad(yn, ((0, 0), (0, d - yn.shape[1])))
    u, _, vt = np.linalg.svd(yn.T @ xn)
    q = u @ vt  # argmin_Q ||Xn - Yn Q||
    dist2 = float(np.sum((xn - yn @ q) ** 2))
    return 1.0 - dist2 / 2.0


REFERENCES = {
    "cka": ref_cka,
    "cka_rbf": ref_cka_rbf,
    "cka_unbiased": ref_cka_unbiased,
    "procrustes": ref_procrustes,
    "rsa": ref_rsa,
}


def reference(name: str, x, y, **kwargs) -> float:
    return REFERENCES[name](x, y, **kwargs)


# --- torch float64 versions of the two linear CKA estimators (for gradient comparisons) -------


def torch_ref_cka(x, y):
    import torch

    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n
    k, l = x @ x.T, y @ y.T

    def hsic(a, b):
        return torch.trace(a @ h @ b @ h)

    return hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l))


def torch_ref_cka_unbiased(x, y):
    import torch

    n = x.shape[0]
    eye = torch.eye(n, dtype=torch.float64)
    one = torch.ones(n, dtype=torch.float64)
    kt = (x @ x.T) * (1 - eye)
    lt = (y @ y.T) * (1 - eye)

    def hsic(a, b):
        t1 = torch.trace(a @ b)
        t2 = (one @ a @ one) * (one @ b @ one) / ((n - 1) * (n - 2))
        t3 = 2.0 / (n - 2) * (one @ a @ b @ one)
        return (t1 + t2 - t3) / (n * (n - 3))

    return hsic(kt, lt) / torch.sqrt(hsic(kt, kt) * hsic(lt, lt))


def torch_ref_procrustes(x, y):
    """Nuclear norm of Xn^T Yn via singular values (differentiable wherever the norm is)."""
    import torch

    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n
    xc, yc = h @ x, h @ y
    xn = xc / torch.linalg.norm(xc)
    yn = yc / torch.linalg.norm(yc)
    return torch.linalg.svdvals(xn.T @ yn).sum()
