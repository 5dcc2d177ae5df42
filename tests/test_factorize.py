"""Fitting maths: closed form = Eckart-Young, planted factors are recovered, whitening is data-aware."""

import math

import pytest
import torch
from torch import nn

from igc_convert import factorize as fz
from igc_convert.blocks import IGCV1, IGCV2, IGCV3
from igc_convert.errors import ConfigError


def _eckart_young(weight, L, M, r):
    """Independent computation: SVD each tile with numpy-free loops, sum the discarded energy."""
    c_out = weight.shape[0]
    m = weight.reshape(c_out, -1).double()
    n_out, n_in = c_out // M, m.shape[1] // L
    tail = 0.0
    for mi in range(M):
        for li in range(L):
            s = torch.linalg.svdvals(m[mi * n_out:(mi + 1) * n_out, li * n_in:(li + 1) * n_in])
            tail += float((s[r:] ** 2).sum())
    return math.sqrt(tail / float((m**2).sum()))


@pytest.mark.parametrize("L,M,r", [(1, 1, 3), (2, 4, 2), (4, 2, 5), (8, 1, 1)], ids=str)
def test_igcv1_error_equals_eckart_young_bound(L, M, r):
    torch.manual_seed(1)
    w = torch.randn(16, 8, 3, 3)
    fit = fz.fit_igcv1(w, L, M, r)
    assert fit.error == pytest.approx(_eckart_young(w, L, M, r), rel=1e-6)
    dense = fz.igcv1_weight(*fit.factors, L, M)
    assert fz.relative_error(w, dense) == pytest.approx(fit.error, rel=1e-6)


def _planted(cls, shape, cin=16, cout=16, k=3, seed=0):
    torch.manual_seed(seed)
    block = cls(cin, cout, k, **shape).double()
    for p in block.parameters():
        nn.init.normal_(p)
    return block.dense_weight().detach()


PLANTED = [
    (IGCV1, dict(primary_groups=4, secondary_groups=2, rank=2)),
    (IGCV1, dict(primary_groups=1, secondary_groups=1, rank=5)),
    (IGCV2, dict(primary_groups=2, factors=[4, 4])),
    (IGCV2, dict(primary_groups=4, factors=[2, 8])),
    (IGCV3, dict(expand_groups=1, reduce_groups=1, mid_channels=8)),
    (IGCV3, dict(expand_groups=2, reduce_groups=2, mid_channels=8)),
]


@pytest.mark.parametrize("cls,shape", PLANTED, ids=[f"{c.kind}-{s}" for c, s in PLANTED])
def test_planted_solutions_are_recovered(cls, shape):
    w = _planted(cls, shape)
    kwargs = {} if cls is IGCV1 else dict(restarts=2)
    fit = cls.fit(w, **shape, **kwargs)
    assert fit.error <= 1e-4
    block = cls(16, 16, 3, **shape).double()
    block.load_factors(fit.factors)
    torch.testing.assert_close(block.dense_weight(), w, rtol=0, atol=1e-4 * float(w.abs().max()))


@pytest.mark.parametrize("cls,shape", PLANTED[2:], ids=[f"{c.kind}-{s}" for c, s in PLANTED[2:]])
def test_iterative_fits_improve_on_their_start_and_respect_the_cap(cls, shape):
    torch.manual_seed(3)
    w = torch.randn(16, 16, 3, 3)
    short = cls.fit(w, **shape, max_iter=1)
    longer = cls.fit(w, **shape, max_iter=60)
    assert longer.error <= short.error + 1e-12
    assert short.iterations <= 1 and longer.iterations <= 60


def test_whitened_fit_is_exact_on_a_low_rank_input_distribution():
    """Inputs living in a 6-dim subspace: a rank-6 pair fits the outputs exactly; weight space can't."""
    torch.manual_seed(0)
    cin, cout, n = 8, 16, 8 * 9
    basis = torch.randn(n, 6, dtype=torch.float64)
    patches = torch.randn(4000, 6, dtype=torch.float64) @ basis.T
    sigma = patches.T @ patches / len(patches)
    w = torch.randn(cout, cin, 3, 3, dtype=torch.float64)
    plain = fz.fit_igcv1(w, 1, 1, 6)
    aware = fz.fit_igcv1(w, 1, 1, 6, sigma=sigma, damping=1e-8)

    def out_err(fit):
        approx = fz.igcv1_weight(*fit.factors, 1, 1).reshape(cout, -1)
        return float(((w.reshape(cout, -1) - approx) @ patches.T).norm() / (w.reshape(cout, -1) @ patches.T).norm())

    assert out_err(aware) < 1e-5
    assert out_err(plain) > 0.1


@pytest.mark.parametrize("sigma", [
    torch.zeros(72, 72),
    torch.ones(72, 72),                                  # rank one
    (lambda p: p.T @ p)(torch.randn(1, 72)),             # a single patch
    torch.diag(torch.cat([torch.ones(1), torch.zeros(71)])) * 1e-30,
], ids=["zero", "rank-one", "single-patch", "tiny"])
@pytest.mark.parametrize("kind", ["igcv1", "igcv2", "igcv3"])
def test_degenerate_statistics_give_finite_fits(sigma, kind):
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    shape = {"igcv1": dict(primary_groups=2, secondary_groups=2, rank=2),
             "igcv2": dict(primary_groups=2, factors=[4, 4]),
             "igcv3": dict(expand_groups=1, reduce_groups=2, mid_channels=8)}[kind]
    cls = {"igcv1": IGCV1, "igcv2": IGCV2, "igcv3": IGCV3}[kind]
    kwargs = {} if kind == "igcv1" else dict(max_iter=20)
    fit = cls.fit(w, **shape, sigma=sigma, row_weights=torch.rand(16), **kwargs)
    assert all(torch.isfinite(f).all() for f in fit.factors)
    assert math.isfinite(fit.error)


def test_row_weights_shift_error_to_unimportant_rows():
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3, dtype=torch.float64)
    rw = torch.ones(16, dtype=torch.float64)
    rw[:8] = 100.0
    fit = fz.fit_igcv1(w, 1, 1, 6, row_weights=rw)
    plain = fz.fit_igcv1(w, 1, 1, 6)
    err = lambda f: (w - fz.igcv1_weight(*f.factors, 1, 1))[:8].norm()  # noqa: E731
    assert err(fit) < err(plain)


def test_balancing_keeps_the_product_and_equalises_norms():
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3, dtype=torch.float64)
    x = torch.randn(500, 72, dtype=torch.float64) * torch.logspace(-3, 1, 72, dtype=torch.float64)
    fit = fz.fit_igcv1(w, 2, 2, 3, sigma=x.T @ x / 500, refine_iters=0)
    p, q = fit.factors
    pn = p.reshape(2, 2, 3, -1).norm(dim=-1)
    qn = q.reshape(2, 8, 2, 3).norm(dim=1).permute(1, 0, 2)
    torch.testing.assert_close(pn, qn)
    w3 = fz.fit_igcv3(w, 2, 2, 8, sigma=x.T @ x / 500, max_iter=10)
    e, d, r = w3.factors
    before = fz.igcv3_weight(e, d, r, 2, 2)
    torch.testing.assert_close(fz.igcv3_weight(*fz.balance_igcv3(e, d, r, 2, 2), 2, 2), before)
    assert torch.allclose(e.reshape(8, -1).norm(dim=1), d.reshape(8, -1).norm(dim=1))


def test_bad_statistics_shape_is_a_config_error():
    with pytest.raises(ConfigError, match="expected"):
        fz.fit_igcv1(torch.randn(4, 4, 3, 3), 1, 1, 2, sigma=torch.eye(5))


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_cross_partition_refinement_lowers_the_whitened_error(precision, monkeypatch):
    """Inputs correlated across the L partitions: the per-partition closed form is not optimal and
    the refinement (structured ``Ŵ·R``, float32 for large kernels) improves it; the reported error is
    the dense objective's."""
    if precision == "float32":
        monkeypatch.setattr(fz, "_FLOAT32_REFINE_FLOPS", 0)
    torch.manual_seed(0)
    w = torch.randn(32, 16, 3, 3, dtype=torch.float64)
    x = torch.randn(2000, 144, dtype=torch.float64) @ torch.randn(144, 144, dtype=torch.float64)
    sigma = x.T @ x / len(x)
    closed = fz.fit_igcv1(w, 2, 2, 4, sigma=sigma, refine_iters=0)
    refined = fz.fit_igcv1(w, 2, 2, 4, sigma=sigma, refine_iters=30)
    assert refined.iterations > 1
    assert refined.error < 0.95 * closed.error
    approx = fz.igcv1_weight(*refined.factors, 2, 2)
    assert refined.error == pytest.approx(fz.relative_error(w, approx, sigma), rel=1e-9)
    assert all(f.dtype == torch.float64 for f in refined.factors)


@pytest.mark.parametrize("data_aware", [False, True])
def test_shared_partition_products_give_the_same_error_curves(data_aware):
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    x = torch.randn(400, 72) @ torch.randn(72, 72)
    sigma = (x.T @ x / 400).double() if data_aware else None
    rows = torch.rand(16) + 0.5 if data_aware else None
    products = fz.PartitionProducts(w, rows, [1, 2, 4])
    for L in (1, 2, 4):
        shared = fz.igcv1_singular_values(w, L, [1, 2, 4], sigma, rows, products=products)
        alone = fz.igcv1_singular_values(w, L, [1, 2, 4], sigma, rows)
        assert shared.keys() == alone.keys()
        for M in alone:
            torch.testing.assert_close(shared[M], alone[M], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("G1,G2", [(1, 1), (2, 1), (1, 2), (2, 2)], ids=str)
@pytest.mark.parametrize("whitened", [False, True], ids=["weight", "whitened"])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "row-weights"])
def test_igcv3_analytic_gradient_equals_autograd_through_the_dense_kernel(G1, G2, whitened, weighted):
    """The fit's hand-written loss and gradient (on tiles) against autograd
    through igcv3_weight and the Objective, which is the definition."""
    torch.manual_seed(0)
    w = torch.randn(12, 8, 3, 3, dtype=torch.float64)
    x = torch.randn(300, 72, dtype=torch.float64) * torch.logspace(-2, 1, 72, dtype=torch.float64)
    obj = fz.Objective(w, x.T @ x / 300 if whitened else None, torch.rand(12) + 0.1 if weighted else None, gram=True)
    c_int = 3 * G1 * G2
    factors = [torch.randn(c_int, 8 // G1, 1, 1, dtype=torch.float64), torch.randn(c_int, 1, 3, 3, dtype=torch.float64),
               torch.randn(12, c_int // G2, 1, 1, dtype=torch.float64)]
    mine = [f.clone().requires_grad_(True) for f in factors]
    ref = [f.clone().requires_grad_(True) for f in factors]
    f_mine = fz._IGCV3Tiles(obj, G1, G2, (3, 3)).loss(*mine)
    f_ref = obj(fz.igcv3_weight(*ref, G1, G2))
    (3 * f_mine).backward()
    (3 * f_ref).backward()
    torch.testing.assert_close(f_mine.detach(), f_ref.detach())
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a.grad, b.grad)


def test_igcv3_widths_fitted_together_equal_single_fits():
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    x = torch.randn(400, 72) * torch.logspace(-2, 1, 72)
    kw = dict(sigma=x.T @ x / 400, row_weights=torch.rand(16) + 0.1, max_iter=8)
    together = fz.fit_igcv3_widths(w, 2, 2, [4, 8, 12], **kw)
    for c_int, fit in zip([4, 8, 12], together):
        alone = fz.fit_igcv3(w, 2, 2, c_int, **kw)
        assert fit.error == alone.error
        for a, b in zip(fit.factors, alone.factors):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
