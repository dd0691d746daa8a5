"""The tray icon, drawn with Pillow: one padlock shape, coloured by state."""

from __future__ import annotations

from PIL import Image, ImageDraw

from tray.model import IconState

COLOURS: dict[IconState, tuple[int, int, int]] = {
    IconState.OK: (46, 160, 67),  # green
    IconState.WARNING: (230, 160, 0),  # amber
    IconState.ERROR: (210, 40, 40),  # red
    IconState.DISCONNECTED: (128, 128, 128),  # grey
}
# Sizes the platforms ask for: 16/22/24 (Linux panels), 32 (Windows), 64 (HiDPI, macOS @2x).
SIZES = (16, 22, 24, 32, 48, 64)


def icon_image(state: IconState, size: int = 64) -> Image.Image:
    """A padlock: a shackle over a filled body, with a keyhole; the body carries the state colour."""
    scale = 4  # draw large, then shrink: smooth edges at small sizes
    big = size * scale
    image = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    colour = COLOURS[state]
    outline = (30, 30, 30, 255)
    body_top = int(big * 0.45)
    margin = int(big * 0.12)
    shackle_w = int(big * 0.09)
    draw.rounded_rectangle(
        (int(big * 0.26), int(big * 0.08), int(big * 0.74), int(big * 0.62)),
        radius=int(big * 0.24),
        outline=outline,
        width=shackle_w,
    )
    draw.rounded_rectangle(
        (margin, body_top, big - margin, big - int(big * 0.06)),
        radius=int(big * 0.08),
        fill=(*colour, 255),
        outline=outline,
        width=max(scale, int(big * 0.03)),
    )
    hole_r = int(big * 0.07)
    cx, cy = big // 2, int(big * 0.68)
    draw.ellipse((cx - hole_r, cy - hole_r, cx + hole_r, cy + hole_r), fill=outline)
    draw.rectangle((cx - hole_r // 2, cy, cx + hole_r // 2, cy + int(big * 0.14)), fill=outline)
    if state is IconState.DISCONNECTED:  # a slash: "no daemon", readable without colour
        draw.line((margin, big - margin, big - margin, margin), fill=(200, 0, 0, 255), width=int(big * 0.06))
    return image.resize((size, size), Image.Resampling.LANCZOS)


def body_pixel(size: int = 64) -> tuple[int, int]:
    """A point inside the padlock's coloured body (for tests that read the colour back)."""
    return int(size * 0.3), int(size * 0.82)
