"""VPL phase 1: learning vision prototypes W from text prototypes Z (METHODS.md 2.2). No Ray.

Why: CLIP's text prototypes Z live on the text side of the modality gap, so ranking dense image
features by ``Z f`` mis-ranks classes. VPL distils the text model's *image-label-restricted*
opinion into prototypes W that live on the image side and are then used instead of Z.

What, for K prototype rows (foreground classes plus one or more background rows), cached dense
features F (N x D, unit rows, pooled over many images) and a bool mask ``allowed`` (N x K: the
classes present in the pixel's image plus every background row):

    target      p'_n = softmax_k(Z f_n / tau_T) over the allowed k only (others get 0)
    prediction  p_n  = softmax_k(W f_n / tau_I) over all K
    J(W) = (1/N) sum_n KL(p'_n || p_n) + lam ||W||_F^2

KL keeps the target's entropy term (with 0 log 0 = 0), so J >= 0 and J(W*) is meaningful. The
solver works with the *mean* over pixels, so its objective and gradient norms read the same
whatever N is. METHODS.md 2.2 writes the *sum* (sum_n KL + lam ||W||^2); its minimiser is this
one's at lam / N, which is what ``prototypes.reduction: sum`` (the default) passes in
(``PrototypeConfig.mean_lam``); ``reduction: mean`` passes lam as it is. The target does not
depend on W: it is computed once.

J is convex (log-sum-exp of a linear map minus a linear term, plus a ridge), with gradient

    dJ/dW = (1/N) sum_n (p_n - p'_n) f_n^T / tau_I + 2 lam W.

``solve_vision_prototypes`` minimises it with a monotone full-batch method: every accepted step
passes an Armijo backtracking line search, so the objective strictly decreases at every
iteration. The default direction is L-BFGS (a positive-definite quasi-Newton scaling of the
gradient, falling back to the plain gradient if rounding ever breaks descent); ``method="agd"``
is Nesterov-accelerated gradient descent whose momentum is dropped whenever an extrapolated step
would not lower J (function-value restart). Both use the gradient above, evaluated by streaming
over F in chunks of rows, so memory is O(chunk_size * (K + D) + K * D) and N can be millions on a
CPU. Sums over chunks are accumulated in float64, and the working precision defaults to float64
(float32 line searches stall on rounding noise above the optimum).

``planted_modality_gap`` builds synthetic data with a known answer for tests and demos.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as TF

__all__ = [
    "PrototypeSolveLog",
    "classify",
    "planted_modality_gap",
    "solve_vision_prototypes",
    "target_distribution",
    "vpl_objective",
]


@dataclass
class PrototypeSolveLog:
    """Trace of ``solve_vision_prototypes``. Entry i of the lists describes accepted iterate i+1
    (``objective`` is J there, ``grad_norm`` the Frobenius norm of dJ/dW there, ``step`` what
    the line search accepted: the multiplier t of the L-BFGS direction, 1 = full quasi-Newton
    step, or the gradient step size for agd); the starting point is in ``initial_*``.
    ``evaluations`` counts passes over F (objective and gradient together); ``restarts`` counts
    dropped L-BFGS memories or momentum restarts."""

    objective: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    step: list[float] = field(default_factory=list)
    initial_objective: float = math.nan
    initial_grad_norm: float = math.nan
    iterations: int = 0
    restarts: int = 0
    evaluations: int = 0
    converged: bool = False
    reason: str = ""
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------
# validation helpers


def _check_features(F: torch.Tensor) -> None:
    if not isinstance(F, torch.Tensor) or F.dim() != 2:
        raise ValueError(f"F must be a 2-D tensor (N x D), got {_describe(F)}")
    if F.shape[0] == 0 or F.shape[1] == 0:
        raise ValueError(f"F must be non-empty, got shape {tuple(F.shape)}")
    if not F.is_floating_point():
        raise ValueError(f"F must be a floating-point tensor, got {F.dtype}")


def _check_prototypes(name: str, P: torch.Tensor, dim: int) -> None:
    if not isinstance(P, torch.Tensor) or P.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor (K x D), got {_describe(P)}")
    if P.shape[0] < 2 or P.shape[1] != dim:
        raise ValueError(f"{name} must be K x D with K >= 2 and D = {dim}, got {tuple(P.shape)}")


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _check_lam(lam: float) -> None:
    if not (isinstance(lam, int | float) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _row_chunks(n: int, chunk_size: int):
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


# ----------------------------------------------------------------------------------------------
# target, objective, gradient


@torch.no_grad()
def target_distribution(
    F: torch.Tensor,
    Z: torch.Tensor,
    allowed: torch.Tensor,
    tau_T: float = 0.01,
    chunk_size: int = 65536,
) -> torch.Tensor:
    """p'_n = softmax_k(Z f_n / tau_T) restricted to ``allowed[n]`` (N x K, rows sum to 1, exact
    zeros at disallowed classes; in F's dtype, at least float32 since tau_T = 0.01 sharpens the
    logits 100x). Every row of ``allowed`` needs a True entry."""
    _check_features(F)
    _check_prototypes("Z", Z, F.shape[1])
    _check_positive("tau_T", tau_T)
    N, K = F.shape[0], Z.shape[0]
    if not isinstance(allowed, torch.Tensor) or allowed.dtype != torch.bool:
        raise ValueError(f"allowed must be a bool tensor (N x K), got {_describe(allowed)}")
    if tuple(allowed.shape) != (N, K):
        raise ValueError(f"allowed must have shape {(N, K)}, got {tuple(allowed.shape)}")
    allowed = allowed.to(F.device)
    if not bool(allowed.any(dim=1).all()):
        raise ValueError("every row of allowed needs at least one allowed class (background)")
    dtype = torch.promote_types(F.dtype, torch.float32)
    Zc = Z.to(device=F.device, dtype=dtype)
    out = torch.empty(N, K, device=F.device, dtype=dtype)
    for a, b in _row_chunks(N, chunk_size):
        logits = (F[a:b].to(dtype) @ Zc.T) / tau_T
        out[a:b] = torch.softmax(logits.masked_fill(~allowed[a:b], float("-inf")), dim=1)
    return out


@torch.no_grad()
def _objective_and_grad(
    W: torch.Tensor,
    F: torch.Tensor,
    P_target: torch.Tensor,
    tau_I: float,
    lam: float,
    chunk_size: int,
) -> tuple[float, torch.Tensor]:
    """J and dJ/dW computed in W's dtype (chunks of F and P_target are cast to it); the sum over
    chunks is accumulated in float64."""
    N = F.shape[0]
    loss = torch.zeros((), device=W.device, dtype=torch.float64)
    G = torch.zeros(W.shape, device=W.device, dtype=torch.float64)
    for a, b in _row_chunks(N, chunk_size):
        Fc = F[a:b].to(device=W.device, dtype=W.dtype)
        Pc = P_target[a:b].to(device=W.device, dtype=W.dtype)
        logp = torch.log_softmax((Fc @ W.T) / tau_I, dim=1)  # chunk x K
        # KL(p' || p) = sum_k p'_k (log p'_k - log p_k), with 0 log 0 = 0
        kl = torch.xlogy(Pc, Pc) - Pc * logp
        loss += kl.sum(dtype=torch.float64)
        G += ((logp.exp_() - Pc).T @ Fc).double()
    W64 = W.double()
    value = float(loss) / N + lam * float((W64**2).sum())
    G = G / (N * tau_I) + 2.0 * lam * W64
    return value, G.to(W.dtype)


def vpl_objective(
    W: torch.Tensor,
    F: torch.Tensor,
    P_target: torch.Tensor,
    tau_I: float = 0.07,
    lam: float = 1e-4,
    chunk_size: int = 65536,
) -> tuple[float, torch.Tensor]:
    """J(W) = mean_n KL(P_target[n] || softmax(W f_n / tau_I)) + lam ||W||_F^2 and the analytic
    dJ/dW (K x D), streaming over row chunks of F. Computed in W's dtype (pass a float64 W for
    full precision); the gradient is returned in that dtype."""
    _check_features(F)
    _check_prototypes("W", W, F.shape[1])
    _check_positive("tau_I", tau_I)
    _check_lam(lam)
    if not W.is_floating_point():
        raise ValueError(f"W must be a floating-point tensor, got {W.dtype}")
    if not isinstance(P_target, torch.Tensor) or tuple(P_target.shape) != (F.shape[0], len(W)):
        raise ValueError(
            f"P_target must have shape {(F.shape[0], len(W))}, got {_describe(P_target)}"
        )
    return _objective_and_grad(W, F, P_target, tau_I, lam, chunk_size)


# ----------------------------------------------------------------------------------------------
# solver

from wsss_ray.ops.solvers import _AGD, _LBFGS, _dot  # noqa: E402


@torch.no_grad()
def solve_vision_prototypes(
    F: torch.Tensor,
    Z: torch.Tensor,
    allowed: torch.Tensor,
    tau_T: float = 0.01,
    tau_I: float = 0.07,
    lam: float = 1e-4,
    init: str = "text",
    max_iter: int = 500,
    tol: float = 1e-6,
    chunk_size: int = 65536,
    log_every: int = 0,
    log_fn: Callable[[str], object] = print,
    *,
    grad_tol: float = 1e-6,
    tol_window: int = 10,
    method: str = "lbfgs",
    history: int = 10,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, PrototypeSolveLog]:
    """Minimises J(W) (module docstring) from W0 = 0 (``init="zero"``) or W0 = Z (``"text"``).

    ``method="lbfgs"`` (default): L-BFGS directions (``history`` pairs) with Armijo
    backtracking. ``method="agd"``: Nesterov-accelerated gradient descent with Armijo
    backtracking and a monotone restart. Both only ever accept a step that lowers J; on the
    planted test problem L-BFGS needs several times fewer passes over F.

    ``dtype`` is the working precision of W and of the per-chunk arithmetic (F and the target stay
    in their own dtype in memory and are cast chunk by chunk). float64 by default: in float32 the
    line search hits rounding noise about 1e-5..1e-4 (relative) above the optimum on realistic
    problems, well before ``tol``.

    Stops (``converged=True``) when the relative decrease of J over the last ``tol_window``
    accepted steps, (J_{k-w} - J_k) / J_k, is below ``tol``, or when ||dJ/dW|| <= ``grad_tol`` *
    ||dJ/dW(W0)||. (The decrease over a single step is not a safe test: on ill-conditioned
    problems L-BFGS crosses flat stretches where one step gains < 1e-6 of J while J is still
    ~1e-3 above its minimum.) Stops with ``converged=False`` when the line search cannot
    decrease J any more at the working precision (then the gradient is tiny in practice) or after
    ``max_iter`` accepted steps. Returns W (K x D, in F's dtype, on F's device) and the log,
    whose objective sequence is strictly decreasing."""
    _check_features(F)
    _check_prototypes("Z", Z, F.shape[1])
    _check_positive("tau_I", tau_I)
    _check_positive("tau_T", tau_T)
    _check_lam(lam)
    if init not in ("zero", "text"):
        raise ValueError(f"init must be 'zero' or 'text', got {init!r}")
    if method not in ("lbfgs", "agd"):
        raise ValueError(f"method must be 'lbfgs' or 'agd', got {method!r}")
    for name, v in (("max_iter", max_iter), ("log_every", log_every)):
        if not (isinstance(v, int) and v >= 0):
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    for name, v in (("history", history), ("tol_window", tol_window)):
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    for name, v in (("tol", tol), ("grad_tol", grad_tol)):
        if not (isinstance(v, int | float) and v >= 0):
            raise ValueError(f"{name} must be a number >= 0, got {v!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")

    t0 = time.perf_counter()
    P = target_distribution(F, Z, allowed, tau_T, chunk_size)  # computed once: no W in it
    log = PrototypeSolveLog()

    def evaluate(W: torch.Tensor) -> tuple[float, torch.Tensor]:
        log.evaluations += 1
        return _objective_and_grad(W, F, P, tau_I, lam, chunk_size)

    # Lipschitz bound of dJ/dW: the softmax Hessian has norm <= 1/2, hence
    # L <= mean_n ||f_n||^2 / (2 tau_I^2) + 2 lam, and 1/L always passes Armijo (descent lemma).
    sq = sum(float(F[a:b].double().pow(2).sum()) for a, b in _row_chunks(len(F), chunk_size))
    safe_step = 1.0 / (sq / len(F) / (2.0 * tau_I**2) + 2.0 * lam)
    if method == "lbfgs":
        stepper: _LBFGS | _AGD = _LBFGS(evaluate, safe_step, history)
    else:
        stepper = _AGD(evaluate, safe_step)

    x = Z.to(device=F.device, dtype=dtype).clone()
    if init == "zero":
        x.zero_()
    fx, gx = evaluate(x)
    gnorm = math.sqrt(_dot(gx, gx))
    log.initial_objective, log.initial_grad_norm = fx, gnorm
    fx0 = fx
    if log_every:
        log_fn(f"iter 0 objective {fx:.10e} grad_norm {gnorm:.4e} step 0")
    if gnorm == 0.0:
        log.converged, log.reason = True, "gradient is zero at the initial point"
    g_stop = grad_tol * gnorm

    while not log.converged and log.iterations < max_iter:
        result = stepper.step(x, fx, gx)
        if result is None:
            log.reason = (
                f"line search cannot decrease the objective at {dtype} precision "
                f"(objective {fx:.10e}, grad_norm {gnorm:.4e})"
            )
            break
        z, fz, gz, s = result
        past = log.objective[-tol_window] if len(log.objective) >= tol_window else fx0
        rel_change = (past - fz) / max(abs(fz), 1e-300)
        x, fx, gx = z, fz, gz
        gnorm = math.sqrt(_dot(gx, gx))
        log.iterations += 1
        log.objective.append(fx)
        log.grad_norm.append(gnorm)
        log.step.append(s)
        if log_every and log.iterations % log_every == 0:
            log_fn(f"iter {log.iterations} objective {fx:.10e} grad_norm {gnorm:.4e} step {s:.4e}")
        if gnorm <= g_stop:
            log.converged, log.reason = True, f"relative gradient norm <= grad_tol={grad_tol:g}"
        elif rel_change < tol:
            log.converged = True
            log.reason = (
                f"relative objective decrease over the last {tol_window} iterations "
                f"{rel_change:.2e} < tol={tol:g}"
            )

    if not log.converged and not log.reason:
        log.reason = f"max_iter={max_iter} reached"
    log.restarts = stepper.restarts
    log.seconds = time.perf_counter() - t0
    if log_every:
        log_fn(
            f"done: {log.iterations} iterations, {log.evaluations} evaluations, "
            f"{log.restarts} restarts, {log.seconds:.2f} s, converged={log.converged}: {log.reason}"
        )
    return x.to(F.dtype), log


# ----------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def classify(
    F: torch.Tensor,
    prototypes: torch.Tensor,
    tau: float = 1.0,
    allowed: torch.Tensor | None = None,
    chunk_size: int = 65536,
) -> torch.Tensor:
    """argmax_k prototypes[k] . f_n for every row of F (LongTensor N). ``tau`` is accepted for
    symmetry with the softmaxes above but, argmax being temperature-invariant, does not change
    the result. With ``allowed`` (N x K bool) the argmax is taken over the allowed classes only."""
    _check_features(F)
    _check_prototypes("prototypes", prototypes, F.shape[1])
    _check_positive("tau", tau)
    K = prototypes.shape[0]
    if allowed is not None and tuple(allowed.shape) != (F.shape[0], K):
        raise ValueError(f"allowed must have shape {(F.shape[0], K)}, got {_describe(allowed)}")
    P = prototypes.to(device=F.device, dtype=F.dtype)
    out = torch.empty(F.shape[0], dtype=torch.long, device=F.device)
    for a, b in _row_chunks(F.shape[0], chunk_size):
        scores = (F[a:b] @ P.T) / tau
        if allowed is not None:
            scores = scores.masked_fill(~allowed[a:b].to(F.device), float("-inf"))
        out[a:b] = scores.argmax(dim=1)
    return out


# ----------------------------------------------------------------------------------------------
# synthetic data


def planted_modality_gap(
    num_classes: int = 20,
    dim: int = 64,
    pixels_per_class: int = 400,
    gap: float = 2.0,
    noise: float = 0.5,
    seed: int = 0,
    *,
    text_confusion: float = 2.5,
    text_noise: float = 0.1,
    class_similarity: float = 0.5,
    pixels_per_region: int = 20,
    max_classes_per_image: int = 3,
) -> dict[str, torch.Tensor]:
    """Synthetic VPL data with a known answer (float32 features, CPU), for tests and demos.

    Vision side: K = ``num_classes`` foreground classes plus one background class (index
    ``num_classes``). Class centres c_k = normalise(sqrt(s) a + sqrt(1 - s) u_k) share a common
    "image cone" direction a (pairwise cosine about s = ``class_similarity``, as CLIP image
    features do); u_k are random unit vectors. A pixel of class k is normalise(c_k + noise * e),
    e ~ N(0, I/dim), so the centres themselves classify pixels almost perfectly.

    Text side: z_k = normalise(c_k + o + m_k + text_noise * e_k) with o one shared offset of norm
    ``gap`` (the modality gap: cos(z_k, c_k) is small) and m_k a class-specific confusion. For a
    foreground class m_k = text_confusion * sqrt(1 - s) / sqrt(num_classes - 1) * sum_j g_kj u_j
    over the other foreground classes j (g_kj ~ N(0, 1)): text k leans towards the images of
    some other classes, so ranking a pixel against *all* text prototypes often picks a wrong
    class, while among the 1-3 classes actually in its image (+ background) the right one usually
    wins; that is what the label-restricted target exploits. The background text gets a
    perturbation of the same norm orthogonal to every centre (no confusion, no norm advantage).
    Note that the shared offset alone would barely change any argmax: it adds the same o . f to
    every class score up to the per-class normalisation; the mis-ranking comes from m_k.

    Images hold 1..``max_classes_per_image`` distinct foreground classes of ``pixels_per_region``
    pixels each plus ``pixels_per_region`` background pixels; the number of images is set so each
    foreground class gets about ``pixels_per_class`` pixels.

    Returns a dict of tensors: ``F`` (N x dim, unit rows), ``Z`` (K x dim, unit rows),
    ``allowed`` (N x K bool: classes of the pixel's image + background), ``labels`` (N long,
    ground truth), ``image`` (N long, image index), ``centres`` (K x dim, the vision class
    centres, an oracle classifier), ``offset`` (dim), ``background`` (long, background row ids).
    """
    for name, v in (
        ("num_classes", num_classes),
        ("dim", dim),
        ("pixels_per_class", pixels_per_class),
        ("pixels_per_region", pixels_per_region),
        ("max_classes_per_image", max_classes_per_image),
    ):
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if num_classes < 2 or max_classes_per_image > num_classes:
        raise ValueError("need num_classes >= 2 and max_classes_per_image <= num_classes")
    if not 0.0 <= class_similarity < 1.0:
        raise ValueError(f"class_similarity must be in [0, 1), got {class_similarity!r}")
    if min(gap, noise, text_noise, text_confusion) < 0:
        raise ValueError("gap, noise, text_noise and text_confusion must be >= 0")

    g = torch.Generator().manual_seed(seed)
    C, K = num_classes, num_classes + 1

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    cone = TF.normalize(randn(dim), dim=0)
    own = TF.normalize(randn(K, dim), dim=1)
    s = class_similarity
    centres = TF.normalize(math.sqrt(s) * cone + math.sqrt(1.0 - s) * own, dim=1)
    offset = gap * TF.normalize(randn(dim), dim=0)

    mix = randn(C, C) * (1.0 - torch.eye(C, dtype=torch.float64))
    confusion = torch.zeros(K, dim, dtype=torch.float64)
    scale = text_confusion * math.sqrt(1.0 - s)
    confusion[:C] = scale / math.sqrt(C - 1) * (mix @ own[:C])
    bg_dir = randn(dim)
    if dim > K:  # remove the components along the centres: the background text confuses nothing
        q, _ = torch.linalg.qr(centres.T)
        bg_dir = bg_dir - q @ (q.T @ bg_dir)
    confusion[C] = scale * TF.normalize(bg_dir, dim=0)
    Z = TF.normalize(
        centres + offset + confusion + text_noise * randn(K, dim) / math.sqrt(dim), dim=1
    )

    mean_classes = (1 + max_classes_per_image) / 2
    num_images = max(1, math.ceil(pixels_per_class * C / (mean_classes * pixels_per_region)))
    n_present = torch.randint(1, max_classes_per_image + 1, (num_images,), generator=g)
    labels, images, allowed_rows = [], [], []
    for i in range(num_images):
        present = torch.randperm(C, generator=g)[: int(n_present[i])]
        row = torch.zeros(K, dtype=torch.bool)
        row[present] = True
        row[C] = True
        cls = torch.cat([present, torch.tensor([C])]).repeat_interleave(pixels_per_region)
        labels.append(cls)
        images.append(torch.full((len(cls),), i, dtype=torch.long))
        allowed_rows.append(row.expand(len(cls), K))
    labels_t = torch.cat(labels)
    F = TF.normalize(centres[labels_t] + noise * randn(len(labels_t), dim) / math.sqrt(dim), dim=1)
    return {
        "F": F.float(),
        "Z": Z.float(),
        "allowed": torch.cat(allowed_rows),
        "labels": labels_t,
        "image": torch.cat(images),
        "centres": centres.float(),
        "offset": offset.float(),
        "background": torch.tensor([C]),
    }
