"""SegDecoder (METHODS.md 2.3): shapes at any grid and block count, finite outputs, gradient to
every parameter, deterministic and batch-independent eval."""

from __future__ import annotations

import pytest
import torch

from wsss_ray.models.decoder import SegDecoder

IN_DIM, K, JOINT = 12, 5, 10


def _decoder(layers: int, dropout: float = 0.1, depth: int = 2) -> SegDecoder:
    torch.manual_seed(0)
    return SegDecoder(IN_DIM, layers, K, JOINT, embed_dim=16, depth=depth, heads=4, dropout=dropout)


def _tokens(layers: int, b: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layers, b, h * w, IN_DIM, generator=g)


@pytest.mark.parametrize(
    "h, w, layers", [(4, 4, 1), (6, 10, 3), (20, 20, 2), (1, 7, 12), (4, 4, 12), (20, 20, 12)]
)
def test_shapes_and_finite(h, w, layers):
    grid = (h, w)
    dec = _decoder(layers)
    out = dec(_tokens(layers, 2, h, w), grid)
    assert out["logits"].shape == (2, K, h, w)
    assert out["embed"].shape == (2, JOINT, h, w)
    assert torch.isfinite(out["logits"]).all() and torch.isfinite(out["embed"]).all()


def test_accepts_list_of_blocks():
    dec = _decoder(3).eval()
    t = _tokens(3, 2, 4, 5)
    a, b = dec(t, (4, 5)), dec(list(t.unbind(0)), (4, 5))
    torch.testing.assert_close(a["logits"], b["logits"])


def test_gradient_reaches_every_parameter():
    dec = _decoder(3).train()
    out = dec(_tokens(3, 2, 6, 10), (6, 10))
    g = torch.Generator().manual_seed(5)
    loss = (out["logits"] * torch.randn(out["logits"].shape, generator=g)).sum() + (
        out["embed"] * torch.randn(out["embed"].shape, generator=g)
    ).sum()
    loss.backward()
    params = dict(dec.named_parameters())
    assert all(p.dim() >= 1 for p in params.values())  # DeepSpeed: no 0-d parameters
    missing = [n for n, p in params.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_eval_is_deterministic_train_is_not():
    dec = _decoder(2, dropout=0.5)
    t = _tokens(2, 2, 6, 6)
    dec.eval()
    a, b = dec(t, (6, 6)), dec(t, (6, 6))
    assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["embed"], b["embed"])
    dec.train()
    torch.manual_seed(3)
    c = dec(t, (6, 6))
    torch.manual_seed(4)
    d = dec(t, (6, 6))
    assert not torch.allclose(c["logits"], d["logits"])


def test_eval_output_does_not_depend_on_the_batch():
    # LayerNorm, not BatchNorm: an image's prediction is the same alone or in a batch.
    dec = _decoder(3).eval()
    t = _tokens(3, 3, 5, 7)
    full = dec(t, (5, 7))
    alone = dec(t[:, 1:2], (5, 7))
    torch.testing.assert_close(full["logits"][1:2], alone["logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full["embed"][1:2], alone["embed"], rtol=1e-5, atol=1e-5)


def test_positions_matter():
    # The conditional positional encoding (and the grid-shaped convs) make the decoder aware of
    # the layout: the same token set on a 4x6 grid and on a 6x4 grid gives different outputs.
    dec = _decoder(1, depth=1).eval()
    t = _tokens(1, 1, 4, 6)
    a = dec(t, (4, 6))["logits"].flatten(2)
    b = dec(t, (6, 4))["logits"].flatten(2)
    assert not torch.allclose(a, b, atol=1e-4)


def test_bad_inputs_raise():
    dec = _decoder(3)
    with pytest.raises(ValueError):
        dec(_tokens(2, 1, 4, 4), (4, 4))  # wrong number of blocks
    with pytest.raises(ValueError):
        dec(_tokens(3, 1, 4, 4), (3, 5))  # 16 tokens are not 3x5
    with pytest.raises(ValueError):
        SegDecoder(IN_DIM, 3, K, JOINT, embed_dim=18, heads=4)
