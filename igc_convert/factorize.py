"""The maths that fits IGC block factors to a dense kernel. Pure tensor functions, no modules.

A dense kernel ``W`` (``C_out × C_in × kh × kw``) is read as the matrix ``C_out × (C_in·S)`` with
columns ordered ``(c_in, ky, kx)`` — the order of ``F.unfold``'s im2col patches, so an input
second-moment matrix ``Σ = E[p pᵀ]`` over those patches lines up with the columns.

Every fit minimises the same objective, relative to the kernel's own size::

    f(Ŵ) = ‖diag(w) (W − Ŵ) R‖²_F / ‖diag(w) W R‖²_F,      R Rᵀ = Σ + δ·I

with ``w`` per-output-row weights (e.g. the next BatchNorm's ``|γ|/σ``) and ``R`` the (damped)
Cholesky factor of the input statistics; with neither it is the plain weight-space error. Because
``E‖(W − Ŵ)p‖² = ‖(W − Ŵ)R‖²``, this is the expected output error on the calibration data.

* IGCV1 — closed form: its dense equivalent is an ``M × L`` grid of independent rank-``r`` tiles, so
  the optimum is a truncated SVD per tile (Eckart–Young). With whitening the closed form is exact when
  ``Σ`` is block-diagonal across the ``L`` input partitions (it uses each partition's diagonal block);
  a few L-BFGS steps on the full objective then account for the cross-partition terms.
* IGCV2 and IGCV3 — no closed form. We start from a structured SVD solution and run L-BFGS with a
  strong-Wolfe line search on the exact objective in float64: every accepted step satisfies the
  sufficient-decrease condition, so the objective is monotone, and we stop on a relative-change
  tolerance or an iteration cap. (Alternating least squares would also be monotone, but for IGCV2's
  butterfly chain and for whitened IGCV3 each ALS sub-problem couples all blocks of a factor through
  ``Σ``; one joint quasi-Newton step costs the same two matrix products for every factor.)

Factors are returned in the layouts of the grouped ``Conv2d`` weights of the blocks in
:mod:`igc_convert.blocks`, and the ``*_weight`` functions here rebuild a dense kernel from them: the
blocks use the same functions for ``dense_weight()``, so there is one definition of each block's maths.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .errors import ConfigError
from .shuffle import shuffle_permutation

Tensor = torch.Tensor

#: Default damping of Σ, relative to its mean eigenvalue (trace / n).
DEFAULT_DAMPING = 1e-3


@dataclass(frozen=True)
class Fit:
    """Result of a fit: factors in conv-weight layout, the final relative error and iterations used.

    ``error`` is ``sqrt(f)`` of the module docstring: the relative (whitened, row-weighted when those
    were given) Frobenius error of the fitted dense equivalent.
    """

    factors: tuple[Tensor, ...]
    error: float
    iterations: int = 0


# --------------------------------------------------------------------------------------- objective
def whitener(sigma: Tensor | None, n: int, damping: float = DEFAULT_DAMPING) -> Tensor | None:
    """Lower Cholesky factor ``R`` of ``Σ + δ·(tr Σ / n)·I`` (float64), or None when Σ is None.

    Damping relative to the mean eigenvalue keeps ``R`` invertible and well conditioned however few
    calibration patches there were (a single image, a rank-deficient set, an all-zero input): the fit
    degrades towards the weight-space fit instead of producing NaN or blow-ups.

    >>> whitener(torch.zeros(3, 3), 3).diagonal().tolist()  # no signal: plain weight space
    [1.0, 1.0, 1.0]
    """
    whitened = _whiten(sigma, n, damping)
    return None if whitened is None else whitened[0]


def _whiten(sigma: Tensor | None, n: int, damping: float, gram: bool = False
            ) -> tuple[Tensor, Tensor | None] | None:
    """:func:`whitener`'s ``R`` and, with ``gram``, the damped, scaled ``Σ`` it factors (``R Rᵀ``)."""
    if sigma is None:
        return None
    if sigma.shape != (n, n):
        raise ConfigError(f"input statistics have shape {tuple(sigma.shape)}, expected ({n}, {n})")
    s = sigma.detach()
    if not finite(s):
        raise ConfigError("input statistics contain NaN or Inf")
    eye = torch.eye(n, dtype=torch.float64)  # no signal, or no factor: plain weight space, R = Σ = I
    fallback = (eye, eye if gram else None)
    scale = float(s.diagonal().sum(dtype=torch.float64)) / max(n, 1)
    if not scale > 0:
        return fallback
    # Unit mean eigenvalue: damping and tolerances become scale-free. Cholesky reads the lower
    # triangle only, which defines the symmetric matrix whatever the upper one holds.
    a = s.to(torch.float64) * (1.0 / scale)
    d, added = max(damping, 1e-10), 0.0
    for _ in range(8):
        a.diagonal().add_(d - added)
        added = d
        r, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0 and finite(r):
            if not gram:
                return r, None
            full = torch.tril(a)  # symmetric, as Cholesky read it
            return r, full.add_(torch.tril(a, -1).mT)
        d *= 10
    return fallback


def finite(t: Tensor) -> bool:
    """Whether ``t`` holds no NaN or Inf: the float64 sum is non-finite otherwise (no boolean temporary)."""
    return bool(torch.isfinite(t.sum(dtype=torch.float64)))


def _row_weights(row_weights: Tensor | None, c_out: int) -> Tensor | None:
    if row_weights is None:
        return None
    w = row_weights.detach().to(torch.float64).abs().flatten()
    if w.numel() != c_out:
        raise ConfigError(f"row weights have {w.numel()} entries, expected {c_out}")
    if not torch.isfinite(w).all():
        raise ConfigError("row weights contain NaN or Inf")
    top = float(w.max()) if w.numel() else 0.0
    if not top > 0:
        return None
    # Rows weighted ~0 would make the closed form divide by zero; keep them a little in play.
    return (w / top).clamp_min(1e-3)


class Objective:
    """``f(Ŵ)`` of the module docstring for one kernel; callable on a dense matrix ``C_out × C_in·S``."""

    def __init__(self, weight: Tensor, sigma: Tensor | None = None, row_weights: Tensor | None = None,
                 damping: float = DEFAULT_DAMPING, *, gram: bool = False) -> None:
        w = weight.detach().to(torch.float64)
        self.c_out = w.shape[0]
        self.matrix = w.reshape(self.c_out, -1)
        self.n = self.matrix.shape[1]
        whitened = _whiten(sigma, self.n, damping, gram)
        # ``gram`` = R Rᵀ (kept on request, n × n): a fit with an analytic gradient needs one
        # product with it where ``(Ŵ − W) R`` and the backward pass through it need two with R.
        self.r, self.gram = (None, None) if whitened is None else whitened
        self.w = _row_weights(row_weights, self.c_out)
        self._target = self._transform(self.matrix)
        self._norm2 = float((self._target**2).sum()) or 1.0

    def _transform(self, m: Tensor) -> Tensor:
        if self.w is not None:
            m = self.w[:, None] * m
        if self.r is not None:
            m = m @ self.r
        return m

    def __call__(self, approx: Tensor) -> Tensor:
        return self.of_transformed(self._transform(approx.reshape(self.c_out, -1)))

    def of_transformed(self, t: Tensor) -> Tensor:
        """``f`` from ``diag(w)·Ŵ·R`` already formed (a block can form it cheaper than ``Ŵ`` then ``·R``)."""
        e = self._target - t
        # Accumulated in float64 even for float32 factors: L-BFGS's first, tiny step changes f by
        # less than float32 resolves, and a change of exactly 0 would stop it there.
        return e.pow(2).sum(dtype=torch.float64) / self._norm2

    def cast(self, dtype: torch.dtype) -> "Objective":
        """A copy whose tensors are ``dtype`` (float32 halves the cost of a long refinement on CPU)."""
        out = copy.copy(self)
        for name in ("matrix", "r", "gram", "w", "_target"):
            t = getattr(self, name)
            setattr(out, name, None if t is None else t.to(dtype))
        return out

    def error(self, approx: Tensor) -> float:
        """Relative error ``sqrt(f)``."""
        return math.sqrt(max(float(self(approx)), 0.0))


def relative_error(weight: Tensor, approx: Tensor, sigma: Tensor | None = None,
                   row_weights: Tensor | None = None, damping: float = DEFAULT_DAMPING) -> float:
    """``sqrt(f)``: relative (whitened, row-weighted) Frobenius error of ``approx`` against ``weight``."""
    return Objective(weight, sigma, row_weights, damping).error(approx.to(torch.float64))


def refine(loss: Callable[..., Tensor], params: Sequence[Tensor], *, max_iter: int = 100, tol: float = 1e-9,
           dtype: torch.dtype = torch.float64) -> tuple[tuple[Tensor, ...], float, int]:
    """Minimise ``loss(*params)`` with L-BFGS + strong-Wolfe line search (monotone).

    The factors are optimised in ``dtype`` (the objective's). Returns the best parameters seen
    (float64), ``f`` there, and the number of iterations run.
    """
    # Optimise unit-RMS copies of the factors: L-BFGS's first step (lr=1) and its absolute
    # tolerances then mean the same thing whatever the kernel's scale (1e-20 or 1e20).
    scales = [float(p.detach().to(torch.float64).pow(2).mean().sqrt()) or 1.0 for p in params]
    ps = [(p.detach().to(torch.float64) / s).to(dtype).contiguous().clone().requires_grad_(True)
          for p, s in zip(params, scales)]

    def objective(*qs):  # the loss sees the factors in their own units
        return loss(*(q * s for q, s in zip(qs, scales)))

    with torch.no_grad():
        f0 = float(objective(*ps))
    if max_iter <= 0 or f0 <= 1e-28:
        return tuple(p.detach().to(torch.float64) * s for p, s in zip(ps, scales)), f0, 0
    opt = torch.optim.LBFGS(ps, lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-14,
                            tolerance_change=tol * max(f0, 1e-30), line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        value = objective(*ps)
        value.backward()
        return value

    opt.step(closure)
    iters = int(opt.state[opt._params[0]].get("n_iter", 0))
    with torch.no_grad():
        f1 = float(objective(*ps))
    if not f1 <= f0 or not math.isfinite(f1):  # the line search guarantees this; guard anyway
        return tuple(p.detach().to(torch.float64) for p in params), f0, iters
    return tuple(p.detach().to(torch.float64) * s for p, s in zip(ps, scales)), f1, iters


# ------------------------------------------------------------------------------------------- IGCV1
def igcv1_weight(primary: Tensor, secondary: Tensor, primary_groups: int, secondary_groups: int) -> Tensor:
    """Dense kernel of an IGCV1 block from its primary (``L·M·r × C_in/L × kh × kw``) and secondary
    (``C_out × L·r × 1 × 1``) conv weights.

    Primary channel ``l·M·r + m·r + j`` (partition ``l``, secondary group ``m``, rank index ``j``)
    reaches secondary group ``m`` at input position ``l·r + j`` after the block's shuffle.
    """
    L, M = primary_groups, secondary_groups
    c_mid, cin_g, kh, kw = primary.shape
    c_out = secondary.shape[0]
    r = c_mid // (L * M)
    p = primary.reshape(L, M, r, cin_g * kh * kw)
    q = secondary.reshape(M, c_out // M, L, r)
    w = torch.einsum("molj,lmjn->moln", q, p)  # (M, n_out, L, n_in)
    return w.reshape(c_out, L, cin_g, kh, kw).reshape(c_out, L * cin_g, kh, kw)


def _tiles(m: Tensor, L: int, M: int) -> Tensor:
    """``C_out × n`` matrix → ``(M, L, C_out/M, n/L)`` tiles."""
    c_out, n = m.shape
    return m.reshape(M, c_out // M, L, n // L).permute(0, 2, 1, 3)


class PartitionProducts:
    """``m_l m_lᵀ`` of ``diag(w)·W``'s column partitions, for several partition counts, from one product.

    A coarser partition's block is a union of finer ones, so its Gram matrix is the sum of theirs: the
    finest partition's are formed once (the flops of a single Gram matrix of the whole ``W``) and the
    others summed from them. The planner asks for ``L = 1, 2, 4``; on VGG's 25088-wide classifier layer
    (``--linear``) that is a third of the float64 products.

    >>> W = torch.randn(8, 12)
    >>> torch.allclose(PartitionProducts(W, None, [1, 2])(1)[0], W.double() @ W.double().T)
    True
    """

    def __init__(self, weight: Tensor, row_weights: Tensor | None, counts: Sequence[int]) -> None:
        self.m = _weighted_matrix(weight, row_weights)
        finest = max(counts)
        fits = self.m.shape[1] % finest == 0 and all(finest % L == 0 for L in counts)
        self.finest = finest if fits else None
        self._finest_grams: Tensor | None = None

    def __call__(self, L: int) -> Tensor:
        """``(L, C_out, C_out)``: the Gram matrix of each of ``L`` column partitions."""
        if self.finest is None or self.finest % L:
            return _plain_grams(self.m, L)
        if self._finest_grams is None:
            self._finest_grams = _plain_grams(self.m, self.finest)
        g = self._finest_grams
        return g if L == self.finest else g.reshape(L, self.finest // L, *g.shape[1:]).sum(1)


def igcv1_singular_values(weight: Tensor, primary_groups: int, secondary_groups: Sequence[int] | int,
                          sigma: Tensor | None = None, row_weights: Tensor | None = None,
                          damping: float = DEFAULT_DAMPING, products: PartitionProducts | None = None
                          ) -> dict[int, Tensor]:
    """Singular values of every (whitened, row-weighted) tile, ``{M: tensor (M, L, k)}``.

    ``sum over tiles of sum_{k >= r} s_k²`` divided by the sum of all ``s_k²`` is the closed-form
    fit's ``f`` at rank ``r``: the planner reads a whole error-versus-rank curve off one call. Tiles
    no taller than wide take the eigenvalues of their rows' Gram matrix, a diagonal block of
    :func:`_partition_grams` (formed once for every ``M``, with no Cholesky factor). ``products``
    (of the same ``weight`` and ``row_weights``) shares the plain Gram matrices between calls.
    """
    L = primary_groups
    Ms = [secondary_groups] if isinstance(secondary_groups, int) else list(secondary_groups)
    c_out = weight.shape[0]
    n_in = weight[0].numel() // L
    wide = [M for M in Ms if c_out // M <= n_in]
    grams = None
    if wide:
        products = products or PartitionProducts(weight, row_weights, [L])
        grams = _partition_grams(products.m, L, sigma, damping, plain=products(L))
    x = _igcv1_whitened_tiles(weight, L, 1, sigma, row_weights, damping)[1][0] if len(wide) < len(Ms) else None
    out: dict[int, Tensor] = {}
    for M in Ms:
        if M in wide:
            g = _diagonal_tiles(grams, M)
        else:  # tall tiles: the Gram matrix of their columns is the smaller one
            t = x.reshape(L, M, c_out // M, n_in).transpose(0, 1)
            g = t.mT @ t
        # torch's float32 eigvalsh is (surprisingly) slower than float64 on CPU.
        out[M] = torch.linalg.eigvalsh(g).flip(-1).clamp_min(0).sqrt()
    return out


def _weighted_matrix(weight: Tensor, row_weights: Tensor | None) -> Tensor:
    """``diag(w)·W`` as a float64 ``C_out × C_in·S`` matrix (``W`` alone without row weights)."""
    m = weight.detach().to(torch.float64).reshape(weight.shape[0], -1)
    w = _row_weights(row_weights, m.shape[0])
    return m if w is None else w[:, None] * m


def _plain_grams(m: Tensor, L: int) -> Tensor:
    """``(L, C_out, C_out)``: ``m_l m_lᵀ`` for each of ``L`` equal column partitions of ``m``."""
    parts = m.reshape(m.shape[0], L, m.shape[1] // L).transpose(0, 1)
    return parts @ parts.mT


def _partition_grams(m: Tensor, L: int, sigma: Tensor | None, damping: float, plain: Tensor | None = None) -> Tensor:
    """``(L, C_out, C_out)``: ``m_l R_l R_lᵀ m_lᵀ = m_l (Σ_ll / s_l + δ·I) m_lᵀ`` per column partition.

    The Gram matrix of partition ``l``'s whitened columns (``R_l`` = :func:`whitener` of its diagonal
    block ``Σ_ll`` of mean eigenvalue ``s_l``), formed from ``Σ_ll`` itself: no Cholesky factor and
    no ``m_l R_l`` product, about a third of the flops for a 4608-column partition. Its eigenvectors
    give the closed-form fit (:func:`fit_igcv1`) and its eigenvalues the error curve. ``plain``:
    :func:`_plain_grams` of ``m``, when already formed.
    """
    c_out, n = m.shape
    n_in = n // L
    parts = m.reshape(c_out, L, n_in).transpose(0, 1)         # (L, C_out, n_in) view
    plain = parts @ parts.mT if plain is None else plain
    if sigma is None:
        return plain
    if sigma.shape != (n, n):
        raise ConfigError(f"input statistics have shape {tuple(sigma.shape)}, expected ({n}, {n})")
    s = sigma.detach().to(torch.float64)
    if not finite(s):
        raise ConfigError("input statistics contain NaN or Inf")
    out = torch.empty_like(plain)
    for l in range(L):
        block = s[l * n_in:(l + 1) * n_in, l * n_in:(l + 1) * n_in]
        scale = float(block.diagonal().sum()) / max(n_in, 1)
        if not scale > 0:   # no signal: the whitener is the identity
            out[l] = plain[l]
            continue
        ml = parts[l]
        out[l] = torch.addmm(plain[l], ml @ block, ml.mT, beta=max(damping, 1e-10), alpha=1.0 / scale)
    return out


def _diagonal_tiles(grams: Tensor, M: int) -> Tensor:
    """``(L, C_out, C_out)`` → the ``(M, L, C_out/M, C_out/M)`` diagonal blocks (one per secondary group)."""
    n_out = grams.shape[-1] // M
    return torch.stack([grams[:, i * n_out:(i + 1) * n_out, i * n_out:(i + 1) * n_out] for i in range(M)])


def _gram(x: Tensor) -> tuple[Tensor, Tensor, bool]:
    """Eigen-decomposition of the smaller Gram matrix of (batched) ``x``: ``(s², vectors, left)``.

    Descending order. LAPACK's SVD of a wide float64 matrix (512 × 4608 is common) is ~50x slower
    than forming the 512 × 512 Gram matrix and calling ``eigh``; in float64 the squared singular
    values lose nothing that matters for a truncation.
    """
    left = x.shape[-2] <= x.shape[-1]
    g = x @ x.mT if left else x.mT @ x
    evals, evecs = torch.linalg.eigh(g)
    return evals.flip(-1), evecs.flip(-1), left


def truncated_svd(x: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` singular triplets ``(U, s, Vh)`` of (batched) ``x`` via the Gram matrix."""
    s2, vecs, left = _gram(x)
    s2, vecs = s2[..., :rank].clamp_min(0), vecs[..., :rank]
    s = s2.sqrt()
    inv = torch.where(s > s[..., :1] * 1e-12, 1 / s.clamp_min(1e-300), torch.zeros_like(s))
    if left:
        u = vecs
        vh = (x.mT @ u * inv[..., None, :]).mT
    else:
        vh = vecs.mT
        u = x @ vecs * inv[..., None, :]
    return u, s, vh


def _igcv1_whitened_tiles(weight, L, M, sigma, row_weights, damping):
    c_out, c_in = weight.shape[:2]
    S = weight[0, 0].numel()
    n_in = c_in // L * S
    obj = Objective(weight, None, row_weights, damping)
    m = obj.matrix if obj.w is None else obj.w[:, None] * obj.matrix
    x = _tiles(m, L, M)  # (M, L, n_out, n_in)
    rl = None
    if sigma is not None:
        n = c_in * S
        if sigma.shape != (n, n):
            raise ConfigError(f"input statistics have shape {tuple(sigma.shape)}, expected ({n}, {n})")
        blocks = torch.stack([sigma[l * n_in:(l + 1) * n_in, l * n_in:(l + 1) * n_in] for l in range(L)])
        rl = torch.stack([whitener(b, n_in, damping) for b in blocks])  # (L, n_in, n_in)
        x = x @ rl[None]
    return obj, x, rl


def fit_igcv1(weight: Tensor, primary_groups: int, secondary_groups: int, rank: int, *,
              sigma: Tensor | None = None, row_weights: Tensor | None = None,
              damping: float = DEFAULT_DAMPING, refine_iters: int = 20) -> Fit:
    """Frobenius-optimal IGCV1 factors (closed form), optionally data-aware.

    Returns ``Fit((primary, secondary), error)`` with weights shaped for the block's convs.

    >>> w = torch.randn(8, 4, 3, 3)
    >>> fit = fit_igcv1(w, 1, 1, rank=8)  # L = M = 1 at full rank is exact
    >>> fit.error < 1e-6
    True
    """
    c_out, c_in, kh, kw = weight.shape
    L, M, r = primary_groups, secondary_groups, rank
    _check_divisible(c_in, L, "in_channels", "primary_groups")
    _check_divisible(c_out, M, "out_channels", "secondary_groups")
    rmax = min(c_out // M, c_in // L * kh * kw)
    if not 1 <= r <= rmax:
        raise ConfigError(f"IGCV1 rank must be in 1..{rmax} for this shape, got {r}")
    n_out, n_in = c_out // M, c_in // L * kh * kw
    row_w = _row_weights(row_weights, c_out)
    closed_f = None
    if n_out <= n_in:
        # The best rank-r tile in the whitened metric projects the tile's rows onto the top-r
        # eigenvectors U of its whitened Gram matrix: Ŵ = U Uᵀ W (no Cholesky factor, no solve).
        m = _weighted_matrix(weight, row_weights)
        evals, evecs = torch.linalg.eigh(_diagonal_tiles(_partition_grams(m, L, sigma, damping), M))
        s2, u = evals.flip(-1)[..., :r].clamp_min(0), evecs.flip(-1)[..., :r]
        root = s2.sqrt().sqrt()                  # sqrt of the singular values: balanced sides
        inv = torch.where(s2 > s2[..., :1] * 1e-24, 1 / root.clamp_min(1e-300), torch.zeros_like(root))
        q = u * root[..., None, :]               # (M, L, n_out, r)
        p = inv[..., :, None] * (u.mT @ _tiles(m, L, M))   # (M, L, r, n_in)
        if sigma is None or L == 1:  # independent tiles: f is the discarded share of the energy
            total = float(evals.sum()) or 1.0
            closed_f = (total - float(s2.sum())) / total
    else:
        _, x, rl = _igcv1_whitened_tiles(weight, L, M, sigma, row_weights, damping)
        u, s, vh = truncated_svd(x, r)
        root = s.sqrt()
        q = u * root[..., None, :]
        p = root[..., :, None] * vh
        if rl is not None:  # undo the whitening: P_l R_l^{-1}
            p = torch.linalg.solve_triangular(rl[None].expand(M, -1, -1, -1), p, upper=False, left=False)
    if row_w is not None:
        q = q / row_w.reshape(M, 1, n_out, 1)
    primary = p.permute(1, 0, 2, 3).reshape(L * M * r, c_in // L, kh, kw)
    secondary = q.permute(0, 2, 1, 3).reshape(c_out, L * r, 1, 1)

    def build(pw, sw):
        return igcv1_weight(pw, sw, L, M)

    iters = 0
    refined = sigma is not None and L > 1 and refine_iters > 0
    # One whitener of the whole Σ for the refinement and the error, when the closed form has no f.
    full = Objective(weight, sigma, row_weights, damping) if refined or closed_f is None else None

    def value(objective: Objective, pw: Tensor, sw: Tensor) -> Tensor:
        if objective.r is None:
            return objective(build(pw, sw))
        t = igcv1_times(pw, sw, L, M, objective.r)  # diag(w)·Ŵ·R without forming Ŵ
        return objective.of_transformed(t if objective.w is None else objective.w[:, None] * t)

    if refined:
        # Large kernels refine in float32 (half the time on CPU); the float64 objective decides.
        dtype = torch.float32 if c_out * full.n * full.n > _FLOAT32_REFINE_FLOPS else torch.float64
        cast = full.cast(dtype)
        start = (primary, secondary)
        (primary, secondary), f, iters = refine(lambda pw, sw: value(cast, pw, sw), start,
                                                max_iter=refine_iters, dtype=dtype)
        if dtype != torch.float64:
            f, f_start = float(value(full, primary, secondary)), float(value(full, *start))
            if not f <= f_start:
                (primary, secondary), f = start, f_start
    else:
        f = closed_f if closed_f is not None else float(value(full, primary, secondary))
    # Balancing leaves the product, and so f, unchanged.
    primary, secondary = balance_igcv1(primary, secondary, L, M)
    return Fit((primary, secondary), math.sqrt(max(f, 0.0)), iters)


#: ``C_out · n²`` above which IGCV1's cross-partition refinement runs in float32.
_FLOAT32_REFINE_FLOPS = 1 << 28


def igcv1_times(primary: Tensor, secondary: Tensor, primary_groups: int, secondary_groups: int,
                right: Tensor) -> Tensor:
    """``Ŵ · right`` for an IGCV1 block's dense equivalent ``Ŵ`` and a lower-triangular ``right``.

    Never forms ``Ŵ``: partition ``l``'s rows of ``right`` multiply its primary filters first
    (``C_mid/L`` rows instead of ``C_out``) and, ``right`` being lower triangular, only reach the
    first ``(l+1)·n/L`` columns: about ``C_mid·(L+1) / (2·L²·C_out)`` of the flops of ``Ŵ·R`` (0.375
    for ``L = 2``, ``C_mid = C_out``).

    >>> p, q, r = torch.randn(8, 2, 3, 3), torch.randn(4, 4, 1, 1), torch.randn(36, 36).tril()
    >>> dense = igcv1_weight(p, q, 2, 2).reshape(4, 36) @ r
    >>> torch.allclose(igcv1_times(p, q, 2, 2, r), dense, atol=1e-5)
    True
    """
    L, M = primary_groups, secondary_groups
    c_mid, c_out = primary.shape[0], secondary.shape[0]
    rank = c_mid // (L * M)
    n = right.shape[0]
    n_in = n // L
    p = primary.reshape(L, M, rank, n_in)
    q = secondary.reshape(M, c_out // M, L, rank)
    out = None
    for l in range(L):
        end = (l + 1) * n_in
        part = q[:, :, l, :] @ (p[l] @ right[l * n_in:end, :end])      # (M, C_out/M, end)
        part = torch.nn.functional.pad(part.reshape(c_out, end), (0, n - end))
        out = part if out is None else out + part
    return out


def balance_igcv1(primary: Tensor, secondary: Tensor, primary_groups: int, secondary_groups: int
                  ) -> tuple[Tensor, Tensor]:
    """Rescale every rank component so its primary filter and secondary column have equal norms.

    The product (the dense equivalent) is unchanged; the point is the optimiser that fine-tunes the
    block afterwards: with one side carrying ``R⁻¹`` at a scale far from the other's, the same
    learning rate is far too large for one factor and far too small for the other.
    """
    L, M = primary_groups, secondary_groups
    c_mid = primary.shape[0]
    c_out = secondary.shape[0]
    r = c_mid // (L * M)
    p = primary.reshape(L, M, r, -1)
    q = secondary.reshape(M, c_out // M, L, r)
    pn = p.norm(dim=-1)                       # (L, M, r)
    qn = q.norm(dim=1).permute(1, 0, 2)       # (L, M, r)
    scale = torch.where((pn > 0) & (qn > 0), (qn / pn.clamp_min(1e-300)).sqrt(), torch.ones_like(pn))
    p = p * scale[..., None]
    q = q / scale.permute(1, 0, 2)[:, None]
    return p.reshape(primary.shape), q.reshape(secondary.shape)


# ------------------------------------------------------------------------------------------- IGCV2
def apply_igcv2_chain(stages: Sequence[Tensor], factors: Sequence[int], x: Tensor) -> Tensor:
    """``chain · x`` for a ``C_mid × n`` matrix ``x``, where ``chain`` (``C_out × C_mid``; applied to
    ``I`` it is the chain's matrix) is IGCV2's chain of grouped 1×1 convs and shuffles.

    Stage ``t`` has weight ``(C_out_t, K_t, 1, 1)`` and ``C_mid / K_t`` groups; before every stage
    but the first, ``ChannelShuffle(K_t, C_mid / K_t)`` brings the digit it mixes innermost. Each
    stage is a batched product of its groups: ``C_out_t·K_t·n`` flops, where multiplying by the
    stage's block-diagonal matrix costs ``C_out_t·C_mid·n`` (planning ResNet-50 with ``auto`` spent a
    minute forming those matrices for 2048-wide layers, and most of IGCV2's scoring time multiplying
    by their zeros).
    """
    c_mid = math.prod(factors)
    for t, (w, k) in enumerate(zip(stages, factors)):
        g = c_mid // k
        if t > 0:
            x = x[shuffle_permutation(c_mid, k, g)]
        x = torch.bmm(w.reshape(g, w.shape[0] // g, k), x.reshape(g, k, -1)).reshape(w.shape[0], -1)
    return x


def igcv2_weight(primary: Tensor, stages: Sequence[Tensor], primary_groups: int,
                 factors: Sequence[int]) -> Tensor:
    """Dense kernel of an IGCV2 block: the chain applied to the block-diagonal primary conv."""
    L = primary_groups
    c_mid, cin_g, kh, kw = primary.shape
    a = primary.reshape(L, c_mid // L, cin_g * kh * kw)
    w = apply_igcv2_chain(stages, factors, torch.block_diag(*a.unbind(0)) if L > 1 else a[0])
    return w.reshape(-1, L * cin_g, kh, kw)


def fit_igcv2(weight: Tensor, primary_groups: int, factors: Sequence[int], *,
              sigma: Tensor | None = None, row_weights: Tensor | None = None,
              damping: float = DEFAULT_DAMPING, max_iter: int = 200, tol: float = 1e-9,
              restarts: int = 0, seed: int = 0) -> Fit:
    """Fit IGCV2 factors ``(primary, stage_1, …, stage_n)`` by monotone L-BFGS from an SVD start.

    Start: the closed-form IGCV1 fit with one secondary group and rank ``C_mid/L`` gives the primary
    conv and a dense secondary ``B``; the chain is fitted to ``B`` (a small problem), the primary is
    re-solved by least squares against that chain, then all factors are refined jointly.
    ``restarts`` adds tries from other random chain starts; the best is kept.
    """
    c_out, c_in, kh, kw = weight.shape
    L, ks = primary_groups, tuple(int(k) for k in factors)
    _validate_igcv2(c_in, c_out, L, ks, kh * kw)
    c_mid = math.prod(ks)
    obj = Objective(weight, sigma, row_weights, damping)

    def build(primary, *stages):
        return igcv2_weight(primary, stages, L, ks)

    # Closed-form start: primary rows = top right singular vectors of each partition.
    r = c_mid // L
    n_in = c_in // L * kh * kw
    base = fit_igcv1(weight, L, 1, min(r, c_out, n_in), sigma=sigma, row_weights=row_weights,
                     damping=damping, refine_iters=0)
    p0, b0 = base.factors
    if p0.shape[0] < c_mid:  # rank capped by the tile: pad with zero filters
        pad = c_mid // L - p0.shape[0] // L
        p0 = torch.cat([p0.reshape(L, -1, n_in), torch.zeros(L, pad, n_in, dtype=p0.dtype)], 1)
        b0 = torch.cat([b0.reshape(c_out, L, -1), torch.zeros(c_out, L, pad, dtype=b0.dtype)], 2)
    b0 = b0.reshape(c_out, c_mid)
    p0 = p0.reshape(c_mid, n_in)

    gen = torch.Generator().manual_seed(seed)
    chain_obj = Objective(b0)
    eye = torch.eye(c_mid, dtype=torch.float64)  # the chain matrix is the chain applied to I
    best: Fit | None = None
    for attempt in range(restarts + 1):
        stages = _random_chain(ks, c_out, gen)
        stages, _, _ = refine(lambda *s: chain_obj(apply_igcv2_chain(s, ks, eye)), stages, max_iter=max_iter // 2)
        chain = apply_igcv2_chain(stages, ks, eye)
        primary = _solve_primary(obj, chain, L, c_mid, n_in)
        primary = primary.reshape(c_mid, c_in // L, kh, kw)
        params, f, iters = refine(lambda *ps: obj(build(*ps)), (primary, *stages), max_iter=max_iter, tol=tol)
        params = balance_chain(params, L, ks)
        fit = Fit(params, obj.error(build(*params)), iters)
        if best is None or fit.error < best.error:
            best = fit
    return best


def _random_chain(ks: Sequence[int], c_out: int, gen: torch.Generator) -> list[Tensor]:
    c_mid = math.prod(ks)
    stages = []
    for t, k in enumerate(ks):
        outs = c_mid if t < len(ks) - 1 else c_out
        stages.append(torch.randn(outs, k, 1, 1, generator=gen, dtype=torch.float64) / math.sqrt(k))
    return stages


def _solve_primary(obj: Objective, chain: Tensor, L: int, c_mid: int, n_in: int) -> Tensor:
    """Least-squares primary conv for a fixed chain, partition by partition (row weights included)."""
    x = chain if obj.w is None else obj.w[:, None] * chain
    y = obj.matrix if obj.w is None else obj.w[:, None] * obj.matrix
    out = []
    for l in range(L):
        xl = x[:, l * (c_mid // L):(l + 1) * (c_mid // L)]
        yl = y[:, l * n_in:(l + 1) * n_in]
        out.append(torch.linalg.lstsq(xl, yl, driver="gelsd").solution)
    return torch.cat(out, 0)


def balance_chain(params: Sequence[Tensor], primary_groups: int, factors: Sequence[int],
                  sweeps: int = 3) -> tuple[Tensor, ...]:
    """Balance an IGCV2 block: every internal channel gets equal incoming and outgoing norms.

    Scaling channel ``c`` by ``α`` on the way in and ``1/α`` on the way out leaves the product
    unchanged; a few sweeps over the chain's boundaries bring all factors to comparable scales.
    """
    ks = tuple(factors)
    c_mid = math.prod(ks)
    mats = [p.clone() for p in params]
    for _ in range(sweeps):
        for t in range(len(ks)):
            # incoming norms of the channels entering stage t, in stage t's input order
            if t == 0:
                inc = mats[0].reshape(c_mid, -1).norm(dim=1)
                inc_order = torch.arange(c_mid)
            else:
                prev = mats[t]
                g = c_mid // ks[t - 1]
                inc_prev = prev.reshape(c_mid, -1).norm(dim=1)  # per output channel of stage t-1
                inc_order = shuffle_permutation(c_mid, ks[t], c_mid // ks[t])
                inc = inc_prev[inc_order]
            w = mats[t + 1]
            g = c_mid // ks[t]
            blocks = w.reshape(g, w.shape[0] // g, ks[t])
            out = blocks.norm(dim=1).reshape(-1)  # per input channel of stage t (its input order)
            alpha = torch.where((inc > 0) & (out > 0), (out / inc.clamp_min(1e-300)).sqrt(),
                                torch.ones_like(inc))
            # scale producer rows (in producer order) by alpha, consumer columns by 1/alpha
            src = mats[t].reshape(c_mid, -1).clone()
            src[inc_order] = src[inc_order] * alpha[:, None]
            mats[t] = src.reshape(mats[t].shape)
            mats[t + 1] = (blocks / alpha.reshape(g, 1, ks[t])).reshape(w.shape)
    return tuple(mats)


def _validate_igcv2(c_in: int, c_out: int, L: int, ks: Sequence[int], taps: int) -> None:
    if len(ks) < 2 or any(k < 1 for k in ks):
        raise ConfigError(f"IGCV2 needs a chain of at least 2 grouped 1x1 convs with group sizes >= 1, got {list(ks)}")
    c_mid = math.prod(ks)
    _check_divisible(c_in, L, "in_channels", "primary_groups")
    if c_mid % L:
        raise ConfigError(f"IGCV2 mid channels {c_mid} (= product of {list(ks)}) not divisible by primary_groups={L}")
    g_last = c_mid // ks[-1]
    if c_out % g_last:
        raise ConfigError(f"IGCV2 out_channels={c_out} not divisible by the last stage's {g_last} groups "
                          f"(mid channels {c_mid} / last group size {ks[-1]})")


# ------------------------------------------------------------------------------------------- IGCV3
def igcv3_weight(expand: Tensor, depthwise: Tensor, reduce: Tensor, expand_groups: int,
                 reduce_groups: int) -> Tensor:
    """Dense kernel of an IGCV3 block from its expand (``C_int × C_in/G1``), depthwise
    (``C_int × 1 × kh × kw``) and reduce (``C_out × C_int/G2``) conv weights.

    ``W[o, i, s] = Σ_c R[o, π(c)] D[c, s] E[c, i]`` with ``π`` the block's one channel shuffle.
    """
    G1, G2 = expand_groups, reduce_groups
    c_int = expand.shape[0]
    c_out = reduce.shape[0]
    kh, kw = depthwise.shape[-2:]
    e = torch.block_diag(*expand.reshape(G1, c_int // G1, -1).unbind(0))      # (C_int, C_in)
    r = torch.block_diag(*reduce.reshape(G2, c_out // G2, -1).unbind(0))      # (C_out, C_int)
    perm = shuffle_permutation(c_int, G1, G2) if G1 > 1 and G2 > 1 else torch.arange(c_int)
    r = r[:, torch.argsort(perm)]
    d = depthwise.reshape(c_int, kh * kw)
    w = torch.einsum("oc,cs,ci->ois", r, d, e)
    return w.reshape(c_out, e.shape[1], kh, kw)


class _IGCV3Tiles:
    """One IGCV3 objective in tile form, shared by every mid width of one grouping.

    Mid channel ``(g1, g2, j)`` (expand order) reads input partition ``g1`` and writes output group
    ``g2`` only, so ``diag(w)·Ŵ`` is a grid of ``G1·G2`` independent tiles, each a sum of
    ``C_int/(G1·G2)`` CP terms: batched products on the tiles cost ``G1·G2`` times less than the
    block-diagonal matrices of :func:`igcv3_weight`.
    """

    def __init__(self, obj: Objective, G1: int, G2: int, kernel_size: tuple[int, int]) -> None:
        if obj.r is not None and obj.gram is None:
            raise ValueError("an IGCV3 tile objective needs Objective(..., gram=True) when whitened")
        self.obj, self.G1, self.G2, self.kernel_size = obj, G1, G2, kernel_size
        self.S = kernel_size[0] * kernel_size[1]
        self.a, self.b = obj.c_out // G2, obj.n // (G1 * self.S)
        m = obj.matrix if obj.w is None else obj.w[:, None] * obj.matrix
        self.target = self.to_tiles(m)                                        # (G, a, b·S)
        self.row_weights = (None if obj.w is None else
                            obj.w.reshape(1, G2, self.a).expand(G1, G2, self.a).reshape(G1 * G2, self.a, 1))
        self._svds: list[tuple[Tensor, Tensor, Tensor]] | None = None

    def to_tiles(self, m: Tensor) -> Tensor:
        """``C_out × C_in·S`` → ``(G1·G2) × a × b·S``, tile ``(g1, g2)`` at ``g1·G2 + g2``."""
        return _tiles(m, self.G1, self.G2).transpose(0, 1).reshape(self.G1 * self.G2, self.a, -1)

    def from_tiles(self, t: Tensor) -> Tensor:
        """:meth:`to_tiles`' inverse."""
        G1, G2, a = self.G1, self.G2, self.a
        return t.reshape(G1, G2, a, -1).permute(1, 2, 0, 3).reshape(G2 * a, -1)

    def start(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """In each tile, the ``k`` strongest singular triplets over all kernel taps (each a rank-1
        term living on one tap), as (expand, depthwise, reduce) conv weights."""
        G, a, b, S = self.G1 * self.G2, self.a, self.b, self.S
        if self._svds is None:  # per tap, once for every mid width
            self._svds = [torch.linalg.svd(t.reshape(a, b, S).permute(2, 0, 1), full_matrices=False)
                          for t in self.target]
        expand = torch.zeros(G, k, b, dtype=torch.float64)
        dw = torch.zeros(G, k, S, dtype=torch.float64)
        red = torch.zeros(G, a, k, dtype=torch.float64)
        for g, (u, sv, vh) in enumerate(self._svds):
            top = torch.argsort(sv.flatten(), descending=True)[:k]
            tap, idx = top // sv.shape[1], top % sv.shape[1]
            root = sv[tap, idx].sqrt()
            n = len(top)
            red[g, :, :n] = u[tap, :, idx].T * root
            expand[g, :n] = vh[tap, idx, :] * root[:, None]
            dw[g, torch.arange(n), tap] = 1.0
        if self.row_weights is not None:
            red = red / self.row_weights
        return (expand.reshape(G * k, b, 1, 1), dw.reshape(G * k, 1, *self.kernel_size),
                self.from_tiles(red).reshape(self.G2 * a, self.G1 * k, 1, 1))

    def loss(self, expand: Tensor, dw: Tensor, red: Tensor) -> Tensor:
        """``f`` of the module docstring for conv-layout factors, with an analytic gradient."""
        return _IGCV3Loss.apply(expand, dw, red, self)


class _IGCV3Loss(torch.autograd.Function):
    """``f = ⟨D, D Σ⟩ / ‖diag(w) W R‖²`` with ``D = diag(w)(Ŵ − W)`` on tiles and ``Σ = R Rᵀ`` (``I``
    without statistics). Autograd through :func:`igcv3_weight`'s einsum and ``·R``
    took more products of the kernel's size and two with ``R``; this takes three and one with ``Σ``."""

    @staticmethod
    def forward(ctx, expand: Tensor, dw: Tensor, red: Tensor, tiles: _IGCV3Tiles) -> Tensor:
        G, b, S = tiles.G1 * tiles.G2, tiles.b, tiles.S
        k = expand.shape[0] // G
        e, d = expand.reshape(G, k, b), dw.reshape(G, k, S)
        r = tiles.to_tiles(red.reshape(tiles.obj.c_out, -1))
        rw = r if tiles.row_weights is None else r * tiles.row_weights
        x = (e[:, :, :, None] * d[:, :, None, :]).reshape(G, k, b * S)
        diff = torch.bmm(rw, x) - tiles.target
        gram = tiles.obj.gram
        g = diff if gram is None else tiles.to_tiles(tiles.from_tiles(diff) @ gram)
        ctx.save_for_backward(e, d, rw, x, g)
        ctx.tiles = tiles
        return (diff * g).sum(dtype=torch.float64) / tiles.obj._norm2

    @staticmethod
    def backward(ctx, grad: Tensor):
        e, d, rw, x, g = ctx.saved_tensors
        tiles = ctx.tiles
        G1, G2, a, b, S = tiles.G1, tiles.G2, tiles.a, tiles.b, tiles.S
        G, k = e.shape[:2]
        g = g * (2.0 * grad / tiles.obj._norm2).to(g.dtype)
        dr = torch.bmm(g, x.mT)
        if tiles.row_weights is not None:
            dr = dr * tiles.row_weights
        dx = torch.bmm(rw.mT, g).reshape(G, k, b, S)
        de = (dx * d[:, :, None, :]).sum(-1)
        dd = (dx * e[:, :, :, None]).sum(2)
        return (de.reshape(G * k, b, 1, 1), dd.reshape(G * k, 1, *tiles.kernel_size),
                tiles.from_tiles(dr).reshape(G2 * a, G1 * k, 1, 1), None)


def fit_igcv3(weight: Tensor, expand_groups: int, reduce_groups: int, mid_channels: int, *,
              sigma: Tensor | None = None, row_weights: Tensor | None = None,
              damping: float = DEFAULT_DAMPING, max_iter: int = 300, tol: float = 1e-10,
              restarts: int = 0, seed: int = 0) -> Fit:
    """Fit IGCV3 factors ``(expand, depthwise, reduce)`` — a grouped CP decomposition of the kernel.

    Start: in each (reduce group, expand partition) tile, the ``C_int/(G1·G2)`` strongest singular
    triplets over all kernel taps (each a rank-1 term living on one tap), then monotone L-BFGS on the
    exact objective. ``restarts`` adds random starts; the best is kept.
    """
    return fit_igcv3_widths(weight, expand_groups, reduce_groups, [mid_channels], sigma=sigma,
                            row_weights=row_weights, damping=damping, max_iter=max_iter, tol=tol,
                            restarts=restarts, seed=seed)[0]


def fit_igcv3_widths(weight: Tensor, expand_groups: int, reduce_groups: int, mid_channels: Sequence[int], *,
                     sigma: Tensor | None = None, row_weights: Tensor | None = None,
                     damping: float = DEFAULT_DAMPING, max_iter: int = 300, tol: float = 1e-10,
                     restarts: int = 0, seed: int = 0) -> list[Fit]:
    """:func:`fit_igcv3` for several mid widths of one grouping (what the planner scores): the
    objective, its whitening and the start's per-tap SVDs are computed once for all of them.
    """
    c_out, c_in, kh, kw = weight.shape
    G1, G2 = expand_groups, reduce_groups
    for c_int in mid_channels:
        _validate_igcv3(c_in, c_out, G1, G2, c_int)
    obj = Objective(weight, sigma, row_weights, damping, gram=True)
    tiles = _IGCV3Tiles(obj, G1, G2, (kh, kw))
    fits = []
    for c_int in mid_channels:
        starts = [tiles.start(c_int // (G1 * G2))]
        gen = torch.Generator().manual_seed(seed)
        for _ in range(restarts):
            starts.append(tuple(torch.randn(t.shape, generator=gen, dtype=torch.float64) * t.std().clamp_min(1e-3)
                                for t in starts[0]))
        best: Fit | None = None
        for start in starts:
            params, f, iters = refine(tiles.loss, start, max_iter=max_iter, tol=tol)
            params = balance_igcv3(*params, G1, G2)
            fit = Fit(params, obj.error(igcv3_weight(*params, G1, G2)), iters)
            if best is None or fit.error < best.error:
                best = fit
        fits.append(best)
    return fits


def balance_igcv3(expand: Tensor, depthwise: Tensor, reduce: Tensor, expand_groups: int,
                  reduce_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Give each mid channel's three factors (expand row, depthwise filter, reduce column) equal norms."""
    G1, G2 = expand_groups, reduce_groups
    c_int = expand.shape[0]
    c_out = reduce.shape[0]
    en = expand.reshape(c_int, -1).norm(dim=1)
    dn = depthwise.reshape(c_int, -1).norm(dim=1)
    perm = shuffle_permutation(c_int, G1, G2) if G1 > 1 and G2 > 1 else torch.arange(c_int)
    rb = reduce.reshape(G2, c_out // G2, c_int // G2)
    rn_q = rb.norm(dim=1).reshape(-1)            # per mid channel in reduce order
    rn = torch.empty_like(rn_q)
    rn[perm] = rn_q                               # back to expand order
    ok = (en > 0) & (dn > 0) & (rn > 0)
    g = (en * dn * rn).clamp_min(1e-300) ** (1 / 3)
    se = torch.where(ok, g / en.clamp_min(1e-300), torch.ones_like(en))
    sd = torch.where(ok, g / dn.clamp_min(1e-300), torch.ones_like(dn))
    sr = torch.where(ok, g / rn.clamp_min(1e-300), torch.ones_like(rn))
    expand = expand * se.reshape(-1, *([1] * (expand.dim() - 1)))
    depthwise = depthwise * sd.reshape(-1, *([1] * (depthwise.dim() - 1)))
    reduce = (rb * sr[perm].reshape(G2, 1, -1)).reshape(reduce.shape)
    return expand, depthwise, reduce


def _validate_igcv3(c_in: int, c_out: int, G1: int, G2: int, c_int: int) -> None:
    _check_divisible(c_in, G1, "in_channels", "expand_groups")
    _check_divisible(c_out, G2, "out_channels", "reduce_groups")
    if c_int < 1 or c_int % (G1 * G2):
        raise ConfigError(f"IGCV3 mid_channels={c_int} must be a positive multiple of "
                          f"expand_groups*reduce_groups={G1 * G2}")


def _check_divisible(n: int, g: int, what: str, by: str) -> None:
    if g < 1 or n % g:
        raise ConfigError(f"{what}={n} is not divisible by {by}={g}")
