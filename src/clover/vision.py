"""Images for vision models: the photographs that ship in clover/data/images (see ATTRIBUTION.txt there), their
preprocessing, and the features that quality reports compare (the CLS token and the mean patch token of the
last hidden state, after the encoder's final norm)."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .errors import CloverError
from .evaluate import encoder_of

IMAGE_DIR = pathlib.Path(__file__).resolve().parent / "data" / "images"
# Calibration (the whitening statistics of calibrated pruning) and scoring never share an image.
CALIBRATION_IMAGES = ("chelsea", "camera", "brick", "grass", "gravel")
SCORING_IMAGES = ("astronaut", "coffee", "rocket", "grace_hopper", "hubble_deep_field", "retina", "coins")


def load_images(names: Sequence[str]) -> list[Image.Image]:
    """The shipped photographs ``names`` (file stems in clover/data/images), as RGB."""
    images = []
    for name in names:
        path = IMAGE_DIR / f"{name}.jpg"
        if not path.is_file():
            raise CloverError(f"the image {path} is missing from the clover package; reinstall clover")
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def image_processor(loaded: Any) -> Any:
    """The model's saved image processor, or, when it has none, ImageNet's preprocessing cropped to the size the
    model was configured for (``config.image_size``)."""
    if loaded.feature_extractor is not None:
        return loaded.feature_extractor
    from .models import imagenet_image_processor

    size = getattr(loaded.model.config, "image_size", None)
    size = size[0] if isinstance(size, list | tuple) else size
    if not isinstance(size, int) or size < 1:
        raise CloverError(f"{loaded.name} has no preprocessor_config.json and its config no image_size")
    return imagenet_image_processor(size)


def pixel_values(loaded: Any, names: Sequence[str]) -> torch.Tensor:
    """The photographs ``names`` preprocessed for ``loaded``'s model: (N, 3, H, W) float32."""
    return image_processor(loaded)(images=load_images(names), return_tensors="pt")["pixel_values"]


@torch.no_grad()
def image_features(model: nn.Module, pixels: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """(N, 2, hidden): each image's CLS token and the mean of its patch tokens in the last hidden state (register
    tokens, which some encoders append after CLS, are left out of the mean)."""
    parameter = next(model.parameters())
    registers = int(getattr(model.config, "num_register_tokens", 0) or 0)
    rows = []
    for start in range(0, len(pixels), batch_size):
        batch = pixels[start : start + batch_size].to(parameter.device, parameter.dtype)
        # (B, 1 + registers + patches, hidden), under a classification head too
        hidden = encoder_of(model)(pixel_values=batch).last_hidden_state.float()
        rows.append(torch.stack([hidden[:, 0], hidden[:, 1 + registers :].mean(1)], dim=1).cpu())
    return torch.cat(rows)


def scoring_features(loaded: Any) -> torch.Tensor:
    """image_features on the scoring photographs."""
    return image_features(loaded.model, pixel_values(loaded, SCORING_IMAGES))


def feature_similarity(reference: torch.Tensor, features: torch.Tensor) -> dict[str, float]:
    """Mean cosine similarity over images of the CLS and of the mean patch features (image_features' layout)."""
    cosine = F.cosine_similarity(reference.double(), features.double(), dim=-1).mean(0)  # (2,)
    return {"cls_similarity_to_original": cosine[0].item(), "patch_similarity_to_original": cosine[1].item()}
