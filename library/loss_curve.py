"""A loss curve next to the outputs: a CSV of every step and a small PNG plot.

Drawn with Pillow (already a dependency) so no plotting library is needed.
"""

from __future__ import annotations

import csv
from pathlib import Path


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values, the same length as ``values``."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def read_loss_curve(path: Path, up_to: int) -> list[tuple[int, float, float]]:
    """The rows of an earlier run's CSV up to step ``up_to`` (what a resumed run continues)."""
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                step, loss, lr = int(row["step"]), float(row["loss"]), float(row["lr"])
            except (KeyError, TypeError, ValueError):
                continue  # a damaged line is dropped, not fatal
            if step <= up_to:
                rows.append((step, loss, lr))
    return rows


def write_loss_curve(rows: list[tuple[int, float, float]], stem: Path) -> tuple[Path, Path]:
    """Write ``stem.csv`` (step, loss, lr) and ``stem.png``; returns both paths."""
    from PIL import Image, ImageDraw

    # with_name, not with_suffix: an --output_name with a dot ("style_v1.5") would lose what follows it
    csv_path, png_path = stem.with_name(stem.name + ".csv"), stem.with_name(stem.name + ".png")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "lr"])
        writer.writerows(rows)

    width, height, margin = 640, 360, 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((margin, margin // 2, width - margin // 2, height - margin), outline="black")
    if rows:
        losses = [r[1] for r in rows]
        smooth = moving_average(losses, max(1, len(losses) // 20))
        lo, hi = min(losses), max(losses)
        span = (hi - lo) or 1.0
        n = max(len(losses) - 1, 1)

        def point(i: int, v: float) -> tuple[float, float]:
            x = margin + (width - 1.5 * margin) * i / n
            y = (height - margin) - (height - 1.5 * margin) * (v - lo) / span
            return x, y

        draw.line([point(i, v) for i, v in enumerate(losses)], fill=(170, 190, 230), width=1)
        draw.line([point(i, v) for i, v in enumerate(smooth)], fill=(20, 60, 180), width=2)
        draw.text((margin, 4), f"loss (steps 1-{rows[-1][0]}): {hi:.4f} max, {lo:.4f} min, "
                  f"last avg {smooth[-1]:.4f}", fill="black")
    image.save(png_path)
    return csv_path, png_path
