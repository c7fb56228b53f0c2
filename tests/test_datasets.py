"""tfds builders read back as array_record data sources, without TensorFlow: SCAN, local text, the catalog."""

import gzip
import importlib.util
import logging
import os
import pickle
import sys

import pytest
import tensorflow_datasets as tfds

from flaxformer_lite.data import datasets
from flaxformer_lite.data import scan

# Text that must survive byte for byte: CJK punctuation, an ideographic space at the end, an emoji outside
# the BMP, a combining accent, and a Unicode line separator that str.splitlines would break on.
CHINESE = ["我是个学生。", "他喜欢橙子　", "胡萝卜要三美元！🥕", "cafe\u0301\u2028next"]
ENGLISH = ["I am a student.", "He likes oranges.", "The carrots cost three dollars!", "cafe next"]


def write_lines(path, lines, *, gz=False):
    """Writes lines joined by newlines; ``lines`` may be bytes for raw content."""
    data = lines if isinstance(lines, bytes) else ("\n".join(lines) + "\n").encode("utf-8")
    if gz:
        with gzip.open(f"{path}.gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def local(path, source_lang="en", target_lang="zh", **kwargs):
    return {"kind": "local", "path": os.fspath(path), "source_lang": source_lang, "target_lang": target_lang,
            **kwargs}


def texts(source):
    return [(ex["inputs"].decode(), ex["targets"].decode()) for ex in (source[i] for i in range(len(source)))]


@pytest.fixture(scope="session")
def scan_data_dir(tmp_path_factory):
    """One data directory for the SCAN builds, shared by the tests (each config builds in about a second)."""
    return tmp_path_factory.mktemp("scan_data")


def test_tensorflow_is_not_installed():
    assert importlib.util.find_spec("tensorflow") is None
    with pytest.raises(ImportError):
        import tensorflow  # noqa: F401


# ---------------------------------------------------------------------------------------------------------
# SCAN


@pytest.mark.parametrize(
    "name, train_size, test_size",
    [("simple", 16_728, 4_182), ("length", 16_990, 3_920), ("addprim_jump", 14_670, 7_706)],
)
def test_scan_builder_round_trip(scan_data_dir, name, train_size, test_size):
    splits = datasets.get_splits({"kind": "scan", "name": name}, scan_data_dir)
    assert {split: len(source) for split, source in splits.items()} == {"train": train_size, "test": test_size}
    expected = scan.make_split(name)
    # Stored in the generator's order, so the sources line up with make_split.
    for split in ("train", "test"):
        for index in (0, len(expected[split]) // 2, len(expected[split]) - 1):
            example = splits[split][index]
            assert {key: value.decode() for key, value in example.items()} == expected[split][index]
    assert "tensorflow" not in sys.modules


def test_scan_example_and_tfds_data_source(scan_data_dir):
    test = datasets.load_split({"kind": "scan", "name": "length"}, "test", scan_data_dir)
    examples = texts(test)
    assert ("jump around right thrice and walk", " ".join(["RTURN JUMP"] * 12 + ["WALK"])) in examples
    # The builder is registered, so plain tfds finds the build too.
    source = tfds.data_source("flaxformer_lite_scan/length", split="test", data_dir=os.fspath(scan_data_dir))
    assert len(source) == 3_920
    assert source[0] == test[0]


def test_scan_reverse_and_split_slicing(scan_data_dir):
    reverse = {"kind": "scan", "name": "simple", "reverse": True}
    source = datasets.load_split(reverse, "train[:10]", scan_data_dir)
    assert len(source) == 10
    first_ten = scan.make_split("simple")["train"][:10]
    assert texts(source) == [(ex["targets"], ex["inputs"]) for ex in first_ten]


# ---------------------------------------------------------------------------------------------------------
# Local parallel text


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_local_corpus_round_trip_keeps_text_exact(tmp_path, gz):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_lines(corpus / "train.en", ENGLISH, gz=gz)
    write_lines(corpus / "train.zh", CHINESE, gz=gz)
    write_lines(corpus / "test_2016-flickr.en", ENGLISH[:2], gz=gz)
    write_lines(corpus / "test_2016-flickr.zh", CHINESE[:2], gz=gz)
    write_lines(corpus / "train.fr", ["ignored"], gz=gz)  # another language: not part of en-zh
    (corpus / "README.md").write_text("not a split\n")

    splits = datasets.get_splits(local(corpus), tmp_path / "data")
    assert sorted(splits) == ["test_2016-flickr", "train"]
    assert texts(splits["train"]) == list(zip(ENGLISH, CHINESE))  # file order kept
    assert texts(splits["test_2016-flickr"]) == list(zip(ENGLISH[:2], CHINESE[:2]))
    sliced = datasets.load_split(local(corpus), "test_2016-flickr[1:]+train[:1]", tmp_path / "data")
    assert texts(sliced) == [(ENGLISH[1], CHINESE[1]), (ENGLISH[0], CHINESE[0])]
    assert "tensorflow" not in sys.modules


def test_local_corpus_reverse_crlf_and_bom(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_lines(corpus / "dev.en", b"\xef\xbb\xbfHello.\r\nBye.\r\n")
    write_lines(corpus / "dev.zh", "你好。\n再见。".encode())  # no final newline
    source = datasets.load_split(local(corpus, reverse=True), "dev", tmp_path / "data")
    assert texts(source) == [("你好。", "Hello."), ("再见。", "Bye.")]


def test_local_corpus_is_built_once_and_rebuilt_when_a_file_changes(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_lines(corpus / "train.en", ENGLISH)
    write_lines(corpus / "train.zh", CHINESE)
    data_dir = tmp_path / "data"
    first = datasets.prepare_builder(local(corpus), data_dir)
    again = datasets.prepare_builder(local(corpus), data_dir)
    assert again.data_dir == first.data_dir
    built = os.stat(os.path.join(first.data_dir, "dataset_info.json")).st_mtime_ns
    assert os.stat(os.path.join(again.data_dir, "dataset_info.json")).st_mtime_ns == built  # reused
    os.utime(corpus / "train.en", ns=(0, 0))  # touching (or copying) the files does not rebuild
    assert datasets.prepare_builder(local(corpus), data_dir).data_dir == first.data_dir

    # A change that keeps the file's size: contents are what is hashed.
    write_lines(corpus / "train.zh", ["我是个老师。", *CHINESE[1:]])
    changed = datasets.load_split(local(corpus), "train", data_dir)
    assert texts(changed)[0] == ("I am a student.", "我是个老师。")
    assert datasets.prepare_builder(local(corpus), data_dir).data_dir != first.data_dir


def test_blank_pairs_are_skipped_and_counted(tmp_path, caplog):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_lines(corpus / "train.en", ["one", "", "three", "four", "   ", "six"])
    write_lines(corpus / "train.zh", ["一", "二", "\t", "四", "五", "六"])
    with caplog.at_level(logging.WARNING):
        builder = datasets.prepare_builder(local(corpus), tmp_path / "data")
    source = builder.as_data_source(split="train")
    assert texts(source) == [("one", "一"), ("four", "四"), ("six", "六")]
    assert builder.info.metadata["skipped_blank_pairs"] == {"train": 3}
    assert any("Skipped 3 blank pairs in split 'train'" in record.getMessage() for record in caplog.records)
    # The count is stored with the build and read back by a later load.
    reloaded = datasets.prepare_builder(local(corpus), tmp_path / "data")
    assert reloaded.info.metadata["skipped_blank_pairs"] == {"train": 3}


def _corpus(tmp_path, files):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, lines in files.items():
        write_lines(corpus / name.removesuffix(".gz"), lines, gz=name.endswith(".gz"))
    return corpus


def test_missing_split_names_the_expected_files(tmp_path):
    corpus = _corpus(tmp_path, {"train.en": ENGLISH, "train.zh": CHINESE})
    expected = r"No split 'test'.*test\.en or test\.en\.gz and test\.zh"
    with pytest.raises(datasets.ParallelTextError, match=expected):
        datasets.load_split(local(corpus), "test", tmp_path / "data")


def test_missing_language_file_is_named(tmp_path):
    corpus = _corpus(tmp_path, {"train.en": ENGLISH, "train.zh": CHINESE, "dev.en": ENGLISH})
    # The complete split still loads; the incomplete one names its missing file.
    assert len(datasets.load_split(local(corpus), "train", tmp_path / "data")) == 4
    with pytest.raises(datasets.ParallelTextError, match=r"No split 'dev'.*missing dev\.zh or dev\.zh\.gz"):
        datasets.load_split(local(corpus), "dev", tmp_path / "data")


def test_language_absent_from_the_folder(tmp_path):
    corpus = _corpus(tmp_path, {"train.en": ENGLISH, "train.zh": CHINESE})
    with pytest.raises(datasets.ParallelTextError, match=r"No split in .*corpus has both en and de files"):
        datasets.load_split(local(corpus, target_lang="de"), "train", tmp_path / "data")


def test_missing_folder(tmp_path):
    with pytest.raises(datasets.ParallelTextError, match=r"nowhere does not exist"):
        datasets.load_split(local(tmp_path / "nowhere"), "train", tmp_path / "data")


@pytest.mark.parametrize("longer", ["en", "zh"])
def test_different_line_counts_name_both_files(tmp_path, longer):
    extra = ["one more line"]
    files = {
        "train.en": ENGLISH + extra if longer == "en" else ENGLISH,
        "train.zh.gz": CHINESE + extra if longer == "zh" else CHINESE,
    }
    corpus = _corpus(tmp_path, files)
    en_count, zh_count = (5, 4) if longer == "en" else (4, 5)
    expected = rf"train\.en has {en_count} lines but .*train\.zh\.gz has {zh_count}"
    with pytest.raises(datasets.ParallelTextError, match=expected):
        datasets.load_split(local(corpus), "train", tmp_path / "data")
    # A failed build leaves nothing behind that a later load would take for a finished dataset.
    assert not list((tmp_path / "data").rglob("dataset_info.json"))


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_invalid_utf8_names_file_and_line(tmp_path, gz):
    bad = "I am a student.\nHe likes oranges.\n".encode() + b"caf\xe9 latin-1\n" + b"last\n"
    corpus = _corpus(tmp_path, {"train.en" + (".gz" if gz else ""): bad, "train.zh": CHINESE})
    with pytest.raises(datasets.ParallelTextError, match=r"train\.en(\.gz)?, line 3: invalid UTF-8"):
        datasets.load_split(local(corpus), "train", tmp_path / "data")


@pytest.mark.parametrize("empty", ["train.en", "train.zh.gz"])
def test_empty_file_is_named(tmp_path, empty):
    files = {"train.en": ENGLISH, "train.zh.gz": CHINESE, empty: b""}
    corpus = _corpus(tmp_path, files)
    with pytest.raises(datasets.ParallelTextError, match=rf"{empty.replace('.', '[.]')} is empty"):
        datasets.load_split(local(corpus), "train", tmp_path / "data")


def test_plain_and_gz_of_the_same_file_are_ambiguous(tmp_path):
    corpus = _corpus(tmp_path, {"train.en": ENGLISH, "train.en.gz": ENGLISH, "train.zh": CHINESE})
    expected = r"train\.en.* and .*train\.en.* are both split 'train'"
    with pytest.raises(datasets.ParallelTextError, match=expected):
        datasets.load_split(local(corpus), "train", tmp_path / "data")


# ---------------------------------------------------------------------------------------------------------
# The tfds catalog


def test_catalog_translation_dataset_maps_languages(tmp_path):
    wmt = {"kind": "tfds", "name": "wmt14_translate/de-en"}
    with tfds.testing.mock_data(num_examples=5):
        de_en = datasets.load_split(wmt, "train", tmp_path)
        # After load_split, which registers the catalog's translation builders (see _catalog_builder).
        raw = tfds.data_source("wmt14_translate/de-en", split="train", data_dir=os.fspath(tmp_path))
        en_de = datasets.load_split(dict(wmt, reverse=True), "train", tmp_path)
        explicit = datasets.load_split(dict(wmt, source_lang="en", target_lang="de"), "validation", tmp_path)
        with pytest.raises(ValueError, match=r"no feature 'fr'; its features are \['de', 'en'\]"):
            datasets.load_split(dict(wmt, source_lang="fr", target_lang="en"), "train", tmp_path)
    assert len(de_en) == len(en_de) == len(raw) == 5
    for i in range(5):
        assert de_en[i] == {"inputs": raw[i]["de"], "targets": raw[i]["en"]}
        assert en_de[i] == {"inputs": raw[i]["en"], "targets": raw[i]["de"]}
        assert explicit[i] == en_de[i]  # mock_data gives every split the same examples
    assert "tensorflow" not in sys.modules


# ---------------------------------------------------------------------------------------------------------
# Configuration and sources


def test_dataset_config_validation():
    config = datasets.DatasetConfig.from_any({"kind": "scan", "name": "length"})
    assert config == datasets.DatasetConfig("scan", "length")
    with pytest.raises(ValueError, match="Unknown dataset kind 'hf'"):
        datasets.DatasetConfig.from_any({"kind": "hf"})
    with pytest.raises(ValueError, match=r"Unknown dataset fields \['split'\]"):
        datasets.DatasetConfig.from_any({"kind": "scan", "name": "length", "split": "train"})
    with pytest.raises(ValueError, match="needs path, source_lang and target_lang"):
        datasets.DatasetConfig(kind="local", path="/data")
    with pytest.raises(ValueError, match="SCAN needs name"):
        datasets.DatasetConfig(kind="scan", name="mcd1")


def test_sources_pickle_for_grain_workers(tmp_path):
    corpus = _corpus(tmp_path, {"train.en": ENGLISH, "train.zh": CHINESE})
    for reverse in (False, True):
        source = datasets.load_split(local(corpus, reverse=reverse), "train", tmp_path / "data")
        restored = pickle.loads(pickle.dumps(source))
        assert texts(restored) == texts(source)
    assert isinstance(source, datasets.FieldMappedSource)
    assert source.__getitems__([1, 0]) == [source[1], source[0]]


def test_no_data_dir_means_the_tfds_default(tmp_path):
    """``data_dir=None`` (the configs' default) builds where tfds builds by default ($TFDS_DATA_DIR here)."""
    import subprocess
    import sys

    code = ("from flaxformer_lite.data import datasets; "
            "print(len(datasets.load_split({'kind': 'scan', 'name': 'simple'}, 'test', None)))")
    env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path), JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "4182"
    assert (tmp_path / "flaxformer_lite_scan" / "simple").is_dir()


def test_processes_building_one_dataset_at_once_build_it_once(tmp_path):
    """Three processes ask for the same unbuilt dataset together (as sweep workers on a fresh data_dir do): one
    builds it, the others wait for it and read it. Without the lock in ``prepare_builder`` the same three
    processes fail (checked by removing it: "FileExistsError: Cannot rename .../incomplete.* ... already
    exists" in two of them)."""
    import subprocess
    import sys

    code = ("import sys; from absl import logging; from flaxformer_lite.data import datasets; "
            "logging.set_verbosity(logging.INFO); "
            "print(len(datasets.load_split({'kind': 'scan', 'name': 'simple'}, 'test', sys.argv[1])))")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    processes = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "data")], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in processes]
    for returncode, out, err in results:
        assert returncode == 0, err[-2000:]
        assert out.split()[-1] == "4182"
    assert sum("Building flaxformer_lite_scan" in err for _, _, err in results) == 1
