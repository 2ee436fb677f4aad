"""Draws the example inputs of the img2img, inpaint, outpaint and upscale workflows:

    example.png         a 512×512 painted landscape (sky, sun, mountains, a river through a
                        meadow, a few trees): SD 1.x's native size, so the workflows run at
                        the size their models were trained for
    example_masked.png  the same picture with a transparent hole in the meadow (LoadImage
                        gives 1 − alpha as the MASK: the hole is the area to repaint)

Flat shapes and row gradients keep the files small. Run ``python workflows/inputs/make_examples.py``
to draw them again (the result is the same every time).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 512
HORIZON = 300
HOLE = (300, 340, 470, 460)          # the ellipse's bounding box (left, top, right, bottom)


def _lerp(a, b, t):
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b))


def landscape() -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE))
    draw = ImageDraw.Draw(img)
    for y in range(HORIZON):                                   # sky: deep blue to a pale horizon
        draw.line([(0, y), (SIZE, y)], fill=_lerp((70, 120, 200), (205, 222, 240), y / HORIZON))
    draw.ellipse([352, 52, 428, 128], fill=(255, 238, 175))    # sun
    draw.polygon([(0, 230), (70, 150), (140, 205), (215, 120), (300, 210), (370, 160), (450, 215), (512, 180),
                  (512, HORIZON), (0, HORIZON)], fill=(126, 136, 168))                 # far mountains
    draw.polygon([(195, 143), (215, 120), (236, 145), (224, 140), (214, 150), (205, 141)], fill=(240, 244, 250))
    draw.polygon([(0, 270), (90, 215), (170, 262), (260, 225), (340, 268), (430, 232), (512, 262),
                  (512, HORIZON), (0, HORIZON)], fill=(84, 112, 112))                  # near hills
    for y in range(HORIZON, SIZE):                             # meadow: lighter far away, darker near
        draw.line([(0, y), (SIZE, y)], fill=_lerp((128, 172, 92), (70, 122, 56), (y - HORIZON) / (SIZE - HORIZON)))
    draw.polygon([(246, HORIZON), (262, HORIZON), (250, 340), (300, 390), (268, 450), (330, SIZE), (170, SIZE),
                  (214, 450), (226, 392), (214, 340)], fill=(92, 152, 204))           # river
    for x, y, h in [(40, 380, 90), (95, 350, 70), (140, 400, 100), (470, 360, 80)]:   # trees
        draw.rectangle([x - 4, y, x + 4, y + 18], fill=(90, 62, 40))
        draw.polygon([(x - h // 3, y + 2), (x + h // 3, y + 2), (x, y - h)], fill=(40, 92, 52))
    return img


def masked(img: Image.Image) -> Image.Image:
    alpha = Image.new("L", img.size, 255)
    ImageDraw.Draw(alpha).ellipse(HOLE, fill=0)
    out = img.copy()
    out.putalpha(alpha)
    return out


def main(folder: Path = Path(__file__).parent) -> None:
    img = landscape()
    img.save(folder / "example.png", optimize=True)
    masked(img).save(folder / "example_masked.png", optimize=True)


if __name__ == "__main__":
    main()
