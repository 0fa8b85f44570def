"""PGSeg prototype machinery: EM vs a per-sample reference loop, EMA across 2 workers, Hungarian
matching vs brute force, hard rejection, and where gradients flow."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from _dist import spawn_gloo

from wsss_ray.losses.prototype import PrototypeLoss, hard_rejection_keep
from wsss_ray.ops.gmm import EMPrototypes, em_prototypes
from wsss_ray.ops.matching import gather_matched, hungarian_match


def _em_reference(x_NC, mu_KC, iters):
    mu = mu_KC.clone()
    for _ in range(iters):
        z = torch.zeros(x_NC.shape[0], mu.shape[0])
        for n in range(x_NC.shape[0]):
            z[n] = torch.softmax(torch.stack([x_NC[n] @ mu[k] for k in range(mu.shape[0])]), 0)
        for k in range(mu.shape[0]):
            zk = z[:, k] / (z[:, k].sum() + 1e-6)
            m = (zk[:, None] * x_NC).sum(0)
            mu[k] = m / m.norm()
    return mu


def test_em_matches_per_sample_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 20, 8, generator=g)
    mu0 = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    mu, z = em_prototypes(x, mu0, iters=5)
    assert mu.shape == (3, 4, 8) and z.shape == (3, 20, 4)
    for b in range(3):
        assert torch.allclose(mu[b], _em_reference(x[b], mu0, 5), atol=1e-5)
    assert torch.allclose(mu.norm(dim=-1), torch.ones(3, 4), atol=1e-5)
    assert torch.allclose(z.sum(-1), torch.ones(3, 20), atol=1e-5)


def test_em_mask_ignores_padding():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 10, 6, generator=g)
    mu0 = F.normalize(torch.randn(3, 6, generator=g), dim=-1)
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, :6] = True
    x_garbage = x.clone()
    x_garbage[0, 6:] = 100.0
    a, _ = em_prototypes(x, mu0, 4, mask)
    b, _ = em_prototypes(x_garbage, mu0, 4, mask)
    c, _ = em_prototypes(x[:, :6], mu0, 4)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)


def _ema_worker(rank, out):
    torch.manual_seed(0)
    em = EMPrototypes(4, 8, momentum=0.9)  # same mu0 on both ranks
    out[f"mu0_{rank}"] = em.mu0.clone()
    g = torch.Generator().manual_seed(100 + rank)
    mu = F.normalize(torch.randn(5, 4, 8, generator=g), dim=-1)  # a different batch per rank
    out[f"mu_{rank}"] = mu
    em.update_buffer(mu)
    out[f"after_{rank}"] = em.mu0.clone()


def test_ema_on_two_workers_is_the_mean_of_both():
    out = spawn_gloo(_ema_worker)
    mean = (out["mu_0"].mean(0) + out["mu_1"].mean(0)) / 2
    expected = F.normalize(0.9 * out["mu0_0"] + 0.1 * mean, dim=-1)
    assert torch.allclose(out["after_0"], expected, atol=1e-6)
    assert torch.allclose(out["after_1"], expected, atol=1e-6)


def test_ema_only_in_training():
    em = EMPrototypes(3, 5)
    before = em.mu0.clone()
    em.eval()
    em(torch.randn(2, 7, 5))
    assert torch.equal(em.mu0, before)
    em.train()
    em(torch.randn(2, 7, 5))
    assert not torch.equal(em.mu0, before)


def test_hungarian_is_the_max_and_min_similarity_permutation():
    g = torch.Generator().manual_seed(3)
    groups, protos = torch.randn(6, 4, 5, generator=g), torch.randn(6, 4, 5, generator=g)
    sim = F.normalize(groups, dim=-1) @ F.normalize(protos, dim=-1).transpose(1, 2)
    for maximize, pick in ((True, max), (False, min)):
        perm = hungarian_match(groups, protos, maximize=maximize)
        for b in range(6):
            best = pick(
                itertools.permutations(range(4)),
                key=lambda p, b=b: sum(sim[b, i, p[i]] for i in range(4)),
            )
            assert tuple(perm[b].tolist()) == best
    matched = gather_matched(protos, hungarian_match(groups, protos))
    assert torch.equal(matched[0, 0], protos[0, hungarian_match(groups, protos)[0, 0]])


def test_hungarian_batched_threads_equal_serial():
    g = torch.Generator().manual_seed(4)
    groups, protos = torch.randn(80, 8, 6, generator=g), torch.randn(80, 8, 6, generator=g)
    assert torch.equal(
        hungarian_match(groups, protos, threads=4), hungarian_match(groups, protos, threads=1)
    )


def test_hard_rejection_keeps_exactly_diagonal_pairs_above_phi():
    # one sample, 3 groups x 3 prototypes; columns are min-max normalised over groups
    sim = torch.tensor([[[0.9, 0.0, 0.5], [0.1, 0.05, 0.2], [0.5, 1.0, 0.3]]])
    # normalised diagonal: (0.9-0.1)/0.8 = 1.0, (0.05-0)/1.0 = 0.05, (0.3-0.2)/0.3 = 0.333
    keep = hard_rejection_keep(sim, phi=0.1)
    assert keep.tolist() == [[True, False, True]]
    # the reference tests column 0 for every pair: (0.9-.1)/.8=1, (.1-.1)/.8=0, (.5-.1)/.8=.5
    assert hard_rejection_keep(sim, 0.1, reference_column0=True).tolist() == [[True, False, True]]
    sim2 = sim.clone()
    sim2[0, 1, 0] = 0.8  # column 0 -> [1, .75, 0]: keeps group 1 but drops group 2
    assert hard_rejection_keep(sim2, 0.1).tolist() == [[True, False, True]]
    assert hard_rejection_keep(sim2, 0.1, reference_column0=True).tolist() == [[True, True, False]]


def test_gradients_reach_group_tokens_through_lpg_and_not_the_em():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 12, 6, generator=g, requires_grad=True)  # the EM's input
    groups = torch.randn(2, 4, 6, generator=g, requires_grad=True)
    em = EMPrototypes(4, 6)
    protos, _ = em(x)
    assert not protos.requires_grad  # EM runs without gradient
    loss, kept = PrototypeLoss(phi=0.1)(
        groups, gather_matched(protos, hungarian_match(groups, protos)), torch.zeros(1)
    )
    loss.backward()
    assert groups.grad is not None and groups.grad.abs().sum() > 0
    assert x.grad is None
    assert 0 < kept <= 1


def _reference_closs(group, proto, log_scale, phi, column0):
    """PGSeg's ``closs`` written out: one min-max-normalised mask per direction (over dim 1 of
    gp = G P^T and of pg = P G^T), read at the diagonal (column 0 for the reference), each applied
    to the rows of the *transposed* matrix; boolean row selection and mean CE per term."""
    b, k, _ = group.shape
    labels = torch.arange(k).repeat(b, 1)
    g, p = F.normalize(group, dim=-1), F.normalize(proto, dim=-1)
    gp, pg = g @ p.transpose(1, 2), p @ g.transpose(1, 2)

    def hrs(m):
        lo, hi = m.min(dim=1, keepdim=True)[0], m.max(dim=1, keepdim=True)[0]
        n = (m - lo) / (hi - lo + 1e-6)
        idx = torch.zeros_like(labels) if column0 else labels
        return torch.gather(n, 2, idx.unsqueeze(-1)).squeeze(-1) > phi

    m_gp, m_pg = hrs(gp), hrs(pg)
    s = log_scale.exp().clamp(max=100)
    ce = torch.nn.CrossEntropyLoss()
    rows_gp, rows_pg = gp.permute(0, 2, 1), pg.permute(0, 2, 1)
    return ce(rows_gp[m_gp] * s, labels[m_gp]) + ce(rows_pg[m_pg] * s, labels[m_pg])


@pytest.mark.parametrize("column0", [False, True])
def test_prototype_loss_equals_the_reference_closs(column0):
    """Both masks and both CE terms as PGSeg's closs, with one shared scale (log 10)."""
    g = torch.Generator().manual_seed(3)
    groups = torch.randn(3, 8, 16, generator=g)
    protos = torch.randn(3, 8, 16, generator=g)
    log_scale = torch.full((1,), math.log(10.0))
    ours, kept = PrototypeLoss(0.1, 100.0, column0)(groups, protos, log_scale)
    ref = _reference_closs(groups, protos, log_scale, 0.1, column0)
    assert torch.allclose(ours, ref, atol=1e-5), (float(ours), float(ref))
    assert 0 < float(kept) < 1  # some rows rejected: the masks matter in this case


def test_prototype_loss_with_every_row_rejected_is_zero_not_nan():
    groups = torch.ones(1, 3, 4)  # all similarities equal: min-max normalised to 0 <= phi
    loss, kept = PrototypeLoss(0.1)(groups, torch.ones(1, 3, 4), torch.zeros(1))
    assert float(loss) == 0.0 and float(kept) == 0.0


def test_reference_text_em_normalises_along_k_and_keeps_the_ema_unnormalised():
    """PGSeg's text NPR (models/transformer.py NPR): 256 scalars, K = 8 prototypes of dim 1, mu
    divided by its norm over K (+1e-6) every iteration; the EMA buffer is not re-normalised."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 256, 1, generator=g)
    em = EMPrototypes(8, 1, 10, 0.9, True, norm="prototype", ema_renorm=False)
    mu0 = em.mu0.clone()
    assert torch.allclose(mu0.norm(dim=0), torch.ones(1))  # unit along K
    mu = mu0.unsqueeze(0).repeat(4, 1, 1)
    for _ in range(10):
        z = torch.softmax(x @ mu.transpose(1, 2), dim=-1)
        z = z / (1e-6 + z.sum(dim=1, keepdim=True))
        mu = z.transpose(1, 2) @ x
        mu = mu / (1e-6 + mu.norm(dim=1, keepdim=True))
    em.train()
    ours, _ = em(x)
    assert torch.allclose(ours, mu, atol=1e-6)
    assert torch.allclose(em.mu0, 0.9 * mu0 + 0.1 * mu.mean(0), atol=1e-6)  # no re-normalisation
