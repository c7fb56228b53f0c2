"""Tokenizers: SentencePiece for natural language, a whitespace word vocabulary for SCAN.

Both share one small interface (``encode``/``encode_batch``/``decode``, ``vocab_size``, ``pad_id``,
``eos_id``, ``unk_id``) and the project's reserved ids: pad = 0, EOS = 1, unk = 2, no BOS (the decoder
starts from id 0). ``encode`` never appends EOS; the input pipeline does, so that truncation and packing see the true length.

Vocabularies are trained on the training split the first time a run needs them and stored in the run's
directory (``workdir/vocab``); every later call (resume, evaluation) loads the stored file instead of
retraining, so a run's token ids never change under it. Training writes to a temporary name and renames,
so a crash mid-training never leaves a half-written model that a later run would silently load. A small JSON
sidecar records the settings a vocabulary was built with; asking for different settings in a directory
that already holds a vocabulary is an error rather than a silent reuse of the wrong one.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import json
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from absl import logging
from etils import epath
import sentencepiece as spm

from flaxformer_lite import storage

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
_RESERVED = ("<pad>", "</s>", "<unk>")


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """How to build (or which stored) vocabulary to use."""

    kind: str = "sentencepiece"  # 'sentencepiece' for text; 'word' for whitespace-split data (SCAN).
    vocab_size: int = 8000  # SentencePiece vocabulary size, reserved ids and 256 byte pieces included.
    model_type: str = "unigram"  # SentencePiece algorithm: 'unigram' or 'bpe'.
    shared: bool = True  # One vocabulary over source and target text; False trains one per side.
    character_coverage: float = 0.9995  # Share of characters covered by pieces; the rest go to byte fallback.
    byte_fallback: bool = True  # Unseen characters become UTF-8 byte pieces, not <unk>: nothing is lost.
    hard_vocab_limit: bool = True  # False lets tiny corpora end with fewer pieces than vocab_size.
    max_training_sentences: int = 2_000_000  # Cap on sentences sampled (seeded reservoir) to train on.
    sample_seed: int = 0  # Seed of that sample, so retraining from scratch gives the same vocabulary.
    # 'identity' keeps text as written, so decode(encode(x)) == x (up to whitespace runs) and hypotheses are
    # scored against raw references in their own characters; 'nmt_nfkc' would turn e.g. Chinese full-width
    # '，' into ',' and cost BLEU against references that keep it.
    normalization_rule_name: str = "identity"
    num_threads: int = 2  # SentencePiece trainer/encoder threads.


class Tokenizer(abc.ABC):
    """What the pipeline and the decoding code need from a vocabulary."""

    pad_id: int = PAD_ID
    eos_id: int = EOS_ID
    unk_id: int = UNK_ID

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, reserved ones included (the model's embedding size must be at least this)."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without EOS."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` over many texts; subclasses override it where a batched call is faster."""
        return [self.encode(t) for t in texts]

    @abc.abstractmethod
    def _decode_clean(self, ids: list[int]) -> str:
        """Decodes ids that contain neither pad nor EOS."""

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: stops at the first EOS and drops padding, so raw model output can be passed in."""
        clean = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i != self.pad_id:
                clean.append(i)
        return self._decode_clean(clean)


class SentencePieceTokenizer(Tokenizer):
    """A trained SentencePiece model (``.model`` file)."""

    def __init__(self, model_path, num_threads: int = 2):
        self.model_path = model_path
        self._num_threads = num_threads
        # Read through epath (the file may be on gs://): SentencePiece itself opens local files only.
        self._sp = spm.SentencePieceProcessor(model_proto=storage.as_path(model_path).read_bytes())
        ids = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id(), self._sp.bos_id())
        if ids != (PAD_ID, EOS_ID, UNK_ID, -1):
            raise ValueError(f"{model_path}: (pad, eos, unk, bos) ids are {ids}, expected (0, 1, 2, -1).")

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=self._num_threads)

    def _decode_clean(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))


class WordTokenizer(Tokenizer):
    """Whitespace words, for already tokenized data such as SCAN; words unseen in training map to unk."""

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if tuple(words[:3]) != _RESERVED:
            raise ValueError(f"a word vocabulary must start with {_RESERVED}, got {words[:3]}")
        self.words = words
        self._ids = {w: i for i, w in enumerate(words)}
        if len(self._ids) != len(words):
            raise ValueError("duplicate words in vocabulary")

    @classmethod
    def build(cls, texts: Iterable[str]) -> WordTokenizer:
        """Vocabulary of every word in ``texts``, most frequent first (ties alphabetical: deterministic)."""
        counts = collections.Counter(w for t in texts for w in t.split())
        for reserved in _RESERVED:
            counts.pop(reserved, None)
        ordered = sorted(counts, key=lambda w: (-counts[w], w))
        return cls(list(_RESERVED) + ordered)

    @classmethod
    def load(cls, path) -> WordTokenizer:
        return cls(json.loads(storage.as_path(path).read_text(encoding="utf-8"))["words"])

    def save(self, path) -> None:
        """Writes the vocabulary whole (no reader sees part of it)."""
        storage.write(path, json.dumps({"words": self.words}, ensure_ascii=False, indent=0))

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(w, UNK_ID) for w in text.split()]

    def _decode_clean(self, ids: list[int]) -> str:
        return " ".join(self.words[i] if 0 <= i < len(self.words) else self.words[UNK_ID] for i in ids)


def to_text(value: Any) -> str:
    """Example fields arrive as ``str`` or as UTF-8 ``bytes`` (tfds ``data_source`` Text features)."""
    if isinstance(value, bytes):  # np.bytes_ is a bytes subclass.
        return value.decode("utf-8")
    if isinstance(value, str):
        return value
    if hasattr(value, "item"):  # A 0-d numpy array holding either of the above.
        return to_text(value.item())
    raise TypeError(f"expected str or bytes, got {type(value)}")


def example_texts(source: Any, keys: Sequence[str] = ("inputs", "targets")) -> Iterable[str]:
    """The text of ``keys`` of every example of a random-access source, decoded to str."""
    for i in range(len(source)):
        example = source[i]
        for key in keys:
            yield to_text(example[key])


def sample_texts(texts: Iterable[str], max_count: int, seed: int) -> list[str]:
    """A seeded uniform sample of at most ``max_count`` non-empty texts (reservoir sampling, one pass).

    The vocabulary should reflect the whole split, not its first lines (files are often sorted by source or
    length), and the corpus may be far larger than what SentencePiece needs, so we sample while streaming.
    """
    rng = random.Random(seed)
    reservoir: list[str] = []
    seen = 0
    for text in texts:
        if not text.strip():
            continue
        if len(reservoir) < max_count:
            reservoir.append(text)
        else:
            j = rng.randrange(seen + 1)
            if j < max_count:
                reservoir[j] = text
        seen += 1
    return reservoir


def _settings(config: TokenizerConfig) -> dict[str, Any]:
    """The settings that determine a stored vocabulary's content (compared on reuse)."""
    if config.kind == "word":
        return {"kind": "word"}
    return {
        "kind": "sentencepiece",
        "vocab_size": config.vocab_size,
        "model_type": config.model_type,
        "character_coverage": config.character_coverage,
        "byte_fallback": config.byte_fallback,
        "normalization_rule_name": config.normalization_rule_name,
    }


def train_sentencepiece(texts: Sequence[str], model_path, config: TokenizerConfig) -> None:
    """Trains a SentencePiece model on ``texts`` and writes ``model_path`` (local or ``gs://``) whole.

    Training happens in a local temporary directory; the finished ``.vocab`` listing, then the ``.model``,
    are written to their places only when it is done.
    """
    if config.model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type must be 'unigram' or 'bpe', got {config.model_type!r}")
    if not texts:
        raise ValueError("no training text for SentencePiece")
    with tempfile.TemporaryDirectory(prefix="flaxformer-spm-") as tmp:
        prefix = os.path.join(tmp, "spm")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_prefix=prefix,
            vocab_size=config.vocab_size,
            model_type=config.model_type,
            character_coverage=config.character_coverage,
            byte_fallback=config.byte_fallback,
            hard_vocab_limit=config.hard_vocab_limit,
            normalization_rule_name=config.normalization_rule_name,
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            bos_id=-1,
            # We sampled already; let SentencePiece use every sentence it is given, in order.
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=config.num_threads,
            minloglevel=2,
        )
        model_path = storage.as_path(model_path)
        storage.write(model_path.with_suffix(".vocab"), epath.Path(prefix + ".vocab").read_bytes())
        storage.write(model_path, epath.Path(prefix + ".model").read_bytes())


def load_or_train_tokenizer(
    config: TokenizerConfig,
    directory,
    texts: Callable[[], Iterable[str]],
    name: str = "spm",
) -> Tokenizer:
    """Loads vocabulary ``name`` from ``directory``, training it on ``texts()`` first if it is not there.

    Args:
      config: what kind of vocabulary to build; must match the stored one's settings when reusing.
      directory: where vocabularies live, e.g. ``workdir/vocab``.
      texts: called only when training is needed; yields the training text (str),
        e.g. ``lambda: example_texts(train)``.
      name: file stem, so that one directory can hold a shared or an inputs and a targets vocabulary.

    Returns:
      The tokenizer. Files: ``{name}.model``/``.vocab`` (SentencePiece) or ``{name}.json`` (word level),
      and ``{name}.settings.json`` recording the settings used.
    """
    if config.kind not in ("sentencepiece", "word"):
        raise ValueError(f"tokenizer kind must be 'sentencepiece' or 'word', got {config.kind!r}")
    directory = storage.as_path(directory)
    settings = _settings(config)
    settings_path = directory / f"{name}.settings.json"
    path = directory / (f"{name}.json" if config.kind == "word" else f"{name}.model")

    if path.exists():
        if settings_path.exists():
            stored = json.loads(settings_path.read_text(encoding="utf-8"))
            if stored != settings:
                raise ValueError(
                    f"{path} was built with {stored}, but the config asks for {settings}; "
                    "use a fresh directory or delete the stored vocabulary."
                )
        logging.info("Reusing vocabulary %s", path)
    else:
        start = time.time()
        # Settings first: a model file is then never without them (a crash before it lands just retrains).
        storage.write(settings_path, json.dumps(settings, indent=1, sort_keys=True))
        if config.kind == "word":
            WordTokenizer.build(texts()).save(path)
        else:
            sample = sample_texts(texts(), config.max_training_sentences, config.sample_seed)
            logging.info(
                "Training SentencePiece (%s, %d pieces) on %d sentences",
                config.model_type,
                config.vocab_size,
                len(sample),
            )
            train_sentencepiece(sample, path, config)
        logging.info("Built vocabulary %s in %.1f s", path, time.time() - start)

    if config.kind == "word":
        return WordTokenizer.load(path)
    return SentencePieceTokenizer(path, num_threads=config.num_threads)


def load_or_train_tokenizers(
    config: TokenizerConfig, directory, train_source: Any
) -> tuple[Tokenizer, Tokenizer]:
    """The (inputs, targets) tokenizers of a run, built from its training split on first use.

    With ``config.shared`` both are the same object, trained on both sides' text (``spm.model`` or
    ``words.json``); otherwise ``spm_inputs``/``spm_targets`` (or ``words_*``) are trained on their own side.
    """
    base = "spm" if config.kind == "sentencepiece" else "words"
    if config.shared:
        tokenizer = load_or_train_tokenizer(config, directory, lambda: example_texts(train_source), name=base)
        return tokenizer, tokenizer
    inputs = load_or_train_tokenizer(
        config, directory, lambda: example_texts(train_source, ("inputs",)), name=f"{base}_inputs"
    )
    targets = load_or_train_tokenizer(
        config, directory, lambda: example_texts(train_source, ("targets",)), name=f"{base}_targets"
    )
    return inputs, targets
