"""Attention capture and plots (flaxformer_lite/plotting.py) and experiments/visualize.py, on the tiny preset."""

import importlib.util
import json
import os
import pathlib
import re
import types
import warnings

import jax
import matplotlib
from matplotlib import image as mpl_image
import numpy as np
import pytest

import flaxformer_lite as ffl
from flaxformer_lite import plotting
from flaxformer_lite.data import tokenizer as tokenizer_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Two sources of different lengths (EOS = 1, padding = 0) and two targets, the second padded.
INPUTS = np.array([[5, 6, 7, 8, 1, 0, 0], [9, 10, 1, 0, 0, 0, 0]], np.int32)
TARGETS = np.array([[11, 12, 13, 1], [14, 1, 0, 0]], np.int32)


def assert_png(path):
    path = pathlib.Path(path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = mpl_image.imread(path)
    assert pixels.ndim == 3 and min(pixels.shape[:2]) > 100


def head_axes(figure):
    return [ax for ax in figure.axes if ax.get_label().startswith("head_")]


@pytest.fixture(scope="module")
def tiny():
    config = ffl.preset("tiny")
    model = ffl.Transformer(config)
    variables = model.init(jax.random.key(0), INPUTS, TARGETS)
    return model, variables


@pytest.fixture(scope="module")
def captured(tiny):
    model, variables = tiny
    return plotting.capture_attention(model, variables, INPUTS, TARGETS)


def test_capture_shapes_and_rows_sum_to_one(tiny, captured):
    model, _ = tiny
    _, maps = captured
    cfg = model.config
    assert len(maps.encoder_self) == cfg.num_encoder_layers
    assert len(maps.decoder_self) == len(maps.cross) == cfg.num_decoder_layers
    b, s, t, h = INPUTS.shape[0], INPUTS.shape[1], TARGETS.shape[1], cfg.num_heads
    for w in maps.encoder_self:
        assert w.shape == (b, h, s, s) and w.dtype == np.float32
    for w in maps.decoder_self:
        assert w.shape == (b, h, t, t)
    for w in maps.cross:
        assert w.shape == (b, h, t, s)
    for w in maps.encoder_self + maps.decoder_self + maps.cross:
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
        assert (w >= 0).all()


def test_decoder_self_attention_is_lower_triangular(captured):
    _, maps = captured
    upper = np.triu(np.ones((TARGETS.shape[1],) * 2, bool), k=1)
    for w in maps.decoder_self:
        assert (w[0][:, upper] == 0).all()  # The first target has no padding: the whole map.
        # Real positions of the padded target too (a padding query row has every key masked: uniform).
        real = TARGETS[1] != 0
        assert (w[1][:, real][..., upper[real]] == 0).all()
        assert w[..., 1, 0].max() > 0  # Not trivially zero below the diagonal.


def test_padding_columns_get_zero_weight(captured):
    _, maps = captured
    source_pad = INPUTS == 0  # [b, s]
    target_real = TARGETS != 0  # [b, t]
    for w in maps.encoder_self:
        for row in range(INPUTS.shape[0]):
            real_queries = w[row][:, ~source_pad[row]]  # [h, real q, s]
            assert (real_queries[..., source_pad[row]] == 0).all()
            assert real_queries[..., ~source_pad[row]].min() > 0
    for w in maps.cross:
        for row in range(INPUTS.shape[0]):
            assert (w[row][:, target_real[row]][..., source_pad[row]] == 0).all()
    for w in maps.decoder_self:  # The second target is padded: its real position never reads padding.
        assert (w[1][:, target_real[1]][..., ~target_real[1]] == 0).all()


def test_capturing_does_not_change_the_logits(tiny, captured):
    model, variables = tiny
    logits, _ = captured  # Jitted.
    plain = np.asarray(model.apply(variables, INPUTS, TARGETS))
    np.testing.assert_allclose(logits, plain, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(logits, np.asarray(jax.jit(model.apply)(variables, INPUTS, TARGETS)))
    # Not jitted: the very same operations as model.apply, bit for bit; the parameter tree alone works too.
    eager, _ = plotting.capture_attention(model, variables["params"], INPUTS, TARGETS, jit=False)
    np.testing.assert_array_equal(eager, plain)


def test_write_attention_figures_one_panel_per_layer_and_head(tiny, captured, tmp_path):
    model, _ = tiny
    cfg = model.config
    _, maps = captured
    source = ["jump", "twice", "after", "walk", "</s>"]
    decoder = ["<s>", "JUMP", "JUMP", "WALK"]
    written = plotting.write_attention_figures(maps, source, decoder, tmp_path)
    layers = cfg.num_encoder_layers + 2 * cfg.num_decoder_layers
    assert len(written) == layers
    assert sum(len(head_axes(figure)) for _, figure in written) == layers * cfg.num_heads
    names = sorted(pathlib.Path(path).name for path, _ in written)
    assert names == sorted([f"{kind}_layer{i}.png" for kind in ("encoder_self", "decoder_self", "cross")
                            for i in range(2)])
    for path, figure in written:
        assert_png(path)
        ax = head_axes(figure)[0]
        columns = [label.get_text() for label in ax.get_xticklabels()]
        rows = [label.get_text() for label in ax.get_yticklabels()]
        kind = pathlib.Path(path).name.split("_layer")[0]
        assert rows == (source if kind == "encoder_self" else decoder)
        assert columns == (decoder if kind == "decoder_self" else source)  # Padding cropped.


def test_attention_summary_names_most_attended_and_asymmetries():
    labels = ["I", "am", "a", "student"]
    enc = np.full((1, 2, 4, 4), 0.25, np.float32)
    enc[0, :, 3] = [0.05, 0.85, 0.05, 0.05]  # "student" attends to "am" ...
    enc[0, :, 1] = [0.3, 0.3, 0.3, 0.1]  # ... much more than "am" attends to "student".
    dec = np.tril(np.ones((1, 2, 2, 2), np.float32))
    dec /= dec.sum(-1, keepdims=True)
    cross = np.zeros((1, 2, 2, 4), np.float32)
    cross[..., 3] = 1.0
    maps = plotting.AttentionMaps([enc], [dec], [cross])
    text = plotting.attention_summary(maps, labels, ["<s>", "学生"], top_asymmetries=2)
    assert "3:student -> 1:am (0.85)" in text
    asymmetries = text.split("largest asymmetries")[1].splitlines()
    assert "1:am -> 3:student: 0.10" in asymmetries[1] and "3:student -> 1:am: 0.85" in asymmetries[1]
    assert "|diff| 0.75" in asymmetries[1]
    assert re.search(r"1:学生 +-> 3:student \(1\.00\)", text)
    assert text.count("encoder layer") == 1 and text.count("decoder layer 0") == 2


def write_metrics(path, truncate_last=True, translation=True):
    lines = []
    for step in range(1, 101, 10):
        lines.append({"step": step, "train/loss": 5.0 / step, "train/accuracy": step / 101,
                      "train/learning_rate": 1e-3 * min(1, step / 40)})
        if step % 30 == 1:
            record = {"step": step, "eval/loss": 4.0 / step, "eval/accuracy": step / 110}
            if translation:
                record.update({"eval/bleu": step / 3, "eval/exact_match": step / 4})
            lines.append(record)
    text = "\n".join(json.dumps(line) for line in lines) + "\n"
    if truncate_last:
        text += '{"step": 101, "train/lo'  # A run still writing its next line.
    path.write_text(text)


def test_curves_tolerate_a_partial_last_line_and_skip_absent_panels(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    write_metrics(metrics)
    records = plotting.read_metrics(metrics)
    assert len(records) == 14 and records[-1]["step"] == 91
    figure = plotting.plot_curves(records, tmp_path / "curves.png", title="run")
    assert [ax.get_label() for ax in figure.axes] == ["loss", "token accuracy", "learning rate", "translation"]
    assert_png(tmp_path / "curves.png")
    loss_lines = figure.axes[0].get_lines()
    assert [line.get_label() for line in loss_lines] == ["train", "eval"] and len(loss_lines[1].get_xdata()) == 4

    write_metrics(metrics, truncate_last=False, translation=False)
    figure = plotting.plot_curves(plotting.read_metrics(metrics), tmp_path / "no_bleu.png")
    assert [ax.get_label() for ax in figure.axes] == ["loss", "token accuracy", "learning rate"]
    with pytest.raises(ValueError, match="no known metric"):
        plotting.plot_curves([{"step": 1, "other": 2.0}])


def test_plot_metric_vs_params(tmp_path):
    rows = [{"learning_rate": lr, "model": {"d_model": d}, "optimizer": opt, "eval/bleu": 10 + i}
            for i, (lr, d, opt) in enumerate([(1e-4, 64, "adam"), (1e-3, 64, "adafactor"), (1e-2, 128, "adam"),
                                              (1e-3, 128, "adam")])]
    rows.append({"learning_rate": 1e-3})  # A run without the metric is skipped.
    path = tmp_path / "sweep.png"
    figure = plotting.plot_metric_vs_params(rows, "eval/bleu", ["learning_rate", "model.d_model", "optimizer"],
                                            path)
    assert len(figure.axes) == 3
    assert figure.axes[0].get_xscale() == "log"
    assert [t.get_text() for t in figure.axes[2].get_xticklabels()] == ["adafactor", "adam"]
    assert_png(path)
    with pytest.raises(ValueError, match="numeric"):
        plotting.plot_metric_vs_params(rows, "eval/missing", ["learning_rate"], path)


def test_font_family_for_cjk_labels(monkeypatch):
    assert plotting.font_family(["jump", "▁student", "</s>"]) is None
    warned = []
    monkeypatch.setattr(plotting, "cjk_font_family", lambda: None)
    monkeypatch.setattr(plotting.logging, "warning", lambda message, *args: warned.append(message % args))
    plotting._warn_no_cjk_font.cache_clear()
    assert plotting.font_family(["我", "是"]) is None
    assert len(warned) == 1 and plotting.CJK_FONT_PACKAGE in warned[0]


def test_a_placeholder_font_does_not_count_as_a_cjk_font(monkeypatch):
    """matplotlib's "Last Resort" font maps every ideograph to one box glyph: with it (and DejaVu Sans) as the
    only fonts, no CJK family is found, so the warning naming the package appears."""
    from matplotlib import font_manager, ft2font

    last_resort = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "LastResortHE-Regular.ttf")
    if not os.path.exists(last_resort):
        pytest.skip(f"this matplotlib ({matplotlib.__version__}) ships no Last Resort font")
    charmap = ft2font.FT2Font(last_resort).get_charmap()
    assert all(ord(c) in charmap for c in plotting._PROBE)  # It claims the ideographs...
    assert not plotting._covers_cjk(last_resort)  # ...but has no glyph of their own for them.
    only = [e for e in font_manager.fontManager.ttflist if e.name == "DejaVu Sans"]
    only.append(font_manager.ttfFontProperty(ft2font.FT2Font(last_resort)))
    monkeypatch.setattr(font_manager.fontManager, "ttflist", only)
    monkeypatch.setattr(font_manager, "findSystemFonts", lambda *args, **kwargs: [])
    plotting.cjk_font_family.cache_clear()
    try:
        assert plotting.cjk_font_family() is None
    finally:
        plotting.cjk_font_family.cache_clear()


def test_cjk_labels_render_with_an_installed_font(tmp_path):
    family = plotting.cjk_font_family()
    if family is None:
        pytest.skip(f"no CJK font installed (apt-get install {plotting.CJK_FONT_PACKAGE})")
    labels = ["<s>", "我", "是", "学生", "。"]
    assert plotting.font_family(labels) == ["DejaVu Sans", family]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plotting.plot_attention_grid(np.full((1, 5, 5), 0.2, np.float32), labels, labels, "中文",
                                     tmp_path / "z.png")
    assert not [w for w in caught if "missing from font" in str(w.message)]  # No empty boxes.
    assert_png(tmp_path / "z.png")


def load_visualize_script():
    spec = importlib.util.spec_from_file_location("visualize_script", ROOT / "experiments" / "visualize.py")
    module = importlib.util.module_from_spec(spec)
    from absl import flags

    before = set(flags.FLAGS)
    spec.loader.exec_module(module)
    for name in set(flags.FLAGS) - before:  # Its flags (--beam_size, --out...) would clash with another
        delattr(flags.FLAGS, name)          # script loaded later in this worker (tests/test_benchmark.py).
    return module


def test_visualize_sentence_end_to_end(tiny, monkeypatch, tmp_path):
    """The script's path from a sentence to PNGs and summary, on a random tiny model (restore faked)."""
    visualize = load_visualize_script()
    model, variables = tiny
    words = tokenizer_lib.WordTokenizer(list(tokenizer_lib._RESERVED) + [f"w{i}" for i in range(61)])
    run = types.SimpleNamespace(model=model, params=variables["params"], label="7",
                                data=types.SimpleNamespace(inputs_tokenizer=words, targets_tokenizer=words))
    from flaxformer_lite import run as run_lib
    monkeypatch.setattr(run_lib, "restore", lambda workdir, checkpoint, average_last: run)
    paths, summary = visualize.visualize_sentence("unused", "w1 w2 w3", str(tmp_path), method="greedy",
                                                  extra_length=3)
    assert len(paths) == 6 and all(pathlib.Path(p).exists() for p in paths)
    assert "source tokens:  w1 w2 w3 </s>" in summary and "(greedy, checkpoint 7)" in summary
    assert "decoder inputs: <s>" in summary and "largest asymmetries" in summary
    assert (tmp_path / "attention_summary.txt").read_text(encoding="utf-8") == summary
    assert visualize.token_labels(words, [0, 1, 5]) == ["<pad>", "</s>", "w2"]
