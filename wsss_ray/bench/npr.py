"""``benchmark npr``: what PGSeg's prototype machinery costs per training step.

Per batch size, interleaved round by round:

- **step**: the PGSeg task's forward + backward (``PGSegTask.training_forward`` and the backward
  of the summed losses), the baseline the prototype work is a share of;
- **npr**: EM prototypes (both grouping stages and the text side, with the EMA buffer update) +
  Hungarian matching (three matchings per sample) + L_PG forward and backward, on the very
  tensors the step produced (captured by hooks during a forward), timed as a whole and by part;
- **step without PG** (``--ablation``): the same model with ``npr.enabled=false`` and
  ``npr.text_mode=none``, so ``1 - no_pg / step`` is everything the PG units add, including the
  learnable reconstruction MLPs that the EM/matching/L_PG share leaves out.

Then two implementation checks on the stage-1 shapes (196 tokens, 64 prototypes for ``vit_s``):
batched EM against a per-sample Python loop (what ``wsss_ray.ops.gmm`` avoids) and Hungarian
matching serial against the thread pool. On CUDA every timed region ends with a synchronize.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from wsss_ray.bench.common import Report, Stat, Target, interleave, paired_ratio, rounds, say

GPU_BATCHES = (64, 256, 1024)
CPU_BATCHES = (2, 4, 8)
CAPTIONS = [
    "a red circle and a blue square.",
    "a photo of a yellow star next to a green triangle on a patterned background.",
    "a purple cross.",
    "three shapes: a blue square, a red circle and an orange star.",
]


@dataclass
class NPRBenchConfig:
    size: str = "vit_s"
    batches: list[int] = field(default_factory=list)  # [] = GPU_BATCHES on CUDA, else CPU_BATCHES
    repeats: int = 3
    warmup: int = 1
    ablation: bool | None = None  # None = on with CUDA, off on CPU (it doubles the time)
    loop_batch: int = 0  # batch of the batched-vs-loop checks; 0 = 256 on CUDA, 64 on CPU
    device: str = "auto"
    precision: str = "auto"  # auto = bf16 on CUDA (as DeepSpeed runs it), fp32 on CPU
    threads: int = 0  # torch threads; 0 = 1 on CPU (a contended node collapses with more)

    def resolved(self) -> NPRBenchConfig:
        cuda = torch.cuda.is_available() and self.device in ("auto", "cuda")
        out = NPRBenchConfig(**asdict(self))
        out.device = "cuda" if cuda else "cpu"
        out.batches = list(self.batches) or list(GPU_BATCHES if cuda else CPU_BATCHES)
        out.ablation = cuda if self.ablation is None else self.ablation
        out.loop_batch = self.loop_batch or (256 if cuda else 64)
        if self.precision == "auto":
            out.precision = "bf16" if cuda else "fp32"
        out.threads = self.threads or (torch.get_num_threads() if cuda else 1)
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_task(size: str, pg: bool = True):
    """The PGSeg task of ``size`` from the default config (with PG units on or off)."""
    from wsss_ray.config import PGSegPretrainConfig, load_config
    from wsss_ray.tasks.pgseg import PGSegTask

    overrides = [f"model.size={size}", "train.max_steps=1"]
    if not pg:
        overrides += ["npr.enabled=false", "npr.text_mode=none"]
    return PGSegTask(load_config(PGSegPretrainConfig, None, overrides))


def synthetic_batch(task, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Normalised-looking images and real tokenised captions (padding included)."""
    from wsss_ray.models.clip import tokenizer

    s = task.model.size
    g = torch.Generator().manual_seed(batch)
    tok = tokenizer("ViT-B-16", s.context_length)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
    return {
        "image": torch.randn(batch, 3, s.image_size, s.image_size, generator=g).to(device, dtype),
        "text": tok(captions).to(device),
    }


def capture_npr_inputs(task, batch: dict) -> dict[str, Any]:
    """One forward with hooks on every EMPrototypes module: the EM inputs, and per matching
    (stage 1, stage 2, text) the group tokens (fresh leaves requiring grad) and prototypes."""
    from wsss_ray.ops.gmm import EMPrototypes

    em_calls: list[tuple[EMPrototypes, torch.Tensor, torch.Tensor | None]] = []

    def hook(module, args, kwargs):
        em_calls.append((module, args[0].detach(), kwargs.get("mask_BN")))

    handles = [
        m.register_forward_pre_hook(hook, with_kwargs=True)
        for m in task.modules()
        if isinstance(m, EMPrototypes)
    ]
    try:
        with torch.no_grad():
            image = task.model.encode_image(batch["image"])
            text = task.model.encode_text(batch["text"])
            text_protos = task.model.text_prototypes(text, batch["text"])
    finally:
        for h in handles:
            h.remove()
    pairs = [(s["groups"], s["protos"]) for s in image["stages"] if s["protos"] is not None]
    if text_protos is not None:
        pairs.append((image["stages"][-1]["groups"], text_protos))
    pairs = [(g.detach().clone().requires_grad_(True), p.detach()) for g, p in pairs]
    return {"em": em_calls, "pairs": pairs}


def npr_once(task, captured: dict, device: torch.device) -> dict[str, float]:
    """EM + Hungarian + L_PG (forward and backward) as the task runs them, timed by part."""
    from wsss_ray.ops.matching import gather_matched, hungarian_match

    t0 = time.perf_counter()
    for module, x, mask in captured["em"]:
        module(x, mask_BN=mask)
    _sync(device)
    t1 = time.perf_counter()
    perms = [hungarian_match(g.detach(), p, maximize=task.maximize) for g, p in captured["pairs"]]
    _sync(device)
    t2 = time.perf_counter()
    total = 0.0
    for (g, p), perm in zip(captured["pairs"], perms):
        loss, _ = task.pg_loss(g, gather_matched(p.to(g.dtype), perm), task.model.pg_logit_scale)
        total = total + loss
    total.backward()
    for g, _ in captured["pairs"]:
        g.grad = None
    _sync(device)
    t3 = time.perf_counter()
    return {"npr_s": t3 - t0, "em_s": t1 - t0, "match_s": t2 - t1, "lpg_s": t3 - t2}


def step_once(task, batch: dict, device: torch.device) -> float:
    """Forward + backward of the whole task (the loop's ``engine(batch)`` + ``backward``)."""
    t0 = time.perf_counter()
    losses, _ = task.training_forward(batch)
    total = sum(v for k, v in losses.items() if k.endswith("_loss"))
    total.backward()
    _sync(device)
    dt = time.perf_counter() - t0
    for p in task.parameters():
        p.grad = None
    return dt


def em_batched_vs_loop(
    batch: int, tokens: int, dim: int, k: int, iters: int, device: torch.device, repeats: int
) -> dict[str, Stat]:
    """Seconds of ``em_prototypes`` on B x N x C at once vs one sample at a time."""
    import torch.nn.functional as F

    from wsss_ray.ops.gmm import em_prototypes

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, tokens, dim, generator=g).to(device)
    mu0 = F.normalize(torch.randn(k, dim, generator=g), dim=-1).to(device)

    def batched() -> float:
        t0 = time.perf_counter()
        em_prototypes(x, mu0, iters)
        _sync(device)
        return time.perf_counter() - t0

    def loop() -> float:
        t0 = time.perf_counter()
        for i in range(batch):
            em_prototypes(x[i : i + 1], mu0, iters)
        _sync(device)
        return time.perf_counter() - t0

    res = interleave({"batched": batched, "loop": loop}, repeats, 1, log=None)
    return {"batched": res["batched"]["value"], "loop": res["loop"]["value"]}


def hungarian_serial_vs_threads(
    batch: int, k: int, device: torch.device, repeats: int
) -> dict[str, Stat]:
    """Seconds of ``hungarian_match`` for B x K x K with one thread vs the pool (4 threads)."""
    from wsss_ray.ops.matching import hungarian_match

    g = torch.Generator().manual_seed(1)
    groups = torch.randn(batch, k, 64, generator=g).to(device)
    protos = torch.randn(batch, k, 64, generator=g).to(device)

    def timed(threads: int):
        def fn() -> float:
            t0 = time.perf_counter()
            hungarian_match(groups, protos, threads=threads)
            return time.perf_counter() - t0

        return fn

    res = interleave({"serial": timed(1), "threads": timed(4)}, repeats, 1, log=None)
    return {"serial": res["serial"]["value"], "threads": res["threads"]["value"]}


def run(cfg: NPRBenchConfig, out: str | None = None) -> Report:
    cfg = cfg.resolved()
    device = torch.device(cfg.device)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    report = Report("npr", asdict(cfg))
    torch.set_num_threads(cfg.threads)
    say(
        f"PGSeg {cfg.size} on {device} ({cfg.precision}, {cfg.threads} torch threads), "
        f"batches {cfg.batches}, "
        f"{cfg.warmup} warm-up + {cfg.repeats} interleaved rounds"
        + (", with the no-PG ablation" if cfg.ablation else "")
    )
    torch.manual_seed(0)
    task = build_task(cfg.size).to(device, dtype).train()
    no_pg = build_task(cfg.size, pg=False).to(device, dtype).train() if cfg.ablation else None
    rows, figures, share_at = [], {}, {}
    for b in cfg.batches:
        batch = synthetic_batch(task, b, device, dtype)
        captured = capture_npr_inputs(task, batch)
        runners: dict[str, Any] = {
            "step": lambda x=batch: step_once(task, x, device),
            "npr": lambda c=captured: npr_once(task, c, device),
        }
        if no_pg is not None:
            runners["step_no_pg"] = lambda x=batch: step_once(no_pg, x, device)
        try:
            res = rounds(runners, cfg, f"batch {b}")
        except torch.OutOfMemoryError:
            report.notes.append(f"batch {b}: out of memory, skipped")
            say(f"batch {b}: out of memory, skipped")
            continue
        step, npr = res["step"]["value"], res["npr"]
        share = paired_ratio(npr["npr_s"], step, "")
        share_at[b] = share.median
        row = [
            str(b),
            step.fmt(),
            npr["em_s"].fmt(),
            npr["match_s"].fmt(),
            npr["lpg_s"].fmt(),
            npr["npr_s"].fmt(),
            f"{100 * share.median:.1f}% ({100 * share.lo:.1f}-{100 * share.hi:.1f})",
        ]
        fig = {"step_s": step, **npr, "share": share}
        if no_pg is not None:
            plain = res["step_no_pg"]["value"]
            overhead = Stat([1 - a / b_ for a, b_ in zip(plain.values, step.values)])
            row += [plain.fmt(), f"{100 * overhead.median:.1f}%"]
            fig.update(step_no_pg_s=plain, pg_overhead=overhead)
        rows.append(row)
        figures[f"batch_{b}"] = fig
        del batch, captured, runners
    headers = [
        "batch",
        "step fwd+bwd (s)",
        "EM (s)",
        "Hungarian (s)",
        "L_PG fwd+bwd (s)",
        "EM+match+L_PG (s)",
        "share of step",
    ]
    if no_pg is not None:
        headers += ["step w/o PG units (s)", "all PG units' share"]
    report.table(f"PGSeg {cfg.size} on {device} ({cfg.precision}), seconds per step", headers, rows)

    s = task.model.size
    n1, k1, dim = (s.image_size // s.patch_size) ** 2, s.group_tokens[0], s.dim
    em = em_batched_vs_loop(cfg.loop_batch, n1, dim, k1, 10, device, cfg.repeats)
    speedup = paired_ratio(em["loop"], em["batched"])
    hung = {
        k: hungarian_serial_vs_threads(cfg.loop_batch, k, device, cfg.repeats)
        for k in sorted({k1, s.group_tokens[1]}, reverse=True)
    }
    impl_rows = [
        [
            f"EM, batch {cfg.loop_batch} x {n1} tokens x {dim}, K={k1}, T=10",
            em["batched"].fmt(),
            em["loop"].fmt(),
            f"{speedup.median:.2f}x",
        ]
    ]
    for k, r in hung.items():
        gain = paired_ratio(r["serial"], r["threads"])
        impl_rows.append(
            [
                f"Hungarian, batch {cfg.loop_batch}, {k} x {k}: 4 threads vs serial",
                r["threads"].fmt(),
                r["serial"].fmt(),
                f"{gain.median:.2f}x",
            ]
        )
        figures[f"hungarian_k{k}"] = {**r, "serial_over_threads": gain}
    report.table(
        "implementation checks (seconds)",
        ["what", "ours (batched / threads)", "baseline (loop / serial)", "baseline / ours"],
        impl_rows,
    )
    figures["em_batched_vs_loop"] = {**em, "loop_over_batched": speedup}
    report.figures = figures

    target_ok = device.type == "cuda" and cfg.size == "vit_s" and 256 in share_at
    cpu_note = ", ".join(f"batch {b}: {100 * v:.1f}%" for b, v in share_at.items())
    report.targets = [
        Target(
            "EM + matching + L_PG <= 5% of the vit_s step at batch 256 on GPU",
            100 * share_at[256] if target_ok else None,
            "<=",
            5.0,
            "%",
            "" if target_ok else f"{cfg.size} on {device}: {cpu_note}",
        )
    ]
    if device.type == "cpu" and cfg.size == "vit_s" and max(cfg.batches) < 64:
        report.notes.append(
            f"CPU: batches {cfg.batches} instead of 64/256/1024: one vit_s step at batch 8 "
            "takes many seconds on 2 cores (--batches scales it up on a GPU node)"
        )
    report.finish(out)
    return report
