"""CLIP pretraining: any open_clip architecture, gathered contrastive loss.

The first task on the spine, and the source of a CLIP that has learned something for the VPL
tests (a tiny one trained on synthetic shapes).
"""

from __future__ import annotations

import torch

from wsss_ray.config import ClipPretrainConfig, ConfigError
from wsss_ray.losses.contrastive import GatheredContrastiveLoss
from wsss_ray.models.clip import create_clip
from wsss_ray.tasks.base import Task


class ClipTask(Task):
    def __init__(self, cfg: ClipPretrainConfig):
        super().__init__()
        m = cfg.model
        self.model = create_clip(m.name, m.pretrained, m.init_logit_scale)
        self.loss = GatheredContrastiveLoss(m.max_logit_scale)

    def training_forward(self, batch):
        image_BD = self.model.encode_image(batch["image"])
        text_BD = self.model.encode_text(batch["text"])
        loss = self.loss(image_BD.float(), text_BD.float(), self.model.logit_scale.float())
        # a detached 0-d tensor: the loop converts all metrics with one host sync per report
        scale = self.model.logit_scale.detach().exp().clamp(max=self.loss.max_logit_scale)[0]
        return {"contrastive_loss": loss}, {"logit_scale": scale}

    @torch.no_grad()
    def after_step(self) -> None:
        self.model.logit_scale.clamp_(max=torch.log(torch.tensor(self.loss.max_logit_scale)))


def tokenizer_spec(cfg: ClipPretrainConfig) -> tuple[str, int | None]:
    return cfg.model.name, None  # the architecture's own tokenizer and context


def check_config(cfg: ClipPretrainConfig) -> None:
    from wsss_ray.models.clip import image_size, model_config

    try:
        model_config(cfg.model.name)
    except KeyError as err:
        raise ConfigError(f"config error: model.name: {err.args[0]}") from None
    want = image_size(cfg.model.name)
    if cfg.data.image_size != want:
        raise ConfigError(
            f"config error: data.image_size: {cfg.model.name} takes {want}px "
            f"inputs, got {cfg.data.image_size}"
        )
