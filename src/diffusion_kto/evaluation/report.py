"""Evaluation reports: results JSON, report.md, a self-contained report.html and score histograms (the image
grids they show are drawn by :mod:`diffusion_kto.images`).

Shared by ``dkto demo`` (toy world) and ``dkto eval`` (real reward models): everything here takes plain
dicts, tables and PIL images, and knows nothing about models or scorers. Tables follow the paper's
Table 1 (win rates, §5) and Table 2 (mean ± 95% CI) of Diffusion-KTO (arXiv 2404.04465).
"""
from __future__ import annotations

import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..images import png_data_uri
from .winrate import Comparison, MeanScore, Table, means_table, summary, winrate_table

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:72em;
color:#141414;background:#fff;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f2f2f2}
caption{caption-side:bottom;font-size:.85em;color:#555;text-align:left;padding-top:.3em}
img{image-rendering:pixelated;max-width:100%;border:1px solid #eee}
.note{color:#8a5a00;background:#fff6e0;padding:.4em .8em;border-left:3px solid #e0a800}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{font-weight:600}dd{margin:0}
"""


# ---------------------------------------------------------------- histograms

def matplotlib_available() -> bool:
    """Whether the optional [eval] extra (matplotlib) is installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def score_histograms(scores: Mapping[str, Mapping[str, object]], bins: int = 30) -> dict[str, Image.Image] | None:
    """One histogram PNG per metric, models overlaid; None when matplotlib is not installed."""
    if not matplotlib_available():
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = list(dict.fromkeys(m for per in scores.values() for m in per))
    out = {}
    for metric in metrics:
        per_model = {k: np.asarray(v[metric], dtype=float).ravel() for k, v in scores.items() if metric in v}
        fig = Figure(figsize=(5, 3), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        edges = np.histogram_bin_edges(np.concatenate(list(per_model.values())), bins=bins)
        for model, values in per_model.items():
            ax.hist(values, bins=edges, alpha=0.5, label=model)
        ax.set_xlabel(metric)
        ax.set_ylabel("images")
        ax.legend(fontsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        out[metric] = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return out


# ---------------------------------------------------------------- tables and text

def as_table(name: str, data) -> Table:
    """A Table from a Table, {key: value} (two columns) or {row: {column: value}}."""
    if isinstance(data, Table):
        return data
    if all(isinstance(v, Mapping) for v in data.values()):
        cols = list(dict.fromkeys(c for v in data.values() for c in v))
        return Table(["", *cols], [[str(r), *(_fmt(v.get(c, "—")) for c in cols)] for r, v in data.items()])
    return Table(["", name], [[str(k), _fmt(v)] for k, v in data.items()])


def _fmt(value) -> str:
    """A compact string for a table cell or run-info value."""
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else f"{float(value):.4g}"
    return str(value)


def flatten(info: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested run info as {'stage.train': '12.3'}: dotted keys, formatted values."""
    out = {}
    for key, value in info.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = _fmt(value)
    return out


def jsonable(obj):
    """obj with numpy values, paths and tuples made JSON-safe; NaN and infinities become null."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _slug(name: str) -> str:
    """A file-name-safe form of name."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_") or "image"


# ---------------------------------------------------------------- markdown and html

def render_markdown(title: str, run_info: Mapping, tables: Mapping[str, Table],
                    images: Mapping[str, str], notes: Sequence[str]) -> str:
    """report.md: title, run info, tables with captions, images by relative path, notes."""
    parts = [f"# {title}", "", "## Run info", ""]
    parts += [f"- **{k}**: `{v}`" for k, v in flatten(run_info).items()] or ["(none)"]
    for heading, table in tables.items():
        parts += ["", f"## {heading}", "", table.to_markdown()]
        if table.caption:
            parts += ["", f"*{table.caption}*"]
    for heading, path in images.items():
        parts += ["", f"## {heading}", "", f"![{heading}]({path})"]
    if notes:
        parts += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(parts) + "\n"


def _html_table(table: Table) -> str:
    """One Table as escaped HTML."""
    e = html.escape
    head = "".join(f"<th>{e(str(h))}</th>" for h in table.header)
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in table.rows)
    cap = f"<caption>{e(table.caption)}</caption>" if table.caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(title: str, run_info: Mapping, tables: Mapping[str, Table],
                images: Mapping[str, Image.Image], notes: Sequence[str]) -> str:
    """report.html: one file, inline CSS, images as base64 PNG data URIs, no external resources."""
    e = html.escape
    info = "".join(f"<dt>{e(k)}</dt><dd><code>{e(v)}</code></dd>" for k, v in flatten(run_info).items())
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{e(title)}</h1>",
             f"<h2>Run info</h2><dl>{info or '<dt>(none)</dt><dd></dd>'}</dl>"]
    for heading, table in tables.items():
        parts.append(f"<h2>{e(heading)}</h2>{_html_table(table)}")
    for heading, image in images.items():
        parts.append(f"<h2>{e(heading)}</h2><img alt=\"{e(heading)}\" width=\"{image.width}\" "
                     f"height=\"{image.height}\" src=\"{png_data_uri(image)}\">")
    if notes:
        parts.append("<h2>Notes</h2>" + "".join(f"<p class=\"note\">{e(n)}</p>" for n in notes))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- the report

def write_report(out_dir, *, title: str, run_info: Mapping | None = None,
                 winrates: Sequence[Comparison] = (), means: Mapping[str, Mapping[str, MeanScore]] | None = None,
                 extra_tables: Mapping[str, object] | None = None, grids: Mapping[str, Image.Image] | None = None,
                 scores: Mapping[str, Mapping[str, object]] | None = None, results: Mapping | None = None,
                 results_name: str = "results.json", notes: Sequence[str] = (),
                 histograms: bool = True) -> dict[str, Path]:
    """Write results JSON, report.md, report.html and PNGs (grids; score histograms if scores) to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_info, means, notes = dict(run_info or {}), dict(means or {}), list(notes)
    tables: dict[str, Table] = {}
    if winrates:
        tables["Win rates (median of N per prompt)"] = winrate_table(winrates)
    if means:
        tables["Mean scores"] = means_table(means)
    for name, data in (extra_tables or {}).items():
        tables[name] = as_table(name, data)
    images = {}  # file stem -> (heading, image)
    for name, grid in (grids or {}).items():
        images[f"grid_{_slug(name)}"] = (f"Image grid: {name}", grid)
    if scores and histograms:
        hists = score_histograms(scores)
        if hists is None:
            notes.append("Score histograms skipped: matplotlib is not installed (pip install 'diffusion-kto[eval]').")
        else:
            images.update({f"hist_{_slug(m)}": (f"Score histogram: {m}", im) for m, im in hists.items()})
    payload = results if results is not None else {"title": title, "run_info": run_info,
                                                    **summary(winrates, means)}
    written = {"results": out / results_name}
    written["results"].write_text(json.dumps(jsonable(payload), indent=2) + "\n", encoding="utf-8")
    for stem, (_, image) in images.items():
        written[stem] = out / f"{stem}.png"
        image.save(written[stem])
    written["markdown"] = out / "report.md"
    written["markdown"].write_text(render_markdown(title, run_info, tables,
                                                   {h: f"{stem}.png" for stem, (h, _) in images.items()}, notes),
                                   encoding="utf-8")
    written["html"] = out / "report.html"
    written["html"].write_text(render_html(title, run_info, tables, dict(images.values()), notes),
                                encoding="utf-8")
    return written
