"""A toy method, registered at run time by ``test_task_registry.py``: the one new file a method
needs (its config schema, its Task, its spec), trained by the unchanged driver."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from wsss_ray.config import TrainJobConfig
from wsss_ray.losses.contrastive import GatheredContrastiveLoss
from wsss_ray.tasks.base import Task
from wsss_ray.tasks.registry import TaskSpec


@dataclass
class ToyModelConfig:
    width: int = 32


@dataclass
class ToyConfig(TrainJobConfig):
    task: str = "toy"
    model: ToyModelConfig = field(default_factory=ToyModelConfig)


class ToyTask(Task):
    """Mean colour of each 8 x 8 cell -> a linear image embedding; mean token embedding -> text."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        w = cfg.model.width
        self.image = nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.LazyLinear(w))
        self.text = nn.EmbeddingBag(49408, w, mode="mean")
        self.logit_scale = nn.Parameter(torch.full((1,), 2.0))
        self.loss = GatheredContrastiveLoss()
        self.image(torch.zeros(1, 3, cfg.data.image_size, cfg.data.image_size))  # materialise

    def training_forward(self, batch):
        img = self.image(batch["image"].float())
        txt = self.text(batch["text"])
        return {"toy_loss": self.loss(img, txt, self.logit_scale)}, {}


def tokenizer_spec(cfg: ToyConfig) -> tuple[str, int]:
    return "ViT-B-16", 16


SPEC = TaskSpec("toy", schema=ToyConfig, build=ToyTask, tokenizer=tokenizer_spec)
