"""Datasets as tensorflow-datasets builders, read back as random-access array_record sources.

Every dataset the project trains on goes through tfds, so that it is built once into a data directory, with
its ``dataset_info.json`` recording what it holds, and read back with ``builder.as_data_source()``: an
``ArrayRecordDataSource`` (``len`` and ``__getitem__``) of ``{'inputs': bytes, 'targets': bytes}``, which is
what the grain pipeline consumes. No TensorFlow is involved: tfds 4.9 writes array_record from a
``GeneratorBasedBuilder`` with plain Python when ``file_format='array_record'`` and TensorFlow is absent.

Three kinds of dataset, each described by a ``DatasetConfig``:

* ``scan``: SCAN (``scan.py``), builder ``flaxformer_lite_scan`` with configs ``simple``, ``length`` and
  ``addprim_jump``, splits ``train``/``test``. Also loadable as
  ``tfds.data_source('flaxformer_lite_scan/length', data_dir=...)`` once this module is imported.
* ``local``: a folder of parallel text files ``{split}.{lang}`` or ``{split}.{lang}.gz``, one sentence per
  line, line N of one language translating line N of the other. The build's config name carries a hash of
  the two languages' files (names and contents), so editing, adding or replacing one makes the next load
  build afresh in a new directory, and a build is never silently stale. Older builds stay where they are
  (another run may still read them); delete their folders, named
  ``{data_dir}/flaxformer_lite_parallel_text/{corpus}-{src}-{tgt}-{hash}``, by hand to reclaim the space.
* ``tfds``: any translation dataset of the tfds catalog (``wmt14_translate/de-en``), whose features are keyed
  by language code; the source and target languages are mapped to ``inputs`` and ``targets``.

``reverse=True`` swaps inputs and targets for any kind (``de-en`` read as en->de) without building twice.

tfds writes a build into a temporary folder and renames it when complete, so a build that fails (a bad
line in a corpus) or is interrupted leaves nothing that a later load would take for a finished dataset.

The entry points are ``load_split`` and ``get_splits``; ``prepare_builder`` gives the built tfds builder
(split names and sizes are in ``builder.info.splits``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import importlib
import itertools
import os
import re
from typing import Any

from absl import logging
from etils import epath
import tensorflow_datasets as tfds
from tensorflow_datasets.core import constants as tfds_constants
from tensorflow_datasets.core import utils as tfds_utils

from flaxformer_lite import errors
from flaxformer_lite.data import scan

KINDS = ("scan", "local", "tfds")

_ARRAY_RECORD = "array_record"
_FEATURES = ("inputs", "targets")
# Split names as tfds accepts them in split expressions like "newstest-2014[:100]+val".
_SPLIT_NAME = r"[\w-]+"


PathLike = os.PathLike | str
Source = Sequence[dict[str, Any]]
"""A random-access source of examples ``{'inputs': str | bytes, 'targets': str | bytes}``."""


class ParallelTextError(errors.UserError, ValueError):
    """A local parallel corpus cannot be built; the message names the file (and line) at fault."""


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """What dataset to read; the small set of fields the training configuration carries.

    Attributes:
      kind: ``'scan'``, ``'local'`` or ``'tfds'``.
      name: ``scan``: the split, one of ``scan.SPLIT_NAMES``; ``tfds``: the catalog name with its config,
        e.g. ``'wmt14_translate/de-en'``; unused for ``local``.
      path: ``local``: the folder of ``{split}.{lang}[.gz]`` files; unused otherwise.
      source_lang: ``local``: required; ``tfds``: the feature read as ``inputs`` (default: the dataset's first
        supervised key, e.g. ``de`` for ``de-en``); unused for ``scan``.
      target_lang: as ``source_lang``, for ``targets``.
      reverse: swap inputs and targets after the above.
    """

    kind: str
    name: str = ""
    path: str = ""
    source_lang: str = ""
    target_lang: str = ""
    reverse: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise errors.ConfigError(f"Unknown dataset kind {self.kind!r}; known: {', '.join(KINDS)}")
        if self.kind == "scan" and self.name not in scan.SPLIT_NAMES:
            raise errors.ConfigError(f"SCAN needs name = one of {', '.join(scan.SPLIT_NAMES)}; got {self.name!r}")
        if self.kind == "local" and not (self.path and self.source_lang and self.target_lang):
            raise errors.ConfigError(f"A local dataset needs path, source_lang and target_lang; got {self}")
        if self.kind == "local" and self.source_lang == self.target_lang:
            raise errors.ConfigError(f"source_lang and target_lang are both {self.source_lang!r}")
        if self.kind == "tfds" and not self.name:
            raise errors.ConfigError("A tfds dataset needs name, e.g. 'wmt14_translate/de-en'")
        if self.kind == "tfds" and bool(self.source_lang) != bool(self.target_lang):
            raise errors.ConfigError(f"Give both source_lang and target_lang, or neither; got {self}")

    @classmethod
    def from_any(cls, dataset: DatasetConfig | Mapping[str, Any]) -> DatasetConfig:
        """Accepts a ``DatasetConfig``, a dict, or an ``ml_collections.ConfigDict`` of its fields."""
        if isinstance(dataset, DatasetConfig):
            return dataset
        fields = dataset.to_dict() if hasattr(dataset, "to_dict") else dict(dataset)
        unknown = set(fields) - {field.name for field in dataclasses.fields(cls)}
        if unknown:
            raise errors.ConfigError(f"Unknown dataset fields {sorted(unknown)} in {fields}")
        return cls(**fields)


DatasetLike = DatasetConfig | Mapping[str, Any]
"""A ``DatasetConfig`` or a mapping (dict, ``ml_collections.ConfigDict``) of its fields."""


class FieldMappedSource(Sequence):
    """A random-access source whose examples are another source's, with keys renamed to inputs/targets.

    Reading is lazy (one record per ``__getitem__``); the object pickles, so grain workers can hold it.
    """

    def __init__(self, source: Sequence[Mapping[str, Any]], inputs_key: str, targets_key: str):
        self._source = source
        self._inputs_key = inputs_key
        self._targets_key = targets_key

    def __len__(self) -> int:
        return len(self._source)

    def _rename(self, example: Mapping[str, Any]) -> dict[str, Any]:
        return {"inputs": example[self._inputs_key], "targets": example[self._targets_key]}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._rename(self._source[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Batched read, which ``ArrayRecordDataSource`` (and so grain) does faster than one by one."""
        if hasattr(self._source, "__getitems__"):
            return [self._rename(example) for example in self._source.__getitems__(indices)]
        return [self[i] for i in indices]

    def __repr__(self) -> str:
        return f"FieldMappedSource({self._source!r}, inputs={self._inputs_key!r}, targets={self._targets_key!r})"


def _text_features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({key: tfds.features.Text() for key in _FEATURES})


class _ProjectBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of this module's builders: works around a tfds 4.9.10 bug so they build without extra packages.

    tfds' ``DatasetBuilder.code_path`` evaluates ``importlib_resources.abc.Traversable`` for any builder
    defined in a package, which needs the ``importlib_resources`` backport that tfds only declares for
    Python < 3.9 (github.com/tensorflow/datasets/issues/11212). Our builders download nothing, so the
    only use of ``code_path`` (finding a ``checksums.tsv`` next to the code) has no effect and we give it
    this file directly.
    """

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)


# ---------------------------------------------------------------------------------------------------------
# SCAN


class ScanBuilder(_ProjectBuilder):
    """SCAN generated from its grammar (``scan.py``); one builder config per split of the paper."""

    name = "flaxformer_lite_scan"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Generated from the grammar; simple, length and addprim_jump splits."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=split, description=f"SCAN {split} split") for split in scan.SPLIT_NAMES
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="SCAN (Lake & Baroni, 2018): navigation commands to action sequences.",
            features=_text_features(),
            supervised_keys=_FEATURES,
            # Examples are stored in the grammar order of scan.make_split; the training pipeline shuffles.
            disable_shuffling=True,
            homepage="https://github.com/brendenlake/SCAN",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the grammar is the data.
        splits = scan.make_split(self.builder_config.name)
        return {split: self._generate_examples(examples) for split, examples in splits.items()}

    def _generate_examples(self, examples):
        yield from enumerate(examples)


# ---------------------------------------------------------------------------------------------------------
# Local parallel text


@dataclasses.dataclass(frozen=True)
class ParallelFiles:
    """The two files of one split of a local parallel corpus."""

    split: str
    source: epath.Path
    target: epath.Path


def discover_parallel_files(path: PathLike, source_lang: str, target_lang: str) -> dict[str, ParallelFiles]:
    """Finds the splits of a folder of ``{split}.{lang}[.gz]`` files that have both languages.

    A split with a file in only one of the two languages is left out with a warning (a corpus may have a
    test set in some language pairs only); asking ``load_split`` for it names the missing file. Files in
    other languages are ignored.

    Raises:
      ParallelTextError: if the folder does not exist, a split has both a plain and a ``.gz`` file for one
        language, a split name has characters other than letters, digits, ``_`` and ``-``, or no split has
        both languages.
    """
    folder = epath.Path(path)
    if not folder.is_dir():
        raise ParallelTextError(f"Parallel text folder {folder} does not exist or is not a folder")
    found: dict[str, dict[str, epath.Path]] = {}
    for file in sorted(folder.iterdir()):
        stem = file.name.removesuffix(".gz")
        split, _, lang = stem.rpartition(".")
        if not split or lang not in (source_lang, target_lang) or not file.is_file():
            continue
        if not re.fullmatch(_SPLIT_NAME, split):
            raise ParallelTextError(f"{file}: split name {split!r} may only have letters, digits, '_' and '-'")
        if lang in found.setdefault(split, {}):
            raise ParallelTextError(
                f"{file} and {found[split][lang]} are both split {split!r}, language {lang!r}")
        found[split][lang] = file
    splits = {}
    for split, files in found.items():
        if source_lang in files and target_lang in files:
            splits[split] = ParallelFiles(split, files[source_lang], files[target_lang])
        else:
            present, missing = (source_lang, target_lang) if source_lang in files else (target_lang, source_lang)
            logging.warning("Leaving out split %r: %s has no %s counterpart (%s)",
                            split, files[present], missing, _expected_names(split, missing))
    if not splits:
        raise ParallelTextError(
            f"No split in {folder} has both {source_lang} and {target_lang} files "
            f"(expected pairs like {_expected_names('train', source_lang)} "
            f"with {_expected_names('train', target_lang)})")
    return splits


def _expected_names(split: str, lang: str) -> str:
    return f"{split}.{lang} or {split}.{lang}.gz"


def fingerprint_files(files: Mapping[str, ParallelFiles]) -> str:
    """A hash of the splits' names and their files' names and contents (compressed bytes for ``.gz``).

    Contents, not modification times, so that copying or touching a corpus does not rebuild it, while any
    edit does. Hashing runs at disk speed (about a second per GB) on every load.
    """
    digest = hashlib.sha256()
    for split in sorted(files):
        for file in (files[split].source, files[split].target):
            digest.update(f"{split}\0{file.name}\0".encode())
            with file.open("rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


@dataclasses.dataclass(kw_only=True)
class ParallelTextConfig(tfds.core.BuilderConfig):
    """One local corpus and language pair; ``name`` ends with the files' fingerprint."""

    path: str = ""
    source_lang: str = ""
    target_lang: str = ""


def parallel_text_config(path: PathLike, source_lang: str, target_lang: str) -> ParallelTextConfig:
    """The builder config of a folder's current contents, e.g. ``tatoeba_en_zh-en-zh-1f3a...``."""
    files = discover_parallel_files(path, source_lang, target_lang)
    folder = epath.Path(path).resolve()
    corpus = re.sub(r"\W+", "_", folder.name) or "corpus"
    return ParallelTextConfig(
        name=f"{corpus}-{source_lang}-{target_lang}-{fingerprint_files(files)[:16]}",
        description=f"{source_lang}->{target_lang} parallel text from {folder}",
        path=os.fspath(folder),
        source_lang=source_lang,
        target_lang=target_lang,
    )


class ParallelTextBuilder(_ProjectBuilder):
    """A folder of ``{split}.{lang}[.gz]`` files; build with a ``ParallelTextConfig``.

    Examples keep the files' line order (blank pairs removed), so that a test split's index lines up with
    its reference file. The count of skipped blank pairs per split is kept in
    ``info.metadata['skipped_blank_pairs']``.
    """

    name = "flaxformer_lite_parallel_text"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Plain and gzip'd text; blank pairs skipped."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.builder_config.description,
            features=_text_features(),
            supervised_keys=_FEATURES,
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(skipped_blank_pairs={}),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # The files are local.
        config = self.builder_config
        files = discover_parallel_files(config.path, config.source_lang, config.target_lang)
        return {split: self._generate_examples(split_files) for split, split_files in files.items()}

    def _generate_examples(self, files: ParallelFiles):
        blank = 0
        for index, (source, target) in enumerate(_read_parallel_lines(files.source, files.target)):
            if not source.strip() or not target.strip():
                blank += 1
                continue
            yield index, {"inputs": source, "targets": target}
        if blank:
            logging.warning("Skipped %d blank pairs in split %r (%s, %s)",
                            blank, files.split, files.source, files.target)
        self.info.metadata["skipped_blank_pairs"][files.split] = blank


def _read_lines(file: epath.Path) -> Iterator[str]:
    """A file's lines without their ``\\n`` or ``\\r\\n``, strictly decoded as UTF-8; a leading BOM is dropped.

    Lines are split on ``\\n`` only (not on the Unicode separators ``str.splitlines`` knows), so text is kept
    exactly as written.

    Raises:
      ParallelTextError: on an empty file, invalid UTF-8 (naming the line) or an unreadable gzip stream.
    """
    line_number = 0
    try:
        with (gzip.open(file, "rb") if file.name.endswith(".gz") else file.open("rb")) as f:
            for line_number, raw in enumerate(f, start=1):
                raw = raw.removesuffix(b"\n").removesuffix(b"\r")
                if line_number == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise ParallelTextError(
                        f"{file}, line {line_number}: invalid UTF-8 ({error.reason} at byte {error.start})"
                    ) from None
    except (OSError, EOFError) as error:
        where = f" after line {line_number}" if line_number else ""
        raise ParallelTextError(f"{file}: cannot read it{where} ({error})") from error
    if line_number == 0:
        raise ParallelTextError(f"{file} is empty")


def _read_parallel_lines(source_file: epath.Path, target_file: epath.Path) -> Iterator[tuple[str, str]]:
    """Line pairs of two files, checking that they have the same number of lines."""
    source_lines, target_lines = _read_lines(source_file), _read_lines(target_file)
    missing = object()
    pairs_or_missing = itertools.zip_longest(source_lines, target_lines, fillvalue=missing)
    for pairs, (source, target) in enumerate(pairs_or_missing):
        if source is missing or target is missing:
            # One file ended; count the rest of the other to report both lengths.
            source_total = pairs + (source is not missing) + sum(1 for _ in source_lines)
            target_total = pairs + (target is not missing) + sum(1 for _ in target_lines)
            raise ParallelTextError(
                f"{source_file} has {source_total} lines but {target_file} has {target_total}; "
                "line N of one must translate line N of the other")
        yield source, target


# ---------------------------------------------------------------------------------------------------------
# The tfds catalog


def _catalog_builder(name: str, data_dir: PathLike) -> tfds.core.DatasetBuilder:
    """``tfds.builder(name)``, registering the catalog's translation builders first.

    tfds imports its legacy builder packages in a fixed order and stops at the first that fails to import;
    without optional packages such as h5py that happens before ``tensorflow_datasets.translate``, so
    ``wmt14_translate`` and the other translation builders would be "not found". Importing the package
    ourselves registers them (it needs no TensorFlow).
    """
    try:
        importlib.import_module("tensorflow_datasets.translate")
    except ImportError as error:
        logging.warning("Could not import tensorflow_datasets.translate (%s); only other builders are known",
                        error)
    return tfds.builder(name, data_dir=data_dir, file_format=_ARRAY_RECORD)


def _catalog_keys(builder: tfds.core.DatasetBuilder, dataset: DatasetConfig) -> tuple[str, str]:
    """The catalog features read as inputs and targets, before ``reverse``."""
    available = list(builder.info.features.keys())
    if dataset.source_lang:
        keys = (dataset.source_lang, dataset.target_lang)
    else:
        supervised = builder.info.supervised_keys
        is_pair = isinstance(supervised, tuple) and len(supervised) == 2
        if not (is_pair and all(isinstance(key, str) for key in supervised)):
            raise errors.ConfigError(f"{dataset.name} has no (source, target) supervised keys; set source_lang and "
                                     f"target_lang to two of its features: {available}")
        keys = supervised
    for key in keys:
        if key not in available:
            raise errors.ConfigError(f"{dataset.name} has no feature {key!r}; its features are {available}")
    return keys


# ---------------------------------------------------------------------------------------------------------
# Entry points


def prepare_builder(dataset: DatasetLike, data_dir: PathLike | None) -> tfds.core.DatasetBuilder:
    """The dataset's tfds builder, built into ``data_dir`` as array_record unless already there.

    A catalog dataset that is not yet built is downloaded and prepared by tfds, which may need network
    access and, for some datasets, more than this project installs.
    """
    dataset = DatasetConfig.from_any(dataset)
    data_dir = None if data_dir is None else os.fspath(data_dir)  # None: tfds's default (~/tensorflow_datasets).
    with _one_builder_at_a_time(data_dir):
        return _prepare_builder(dataset, data_dir)


@contextlib.contextmanager
def _one_builder_at_a_time(data_dir: str | None):
    """An exclusive lock on a local ``data_dir`` while a builder is made and prepared.

    Several processes on one machine (sweep workers, two runs started together) may ask for the same
    dataset: the first builds it, the others wait, then find it built. tfds alone lets them all build and
    the losers fail renaming their temporary folder. Remote data dirs (``gs://``) are not locked: there
    several hosts of one run already build in turn (process 0 first).
    """
    root = data_dir or tfds_constants.DATA_DIR
    if "://" in root:
        yield
        return
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".flaxformer_lite_build.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _prepare_builder(dataset: DatasetConfig, data_dir: str | None) -> tfds.core.DatasetBuilder:
    if dataset.kind == "scan":
        builder = ScanBuilder(config=dataset.name, data_dir=data_dir, file_format=_ARRAY_RECORD)
    elif dataset.kind == "local":
        config = parallel_text_config(dataset.path, dataset.source_lang, dataset.target_lang)
        builder = ParallelTextBuilder(config=config, data_dir=data_dir, file_format=_ARRAY_RECORD)
    else:
        builder = _catalog_builder(dataset.name, data_dir)
    if not builder.is_prepared():
        logging.info("Building %s into %s", builder.info.full_name, builder.data_dir)
    try:
        builder.download_and_prepare(file_format=_ARRAY_RECORD)
    except ModuleNotFoundError as error:
        if error.name != "importlib_resources":
            raise
        raise RuntimeError(
            f"tfds needs the importlib_resources package to build the catalog dataset {dataset.name} (a tfds "
            "4.9.10 bug, github.com/tensorflow/datasets/issues/11212): pip install importlib_resources"
        ) from error
    return builder


def get_splits(dataset: DatasetLike, data_dir: PathLike | None) -> dict[str, Source]:
    """Every split of the dataset, by name, as random-access sources of ``{'inputs', 'targets'}`` examples."""
    dataset = DatasetConfig.from_any(dataset)
    builder = prepare_builder(dataset, data_dir)
    return {split: _as_source(builder, dataset, split) for split in builder.info.splits}


def load_split(dataset: DatasetLike, split: str, data_dir: PathLike | None) -> Source:
    """One split as a random-access source (``len``, ``__getitem__``) of ``{'inputs', 'targets'}`` examples.

    Args:
      dataset: a ``DatasetConfig`` or a mapping of its fields, e.g.
        ``{'kind': 'local', 'path': '/data/multi30k', 'source_lang': 'en', 'target_lang': 'de'}``.
      split: a split name, or any tfds split expression (``'train[:1000]'``, ``'train+val'``).
      data_dir: where tfds keeps built datasets; built here on first use.

    Texts are ``bytes`` (UTF-8) for built datasets; the tokenizer accepts ``str`` or ``bytes``.
    """
    dataset = DatasetConfig.from_any(dataset)
    builder = prepare_builder(dataset, data_dir)
    _check_split(dataset, split, builder)
    return _as_source(builder, dataset, split)


def _check_split(dataset: DatasetConfig, split: str, builder: tfds.core.DatasetBuilder) -> None:
    """Names a missing split (for a local corpus, the files it would need), clearer than tfds' error."""
    known = builder.info.splits  # Empty only for tfds' mock data (tests), which serves any split.
    for name in re.findall(rf"({_SPLIT_NAME})(?:\[[^\]]*\])?", split):
        if not known or name in known:
            continue
        if dataset.kind != "local":
            raise errors.NotFoundError(f"no split {name!r} in {builder.info.full_name}; its splits are "
                                       f"{', '.join(sorted(known))}")
        folder = epath.Path(dataset.path)
        missing = [_expected_names(name, lang) for lang in (dataset.source_lang, dataset.target_lang)
                   if not any((folder / f"{name}.{lang}{suffix}").exists() for suffix in ("", ".gz"))]
        raise ParallelTextError(
            f"No split {name!r} in {folder}: missing {' and '.join(missing)} "
            f"(splits with both languages: {', '.join(builder.info.splits)})")


def _as_source(builder: tfds.core.DatasetBuilder, dataset: DatasetConfig, split: str) -> Source:
    source = builder.as_data_source(split=split)
    inputs_key, targets_key = _catalog_keys(builder, dataset) if dataset.kind == "tfds" else _FEATURES
    if dataset.reverse:
        inputs_key, targets_key = targets_key, inputs_key
    if (inputs_key, targets_key) == _FEATURES:
        return source
    return FieldMappedSource(source, inputs_key, targets_key)
