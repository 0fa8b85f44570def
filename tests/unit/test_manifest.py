"""Checkpoint manifests: every file's size and SHA-256 per worker; a truncated, altered or
missing file is named; a checkpoint written before manifests passes."""

from __future__ import annotations

import json

from wsss_ray.train.manifest import verify, write_manifest


def test_manifest_names_the_damaged_file(tmp_path):
    (tmp_path / "ckpt").mkdir()
    model = tmp_path / "ckpt" / "mp_rank_00_model_states.pt"
    model.write_bytes(bytes(range(256)) * 40)
    (tmp_path / "latest").write_text("ckpt")
    write_manifest(tmp_path, rank=0)
    optim = tmp_path / "ckpt" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    optim.write_bytes(b"x" * 5000)  # rank 1's part, with its own manifest
    rank1 = {"files": {"ckpt/" + optim.name: {"size": 5000, "sha256": ""}}}
    (tmp_path / "manifest_rank1.json").write_text(json.dumps(rank1))
    assert "does not match its SHA-256" in verify(tmp_path)  # rank 1's hash left empty above
    (tmp_path / "manifest_rank1.json").unlink()
    assert verify(tmp_path) is None

    model.write_bytes(model.read_bytes()[:1000])  # cut to 1,000 bytes
    assert verify(tmp_path) == (
        "ckpt/mp_rank_00_model_states.pt has 1,000 bytes, the manifest says 10,240"
    )
    model.write_bytes(bytes(range(256))[::-1] * 40)  # same size, other bytes
    assert verify(tmp_path) == "ckpt/mp_rank_00_model_states.pt does not match its SHA-256"
    model.unlink()
    assert verify(tmp_path) == "ckpt/mp_rank_00_model_states.pt is missing"
    (tmp_path / "manifest_rank0.json").write_text("{")
    assert verify(tmp_path).startswith("unreadable manifest_rank0.json")


def test_a_checkpoint_without_manifest_passes(tmp_path):
    (tmp_path / "latest").write_text("ckpt")
    assert verify(tmp_path) is None
