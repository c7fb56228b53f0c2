"""Plots of a run: attention maps, training curves, and a metric against hyperparameters (for sweeps).

Everything draws on ``matplotlib.figure.Figure`` objects with an explicit Agg canvas: ``pyplot`` is never
imported, so no global figure registry, backend switch or rcParams change leaks out of these helpers (a
figure is freed as soon as the caller drops it). Each plotting helper returns its ``Figure`` and writes a
PNG when given a path.

* Attention: :func:`capture_attention` runs ONE teacher-forced forward pass with the ``intermediates``
  collection mutable, which collects the probabilities every ``MultiHeadAttention`` sows
  (``attention_weights``, float32 ``[batch, heads, q, k]``) without changing the computation;
  :func:`plot_attention_grid` draws one layer as a grid of heads; :func:`write_attention_figures` writes
  every layer of the three kinds (encoder self, decoder masked self, encoder-decoder cross);
  :func:`attention_summary` is the matching text report.
* Curves: :func:`read_metrics` reads ``metrics.jsonl`` (tolerating the partial last line of a run that is
  still writing); :func:`plot_curves` draws loss, token accuracy, learning rate and BLEU / exact match
  against steps, leaving out panels whose metrics are absent.
* Sweeps: :func:`plot_metric_vs_params` draws one metric against each of several hyperparameters.

Fonts (CJK labels). Matplotlib's bundled DejaVu Sans has no Chinese, Japanese or Korean glyphs, so such
labels would be drawn as empty boxes. When a label contains CJK characters the helpers look for a
CJK-capable font among the installed ones (matplotlib's font manager, plus the system font folders, since
matplotlib's font cache does not see fonts installed after it was built) and use it as a per-glyph fallback
family behind DejaVu Sans. The font the project chose is WenQuanYi Micro Hei, from the small Debian/Ubuntu
package ``fonts-wqy-microhei`` (about 1.6 MB; ``apt-get install -y fonts-wqy-microhei``); Noto Sans CJK
(``fonts-noto-cjk``, about 57 MB) and the usual macOS/Windows CJK fonts are found too. With none installed, a
warning names the package to install and the labels show boxes; nothing else fails.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

from absl import logging
import jax
from matplotlib import font_manager
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

from flaxformer_lite import storage

CJK_FONT_PACKAGE = "fonts-wqy-microhei"  # Debian/Ubuntu package of the CJK font the project uses.
_BASE_FAMILY = "DejaVu Sans"  # Matplotlib's bundled default; always present.
# Known CJK-capable families, most preferred first (Linux packages, then macOS and Windows fonts).
_CJK_FAMILIES = (
    "WenQuanYi Micro Hei", "Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK TC", "Noto Sans CJK KR",
    "Noto Sans SC", "Source Han Sans SC", "Source Han Sans CN", "WenQuanYi Zen Hei", "Droid Sans Fallback",
    "AR PL UMing CN", "AR PL UKai CN", "PingFang SC", "Heiti SC", "STHeiti", "Hiragino Sans GB",
    "Microsoft YaHei", "SimHei", "SimSun", "Noto Serif CJK SC",
)
_CJK_FILE_HINTS = ("cjk", "wqy", "wenquanyi", "han", "droidsansfallback", "uming", "ukai", "yahei", "simhei",
                   "simsun", "pingfang", "hiragino", "heiti", "gothic", "mincho", "nanum", "ipa")
# CJK ideographs, kana, hangul, CJK punctuation and full-width forms.
_CJK_RE = re.compile("[\u2e80-\u2fff\u3000-\u30ff\u3100-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
                     "\uf900-\ufaff\uff00-\uffef\U00020000-\U0002fa1f]")
_MAX_WIDTH = 16.0  # Inches: attention grids wrap their heads onto more rows past this width.
_PROBE = ("\u4e2d", "\u6587")  # Two ideographs a usable font must have.


def _new_figure(width: float, height: float) -> Figure:
    """A figure with its own Agg canvas, unknown to pyplot (nothing global to close)."""
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | os.PathLike | None) -> None:
    if path is None:
        return
    buffer = io.BytesIO()  # matplotlib writes local files only; the path may be on gs://.
    figure.savefig(buffer, format="png")
    storage.write(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------------------------
# Fonts
# ---------------------------------------------------------------------------------------------------------
def has_cjk(text: str) -> bool:
    """Whether ``text`` holds a Chinese/Japanese/Korean character that DejaVu Sans cannot draw."""
    return bool(_CJK_RE.search(text))


def _covers_cjk(path: str) -> bool:
    """Whether the font file draws the probe ideographs, each with a glyph of its own.

    Placeholder fonts such as matplotlib's "Last Resort" map every code point of a script to one box glyph:
    they have the characters in their map but draw none of them.
    """
    try:
        from matplotlib import ft2font  # pylint: disable=import-outside-toplevel
        charmap = ft2font.FT2Font(path).get_charmap()
    except Exception:  # noqa: BLE001  (unreadable or unsupported font file: not a candidate)
        return False
    glyphs = [charmap.get(ord(c)) for c in _PROBE]
    return None not in glyphs and len(set(glyphs)) == len(glyphs)


def _known_cjk_family() -> str | None:
    """The most preferred known CJK family in matplotlib's font list whose file really has the glyphs."""
    by_name: dict[str, list[str]] = {}
    for entry in font_manager.fontManager.ttflist:
        by_name.setdefault(entry.name, []).append(entry.fname)
    for family in _CJK_FAMILIES:
        if any(_covers_cjk(path) for path in by_name.get(family, ())):
            return family
    return None


@functools.lru_cache(maxsize=1)
def cjk_font_family() -> str | None:
    """Name of an installed CJK-capable font family (registered with matplotlib), or None.

    Looked up once per process: first the known families in matplotlib's font list; then font files in the
    system folders that matplotlib's cache has not seen (a font installed after the cache was built),
    registered on the fly; last, any font in matplotlib's list whose file has CJK glyphs.
    """
    family = _known_cjk_family()
    if family:
        return family
    known = {entry.fname for entry in font_manager.fontManager.ttflist}
    added = False
    for path in font_manager.findSystemFonts():
        if path in known or not any(h in os.path.basename(path).lower() for h in _CJK_FILE_HINTS):
            continue
        if _covers_cjk(path):
            try:
                font_manager.fontManager.addfont(path)
                added = True
            except Exception:  # noqa: BLE001  (a font file matplotlib cannot parse)
                continue
    family = _known_cjk_family() if added else None
    if family:
        return family
    for entry in font_manager.fontManager.ttflist:
        if _covers_cjk(entry.fname):
            return entry.name
    return None


@functools.lru_cache(maxsize=1)
def _warn_no_cjk_font() -> None:
    logging.warning(
        "Labels contain Chinese/Japanese/Korean characters but no CJK-capable font is installed, so they "
        "will be drawn as empty boxes. Install one, e.g. `apt-get install -y %s` (or fonts-noto-cjk), then "
        "rerun.", CJK_FONT_PACKAGE)


def font_family(labels: Iterable[str]) -> list[str] | None:
    """Font family list for text holding ``labels``: DejaVu Sans with a CJK fallback when needed.

    None (matplotlib's default) when no label has CJK characters, or when no CJK font is installed (with a
    warning, once per process, naming the package to install).
    """
    if not any(has_cjk(str(label)) for label in labels):
        return None
    family = cjk_font_family()
    if family is None:
        _warn_no_cjk_font()
        return None
    return [_BASE_FAMILY, family]


# ---------------------------------------------------------------------------------------------------------
# Attention maps
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class AttentionMaps:
    """Attention probabilities of every layer, each a float32 numpy array ``[batch, heads, q, k]``."""

    encoder_self: list[np.ndarray]  # [b, h, source, source] per encoder layer.
    decoder_self: list[np.ndarray]  # [b, h, target, target] per decoder layer (lower-triangular).
    cross: list[np.ndarray]  # [b, h, target, source] per decoder layer.


def _sown(tree: dict, *path: str) -> np.ndarray:
    node = tree
    for key in path:
        node = node[key]
    (weights,) = node["attention_weights"]  # sow appends to a tuple; one call per forward pass.
    return np.asarray(weights, np.float32)


def capture_attention(model, variables: Any, inputs, targets, *,
                      jit: bool = True) -> tuple[np.ndarray, AttentionMaps]:
    """``(logits, maps)`` of one teacher-forced forward pass of ``model`` on ``(inputs, targets)``.

    ``variables`` is ``{'params': ...}`` or the parameter tree itself; ``inputs [b, s]`` are source ids
    (EOS-terminated, 0-padded) and ``targets [b, t]`` target ids (shifted right inside the model, so decoder
    position 0 sees the start token). The forward pass is the usual deterministic one; only the
    ``intermediates`` collection is made mutable, so the logits are those of ``model.apply`` (bit for bit
    with ``jit=False``; ``jit=True``, one compiled program, is faster and may differ in the last bits).
    """
    if "params" not in variables:
        variables = {"params": variables}
    variables = {"params": variables["params"]}
    apply = functools.partial(model.apply, mutable=["intermediates"])
    if jit:
        apply = jax.jit(apply)
    logits, state = apply(variables, np.asarray(inputs, np.int32), np.asarray(targets, np.int32))
    tree = state["intermediates"]
    cfg = model.config
    maps = AttentionMaps(
        encoder_self=[_sown(tree, "encoder", f"layer_{i}", "self_attention")
                      for i in range(cfg.num_encoder_layers)],
        decoder_self=[_sown(tree, "decoder", f"layer_{i}", "self_attention")
                      for i in range(cfg.num_decoder_layers)],
        cross=[_sown(tree, "decoder", f"layer_{i}", "cross_attention") for i in range(cfg.num_decoder_layers)],
    )
    return np.asarray(logits), maps


def plot_attention_grid(weights: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str],
                        title: str = "", path: str | os.PathLike | None = None, *, max_columns: int = 4,
                        row_name: str = "query", col_name: str = "key") -> Figure:
    """One attention layer as a grid of heads: ``weights [heads, q, k]`` with labelled rows and columns.

    Only the first ``len(row_labels)`` rows and ``len(col_labels)`` columns are drawn (so padding is cropped
    by passing the real tokens' labels). Heads are laid out ``max_columns`` to a row, fewer for long
sentences (the figure stays about 16 inches wide). Every head shares one colour scale, 0 to the layer's largest
    weight. The figure has one axes per head (labelled ``head_<i>``) plus the colour bar's.
    """
    weights = np.asarray(weights, np.float32)
    if weights.ndim != 3:
        raise ValueError(f"weights must be [heads, q, k], got shape {weights.shape}")
    rows, cols = len(row_labels), len(col_labels)
    if rows > weights.shape[1] or cols > weights.shape[2]:
        raise ValueError(f"{rows}x{cols} labels for weights of shape {weights.shape}")
    weights = weights[:, :rows, :cols]
    heads = weights.shape[0]
    # Each panel: about 0.22 inch per token (labels at 8 pt fit), plus room for the tick labels; as many
    # panels side by side as fit in about 16 inches (at most ``max_columns``).
    longest = max([len(str(label)) for label in (*row_labels, *col_labels)] + [1])
    margin = 0.35 + 0.07 * min(longest, 16)
    panel_w = max(2.2, 0.22 * cols + margin)
    panel_h = max(2.0, 0.22 * rows + margin)
    grid_cols = max(1, min(heads, max_columns, int(_MAX_WIDTH // panel_w)))
    grid_rows = math.ceil(heads / grid_cols)
    figure = _new_figure(panel_w * grid_cols + 0.9, panel_h * grid_rows + 0.5)
    family = font_family([*row_labels, *col_labels, title])
    text_kw = {"fontfamily": family} if family else {}
    fontsize = 8 if max(rows, cols) <= 30 else 6
    vmax = float(weights.max()) if weights.size else 1.0
    image = None
    for head in range(heads):
        ax = figure.add_subplot(grid_rows, grid_cols, head + 1, label=f"head_{head}")
        image = ax.imshow(weights[head], cmap="viridis", vmin=0.0, vmax=vmax or 1.0, aspect="equal",
                          interpolation="nearest")
        ax.set_xticks(range(cols), [str(c) for c in col_labels], rotation=90, fontsize=fontsize, **text_kw)
        ax.set_yticks(range(rows), [str(r) for r in row_labels], fontsize=fontsize, **text_kw)
        ax.tick_params(length=0)
        ax.set_title(f"head {head}", fontsize=9)
        if head % grid_cols == 0:
            ax.set_ylabel(row_name, fontsize=8)
        if head >= heads - grid_cols:
            ax.set_xlabel(col_name, fontsize=8)
    if image is not None:
        colorbar = figure.colorbar(image, ax=figure.axes, shrink=0.8, fraction=0.03)
        colorbar.ax.set_label("colorbar")
        colorbar.ax.tick_params(labelsize=7)
    if title:
        figure.suptitle(title, fontsize=10, **text_kw)
    _save(figure, path)
    return figure


_KINDS = (  # (file prefix, AttentionMaps field, title, row name, column name)
    ("encoder_self", "encoder_self", "encoder self-attention", "source (query)", "source (key)"),
    ("decoder_self", "decoder_self", "decoder masked self-attention", "decoder input (query)",
     "decoder input (key)"),
    ("cross", "cross", "encoder-decoder attention", "decoder input (query)", "source (key)"),
)


def write_attention_figures(maps: AttentionMaps, source_labels: Sequence[str], decoder_labels: Sequence[str],
                            out_dir: str | os.PathLike, *, row: int = 0,
                            title_suffix: str = "") -> list[tuple[str, Figure]]:
    """Writes one PNG per layer and kind for batch row ``row``; returns ``[(path, figure)]``.

    ``source_labels`` name the real source tokens (EOS included), ``decoder_labels`` the decoder inputs
    (``'<s>'`` then the target tokens, shifted right). Files: ``encoder_self_layer<i>.png``,
    ``decoder_self_layer<i>.png``, ``cross_layer<i>.png`` in ``out_dir``.
    """
    labels = {"source": list(source_labels), "decoder": list(decoder_labels)}
    written = []
    for prefix, field, title, row_name, col_name in _KINDS:
        rows = labels["source"] if field == "encoder_self" else labels["decoder"]
        cols = labels["decoder"] if field == "decoder_self" else labels["source"]
        for layer, weights in enumerate(getattr(maps, field)):
            path = str(storage.as_path(out_dir) / f"{prefix}_layer{layer}.png")
            figure = plot_attention_grid(weights[row], rows, cols, f"{title}, layer {layer}{title_suffix}",
                                         path, row_name=row_name, col_name=col_name)
            written.append((path, figure))
    return written


def _layer_summary(name: str, weights: np.ndarray, rows: Sequence[str], cols: Sequence[str],
                   symmetric: bool, top: int) -> list[str]:
    mean = weights[:, : len(rows), : len(cols)].mean(axis=0)  # Averaged over heads.
    row_names = [f"{i}:{label}" for i, label in enumerate(rows)]
    col_names = [f"{j}:{label}" for j, label in enumerate(cols)]
    width = max(len(n) for n in row_names)
    lines = [f"{name} (averaged over {weights.shape[0]} heads): each token -> the token it attends to most"]
    for i, label in enumerate(row_names):
        j = int(mean[i].argmax())
        lines.append(f"  {label:<{width}} -> {col_names[j]} ({mean[i, j]:.2f})")
    if symmetric:
        n = len(rows)
        pairs = [(abs(mean[i, j] - mean[j, i]), i, j) for i in range(n) for j in range(i + 1, n)]
        pairs.sort(reverse=True)
        lines.append("  largest asymmetries |A(i->j) - A(j->i)|:")
        for diff, i, j in pairs[:top]:
            lines.append(f"    {row_names[i]} -> {row_names[j]}: {mean[i, j]:.2f}   "
                         f"{row_names[j]} -> {row_names[i]}: {mean[j, i]:.2f}   |diff| {diff:.2f}")
    return lines


def attention_summary(maps: AttentionMaps, source_labels: Sequence[str], decoder_labels: Sequence[str], *,
                      row: int = 0, top_asymmetries: int = 5) -> str:
    """Text report per layer: for each token, the token it attends to most (head-averaged), and for the
    encoder self-attention the ``top_asymmetries`` pairs with the largest ``|A(i->j) - A(j->i)|``."""
    lines: list[str] = []
    for layer, weights in enumerate(maps.encoder_self):
        lines += _layer_summary(f"encoder layer {layer} self-attention", weights[row], source_labels,
                                source_labels, True, top_asymmetries) + [""]
    for layer, (self_w, cross_w) in enumerate(zip(maps.decoder_self, maps.cross)):
        lines += _layer_summary(f"decoder layer {layer} masked self-attention", self_w[row], decoder_labels,
                                decoder_labels, False, top_asymmetries) + [""]
        lines += _layer_summary(f"decoder layer {layer} encoder-decoder attention", cross_w[row],
                                decoder_labels, source_labels, False, top_asymmetries) + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Training curves
# ---------------------------------------------------------------------------------------------------------
def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl``; a line that does not parse (the partial last line of a run still
    writing) is skipped, with a warning when it is not the last one."""
    lines = storage.as_path(path).read_text(encoding="utf-8").split("\n")
    records = []
    for number, line in enumerate(lines):
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if any(rest.strip() for rest in lines[number + 1:]):
                logging.warning("%s: skipping unreadable line %d", path, number + 1)
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


_CURVE_PANELS = (  # (title, y label, [(metric, legend label)])
    ("loss", "loss", [("train/loss", "train"), ("eval/loss", "eval")]),
    ("token accuracy", "accuracy", [("train/accuracy", "train"), ("eval/accuracy", "eval")]),
    ("learning rate", "learning rate", [("train/learning_rate", "learning rate")]),
    ("translation", "score", [("eval/bleu", "BLEU"), ("eval/exact_match", "exact match (%)")]),
)


def _series(records: Sequence[dict], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of ``metric``, sorted by step; a step logged twice (after a resume) keeps the last."""
    by_step = {}
    for record in records:
        value = record.get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            by_step[int(record["step"])] = float(value)
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def plot_curves(records: Sequence[dict], path: str | os.PathLike | None = None, title: str = "") -> Figure:
    """Loss, token accuracy, learning rate and BLEU / exact match against steps, one panel each (train
    and eval together where both exist); panels whose metrics are all absent are left out."""
    panels = []
    for panel_title, ylabel, metrics in _CURVE_PANELS:
        series = [(label, *_series(records, metric)) for metric, label in metrics]
        series = [s for s in series if len(s[1])]
        if series:
            panels.append((panel_title, ylabel, series))
    if not panels:
        raise ValueError("no known metric (train/loss, eval/loss, ...) in the records")
    columns = min(2, len(panels))
    grid_rows = math.ceil(len(panels) / columns)
    figure = _new_figure(5.2 * columns, 3.4 * grid_rows)
    for index, (panel_title, ylabel, series) in enumerate(panels):
        ax = figure.add_subplot(grid_rows, columns, index + 1, label=panel_title)
        for label, steps, values in series:
            marker = "o" if len(steps) <= 30 else None
            ax.plot(steps, values, marker=marker, markersize=3, linewidth=1.2, label=label)
        if panel_title == "loss" and all(v.min() > 0 for _, _, v in series):
            ax.set_yscale("log")
        if panel_title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if len(series) > 1 or panel_title == "translation":
            ax.legend(fontsize=8)
    if title:
        kw = {"fontfamily": family} if (family := font_family([title])) else {}
        figure.suptitle(title, fontsize=11, **kw)
    _save(figure, path)
    return figure


# ---------------------------------------------------------------------------------------------------------
# A metric against hyperparameters (sweeps)
# ---------------------------------------------------------------------------------------------------------
def _lookup(row: dict, key: str) -> Any:
    """``row[key]``, or a dotted path into nested dicts (``'model.d_model'``); None when absent."""
    if key in row:
        return row[key]
    node: Any = row
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def plot_metric_vs_params(rows: list[dict], metric: str, params: list[str],
                          path: str | os.PathLike | None = None) -> Figure:
    """``metric`` against each hyperparameter in ``params``: one panel per parameter.

    ``rows`` are one dict per run (a sweep's results), with flat keys or nested dicts addressed by dotted
    names. Each run is a point; a line joins the mean metric at each distinct value. Numeric parameters use
    a numeric axis (logarithmic when positive and spanning more than a factor of 20, e.g. learning rates),
    others (strings, booleans, None) one tick per distinct value. Rows lacking the metric are skipped.
    """
    if not params:
        raise ValueError("params must name at least one hyperparameter")
    usable = [r for r in rows if _is_number(_lookup(r, metric)) and math.isfinite(float(_lookup(r, metric)))]
    if not usable:
        raise ValueError(f"no row has a numeric {metric!r}")
    columns = min(3, len(params))
    grid_rows = math.ceil(len(params) / columns)
    figure = _new_figure(4.2 * columns, 3.3 * grid_rows)
    for index, param in enumerate(params):
        ax = figure.add_subplot(grid_rows, columns, index + 1, label=param)
        values = [_lookup(r, param) for r in usable]
        ys = np.array([float(_lookup(r, metric)) for r in usable])
        numeric = all(_is_number(v) for v in values)
        if numeric:
            xs = np.array(values, dtype=np.float64)
            distinct = np.unique(xs)
            if distinct.size > 1 and distinct.min() > 0 and distinct.max() / distinct.min() > 20:
                ax.set_xscale("log")
        else:
            names = [str(v) for v in values]
            order = sorted(set(names), key=lambda n: (n == "None", n))
            position = {name: i for i, name in enumerate(order)}
            xs = np.array([position[n] for n in names], dtype=np.float64)
            distinct = np.arange(len(order), dtype=np.float64)
            family = font_family(order)
            ax.set_xticks(distinct, order, rotation=30 if len(order) > 4 else 0, fontsize=8,
                          **({"fontfamily": family} if family else {}))
        ax.scatter(xs, ys, s=18, alpha=0.7, zorder=3)
        means = [ys[xs == x].mean() for x in distinct]
        if len(distinct) > 1:
            ax.plot(distinct, means, linewidth=1.2, alpha=0.8, color="tab:orange", label="mean")
        ax.set_xlabel(param)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs {param}", fontsize=9)
        ax.grid(True, alpha=0.3)
    _save(figure, path)
    return figure
