"""Pictures of a segmentation: a palette label PNG and an overlay with a legend (PIL only)."""

from __future__ import annotations

import io

import numpy as np


def palette() -> list[int]:
    from wsss_ray.data.synthetic import voc_palette

    return voc_palette()


def label_png(mask: np.ndarray) -> bytes:
    """The mask as a palette PNG (VOC colours; the pixel values are the class indices)."""
    from PIL import Image

    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette(palette())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def overlay_with_legend(
    image: np.ndarray, mask: np.ndarray, class_names: list[str], alpha: float = 0.5
):
    """The image with every non-background class blended in its palette colour, and a legend
    strip on the right naming the classes present (largest first)."""
    from PIL import Image, ImageDraw

    pal = np.asarray(palette(), np.uint8).reshape(-1, 3)
    colour = pal[mask]
    fg = (mask > 0)[..., None]
    blended = np.where(fg, (1 - alpha) * image + alpha * colour, image).astype(np.uint8)
    h, w = mask.shape
    counts = np.bincount(mask.reshape(-1), minlength=len(class_names))
    present = [int(c) for c in np.argsort(-counts) if counts[c] and c < len(class_names)]
    row = 18
    legend_w = 12 + max((len(class_names[c]) for c in present), default=4) * 7 + 60
    out = Image.new("RGB", (w + legend_w, max(h, row * len(present) + 8)), (255, 255, 255))
    out.paste(Image.fromarray(blended), (0, 0))
    draw = ImageDraw.Draw(out)
    for i, c in enumerate(present):
        y = 4 + i * row
        draw.rectangle([w + 6, y, w + 20, y + 14], fill=tuple(int(v) for v in pal[c]), outline=0)
        share = 100.0 * counts[c] / mask.size
        draw.text((w + 26, y + 1), f"{class_names[c]} {share:.0f}%", fill=(0, 0, 0))
    return out
