"""The differentiable solver (pde.torch_solver) against the numpy solver, its gradients and its guards."""

import numpy as np
import pytest
import torch

from napari_binn.pde import simulate
from napari_binn.pde.grid import MaskedGrid
from napari_binn.pde.torch_solver import TorchGrid, interp_table, simulate_tables, simulate_tables_batch


def _triangle(n=14):
    yy, xx = np.mgrid[:n, :n]
    return (xx <= yy + 2) & (xx >= 1)


def test_matches_numpy_solver_on_a_masked_grid():
    mask = _triangle()
    K = 2000.0
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:14, :14]
    u0 = np.where(mask, K / (1 + np.exp((xx - 5.0) / 1.5)) * (0.9 + 0.1 * rng.random(mask.shape)), 0.0)
    D = lambda u: 300.0 + 900.0 * u / K  # noqa: E731  (density-dependent D: the face means matter)
    G = lambda u: 0.1 * (1 - u / K)  # noqa: E731
    t = np.linspace(0.0, 12.0, 4)
    ref = simulate(D, G, u0, mask, 50.0, t, rtol=1e-7)
    grid = MaskedGrid(mask, 50.0)
    nodes = np.linspace(0, 1.3 * K, 40)  # D and G are linear: the tables are exact
    out = simulate_tables(TorchGrid(grid), torch.tensor(grid.from_grid(u0)), t, 1.3 * K, torch.tensor(D(nodes)),
                          torch.tensor(G(nodes)))
    ref_mask = np.stack([grid.from_grid(r) for r in ref])
    assert np.abs(out.numpy() - ref_mask).max() < 1e-3 * K
    # mass is conserved by the diffusion part: with G = 0 the total stays put
    flat = simulate_tables(TorchGrid(grid), torch.tensor(grid.from_grid(u0)), t, 1.3 * K,
                           torch.tensor(D(nodes)), torch.zeros(40))
    assert abs(float(flat[-1].sum() / flat[0].sum()) - 1) < 1e-10


def test_gradients_flow_to_the_tables_and_the_initial_state():
    grid = MaskedGrid(np.ones((6, 6), bool), 50.0)
    u0 = torch.linspace(0, 1, 36, dtype=torch.float64).requires_grad_(True)
    D = torch.full((5,), 100.0, dtype=torch.float64, requires_grad=True)
    G = torch.full((5,), 0.1, dtype=torch.float64, requires_grad=True)
    out = simulate_tables(TorchGrid(grid), u0, np.array([0.0, 1.0, 2.0]), 1.3, D, G)
    (out[-1] ** 2).sum().backward()
    assert all(bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().sum()) > 0 for x in (u0, D, G))


def test_interpolation_is_linear_and_constant_beyond_the_ends():
    vals = torch.tensor([0.0, 1.0, 4.0], dtype=torch.float64)
    u = torch.tensor([-1.0, 0.0, 0.25, 0.75, 1.0, 3.0], dtype=torch.float64)
    assert np.allclose(interp_table(u, 1.0, vals).numpy(), [0.0, 0.0, 0.5, 2.5, 4.0, 4.0])


def test_guards():
    grid = TorchGrid(MaskedGrid(np.ones((4, 4), bool), 10.0))
    u0 = torch.ones(16, dtype=torch.float64)
    G = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="max_steps"):
        simulate_tables(grid, u0, np.array([0.0, 100.0]), 1.0, torch.full((3,), 1e6, dtype=torch.float64), G,
                        max_steps=1000)
    with pytest.raises(ValueError, match=">= 0"):
        simulate_tables(grid, u0, np.array([0.0, 1.0]), 1.0, torch.tensor([1.0, -1.0, 1.0]).double(), G)
    with pytest.raises(ValueError, match="cfl"):
        simulate_tables(grid, u0, np.array([0.0, 1.0]), 1.0, torch.ones(3).double(), G, cfl=1.5)
    with pytest.raises(ValueError, match="one value per mask box"):
        simulate_tables(grid, u0[:5], np.array([0.0, 1.0]), 1.0, torch.ones(3).double(), G)


@pytest.mark.parametrize("delay", [False, True])
def test_the_adjoint_gives_autograds_values_and_gradients(delay):
    """The numpy stepper with its hand-written adjoint against autograd through the same torch steps: on a masked
    grid, with exact zeros and a negative value in u0 (the clamp at 0), a density above the tables' end (constant
    continuation), density-dependent tables (the face means and the interpolation slopes) and a delay T(t)."""
    mask = _triangle()
    grid = MaskedGrid(mask, 50.0)
    K = 2000.0
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:14, :14]
    u0 = grid.from_grid(np.where(mask, K / (1 + np.exp((xx - 5.0) / 1.5)), 0.0)) * (0.9 + 0.1 * rng.random(grid.n))
    u0[::7] = 0.0
    u0[3] = 1.35 * K
    u0[5] = -10.0
    nodes = np.linspace(0, 1.3 * K, 12)
    weights = torch.tensor(rng.standard_normal((4, grid.n)))
    tf = (lambda t: 1.0 / (1.0 + np.exp(-(t - 3.0)))) if delay else None
    got = {}
    for method in ("autograd", "adjoint"):
        x0 = torch.tensor(u0, requires_grad=True)
        D = torch.tensor(300 + 900 * nodes / K + 50 * np.sin(nodes / 300), requires_grad=True)
        G = torch.tensor(0.1 * (1 - nodes / K) + 0.02 * np.cos(nodes / 200), requires_grad=True)
        out = simulate_tables(TorchGrid(grid), x0, np.array([0.0, 2.0, 5.0, 7.5]), 1.3 * K, D, G, time_factor=tf,
                              method=method)
        ((out * weights).sum() + 1e-4 * (out[-1] ** 2).sum()).backward()
        got[method] = [out.detach().numpy(), x0.grad.numpy(), D.grad.numpy(), G.grad.numpy()]
    for name, a, b in zip(("u", "du0", "dD", "dG"), got["autograd"], got["adjoint"]):
        assert np.abs(a).max() > 0, name
        assert np.abs(a - b).max() <= 1e-12 * np.abs(a).max(), name


def test_the_adjoint_matches_finite_differences():
    """The adjoint's gradient against central differences of the simulation (torch.autograd.gradcheck)."""
    grid = TorchGrid(MaskedGrid(np.ones((5, 4), bool), 50.0))
    u0 = torch.linspace(0.05, 1.0, 20, dtype=torch.float64).requires_grad_(True)
    D = torch.linspace(80.0, 150.0, 6, dtype=torch.float64).requires_grad_(True)
    G = torch.linspace(0.17, -0.1, 6, dtype=torch.float64).requires_grad_(True)  # (step count away from a jump)

    def run(u0, D, G):
        return simulate_tables(grid, u0, np.array([0.0, 1.0, 2.5]), 1.3, D, G)

    assert torch.autograd.gradcheck(run, (u0, D, G), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_without_a_gradient_nothing_is_kept_and_the_method_is_checked():
    grid = TorchGrid(MaskedGrid(np.ones((4, 4), bool), 10.0))
    u0 = torch.linspace(0, 1, 16, dtype=torch.float64)
    D, G = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    out = simulate_tables(grid, u0, np.array([0.0, 1.0]), 1.0, D, G)
    assert not out.requires_grad
    with pytest.raises(ValueError, match="method"):
        simulate_tables(grid, u0, np.array([0.0, 1.0]), 1.0, D, G, method="euler")


@pytest.mark.parametrize("delay", [False, True])
def test_a_batch_gives_every_member_exactly_its_own_simulation(delay):
    mask = _triangle()
    grid = MaskedGrid(mask, 50.0)
    tg = TorchGrid(grid)
    K = 2000.0
    rng = np.random.default_rng(3)
    u0 = torch.tensor(grid.from_grid(np.where(mask, K * rng.random(mask.shape), 0.0)))
    nodes = np.linspace(0, 1.3 * K, 9)
    # members whose largest D differs take other step schedules (different groups); equal ones step together
    D = np.stack([200.0 + 800.0 * nodes / K, 200.0 + 800.0 * nodes / K, 3000.0 - nodes, np.full(9, 50.0)])
    G = np.stack([0.1 * (1 - nodes / K), 0.05 * (1 - nodes / K), np.zeros(9), 0.3 * (1 - nodes / K)])
    t = np.array([0.0, 1.0, 3.0, 6.0])
    tf = (lambda th: 1.0 - 0.5 * np.exp(-th / 2.0)) if delay else None
    batch = simulate_tables_batch(tg, u0, t, 1.3 * K, D, G, time_factor=tf)
    assert batch.shape == (4, t.size, grid.n)
    for b in range(4):
        alone = simulate_tables(tg, u0, t, 1.3 * K, torch.tensor(D[b]), torch.tensor(G[b]), time_factor=tf)
        assert np.array_equal(batch[b], alone.numpy())
    with pytest.raises(ValueError, match="same shape"):
        simulate_tables_batch(tg, u0, t, 1.3 * K, D, G[:, :5])


def test_the_refinements_jacobian_is_the_one_simulation_at_a_time(monkeypatch):
    from napari_binn.binn import refine as R

    mask = _triangle()
    grid = MaskedGrid(mask, 50.0)
    K = 2000.0
    rng = np.random.default_rng(4)
    prob = R._Problem.__new__(R._Problem)  # only what _jacobian uses
    prob.cfg = R.RefineConfig(nodes=7)
    prob.tg, prob.grid = TorchGrid(grid), grid
    prob.t = np.array([0.0, 2.0, 4.0])
    prob.u_max, prob.D_scale, prob.G_scale, prob.D_cap = 1.3 * K, 500.0, 0.05, 1e5
    prob.max_steps, prob.time_factor, prob.sigma = 20000, None, 40.0
    prob.curves = R._Curves(7)
    prob.obs = torch.as_tensor(rng.random((3, grid.n)) > 0.2)
    u0 = torch.tensor(grid.from_grid(np.where(mask, K * rng.random(mask.shape), 0.0)))
    z = rng.normal(size=14)
    with torch.no_grad():
        base = (prob.simulate(torch.as_tensor(z), u0)[prob.obs] / prob.sigma).numpy()
        expected = np.empty((base.size, z.size))
        for k in range(z.size):
            step = 1e-4 * max(1.0, abs(z[k]))
            zk = z.copy()
            zk[k] += step
            expected[:, k] = ((prob.simulate(torch.as_tensor(zk), u0)[prob.obs] / prob.sigma).numpy() - base) / step
    monkeypatch.setattr(R, "_JACOBIAN_BATCH", 4)  # several batches, the last one short
    assert np.array_equal(R._jacobian(prob, z, u0), expected)
