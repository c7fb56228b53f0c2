"""Attention maps of one translated sentence, and training curves, of a run, as PNG files.

    python experiments/visualize.py --workdir=runs/m30k --text="A man is riding a bike."
    python experiments/visualize.py --workdir=workdir/scan --text="jump twice after walk left" --method=beam
    python experiments/visualize.py --workdir=workdir/scan --curves      # works while the run is training

With ``--text`` the sentence is translated (greedy or beam search), then ONE teacher-forced forward pass on
(source, translation) captures every layer's attention probabilities, written to ``--out`` (default
``WORKDIR/visualize``) as:

* ``encoder_self_layer<i>.png``: encoder self-attention, one panel per head (source x source);
* ``decoder_self_layer<i>.png``: decoder masked self-attention (decoder inputs x decoder inputs);
* ``cross_layer<i>.png``: encoder-decoder attention (decoder inputs as rows, source as columns);
* ``attention_summary.txt`` (also printed): per layer, the token each token attends to most (averaged
  over heads) and the largest asymmetries |A(i->j) - A(j->i)| of the encoder self-attention.

Decoder inputs are the target shifted right: ``<s>`` (the start token) then the translation without its
final ``</s>``; row ``i`` of a decoder map is the position that predicts target token ``i``. Labels are the
tokenizer's pieces (SentencePiece pieces, ``▁`` marking a word start; words for a word vocabulary).

With ``--curves``, ``curves.png`` plots loss, token accuracy, learning rate and BLEU / exact match against
steps from ``metrics.jsonl`` (no checkpoint is loaded). Chinese labels need a CJK font: see
``flaxformer_lite/plotting.py``.
"""

import os
import sys

from absl import app, flags, logging
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Run from a checkout.

from flaxformer_lite import backend  # noqa: E402
from flaxformer_lite import config as config_lib  # noqa: E402
from flaxformer_lite import errors, plotting, storage  # noqa: E402

config_lib.register_jax_flags()  # --jax_* flags (--jax_platforms=cpu, --jax_log_compiles, ...).
backend.keep_host_memory_for_reuse()  # Before JAX starts its threads: see its docstring.

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by experiments/train.py.", required=True)
_TEXT = flags.DEFINE_string("text", None, "Source sentence whose attention maps to draw.")
_CURVES = flags.DEFINE_bool("curves", False, "Plot the training curves of metrics.jsonl.")
_OUT = flags.DEFINE_string("out", None, "Output folder; default WORKDIR/visualize.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "latest, best, or a step number.")
_AVERAGE = flags.DEFINE_integer("average_last", 0, "Average the parameters of the last K checkpoints.")
_METHOD = flags.DEFINE_enum("method", "greedy", ["greedy", "beam"], "Decoding method of the translation.")
_BEAM = flags.DEFINE_integer("beam_size", 4, "Beam size.")
_ALPHA = flags.DEFINE_float("alpha", 0.6, "Length penalty exponent of beam search.")
_EXTRA = flags.DEFINE_integer("extra_length", 50, "The translation may have up to (source length + this) "
                              "tokens.")
_TOP = flags.DEFINE_integer("top_asymmetries", 5, "Asymmetric encoder pairs listed per layer.")

START_LABEL = "<s>"


def token_labels(tokenizer, ids) -> list[str]:
    """Display strings of token ids: the tokenizer's pieces (or words), '<pad>' and '</s>' for 0 and 1."""
    labels = []
    for i in (int(i) for i in ids):
        if i == tokenizer.pad_id:
            labels.append("<pad>")
        elif i == tokenizer.eos_id:
            labels.append("</s>")
        elif hasattr(tokenizer, "id_to_piece"):
            labels.append(tokenizer.id_to_piece(i))
        elif hasattr(tokenizer, "words") and 0 <= i < len(tokenizer.words):
            labels.append(tokenizer.words[i])
        else:
            labels.append(tokenizer.decode([i]) or f"#{i}")
    return labels


def translate(model, params, inputs: np.ndarray, method: str, beam_size: int, alpha: float, eos_id: int,
              extra_length: int = 50) -> list[int]:
    """Target ids of the translation of ``inputs [1, s]``, EOS included when the model emitted one."""
    from flaxformer_lite import decoding  # pylint: disable=import-outside-toplevel

    decoded = decoding.decode_batch(model, params, inputs, decoding.DecodeConfig(
        method=method, beam_size=beam_size, alpha=alpha, eos_id=eos_id, extra_length=extra_length))
    tokens = np.asarray(decoded.tokens[0])[: int(decoded.lengths[0])].tolist()
    return tokens or [eos_id]  # An empty translation still gets one decoder position.


def visualize_sentence(workdir: str, text: str, out_dir: str, *, checkpoint: str = "latest",
                       average_last: int = 0, method: str = "greedy", beam_size: int = 4, alpha: float = 0.6,
                       extra_length: int = 50, top_asymmetries: int = 5) -> tuple[list[str], str]:
    """Translates ``text`` with the run in ``workdir`` and writes its attention maps and summary to
    ``out_dir``; returns (PNG paths, summary text)."""
    from flaxformer_lite import run as run_lib  # pylint: disable=import-outside-toplevel

    run = run_lib.restore(workdir, checkpoint, average_last)
    source_tok, target_tok = run.data.inputs_tokenizer, run.data.targets_tokenizer
    source_ids = source_tok.encode(text) + [source_tok.eos_id]
    inputs = np.array([source_ids], np.int32)
    target_ids = translate(run.model, run.params, inputs, method, beam_size, alpha, target_tok.eos_id,
                           extra_length)
    translation = target_tok.decode(target_ids)
    _, maps = plotting.capture_attention(run.model, run.params, inputs, np.array([target_ids], np.int32))

    source_labels = token_labels(source_tok, source_ids)
    decoder_labels = [START_LABEL] + token_labels(target_tok, target_ids[:-1])
    written = plotting.write_attention_figures(maps, source_labels, decoder_labels, out_dir,
                                               title_suffix=f" (checkpoint {run.label})")
    summary = "\n".join([
        f"source:      {text}",
        f"translation: {translation}   ({method}, checkpoint {run.label})",
        f"source tokens:  {' '.join(source_labels)}",
        f"decoder inputs: {' '.join(decoder_labels)}",
        "",
        plotting.attention_summary(maps, source_labels, decoder_labels, top_asymmetries=top_asymmetries),
    ])
    storage.write(storage.as_path(out_dir) / "attention_summary.txt", summary)
    return [path for path, _ in written], summary


def visualize_curves(workdir: str, out_dir: str) -> str:
    """Writes ``curves.png`` from the run's ``metrics.jsonl``; returns its path."""
    from flaxformer_lite import run as run_lib  # pylint: disable=import-outside-toplevel

    run_dir = run_lib.RunDir.of(workdir)
    if not run_dir.metrics.exists():
        raise errors.NotFoundError(f"{run_dir.metrics} not found: is {workdir} the workdir of a training run?")
    path = storage.as_path(out_dir) / "curves.png"
    plotting.plot_curves(plotting.read_metrics(run_dir.metrics), path, title=run_dir.root.name)
    return str(path)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _TEXT.value and not _CURVES.value:
        raise app.UsageError("give --text=SENTENCE (attention maps) and/or --curves (training curves)")
    if _OUT.value:
        out_dir = _OUT.value
    else:
        from flaxformer_lite import run as run_lib  # pylint: disable=import-outside-toplevel
        out_dir = str(run_lib.RunDir.of(_WORKDIR.value).visualize)
    if _CURVES.value:
        path = visualize_curves(_WORKDIR.value, out_dir)
        logging.info("wrote %s", path)
        print(path, flush=True)
    if _TEXT.value:
        paths, summary = visualize_sentence(
            _WORKDIR.value, _TEXT.value, out_dir, checkpoint=_CHECKPOINT.value, average_last=_AVERAGE.value,
            method=_METHOD.value, beam_size=_BEAM.value, alpha=_ALPHA.value,
            extra_length=_EXTRA.value, top_asymmetries=_TOP.value)
        print(summary, flush=True)
        for path in paths + [str(storage.as_path(out_dir) / "attention_summary.txt")]:
            print(path, flush=True)


if __name__ == "__main__":
    errors.run(main)
