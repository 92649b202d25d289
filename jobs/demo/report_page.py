"""The demo's report: image grids, loss curves and metrics, tied together by an ``index.html``.

Everything is written next to ``index.html`` with relative links, so the folder can be copied,
zipped or served as it is.
"""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


WORD_GAP = 5  # px between words: Pillow's default font draws a space 2 px wide, which reads as none


def _draw_words(draw: ImageDraw.ImageDraw, at: tuple[int, int], text: str) -> None:
    x, y = at
    for word in text.split():
        draw.text((x, y), word, fill=(0, 0, 0))
        x += draw.textlength(word) + WORD_GAP


def image_grid(rows: list[np.ndarray], row_labels: list[str] | None = None, scale: int = 2,
               gap: int = 2, label_width: int = 150,
               column_labels: list[tuple[int, str]] | None = None) -> Image.Image:
    """Rows of images (each (n, H, W, 3) uint8) into one picture, optionally labelled on the left and,
    above, at given columns (``(column index, text)``: a heading over the group that starts there)."""
    height, width = rows[0].shape[1:3]
    columns = max(len(r) for r in rows)
    cell_h, cell_w = height * scale, width * scale
    left = label_width if row_labels else 0
    top = 18 if column_labels else 0
    canvas = Image.new("RGB", (left + columns * (cell_w + gap) + gap, top + len(rows) * (cell_h + gap) + gap),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for column, text in column_labels or []:
        _draw_words(draw, (left + gap + column * (cell_w + gap), 3), text)
    for r, row in enumerate(rows):
        y = top + gap + r * (cell_h + gap)
        if row_labels:
            _draw_words(draw, (6, y + cell_h // 2 - 6), row_labels[r])
        for c, image in enumerate(row):
            tile = Image.fromarray(image).resize((cell_w, cell_h), Image.Resampling.NEAREST)
            canvas.paste(tile, (left + gap + c * (cell_w + gap), y))
    return canvas


def loss_curves(histories: dict[str, list[dict]], path: Path, keys: tuple[str, ...] = ("loss",)) -> Path:
    """One panel per run: the logged metrics in `keys` against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(histories), figsize=(5 * len(histories), 3.6), squeeze=False)
    for axis, (run, history) in zip(axes[0], histories.items()):
        for key in sorted({k for row in history for k in row if k in keys or k.endswith("_loss")}):
            points = [(row["step"], row[key]) for row in history
                      if key in row and isinstance(row[key], (int, float)) and math.isfinite(row[key])]
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, label=key, marker="o" if len(steps) < 12 else None)
        axis.set_title(run)
        axis.set_xlabel("step")
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


@dataclass(frozen=True)
class Table:
    """A small table: a header row, then rows of cells (numbers are shown to 4 significant digits)."""

    header: tuple[str, ...]
    rows: list[tuple]


@dataclass
class Section:
    """One heading of the page: paragraphs in plain words, then figures (file name, caption), then a table."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)
    table: Table | None = None


@dataclass
class Report:
    """What the index shows, in order: an introduction, the sections, then every metric of metrics.json."""

    title: str
    intro: list[str] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)

    def write(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps(self.metrics, indent=2, sort_keys=True))
        parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>",
                 "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
                 "img{max-width:100%;border:1px solid #ddd}figure{margin:1.5em 0}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
                 "text-align:left;vertical-align:top}</style></head><body>", f"<h1>{html.escape(self.title)}</h1>"]
        parts += [f"<p>{html.escape(paragraph)}</p>" for paragraph in self.intro]
        for section in self.sections:
            parts.append(f"<h2>{html.escape(section.title)}</h2>")
            parts += [f"<p>{html.escape(paragraph)}</p>" for paragraph in section.paragraphs]
            for name, caption in section.figures:
                parts.append(f"<figure><img src='{html.escape(name)}' alt='{html.escape(caption)}'>"
                             f"<figcaption>{html.escape(caption)}</figcaption></figure>")
            if section.table is not None:
                parts.append(_table_html(section.table.header, section.table.rows))
        parts.append("<h2>Every number (metrics.json)</h2>")
        parts.append(_table_html(("metric", "value"), _flatten(self.metrics)))
        parts.append("<p><a href='metrics.json'>metrics.json</a></p></body></html>")
        index = folder / "index.html"
        index.write_text("\n".join(parts))
        return index


def _shown(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _table_html(header: tuple[str, ...], rows: list[tuple]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_shown(cell))}</td>" for cell in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _flatten(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _flatten(value, name + ".")
        else:
            rows.append((name, value))
    return rows
