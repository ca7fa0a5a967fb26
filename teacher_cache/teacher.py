"""The teacher: a timm model with weights from a file (never a hub download), evaluated without gradients.

Two ways to ask it: ``logits(views)``, the online teacher (the views the student sees), and
``logit_map(images)``, the classifier applied at every location of the last feature map. For a convnet
whose head is a linear layer on average-pooled features (RegNetY, ResNet: the papers' teachers), the
mean of the map over all locations *is* the teacher's logits, and the mean over a view's crop box is a
cheap, crop-aware estimate of what the teacher would say about that view: what the cache stores.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherSpec:
    name: str  # any timm model name
    weights: str | None  # a timm / official DeiT checkpoint file (path or URL) or a distillery run folder
    num_classes: int = 1000
    resolution: int = 224

    def check(self) -> None:
        """A `TeacherError` now, where the build's workers would fail later: a name timm does not know, a
        local weights file that is not there or does not fit the model (checked on the meta device)."""
        import timm

        if not timm.is_model(self.name):
            close = difflib.get_close_matches(self.name, timm.list_models(), n=5, cutoff=0.6)
            raise TeacherError(f"teacher {self.name!r} is not a timm model name"
                               + (f" (close: {', '.join(close)})" if close else " (e.g. regnety_160, resnet50)"))
        from trainer.checkpoint import check_local_weights

        loaded = check_local_weights(self.build, self.weights, f"teacher weights {self.weights}", TeacherError)
        if loaded is not None:
            _fitted(self, loaded)

    def build(self) -> nn.Module:
        """The timm model, untrained (no weights are downloaded)."""
        import timm

        return timm.create_model(self.name, pretrained=False, num_classes=self.num_classes)


def _fitted(spec: TeacherSpec, loaded: dict[str, Any]) -> str:
    """The weights' digest from `load_pretrained`'s report, once it says that every weight was found."""
    if loaded["missing"]:
        raise TeacherError(f"{spec.weights} does not fit {spec.name} with {spec.num_classes} classes: "
                           f"missing {loaded['missing'][:3]}; give the checkpoint's class count "
                           f"(teacher-cache build --num-classes, distill.teacher.num_classes)")
    return loaded["sha256"]


def ready_for_inference(model: nn.Module, device: torch.device, channels_last: bool = False) -> nn.Module:
    """A teacher's model for inference on ``device``: eval mode, no gradients, NHWC memory on a GPU always (a
    convnet's bf16 kernels, RegNetY's, are NHWC ones) and elsewhere when ``channels_last`` asks."""
    if channels_last or device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model.to(device).eval().requires_grad_(False)


class Fp32Head(nn.Module):
    """A timm classifier whose body runs under the caller's autocast (bf16 on a GPU) and whose head (pooling
    and classifier, a few MFLOPs against the body's GFLOPs) in fp32: logits rounded to bf16 (8 significant
    bits) flip or tie the argmax of close classes, the hard label of hard distillation, and a cache's
    maps come from an fp32 head (`Teacher.logit_map`), so the online teacher's must too."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.model.forward_head(features.float())


def expected_identity(spec: TeacherSpec) -> dict[str, Any]:
    """The `Teacher.identity` a cache built from ``spec`` carries, without loading the model (weights are
    hashed, as `load_pretrained` reports them)."""
    from trainer.checkpoint import weights_digest

    return {"name": spec.name, "weights_sha256": weights_digest(spec.weights) if spec.weights else "random-init",
            "resolution": spec.resolution, "num_classes": spec.num_classes}


class TeacherError(ValueError):
    """The teacher cannot be built or cannot serve the requested mode; the message says what to do."""


class Teacher:
    """``compile``: a ``torch.compile`` backend ("inductor") for the forward and the feature map, or None."""

    def __init__(self, spec: TeacherSpec, device: str = "cpu", compile: str | None = None):  # noqa: A002
        self.spec, self.device = spec, torch.device(device)
        self.model: nn.Module = spec.build()  # `build_cache` ran spec.check() before any worker started
        self.weights_sha256 = "random-init"
        if spec.weights:
            from trainer.checkpoint import load_pretrained  # timm/DeiT files and our checkpoint folders

            self.weights_sha256 = _fitted(spec, load_pretrained(self.model, spec.weights))
        else:
            log.warning("teacher %s has random weights (no weights file given)", spec.name)
        self.model = ready_for_inference(self.model, self.device)
        # what logits() and logit_map() call: compiled once each when asked (a batch of another size, a
        # shard's last one, recompiles once with a dynamic batch dimension, then serves every size)
        self._forward, self._features = Fp32Head(self.model), self.model.forward_features
        if compile:
            self._forward = torch.compile(self._forward, backend=compile)
            self._features = torch.compile(self.model.forward_features, backend=compile)

    @property
    def identity(self) -> dict[str, Any]:
        """What a cache records and a training run checks: same name, weights and resolution."""
        return {"name": self.spec.name, "weights_sha256": self.weights_sha256,
                "resolution": self.spec.resolution, "num_classes": self.spec.num_classes}

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Online teacher: normalised views [B,3,H,W] -> logits [B,C] (fp32)."""
        with self._autocast():
            return self._forward(x.to(self.device, non_blocking=True)).float()

    def _no_map(self) -> TeacherError:
        return TeacherError(
            f"teacher {self.spec.name} has no linear classifier on average-pooled spatial features, so it has no "
            f"logit map for a crop-aware cache; use a convnet teacher (e.g. regnety_160) or distill.source=online")

    def _linear_head(self) -> nn.Linear:
        head = self.model.get_classifier()
        pool = (getattr(getattr(self.model, "head", None), "global_pool", None)
                or getattr(self.model, "global_pool", None))
        pool_type = pool if isinstance(pool, str) else getattr(pool, "pool_type", "avg")  # ViTs say 'token'
        if not isinstance(head, nn.Linear) or pool_type not in ("avg", "fast", "fastavg"):
            raise self._no_map()
        return head

    @torch.no_grad()
    def logit_map(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised whole images [B,3,R,R] -> logits at every feature location [B,C,h,w] (fp32)."""
        head = self._linear_head()
        with self._autocast():
            features = self._features(x.to(self.device, non_blocking=True))
        if features.ndim != 4:
            raise self._no_map()
        features = features.float()
        return torch.einsum("bfhw,cf->bchw", features, head.weight.float()) + head.bias.float().view(1, -1, 1, 1)
