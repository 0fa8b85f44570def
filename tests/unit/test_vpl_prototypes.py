"""VPL phase 1 (wsss_ray.ops.prototypes): target, objective and analytic gradient against direct
formulas and autograd, the monotone solvers, convexity (both inits reach one optimum), recovery
of the vision classes on planted modality-gap data, and input validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as TF

from wsss_ray.ops.prototypes import (
    PrototypeSolveLog,
    classify,
    planted_modality_gap,
    solve_vision_prototypes,
    target_distribution,
    vpl_objective,
)

SMALL = dict(num_classes=8, dim=16, pixels_per_class=100, seed=1)  # N ~ 1.2k, fast solves


def _random_case(N=53, K=6, D=9, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    F = TF.normalize(torch.randn(N, D, generator=g, dtype=dtype), dim=1)
    Z = TF.normalize(torch.randn(K, D, generator=g, dtype=dtype), dim=1)
    allowed = torch.rand(N, K, generator=g) < 0.5
    allowed[:, -1] = True  # background row
    W = torch.randn(K, D, generator=g, dtype=dtype) * 3.0
    return F, Z, allowed, W


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # the problems here are tiny: intra-op threads only add synchronisation, which costs 10x on a
    # busy machine; restore the setting for the other test modules
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def small():
    return planted_modality_gap(**SMALL)


@pytest.fixture(scope="module")
def planted():
    # 20 classes + background, dim 64, N ~ 6k
    return planted_modality_gap(num_classes=20, dim=64, pixels_per_class=200, seed=1)


def test_target_is_restricted_softmax():
    F, Z, allowed, _ = _random_case()
    P = target_distribution(F, Z, allowed, tau_T=0.05, chunk_size=7)
    assert P.shape == allowed.shape and P.dtype == F.dtype
    assert torch.all(P[~allowed] == 0)
    torch.testing.assert_close(P.sum(1), torch.ones(len(F), dtype=F.dtype))
    for n in range(len(F)):  # reference: softmax over the allowed entries only
        idx = allowed[n].nonzero().squeeze(1)
        ref = torch.softmax(Z[idx] @ F[n] / 0.05, dim=0)
        torch.testing.assert_close(P[n, idx], ref, rtol=1e-12, atol=1e-14)


def test_objective_and_gradient_match_direct_formula_and_autograd():
    F, Z, allowed, W = _random_case()
    P = target_distribution(F, Z, allowed, tau_T=0.3)
    tau_I, lam = 0.2, 0.03
    value, grad = vpl_objective(W, F, P, tau_I=tau_I, lam=lam, chunk_size=10)

    Wr = W.clone().requires_grad_(True)
    logp = torch.log_softmax(F @ Wr.T / tau_I, dim=1)
    kl = torch.where(P > 0, P * (torch.log(P) - logp), torch.zeros_like(P)).sum(1)
    ref = kl.mean() + lam * (Wr**2).sum()
    ref.backward()
    assert value == pytest.approx(ref.item(), rel=1e-12)
    assert grad.dtype == torch.float64 and grad.shape == W.shape
    torch.testing.assert_close(grad, Wr.grad, rtol=0, atol=1e-8)
    assert torch.allclose(grad, Wr.grad, rtol=1e-10, atol=1e-12)
    # chunking does not change anything
    value2, grad2 = vpl_objective(W, F, P, tau_I=tau_I, lam=lam, chunk_size=1000)
    assert value2 == pytest.approx(value, rel=1e-13)
    torch.testing.assert_close(grad2, grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reduction_sum_is_methods_objective(reduction):
    """prototypes.reduction=sum solves METHODS 2.2's sum_n KL + lam ||W||^2 (the solver's mean
    objective at lam / N has the same gradient up to the factor N); mean: mean KL + lam."""
    from wsss_ray.config.vpl import PrototypeConfig

    F, Z, allowed, W = _random_case()
    P = target_distribution(F, Z, allowed, tau_T=0.3)
    cfg = PrototypeConfig(lam=0.03, reduction=reduction)
    value, grad = vpl_objective(W, F, P, tau_I=0.2, lam=cfg.mean_lam(len(F)))
    Wr = W.clone().requires_grad_(True)
    logp = torch.log_softmax(F @ Wr.T / 0.2, dim=1)
    kl = torch.where(P > 0, P * (torch.log(P) - logp), torch.zeros_like(P)).sum(1)
    n = len(F) if reduction == "sum" else 1
    ref = (kl.sum() if reduction == "sum" else kl.mean()) + 0.03 * (Wr**2).sum()
    ref.backward()
    assert n * value == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(n * grad, Wr.grad, rtol=1e-10, atol=1e-10)


def test_kl_keeps_entropy_term_so_objective_is_nonnegative():
    F, Z, allowed, _ = _random_case()
    P = target_distribution(F, Z, allowed, tau_T=0.3)
    for W in (torch.zeros(6, 9, dtype=torch.float64), 10 * Z, -10 * Z):
        assert vpl_objective(W, F, P, tau_I=0.1, lam=0.0)[0] >= 0.0
    # one-hot target against the uniform prediction of W = 0: J = log K exactly
    onehot = TF.one_hot(allowed.long().argmax(1), 6).to(F.dtype)
    assert vpl_objective(torch.zeros(6, 9, dtype=torch.float64), F, onehot, lam=0)[0] == (
        pytest.approx(math.log(6), rel=1e-12)
    )


@pytest.mark.parametrize("method", ["lbfgs", "agd"])
def test_solver_reaches_stationary_point_monotonically(small, method):
    F, Z, allowed = small["F"], small["Z"], small["allowed"]
    lines: list[str] = []
    W, log = solve_vision_prototypes(
        F, Z, allowed, method=method, max_iter=2000, log_every=50, log_fn=lines.append
    )
    assert isinstance(log, PrototypeSolveLog)
    assert W.shape == Z.shape and W.dtype == F.dtype
    assert log.iterations == len(log.objective) == len(log.grad_norm) == len(log.step)
    obj = [log.initial_objective, *log.objective]
    assert all(b <= a for a, b in zip(obj, obj[1:])), "objective increased"
    assert all(s > 0 for s in log.step) and log.seconds > 0
    assert log.converged, log.reason

    # independent check of the gradient at the returned W (float64)
    P = target_distribution(F.double(), Z.double(), allowed)
    _, g0 = vpl_objective(Z.double(), F.double(), P)
    _, g = vpl_objective(W.double(), F.double(), P)
    ratio = (g.norm() / g0.norm()).item()
    assert ratio < 1e-3, f"{method}: |grad(W)| / |grad(W0)| = {ratio:.2e} ({log.reason})"
    assert log.grad_norm[-1] / log.initial_grad_norm == pytest.approx(ratio, rel=1e-3)

    assert lines[0].startswith("iter 0 objective ")
    assert any(line.startswith("iter 50 objective ") and " grad_norm " in line for line in lines)
    assert " step " in lines[1] and lines[-1].startswith("done:")


def test_zero_and_text_init_reach_the_same_optimum(small):
    F, Z, allowed = small["F"], small["Z"], small["allowed"]
    sols = {
        init: solve_vision_prototypes(F, Z, allowed, init=init, tol=0, grad_tol=1e-7, max_iter=3000)
        for init in ("zero", "text")
    }
    (Wz, logz), (Wt, logt) = sols["zero"], sols["text"]
    assert logz.converged and logt.converged, (logz.reason, logt.reason)
    assert logz.initial_objective != pytest.approx(logt.initial_objective, rel=1e-2)
    assert logz.objective[-1] == pytest.approx(logt.objective[-1], rel=1e-10)
    rel = ((Wz.double() - Wt.double()).norm() / Wz.double().norm()).item()
    assert rel < 1e-4, f"relative distance between the two solutions {rel:.2e}"


def test_learned_prototypes_beat_text_on_planted_modality_gap(planted):
    F, Z, allowed, y = planted["F"], planted["Z"], planted["allowed"], planted["labels"]
    W, log = solve_vision_prototypes(F, Z, allowed)  # the defaults of METHODS.md 2.2
    assert log.converged, log.reason

    def acc(protos, mask=None):
        return (classify(F, protos, allowed=mask) == y).double().mean().item()

    text, text_restricted, learned = acc(Z), acc(Z, allowed), acc(W)
    oracle = acc(planted["centres"])
    msg = (
        f"accuracy: text {text:.3f}, text restricted to image labels {text_restricted:.3f}, "
        f"learned W {learned:.3f}, vision centres {oracle:.3f}"
    )
    assert oracle > 0.99, msg
    assert text < 0.6, msg
    assert learned > 0.9, msg
    assert learned > text + 0.3, msg

    # without the image-label restriction the target is just the (wrong) text ranking, and W
    # inherits its mistakes: the restriction is what recovers the vision classes
    W_free, _ = solve_vision_prototypes(F, Z, torch.ones_like(allowed))
    free = acc(W_free)
    assert free < text + 0.1 and free < learned - 0.25, f"{msg}, unrestricted target {free:.3f}"


def test_classify_is_argmax_and_respects_allowed():
    F, Z, allowed, W = _random_case()
    pred = classify(F, W, chunk_size=5)
    assert pred.dtype == torch.long
    assert torch.equal(pred, (F @ W.T).argmax(1))
    assert torch.equal(classify(F, W, tau=0.01), pred)
    restricted = classify(F, W, allowed=allowed)
    assert bool(allowed.gather(1, restricted[:, None]).all())
    assert torch.equal(restricted, (F @ W.T).masked_fill(~allowed, -math.inf).argmax(1))


def test_planted_generator_shapes_and_labels():
    d = planted_modality_gap(num_classes=5, dim=12, pixels_per_class=40, seed=3)
    F, Z, allowed, y, img = d["F"], d["Z"], d["allowed"], d["labels"], d["image"]
    N, K = allowed.shape
    assert K == 6 and F.shape == (N, 12) and Z.shape == (6, 12) and y.shape == img.shape == (N,)
    torch.testing.assert_close(F.norm(dim=1), torch.ones(N))
    torch.testing.assert_close(Z.norm(dim=1), torch.ones(K))
    assert bool(allowed.gather(1, y[:, None]).all())  # every pixel's class is in its image
    assert bool(allowed[:, d["background"]].all())
    for i in img.unique():  # same allowed set within an image, 1-3 foreground classes
        rows = allowed[img == i]
        assert bool((rows == rows[0]).all()) and 1 <= int(rows[0, :5].sum()) <= 3
    again = planted_modality_gap(num_classes=5, dim=12, pixels_per_class=40, seed=3)
    assert torch.equal(again["F"], F) and torch.equal(again["Z"], Z)


def test_bad_inputs_raise_value_error():
    F, Z, allowed, W = _random_case()
    P = target_distribution(F, Z, allowed)
    bad_calls = [
        lambda: solve_vision_prototypes(F, Z, allowed, init="random"),
        lambda: solve_vision_prototypes(F, Z, allowed, method="sgd"),
        lambda: solve_vision_prototypes(F, Z[:, :5], allowed),  # wrong D
        lambda: solve_vision_prototypes(F, Z, allowed[:, :4]),  # wrong K
        lambda: solve_vision_prototypes(F, Z, allowed[:10]),  # wrong N
        lambda: solve_vision_prototypes(F, Z, allowed.float()),  # not bool
        lambda: solve_vision_prototypes(F[0], Z, allowed),  # F not 2-D
        lambda: solve_vision_prototypes(F, Z, allowed, tau_I=0.0),
        lambda: solve_vision_prototypes(F, Z, allowed, tau_T=-1.0),
        lambda: solve_vision_prototypes(F, Z, allowed, lam=-1e-4),
        lambda: solve_vision_prototypes(F, Z, allowed, max_iter=-1),
        lambda: solve_vision_prototypes(F, Z, allowed, chunk_size=0),
        lambda: solve_vision_prototypes(F, Z, allowed, dtype=torch.int64),
        lambda: target_distribution(F, Z, torch.zeros_like(allowed)),  # a row with nothing
        lambda: vpl_objective(W, F, P[:, :3]),
        lambda: vpl_objective(W[:, :4], F, P),
        lambda: classify(F, W[:, :4]),
        lambda: classify(F, W, allowed=allowed[:, :2]),
        lambda: planted_modality_gap(num_classes=1),
        lambda: planted_modality_gap(class_similarity=1.0),
    ]
    for i, call in enumerate(bad_calls):
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"bad call #{i} did not raise")


def test_max_iter_stops_unconverged():
    F, Z, allowed, _ = _random_case()
    W, log = solve_vision_prototypes(F, Z, allowed, max_iter=0)
    assert torch.equal(W, Z) and log.iterations == 0 and not log.converged
    assert "max_iter" in log.reason
    W, log = solve_vision_prototypes(F, Z, allowed, max_iter=3, tol=0)
    assert log.iterations == 3 and not log.converged


def test_float32_working_precision_is_close_to_float64(small):
    F, Z, allowed = small["F"], small["Z"], small["allowed"]
    W64, log64 = solve_vision_prototypes(F, Z, allowed)
    W32, log32 = solve_vision_prototypes(F, Z, allowed, dtype=torch.float32)
    assert W32.dtype == F.dtype
    obj = [log32.initial_objective, *log32.objective]
    assert all(b <= a for a, b in zip(obj, obj[1:]))
    assert log32.objective[-1] == pytest.approx(log64.objective[-1], rel=1e-3)
    agree = (classify(F, W32) == classify(F, W64)).double().mean().item()
    assert agree > 0.99
