"""Image classification (VTAB-1k splits) with a transformers ViT or a timm model."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...data import load_task
from ...data.metrics import compute_metrics
from ..models import image_preprocessing
from .base import Task


class ImageClassificationTask(Task):
    """Keeps images as uint8 arrays; resizing and normalisation happen per batch (memory stays small)."""

    model_kind = "image"
    head_modules = ("classifier",)  # no PEFT task type for images: train and save the head explicitly

    def load(self) -> None:
        cfg = self.cfg
        options = {"train_size": cfg.train_size, "val_size": cfg.val_size, "image_size": cfg.image_size}
        data = load_task(
            "image",
            cfg.data_dir,
            seed=cfg.seed,
            max_train_samples=cfg.max_train_samples,
            max_eval_samples=cfg.max_eval_samples,
            **{**options, **cfg.reader_kwargs},
        )
        rows = lambda x, y: [{"pixel_values": img, "labels": int(label)} for img, label in zip(x, y)]  # noqa: E731
        self.train = rows(data.x_train, data.y_train)
        self.eval_splits = {"validation": rows(data.x_val, data.y_val), "test": rows(data.x_test, data.y_test)}
        self.num_labels = data.num_labels
        self.metric_names, self.main_metric = list(data.metric_names), data.main_metric
        self.prep: dict = {}

    def build_model(self) -> nn.Module:
        model = super().build_model()
        self.prep = image_preprocessing(model, self.cfg.model)
        if hasattr(model, "model") and hasattr(model.model, "default_cfg"):  # timm: its head has its own name
            self.head_modules = (model.model.default_cfg.get("classifier", "head"),)
        return model

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        images = torch.from_numpy(np.stack([f["pixel_values"] for f in features])).permute(0, 3, 1, 2).float() / 255.0
        channels = self.prep.get("channels", 3)
        if images.shape[1] != channels:
            images = images[:, :1].expand(-1, channels, -1, -1)  # grayscale -> the model's channels
        size = tuple(self.prep.get("size", images.shape[-2:]))
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        mean = torch.tensor(self.prep.get("mean", (0.5,) * 3)[:channels]).view(1, -1, 1, 1)
        std = torch.tensor(self.prep.get("std", (0.5,) * 3)[:channels]).view(1, -1, 1, 1)
        return {"pixel_values": (images - mean) / std, "labels": torch.tensor([f["labels"] for f in features])}

    def score(self, split: str, outputs: dict[str, np.ndarray]) -> dict[str, float]:
        labels = np.asarray([f["labels"] for f in self.eval_splits[split]])
        return compute_metrics(self.metric_names, outputs["logits"], labels)
