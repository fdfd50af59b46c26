"""The compiled loops (pde._kernels) give the numpy code's numbers to the last bit, on masked and full grids."""

import numpy as np
import pytest
import torch

from napari_binn.pde import _kernels, simulate
from napari_binn.pde.grid import MaskedGrid
from napari_binn.pde.torch_solver import TorchGrid, _NumpyRhs, simulate_tables, simulate_tables_batch


@pytest.fixture
def numpy_only(monkeypatch):
    """Run the numpy code instead of the compiled loops inside the block this returns."""

    class _Switch:
        def __enter__(self):
            monkeypatch.setattr(_kernels, "AVAILABLE", False)

        def __exit__(self, *exc):
            monkeypatch.setattr(_kernels, "AVAILABLE", True)

    return _Switch()


def _masked(seed=0, n=15):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n]
    mask = ((xx - 7) ** 2 + (yy - 7) ** 2 < 40) | (xx < 2)  # a disc and a strip, with holes at the edge
    mask[3, 3] = False
    u0 = np.where(mask, 2000.0 / (1 + np.exp((xx - 6.0) / 1.5)) * (0.8 + 0.4 * rng.random(mask.shape)), 0.0)
    return mask, u0


def test_compiled_loops_are_used():
    # numba is a dependency: without it the solvers fall back to numpy (same numbers, slower), not an error
    assert _kernels.AVAILABLE, "numba could not be imported: the solvers run their slower numpy code"


@pytest.mark.parametrize("full", [False, True])
def test_divergence_is_the_same_to_the_last_bit(numpy_only, full):
    mask, u0 = _masked()
    if full:
        mask = np.ones_like(mask)
    grid = MaskedGrid(mask, 50.0)
    rng = np.random.default_rng(1)
    u = grid.from_grid(u0) + rng.normal(0, 30, grid.n)
    u[::7] = -u[::7]  # negatives, as a solver's overshoot gives
    d = 500.0 + 2000.0 * rng.random(grid.n)
    fast = [grid.divergence(u, d), grid.divergence(u, 800.0), grid.divergence(u, 0.0)]
    with numpy_only:
        slow = [grid.divergence(u, d), grid.divergence(u, 800.0), grid.divergence(u, 0.0)]
    for a, b in zip(fast, slow):
        assert np.array_equal(a, b)
    # and the scheme itself: pure diffusion conserves mass on the mask
    assert abs(fast[0].sum()) < 1e-9 * np.abs(fast[0]).sum()


def test_the_numpy_solver_gives_the_same_frames(numpy_only):
    mask, u0 = _masked(2)
    K = 2000.0
    D = lambda u: 300.0 + 900.0 * u / K  # noqa: E731
    G = lambda u: 0.1 * (1 - u / K)  # noqa: E731
    t = np.linspace(0.0, 24.0, 5)
    fast = simulate(D, G, u0, mask, 50.0, t, method="rkc")
    fast_const = simulate(800.0, G, u0, mask, 50.0, t, method="rkc")
    with numpy_only:
        slow = simulate(D, G, u0, mask, 50.0, t, method="rkc")
        slow_const = simulate(800.0, G, u0, mask, 50.0, t, method="rkc")
    assert np.array_equal(fast, slow, equal_nan=True) and np.array_equal(fast_const, slow_const, equal_nan=True)


def _tables(K=2000.0, m=25):
    nodes = np.linspace(0.0, 1.3 * K, m)
    D = 200.0 + 3000.0 * (nodes / K) ** 2 + 50.0 * np.sin(nodes / 300.0)
    G = 0.08 * (1 - nodes / K) * (nodes / K - 0.1)
    return 1.3 * K, D, G


def test_right_hand_side_and_its_vector_jacobian_product(numpy_only):
    mask, u0 = _masked(3)
    grid = MaskedGrid(mask, 50.0)
    u_max, D, G = _tables()
    rng = np.random.default_rng(4)
    u = grid.from_grid(u0) + rng.normal(0, 50, grid.n)
    u[0] = 5 * u_max  # beyond the last node: the table is constant there
    a = rng.normal(size=grid.n)
    rhs = _NumpyRhs(TorchGrid(grid), u_max, D, G)
    aD, aG = np.zeros(D.size), np.zeros(D.size)
    fast = (_kernels.table_rhs(u, D, G, rhs.i, rhs.j, rhs.scale, rhs.top, rhs.half_inv_dx2),
            _kernels.table_vjp(u, a, D, G, rhs.dD, rhs.dG, rhs.i, rhs.j, rhs.scale, rhs.top, rhs.half_inv_dx2,
                               aD, aG))
    bD, bG = np.zeros(D.size), np.zeros(D.size)
    slow = rhs(u), rhs.vjp(u, a, bD, bG)
    assert np.array_equal(fast[0], slow[0]) and np.array_equal(fast[1], slow[1])
    assert np.array_equal(aD, bD) and np.array_equal(aG, bG)
    u[5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        _kernels.table_rhs(u, D, G, rhs.i, rhs.j, rhs.scale, rhs.top, rhs.half_inv_dx2)


@pytest.mark.parametrize("delay", [False, True])
def test_simulation_and_gradient_are_the_same_to_the_last_bit(numpy_only, delay):
    mask, u0 = _masked(5)
    grid = MaskedGrid(mask, 50.0)
    tg = TorchGrid(grid)
    u_max, D, G = _tables()
    t = np.array([0.0, 3.0, 6.0, 9.0, 15.0])
    tf = (lambda th: 1.0 - 0.5 * np.exp(-th / 4.0)) if delay else None
    weights = torch.as_tensor(np.random.default_rng(6).normal(size=(t.size, grid.n)))

    def run():
        x0 = torch.tensor(grid.from_grid(u0), requires_grad=True)
        Dt = torch.tensor(D, requires_grad=True)
        Gt = torch.tensor(G, requires_grad=True)
        out = simulate_tables(tg, x0, t, u_max, Dt, Gt, time_factor=tf)
        (out * weights).sum().backward()
        return out.detach().numpy(), x0.grad.numpy(), Dt.grad.numpy(), Gt.grad.numpy()

    fast = run()
    with numpy_only:
        slow = run()
    for a, b in zip(fast, slow):
        assert np.array_equal(a, b)
    # the batch of tables: every member as simulated alone
    Db = np.stack([D, 1.1 * D, D + 40.0])
    Gb = np.stack([G, G, 0.5 * G])
    x0 = torch.tensor(grid.from_grid(u0))
    batch = simulate_tables_batch(tg, x0, t, u_max, Db, Gb, time_factor=tf)
    with numpy_only:
        batch_slow = simulate_tables_batch(tg, x0, t, u_max, Db, Gb, time_factor=tf)
    assert np.array_equal(batch, batch_slow)
    assert np.array_equal(batch[0], fast[0])
