"""Images for people: grids, boxes and masks drawn with class names, saved as PNG.

Used for the augment previews, by the training engine for sample predictions, and by
`python -m services.predict --save` for annotated images.
Every function takes and returns uint8 [C, H, W] tensors (C = 1 or 3).
"""

from __future__ import annotations

import os
import tempfile
import zlib
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid

# Tableau-like palette: well separated hues, readable on black and on photos.
PALETTE = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
           "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3"]


def color_of(name: str) -> str:
    """A stable colour per class name (crc32, not Python's salted hash); prefer `class_colors`."""
    return PALETTE[zlib.crc32(name.encode()) % len(PALETTE)]


def class_colors(classes: Sequence[str]) -> dict[str, str]:
    """Distinct colours by class index (names may collide under `color_of`)."""
    return {name: PALETTE[c % len(PALETTE)] for c, name in enumerate(classes)}


def to_rgb(image: torch.Tensor) -> torch.Tensor:
    """uint8 [3, H, W] from [1, H, W] or [3, H, W]."""
    return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image


def upscale(image: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest-neighbour upscale of [C, H, W] by an integer factor (small images, readable labels)."""
    if factor <= 1:
        return image
    return image.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def draw_detections(image: torch.Tensor, boxes_xyxy: torch.Tensor, labels: Sequence[str],
                    masks: torch.Tensor | None = None, scores: torch.Tensor | None = None,
                    scale: int = 1, alpha: float = 0.45, colors: dict[str, str] | None = None) -> torch.Tensor:
    """uint8 [3, H*scale, W*scale]: `image` with instance masks [k, H, W] filled and boxes labelled
    `name` or `name 0.93`; `colors` maps names to colours (e.g. `class_colors(classes)`)."""
    canvas = upscale(to_rgb(image), scale)
    colors = [(colors or {}).get(name) or color_of(name) for name in labels]
    if masks is not None and len(masks):
        canvas = draw_segmentation_masks(canvas, upscale(masks.bool(), scale), alpha=alpha, colors=colors)
    if len(boxes_xyxy):
        text = [name if scores is None else f"{name} {float(s):.2f}" for name, s in
                zip(labels, scores if scores is not None else [None] * len(labels))]
        # pixel-edge boxes: the last covered pixel is x2 - 1
        boxes = boxes_xyxy.float() * scale - torch.tensor([0.0, 0.0, 1.0, 1.0])
        canvas = draw_bounding_boxes(canvas, boxes, labels=list(text), colors=colors, width=1)
    return canvas


def draw_semantic(image: torch.Tensor, semantic: torch.Tensor, classes: Sequence[str],
                  scale: int = 1, alpha: float = 0.45) -> torch.Tensor:
    """uint8 [3, H*scale, W*scale]: `image` with a semantic mask [H, W] (0 = background, c + 1 = class c)."""
    canvas = upscale(to_rgb(image), scale)
    present = [c for c in range(len(classes)) if bool((semantic == c + 1).any())]
    if not present:
        return canvas
    masks = torch.stack([upscale((semantic == c + 1)[None], scale)[0] for c in present])
    palette = class_colors(classes)
    return draw_segmentation_masks(canvas, masks, alpha=alpha, colors=[palette[classes[c]] for c in present])


def draw_caption(image: torch.Tensor, lines: Sequence[str], colors: Sequence[str | None] | None = None,
                 alpha: float = 0.6) -> torch.Tensor:
    """uint8 [3, H, W]: `image` with text `lines` at its top left on a dark translucent band (readable on
    any image); a line with a colour in `colors` starts with a swatch of it (a legend)."""
    from PIL import ImageDraw, ImageFont
    from torchvision.transforms.v2.functional import pil_to_tensor, to_pil_image

    if not lines:
        return to_rgb(image)
    font = ImageFont.load_default()  # the font torchvision's draw_bounding_boxes writes with
    colors = list(colors or [None] * len(lines))
    _, top, _, bottom = font.getbbox("Ag")
    line_h, pad = bottom - top + 2, 3
    swatch = line_h - 2 if any(colors) else 0
    text_w = max(int(font.getlength(line)) for line in lines)
    width, height = pad * 2 + swatch + (pad if swatch else 0) + text_w, pad * 2 + line_h * len(lines)
    canvas = to_pil_image(to_rgb(image)).convert("RGBA")
    band = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    ImageDraw.Draw(band).rectangle((0, 0, width - 1, height - 1), fill=(0, 0, 0, round(255 * alpha)))
    canvas = Image.alpha_composite(canvas, band)
    draw = ImageDraw.Draw(canvas)
    for row, (line, color) in enumerate(zip(lines, colors)):
        y = pad + row * line_h
        if color:
            draw.rectangle((pad, y + 1, pad + swatch - 1, y + swatch), fill=color)
        draw.text((pad + swatch + (pad if swatch else 0), y - top), line, fill="white", font=font)
    return pil_to_tensor(canvas.convert("RGB"))


def grid(images: Sequence[torch.Tensor] | torch.Tensor, nrow: int = 8, scale: int = 1) -> torch.Tensor:
    """uint8 [3, H', W']: images (same size, 1 or 3 channels) in a grid, optionally upscaled."""
    tiles = torch.stack([upscale(to_rgb(image), scale) for image in images])
    return make_grid(tiles, nrow=nrow, padding=2, pad_value=128)


def save_png(image: torch.Tensor, path: Path) -> Path:
    """Write uint8 [C, H, W] as PNG atomically; the same pixels give the same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = image.permute(1, 2, 0).numpy()
    array = array[:, :, 0] if array.shape[-1] == 1 else array
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".png.tmp") as handle:
        Image.fromarray(array).save(handle, format="PNG")
    os.replace(handle.name, path)
    return path


def save_grid(images: Sequence[torch.Tensor] | torch.Tensor, path: Path, nrow: int = 8, scale: int = 1) -> Path:
    """Save images as one grid PNG (see `grid`)."""
    return save_png(grid(images, nrow=nrow, scale=scale), path)
