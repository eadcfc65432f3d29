"""Segmentation model factory over segmentation-models-pytorch (smp).

One function builds any smp architecture by name (PSPNet, FPN, U-Net, ...) for a
task's channels and classes. Binary tasks get one output channel (sigmoid), multi-class
tasks one channel per class (softmax).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import nn

DEFAULT_DEPTH = {"pspnet": 3}


@dataclass
class ModelConfig:
    """Everything needed to rebuild a segmentation network.

    Attributes:
        arch: smp architecture name, e.g. "unet", "fpn", "pspnet" (case-insensitive).
        encoder_name: smp encoder, e.g. "resnet18", "resnet34", "efficientnet-b0".
        encoder_depth: number of encoder stages (None: the architecture's default).
        encoder_weights: None (random init) or "imagenet" (needs network access).
        in_channels: image channels (MSD modalities).
        num_classes: classes including background.
        decoder: extra keyword arguments for the decoder, e.g.
            {"decoder_channels": [128, 64, 32, 16, 8], "decoder_attention_type": "scse"}.
    """

    arch: str = "unet"
    encoder_name: str = "resnet18"
    encoder_depth: int | None = None
    encoder_weights: str | None = None
    in_channels: int = 1
    num_classes: int = 2
    decoder: dict[str, Any] = field(default_factory=dict)

    @property
    def out_channels(self) -> int:
        """1 for binary tasks (sigmoid), else one per class (softmax)."""
        return 1 if self.num_classes == 2 else self.num_classes

    @property
    def depth(self) -> int:
        return self.encoder_depth or DEFAULT_DEPTH.get(self.arch.lower(), 5)

    @property
    def stride(self) -> int:
        """Input sides must be divisible by this (the encoder's output stride)."""
        return 2**self.depth

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def available_architectures() -> list[str]:
    """Lower-case names accepted by :func:`build_model`."""
    return sorted(a.lower() for a in smp.MODEL_ARCHITECTURES_MAPPING)


def check_image_size(cfg: ModelConfig, image_size: int) -> None:
    """Raise ValueError if ``image_size`` is not divisible by the encoder's stride."""
    if image_size % cfg.stride:
        raise ValueError(
            f"image_size {image_size} is not divisible by {cfg.stride}, the output stride of "
            f"{cfg.arch} with encoder depth {cfg.depth}; use a multiple of {cfg.stride} "
            f"(e.g. {max(cfg.stride, image_size // cfg.stride * cfg.stride)})"
        )


def build_model(cfg: ModelConfig, image_size: int | None = None) -> nn.Module:
    """Build the smp model described by ``cfg``.

    Args:
        cfg: model configuration.
        image_size: if given, checked against the encoder's stride.

    Raises:
        KeyError: unknown architecture or encoder, listing the valid names.
        RuntimeError: "imagenet" weights requested but they cannot be fetched (offline).
    """
    arch = cfg.arch.lower()
    if arch not in available_architectures():
        raise KeyError(f"unknown architecture {cfg.arch!r}; choose one of {available_architectures()}")
    encoders = smp.encoders.get_encoder_names()
    if cfg.encoder_name not in encoders:
        raise KeyError(f"unknown encoder {cfg.encoder_name!r}; smp offers e.g. {encoders[:12]} ({len(encoders)} in all)")
    if image_size is not None:
        check_image_size(cfg, image_size)
    kwargs = dict(cfg.decoder)
    if cfg.encoder_depth is not None:
        kwargs["encoder_depth"] = cfg.encoder_depth
    try:
        return smp.create_model(
            arch,
            encoder_name=cfg.encoder_name,
            encoder_weights=cfg.encoder_weights,
            in_channels=cfg.in_channels,
            classes=cfg.out_channels,
            **kwargs,
        )
    except Exception as err:  # smp/hub raise many types when offline
        if cfg.encoder_weights:
            raise RuntimeError(
                f"could not fetch {cfg.encoder_weights!r} weights for encoder {cfg.encoder_name!r} "
                f"({type(err).__name__}: {err}). Pretrained weights need network access (e.g. on "
                "Colab); offline, use encoder_weights=None."
            ) from err
        raise


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Per-class probabilities (N, K, H, W) from model logits.

    Binary models (one logit channel) get a background channel ``1 - p`` so both
    cases share the same (N, K, H, W) layout.
    """
    if logits.shape[1] == 1:
        fg = torch.sigmoid(logits.float())
        return torch.cat([1 - fg, fg], dim=1)
    return torch.softmax(logits.float(), dim=1)
