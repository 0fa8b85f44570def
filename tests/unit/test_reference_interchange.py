"""Released GroupViT / PGSeg checkpoints: layout, loading, export, and outputs against an
independent computation.

The test writes a random state dict in the *released* layout from the published architecture
(GroupViT ``models/group_vit.py``, ``models/transformer.py``, ``models/multi_label_contrastive.py``;
PGSeg ``models/pgseg.py``: key names and shapes, Conv1d k=1 projectors, 0-d scales, NPR buffers
``[1, K, C]``), and computes the image and text embeddings from that dict with plain tensor
operations (no module of ours). Our model loads the dict and must give the same embeddings.
No downloads: the weights are random; BatchNorm statistics are random too, so eval mode matters.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsss_ray.models.pgseg import (
    SIZES,
    PartialCheckpointError,
    PGSeg,
    export_reference_state,
    load_for_inference,
    load_groupvit_checkpoint,
)

EOT = 49407


# ------------------------------------------------------------------ the released layout
def _proj_keys(prefix: str, cin: int, hidden: int, cout: int) -> dict[str, tuple]:
    """GroupViT's ProjectMLP: Conv1d(k=1) -> BatchNorm1d -> ReLU -> Conv1d(k=1)."""
    return {
        f"{prefix}.linear_hidden.0.weight": (hidden, cin, 1),
        f"{prefix}.linear_hidden.0.bias": (hidden,),
        f"{prefix}.linear_hidden.1.weight": (hidden,),
        f"{prefix}.linear_hidden.1.bias": (hidden,),
        f"{prefix}.linear_hidden.1.running_mean": (hidden,),
        f"{prefix}.linear_hidden.1.running_var": (hidden,),
        f"{prefix}.linear_hidden.1.num_batches_tracked": (),
        f"{prefix}.linear_out.weight": (cout, hidden, 1),
        f"{prefix}.linear_out.bias": (cout,),
    }


def _ln(prefix: str, c: int) -> dict[str, tuple]:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,)}


def _lin(prefix: str, cin: int, cout: int) -> dict[str, tuple]:
    return {f"{prefix}.weight": (cout, cin), f"{prefix}.bias": (cout,)}


def _mlp(prefix: str, cin: int, hidden: int, cout: int) -> dict[str, tuple]:
    return {**_lin(f"{prefix}.fc1", cin, hidden), **_lin(f"{prefix}.fc2", hidden, cout)}


def released_layout(size: str, pgseg: bool, multi_label: bool = False) -> dict[str, tuple]:
    """Key -> shape of the released checkpoint's ``model`` dict (GroupViT, or PGSeg with NPR)."""
    s = SIZES[size]
    c, grid = s.dim, (s.image_size // s.patch_size) ** 2
    keys: dict[str, tuple] = {
        "img_encoder.patch_embed.proj.weight": (c, 3, s.patch_size, s.patch_size),
        "img_encoder.patch_embed.proj.bias": (c,),
        **_ln("img_encoder.patch_embed.norm", c),
        "img_encoder.pos_embed": (1, grid, c),
    }
    prev = 0
    for i, depth in enumerate(s.depths):
        p = f"img_encoder.layers.{i}"
        for j in range(depth):
            b = f"{p}.blocks.{j}"
            keys.update(_ln(f"{b}.norm1", c))
            keys.update(_lin(f"{b}.attn.qkv", c, 3 * c))
            keys.update(_lin(f"{b}.attn.proj", c, c))
            keys.update(_ln(f"{b}.norm2", c))
            keys.update(_mlp(f"{b}.mlp", c, 4 * c, c))
        k = s.group_tokens[i]
        if k:
            keys[f"{p}.group_token"] = (1, k, c)
            if prev:
                keys.update(_ln(f"{p}.group_projector.0", c))
                keys.update(_mlp(f"{p}.group_projector.1", prev, c // 2, k))
            d, out = f"{p}.downsample", s.output_groups[i]
            for n in ("norm_tokens", "norm_post_tokens", "norm_x", "norm_new_x"):
                keys.update(_ln(f"{d}.{n}", c))
            keys.update(_mlp(f"{d}.mlp_inter", k, c // 2, out))
            a = f"{d}.pre_assign_attn"
            keys.update(_ln(f"{a}.norm_post", c))
            for n in ("q_proj", "k_proj", "v_proj", "proj"):
                keys.update(_lin(f"{a}.attn.{n}", c, c))
                keys.update(_lin(f"{d}.assign.{n}", c, c))
            keys.update(_ln(f"{a}.norm2", c))
            keys.update(_mlp(f"{a}.mlp", c, 4 * c, c))
            keys.update(_mlp(f"{d}.mlp_channels", c, 4 * c, c))
            if pgseg:
                keys[f"{p}.downsample_spatial.mu"] = (1, k, c)
                keys.update(_proj_keys(f"{p}.downsample_spatial.mapping_x", c, s.proj_hidden, c))
        prev = k
    keys.update(_ln("img_encoder.norm", c))
    w = s.text_width
    keys["text_encoder.positional_embedding"] = (s.context_length, w)
    for j in range(s.text_layers):
        b = f"text_encoder.transformer.resblocks.{j}"
        keys[f"{b}.attn.in_proj_weight"] = (3 * w, w)
        keys[f"{b}.attn.in_proj_bias"] = (3 * w,)
        keys.update(_lin(f"{b}.attn.out_proj", w, w))
        keys.update(_ln(f"{b}.ln_1", w))
        keys.update(_lin(f"{b}.mlp.c_fc", w, 4 * w))
        keys.update(_lin(f"{b}.mlp.c_proj", 4 * w, w))
        keys.update(_ln(f"{b}.ln_2", w))
    keys.update(_ln("text_encoder.ln_final", w))
    keys["text_encoder.token_embedding.weight"] = (49408, w)
    keys.update(_proj_keys("img_projector", c, s.proj_hidden, s.proj_dim))
    keys.update(_proj_keys("text_projector", w, s.proj_hidden, s.proj_dim))
    keys["logit_scale"] = ()
    if multi_label:
        keys["multi_label_logit_scale"] = ()
    if pgseg:
        keys["img_encoder.logit_scale"] = ()
        keys.update(_proj_keys("img_encoder.mapping_text", c, s.proj_hidden, 256))
        keys["text_encoder.Atten.mu"] = (1, [n for n in s.group_tokens if n][-1], 1)
    return keys


def random_released_state(size: str, pgseg: bool, seed: int = 0, **kw) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in released_layout(size, pgseg, **kw).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith("logit_scale"):
            state[key] = torch.tensor(math.log(1 / 0.07))
        elif key.endswith(".weight") and ("norm" in key or ".ln_" in key):  # LayerNorm gains
            state[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif key.endswith(".mu"):
            mu = torch.randn(shape, generator=g)
            state[key] = mu / mu.norm(dim=-1 if shape[-1] > 1 else 1, keepdim=True)
        else:
            state[key] = 0.1 * torch.randn(shape, generator=g)
    return state


# ----------------------------------------------------- independent computation of the outputs
def _layer_norm(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-5)


def _linear(x, sd, p):
    return x @ sd[f"{p}.weight"].T + sd[f"{p}.bias"]


def _mlp_f(x, sd, p):  # timm-style Mlp: fc1 -> exact GELU -> fc2
    return _linear(F.gelu(_linear(x, sd, f"{p}.fc1")), sd, f"{p}.fc2")


def _project_mlp(x, sd, p):
    """Conv1d k=1 -> BatchNorm1d (eval: running statistics) -> ReLU -> Conv1d k=1, per token."""
    h = x @ sd[f"{p}.linear_hidden.0.weight"][..., 0].T + sd[f"{p}.linear_hidden.0.bias"]
    bn = f"{p}.linear_hidden.1"
    h = (h - sd[f"{bn}.running_mean"]) / torch.sqrt(sd[f"{bn}.running_var"] + 1e-5)
    h = torch.relu(h * sd[f"{bn}.weight"] + sd[f"{bn}.bias"])
    return h @ sd[f"{p}.linear_out.weight"][..., 0].T + sd[f"{p}.linear_out.bias"]


def _heads_attention(q, k, v, heads, mask=None):
    b, n, c = q.shape
    d = c // heads

    def split(t):
        return t.reshape(b, t.shape[1], heads, d).transpose(1, 2)

    w = split(q) @ split(k).transpose(-1, -2) * d**-0.5
    if mask is not None:
        w = w + mask
    return (w.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, c)


def _attn_block(x, sd, p, heads):
    h = _layer_norm(x, sd, f"{p}.norm1")
    q, k, v = _linear(h, sd, f"{p}.attn.qkv").chunk(3, dim=-1)
    x = x + _linear(_heads_attention(q, k, v, heads), sd, f"{p}.attn.proj")
    return x + _mlp_f(_layer_norm(x, sd, f"{p}.norm2"), sd, f"{p}.mlp")


def _grouping_block(x, groups, sd, p, heads):
    g = _layer_norm(groups, sd, f"{p}.norm_tokens")
    x = _layer_norm(x, sd, f"{p}.norm_x")
    g = _mlp_f(g.transpose(1, 2), sd, f"{p}.mlp_inter").transpose(1, 2)
    g = _layer_norm(g, sd, f"{p}.norm_post_tokens")
    a = f"{p}.pre_assign_attn.attn"
    q, k, v = (_linear(t, sd, f"{a}.{n}") for t, n in ((g, "q_proj"), (x, "k_proj"), (x, "v_proj")))
    g = g + _linear(_heads_attention(q, k, v, heads), sd, f"{a}.proj")
    g = g + _mlp_f(_layer_norm(g, sd, f"{p}.pre_assign_attn.norm2"), sd, f"{p}.pre_assign_attn.mlp")
    g = _layer_norm(g, sd, f"{p}.pre_assign_attn.norm_post")
    s = f"{p}.assign"
    raw = _linear(g, sd, f"{s}.q_proj") @ _linear(x, sd, f"{s}.k_proj").transpose(1, 2)
    raw = raw * x.shape[-1] ** -0.5  # B x K x N; eval: hard one-hot over the groups
    hard = F.one_hot(raw.softmax(dim=1).argmax(dim=1), raw.shape[1]).transpose(1, 2).float()
    attn = hard / (hard.sum(dim=-1, keepdim=True) + 1.0)
    new = _linear(attn @ _linear(x, sd, f"{s}.v_proj"), sd, f"{s}.proj") + g
    return new + _mlp_f(_layer_norm(new, sd, f"{p}.norm_new_x"), sd, f"{p}.mlp_channels")


def _npr_reconstruction(x, sd, p, iters=10):
    """PGSeg's NPR: EM from mu, z of the last iteration (normalised over tokens) times the last
    mu, through mapping_x."""
    mu = sd[f"{p}.mu"].repeat(x.shape[0], 1, 1)
    for _ in range(iters):
        z = torch.softmax(x @ mu.transpose(1, 2), dim=-1)
        z = z / (1e-6 + z.sum(dim=1, keepdim=True))
        mu = z.transpose(1, 2) @ x
        mu = mu / (1e-6 + mu.norm(dim=2, keepdim=True))
    return _project_mlp(z @ mu, sd, f"{p}.mapping_x")


def reference_image_embed(sd, image, size, pgseg):
    s = SIZES[size]
    pe = "img_encoder.patch_embed"
    x = F.conv2d(image, sd[f"{pe}.proj.weight"], sd[f"{pe}.proj.bias"], stride=s.patch_size)
    x = _layer_norm(x.flatten(2).transpose(1, 2), sd, "img_encoder.patch_embed.norm")
    x = x + sd["img_encoder.pos_embed"]
    prev = None
    for i, depth in enumerate(s.depths):
        p = f"img_encoder.layers.{i}"
        x_in = x
        k = s.group_tokens[i]
        if k:
            groups = sd[f"{p}.group_token"].expand(x.shape[0], -1, -1)
            if prev is not None:
                h = _layer_norm(prev, sd, f"{p}.group_projector.0")
                h = _mlp_f(h.transpose(1, 2), sd, f"{p}.group_projector.1").transpose(1, 2)
                groups = groups + h
            x = torch.cat([x, groups], dim=1)
        for j in range(depth):
            x = _attn_block(x, sd, f"{p}.blocks.{j}", s.heads)
        if k:
            x, prev = x[:, :-k], x[:, -k:]
            if pgseg:
                x = x + _npr_reconstruction(x_in, sd, f"{p}.downsample_spatial")
            x = _grouping_block(x, prev, sd, f"{p}.downsample", s.heads)
    x = _layer_norm(x, sd, "img_encoder.norm").mean(dim=1)
    return _project_mlp(x, sd, "img_projector")


def reference_text_embed(sd, tokens, size, act="quick_gelu", pooled_only=False):
    """CLIP's text transformer as GroupViT writes it: causal mask, QuickGELU, EOT pooling."""
    s = SIZES[size]
    p = "text_encoder"
    x = sd[f"{p}.token_embedding.weight"][tokens] + sd[f"{p}.positional_embedding"]
    n = tokens.shape[1]
    causal = torch.full((n, n), float("-inf")).triu(1)
    for j in range(s.text_layers):
        b = f"{p}.transformer.resblocks.{j}"
        h = _layer_norm(x, sd, f"{b}.ln_1")
        qkv = h @ sd[f"{b}.attn.in_proj_weight"].T + sd[f"{b}.attn.in_proj_bias"]
        q, k, v = qkv.chunk(3, dim=-1)
        x = x + _linear(_heads_attention(q, k, v, s.text_heads, causal), sd, f"{b}.attn.out_proj")
        h = _linear(_layer_norm(x, sd, f"{b}.ln_2"), sd, f"{b}.mlp.c_fc")
        h = h * torch.sigmoid(1.702 * h) if act == "quick_gelu" else F.gelu(h)
        x = x + _linear(h, sd, f"{b}.mlp.c_proj")
    x = _layer_norm(x, sd, f"{p}.ln_final")
    pooled = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]
    return pooled if pooled_only else _project_mlp(pooled, sd, "text_projector")


def _inputs(size, b=2, seed=1):
    s = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 3, s.image_size, s.image_size, generator=g)
    tokens = torch.zeros(b, s.context_length, dtype=torch.long)
    for i in range(b):
        n = 4 + 3 * i
        tokens[i, 0] = 49406
        tokens[i, 1:n] = torch.randint(1, 49000, (n - 1,), generator=g)
        tokens[i, n] = EOT
    return image, tokens


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("pgseg", [False, True], ids=["groupvit", "pgseg"])
def test_released_layout_loads_completely_and_equals_the_independent_computation(pgseg, tmp_path):
    state = random_released_state("tiny", pgseg)
    torch.save({"model": state, "epoch": 29}, tmp_path / "release.pth")
    kw = {"reconstruction": "reference", "text_mode": "reference"} if pgseg else {}
    model = PGSeg("tiny", npr_enabled=pgseg, text_mode=kw.get("text_mode", "none"), **{
        k: v for k, v in kw.items() if k != "text_mode"
    })  # fmt: skip
    report = load_groupvit_checkpoint(model, str(tmp_path / "release.pth"))
    assert report["missing"] == [] and report["unexpected"] == [] and report["mismatched"] == []
    assert report["ignored"] == sorted(k for k in state if "mapping_text" in k)
    model.eval()
    image, tokens = _inputs("tiny")
    with torch.no_grad():
        ours_i = model.encode_image(image)["embed"]
        ours_t = model.encode_text(tokens)["embed"]
        ref_i = reference_image_embed(state, image, "tiny", pgseg)
        ref_t = reference_text_embed(state, tokens, "tiny")
    assert torch.allclose(ours_i, ref_i, atol=1e-4), float((ours_i - ref_i).abs().max())
    assert torch.allclose(ours_t, ref_t, atol=1e-4), float((ours_t - ref_t).abs().max())
    assert ref_i.abs().max() > 0.1 and ref_t.abs().max() > 0.1  # not trivially zero
    # the 0-d scale became a 1-element tensor (DeepSpeed cannot broadcast 0-d parameters)
    assert model.logit_scale.shape == (1,)
    assert math.isclose(float(model.logit_scale.detach()), math.log(1 / 0.07), rel_tol=1e-6)
    if pgseg:  # the NPR buffers and the shared L_PG scale land where the model reads them
        assert torch.equal(
            model.img_encoder.layers[0].em.mu0,
            state["img_encoder.layers.0.downsample_spatial.mu"][0],
        )
        assert model.text_em.mu0.shape == (4, 1) and model.pg_logit_scale.shape == (1,)


def test_the_text_tower_is_quickgelu_and_gelu_differs():
    state = random_released_state("tiny", False)
    for key in state:  # pre-activations of order 1, where GELU and QuickGELU part ways
        if key.endswith(("mlp.c_fc.weight", "mlp.c_proj.weight")):
            state[key] = state[key] * 20
    image, tokens = _inputs("tiny")
    ref = reference_text_embed(state, tokens, "tiny", "quick_gelu", pooled_only=True)
    outs = {}
    for act in ("quick_gelu", "gelu"):
        model = PGSeg("tiny", npr_enabled=False, text_mode="none", text_act=act).eval()
        load_groupvit_checkpoint(model, state)
        with torch.no_grad():
            outs[act] = model.encode_text(tokens)["pooled"]  # the tower's output, at EOT
    assert torch.allclose(outs["quick_gelu"], ref, atol=1e-4)
    assert (outs["gelu"] - ref).abs().max() > 1e-3  # 10x the tolerance: not a detail


def test_partial_load_is_an_error_naming_the_keys_unless_allowed():
    state = random_released_state("tiny", False)  # GroupViT weights into a PGSeg with NPR
    model = PGSeg("tiny", reconstruction="reference", text_mode="reference")
    with pytest.raises(PartialCheckpointError, match=r"missing \(first: img_encoder\.layers\.0"):
        load_groupvit_checkpoint(model, state)
    report = load_groupvit_checkpoint(model, state, allow_partial=True)  # PGSeg's own start
    assert report["unexpected"] == [] and report["mismatched"] == []
    assert set(report["missing"]) == {
        k
        for k in model.state_dict()
        if ".em." in k or ".recon." in k or k in ("img_encoder.logit_scale", "text_em.mu0")
    }
    assert torch.equal(model.img_encoder.pos_embed, state["img_encoder.pos_embed"])
    bad = dict(state)
    bad["img_encoder.pos_embed"] = torch.zeros(1, 3, 3)
    with pytest.raises(PartialCheckpointError, match="mismatched"):
        load_groupvit_checkpoint(PGSeg("tiny", npr_enabled=False, text_mode="none"), bad)


@pytest.mark.parametrize("pgseg", [False, True], ids=["groupvit", "pgseg"])
def test_export_writes_the_released_layout_and_loads_back(pgseg):
    kw = {"reconstruction": "reference", "text_mode": "reference"} if pgseg else {}
    model = PGSeg("tiny", npr_enabled=pgseg, **({"text_mode": "none"} | kw)).eval()
    exported = export_reference_state(model)
    want = released_layout("tiny", pgseg)
    assert {k: tuple(v.shape) for k, v in exported.items()} == want
    again = PGSeg("tiny", npr_enabled=pgseg, **({"text_mode": "none"} | kw)).eval()
    load_groupvit_checkpoint(again, exported)
    image, tokens = _inputs("tiny")
    with torch.no_grad():
        assert torch.equal(model.encode_image(image)["embed"], again.encode_image(image)["embed"])
        ref = reference_image_embed(exported, image, "tiny", pgseg)
        assert torch.allclose(model.encode_image(image)["embed"], ref, atol=1e-4)


def test_export_refuses_our_mlp_reconstruction():
    with pytest.raises(ValueError, match="npr.reconstruction=mlp"):
        export_reference_state(PGSeg("tiny", reconstruction="mlp"))


def test_vit_s_layout_has_the_released_key_counts():
    """gcc_yfcc_30e (multi_label 3): 407 tensors; the PGSeg release: 437."""
    assert len(released_layout("vit_s", False, multi_label=True)) == 407
    assert len(released_layout("vit_s", True)) == 437
    gv = PGSeg("vit_s", npr_enabled=False, text_mode="none", multi_label=3)
    assert set(export_reference_state(gv)) == set(released_layout("vit_s", False, True))
    pg = PGSeg("vit_s", reconstruction="reference", text_mode="reference")
    assert set(export_reference_state(pg)) == set(released_layout("vit_s", True))


def test_inference_builds_the_model_the_checkpoint_describes():
    """Evaluation reads NPR, its reconstruction kind and the text-prototype mode off the keys."""
    for pgseg in (False, True):
        state = random_released_state("tiny", pgseg)
        model, report = load_for_inference("tiny", state, "quick_gelu", "release.pth")
        assert (model.img_encoder.layers[0].recon is not None) == pgseg
        assert model.text_mode == ("reference" if pgseg else "none")
    with pytest.raises(PartialCheckpointError, match="model.size"):
        load_for_inference("tiny_seg", random_released_state("tiny", False), "gelu", "x.pth")


def test_export_job_writes_a_file_the_reference_layout_reads(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_job", "jobs/export_checkpoint.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    torch.manual_seed(0)
    ours = PGSeg("tiny", reconstruction="reference", text_mode="reference").eval()
    # as our training checkpoints hold it: the task's prefix, other task tensors beside it
    state = {f"model.{k}": v for k, v in ours.state_dict().items()}
    state["it_loss.dummy"] = torch.zeros(1)
    torch.save(state, tmp_path / "ours.pt")
    out = tmp_path / "exported" / "pgseg.pth"
    argv = ["model.size=tiny", f"model.checkpoint={tmp_path / 'ours.pt'}", f"out={out}"]
    assert job.main(argv) == 0
    assert "in the pgseg layout" in capsys.readouterr().out
    written = torch.load(out, weights_only=True)["model"]
    assert {k: tuple(v.shape) for k, v in written.items()} == released_layout("tiny", True)
    image, _ = _inputs("tiny")
    with torch.no_grad():
        ref = reference_image_embed(written, image, "tiny", True)
        assert torch.allclose(ours.encode_image(image)["embed"], ref, atol=1e-4)
    # GroupViT's layout drops the NPR, with a warning; our MLP reconstruction cannot export
    assert job.main([*argv[:2], f"out={tmp_path / 'gv.pth'}", "layout=groupvit"]) == 0
    assert "drops the NPR" in capsys.readouterr().out
    gv = torch.load(tmp_path / "gv.pth", weights_only=True)["model"]
    assert set(gv) == set(released_layout("tiny", False))
    torch.save({f"model.{k}": v for k, v in PGSeg("tiny").state_dict().items()}, tmp_path / "m.pt")
    assert job.main(["model.size=tiny", f"model.checkpoint={tmp_path / 'm.pt'}", "out=x.pth"]) == 2
    assert "npr.reconstruction=mlp" in capsys.readouterr().err


def test_pretraining_starts_from_a_released_groupvit_file(tmp_path):
    """The PGSeg recipe starts from group_vit_gcc_redcap_30e: a partial start (no NPR yet) that
    must be asked for; without model.allow_partial_init it stops before Ray with one line."""
    from wsss_ray.config import ConfigError, PGSegPretrainConfig, load_config
    from wsss_ray.tasks import build_task, check_config

    state = random_released_state("tiny", False)
    torch.save({"model": state, "config": {"epochs": 30}}, tmp_path / "gv.pth")
    over = ["model.size=tiny", f"model.pretrained={tmp_path / 'gv.pth'}"]
    over += ["npr.reconstruction=reference", "npr.text_mode=reference"]
    cfg = load_config(PGSegPretrainConfig, "configs/pgseg/tiny.yaml", over)
    with pytest.raises(ConfigError, match=r"model\.pretrained: .*partial load: \d+ missing"):
        check_config(cfg)
    cfg = load_config(
        PGSegPretrainConfig, "configs/pgseg/tiny.yaml", [*over, "model.allow_partial_init=true"]
    )
    check_config(cfg)
    task = build_task(cfg)
    assert torch.equal(task.model.img_encoder.pos_embed, state["img_encoder.pos_embed"])
    assert torch.equal(
        task.model.text_projector.linear_out.weight,
        state["text_projector.linear_out.weight"][..., 0],
    )
    image, tokens = _inputs("tiny", b=4)
    losses, metrics = task.training_forward({"image": image, "text": tokens})
    assert set(losses) == {"it_loss", "pg1_loss", "pg2_loss", "pg_text_loss"}
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("text_mode", ["tokens", "none"])
def test_export_layout_whatever_our_text_mode(text_mode, tmp_path):
    """PGSeg's layout always has its text NPR buffer; GroupViT's never has text prototypes."""
    import importlib.util

    pg = PGSeg("tiny", reconstruction="reference", text_mode=text_mode)
    assert set(export_reference_state(pg)) == set(released_layout("tiny", True))
    spec = importlib.util.spec_from_file_location("export_job", "jobs/export_checkpoint.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    gv = PGSeg("tiny", npr_enabled=False, text_mode=text_mode)
    torch.save({f"model.{k}": v for k, v in gv.state_dict().items()}, tmp_path / "gv.pt")
    out = tmp_path / "gv.pth"
    assert (
        job.main(["model.size=tiny", f"model.checkpoint={tmp_path / 'gv.pt'}", f"out={out}"]) == 0
    )
    assert set(torch.load(out, weights_only=True)["model"]) == set(released_layout("tiny", False))


class _Pickled:  # stands for the OmegaConf config the released checkpoints pickle
    def __init__(self) -> None:
        self.lr = 1e-4


def test_pickled_objects_need_the_explicit_opt_in(tmp_path, monkeypatch):
    """weights_only=True first; a file that needs the full unpickler (which runs code from the
    file) is refused with the opt-in named, and loads with WSSS_TRUST_PICKLE=1."""
    import torch

    from wsss_ray.config import ConfigError, PGSegPretrainConfig, load_config
    from wsss_ray.models.pgseg import UntrustedPickleError, read_checkpoint_file
    from wsss_ray.tasks.pgseg import check_config

    path = tmp_path / "released.pth"
    torch.save({"model": {"w": torch.ones(2)}, "config": _Pickled()}, path)
    monkeypatch.delenv("WSSS_TRUST_PICKLE", raising=False)
    with pytest.raises(UntrustedPickleError, match="WSSS_TRUST_PICKLE=1"):
        read_checkpoint_file(str(path))
    cfg = load_config(PGSegPretrainConfig, "configs/pgseg/tiny.yaml", [])
    cfg.model.pretrained = str(path)
    with pytest.raises(ConfigError, match=r"^config error: model.pretrained: .*pickles Python"):
        check_config(cfg)  # the driver-side check: one line, exit 2
    monkeypatch.setenv("WSSS_TRUST_PICKLE", "1")
    assert torch.equal(read_checkpoint_file(str(path))["w"], torch.ones(2))
