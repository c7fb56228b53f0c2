"""Tests of the SentencePiece and word tokenizers and of vocabulary storage/reuse."""

import os

import numpy as np
import pytest
import sentencepiece as spm

from flaxformer_lite.data import tokenizer as tokenizer_lib

_EN = [
    "A man in a blue shirt is standing on a ladder.",
    "Two young children are playing in the sand at the beach.",
    "A dog runs through the grass with a ball in its mouth.",
    "The woman is reading a book in the park.",
]
_DE = [
    "Ein Mann in einem blauen Hemd steht auf einer Leiter.",
    "Zwei kleine Kinder spielen am Strand im Sand.",
    "Ein Hund läuft mit einem Ball im Maul über die Wiese.",
    "Die Frau liest im Park ein Buch über die Größe der Straße.",
]
_ZH = ["我是个学生。", "你好，世界！", "他们在公园里玩。", "这只狗跑得很快。"]
_CORPUS = (_EN + _DE + _ZH) * 5
# Tiny corpora need hard_vocab_limit=False; 256 byte pieces + 3 reserved + characters must fit.
_CONFIG = tokenizer_lib.TokenizerConfig(vocab_size=400, hard_vocab_limit=False)


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def spm_tokenizer(request, tmp_path_factory):
    config = tokenizer_lib.TokenizerConfig(vocab_size=400, hard_vocab_limit=False, model_type=request.param)
    directory = str(tmp_path_factory.mktemp(f"vocab_{request.param}"))
    return tokenizer_lib.load_or_train_tokenizer(config, directory, lambda: iter(_CORPUS))


@pytest.mark.parametrize(
    "text",
    [
        "A man in a blue shirt is standing on a ladder.",
        "Die Frau liest ein Buch über die Größe der Straße.",
        "Ähnliche Öfen, übergroße Füße.",
        "我是个学生。",
        # 龘 and 鑫 are not in the training text: byte fallback must still reproduce them.
        "龘鑫，你好！",
    ],
)
def test_sentencepiece_round_trip(spm_tokenizer, text):
    ids = spm_tokenizer.encode(text)
    assert ids and all(3 <= i < spm_tokenizer.vocab_size for i in ids), ids  # No pad/EOS/unk produced.
    assert spm_tokenizer.decode(ids) == text


def test_byte_fallback_uses_byte_pieces(spm_tokenizer):
    ids = spm_tokenizer.encode("龘")
    assert [spm_tokenizer.id_to_piece(i) for i in ids if spm_tokenizer.id_to_piece(i) != "▁"] == [
        "<0xE9>",
        "<0xBE>",
        "<0x98>",
    ]  # The UTF-8 bytes of 龘.
    assert tokenizer_lib.UNK_ID not in ids


def test_reserved_ids(spm_tokenizer):
    assert (spm_tokenizer.pad_id, spm_tokenizer.eos_id, spm_tokenizer.unk_id) == (0, 1, 2)
    assert [spm_tokenizer.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    ids = spm_tokenizer.encode("Zwei kleine Kinder.")
    # decode stops at EOS and ignores padding, as model output has both.
    assert spm_tokenizer.decode(ids + [1] + spm_tokenizer.encode("Hund") + [0, 0]) == "Zwei kleine Kinder."
    assert spm_tokenizer.decode([0] + ids + [0, 0]) == "Zwei kleine Kinder."
    assert spm_tokenizer.encode_batch(["Zwei kleine Kinder.", "我是个学生。"]) == [
        ids,
        spm_tokenizer.encode("我是个学生。"),
    ]


def test_vocabulary_is_reused_not_retrained(tmp_path):
    directory = str(tmp_path)
    first = tokenizer_lib.load_or_train_tokenizer(_CONFIG, directory, lambda: iter(_CORPUS))
    path = os.path.join(directory, "spm.model")
    mtime = os.stat(path).st_mtime_ns

    def must_not_train():
        raise AssertionError("the stored vocabulary should have been reused")

    second = tokenizer_lib.load_or_train_tokenizer(_CONFIG, directory, must_not_train)
    assert os.stat(path).st_mtime_ns == mtime
    assert second.encode(_DE[3]) == first.encode(_DE[3])
    assert sorted(os.listdir(directory)) == [
        "spm.model",
        "spm.settings.json",
        "spm.vocab",
    ]  # No temp leftovers.


def test_different_settings_refuse_stored_vocabulary(tmp_path):
    tokenizer_lib.load_or_train_tokenizer(_CONFIG, str(tmp_path), lambda: iter(_CORPUS))
    other = tokenizer_lib.TokenizerConfig(vocab_size=500, hard_vocab_limit=False)
    with pytest.raises(ValueError, match="was built with"):
        tokenizer_lib.load_or_train_tokenizer(other, str(tmp_path), lambda: iter(_CORPUS))


def test_crash_during_training_leaves_no_model(tmp_path, monkeypatch):
    def crash(**kwargs):
        raise RuntimeError("killed mid-training")

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", crash)
    with pytest.raises(RuntimeError):
        tokenizer_lib.load_or_train_tokenizer(_CONFIG, str(tmp_path), lambda: iter(_CORPUS))
    assert not os.path.exists(tmp_path / "spm.model")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
    monkeypatch.undo()
    tokenizer = tokenizer_lib.load_or_train_tokenizer(_CONFIG, str(tmp_path), lambda: iter(_CORPUS))
    assert tokenizer.decode(tokenizer.encode(_EN[0])) == _EN[0]


def test_separate_vocabularies_per_side(tmp_path):
    source = [{"inputs": en.encode(), "targets": zh.encode()} for en, zh in zip(_EN * 5, _ZH * 5)]
    config = tokenizer_lib.TokenizerConfig(vocab_size=300, hard_vocab_limit=False, shared=False)
    inputs_tok, targets_tok = tokenizer_lib.load_or_train_tokenizers(config, str(tmp_path), source)
    assert os.path.exists(tmp_path / "spm_inputs.model") and os.path.exists(tmp_path / "spm_targets.model")
    # The English vocabulary has no Chinese pieces: Chinese comes out as bytes, yet still round-trips.
    assert len(inputs_tok.encode("我是个学生。")) > len(targets_tok.encode("我是个学生。"))
    assert inputs_tok.decode(inputs_tok.encode("我是个学生。")) == "我是个学生。"
    shared = tokenizer_lib.load_or_train_tokenizers(_CONFIG, str(tmp_path / "shared"), source)
    assert shared[0] is shared[1]


def test_sample_texts_is_seeded_and_covers_the_stream():
    texts = [f"sentence {i}" for i in range(1000)] + ["", "  "]
    sample = tokenizer_lib.sample_texts(iter(texts), 100, seed=3)
    assert len(sample) == 100 and "" not in sample
    assert sample == tokenizer_lib.sample_texts(iter(texts), 100, seed=3)
    assert sample != tokenizer_lib.sample_texts(iter(texts), 100, seed=4)
    assert max(int(s.split()[1]) for s in sample) >= 500  # Not just the first lines.
    assert len(tokenizer_lib.sample_texts(iter(texts), 5000, seed=0)) == 1000


def test_word_tokenizer_round_trip_and_storage(tmp_path):
    source = [
        {"inputs": b"jump twice and walk left", "targets": b"I_JUMP I_JUMP I_TURN_LEFT I_WALK"},
        {
            "inputs": "look right thrice",
            "targets": "I_TURN_RIGHT I_LOOK I_TURN_RIGHT I_LOOK I_TURN_RIGHT I_LOOK",
        },
    ]
    config = tokenizer_lib.TokenizerConfig(kind="word")
    tok, same = tokenizer_lib.load_or_train_tokenizers(config, str(tmp_path), source)
    assert tok is same and os.path.exists(tmp_path / "words.json")
    assert tok.words[:3] == ["<pad>", "</s>", "<unk>"]
    assert tok.words[3:5] == ["I_LOOK", "I_TURN_RIGHT"]  # Most frequent first, ties alphabetical.
    ids = tok.encode("jump twice and walk left")
    assert min(ids) >= 3 and tok.decode(ids) == "jump twice and walk left"
    assert tok.decode(ids + [1, 5, 0]) == "jump twice and walk left"
    assert tok.encode("jump around") == [tok.encode("jump")[0], tokenizer_lib.UNK_ID]
    assert tok.vocab_size == 3 + 13

    reloaded = tokenizer_lib.load_or_train_tokenizer(config, str(tmp_path), lambda: iter(()), name="words")
    assert reloaded.words == tok.words


def test_to_text_accepts_bytes_and_str():
    assert tokenizer_lib.to_text(b"Stra\xc3\x9fe") == "Straße"
    assert tokenizer_lib.to_text(np.bytes_("abc".encode())) == "abc"
    assert tokenizer_lib.to_text(np.array(b"abc", dtype=object)) == "abc"
    assert tokenizer_lib.to_text("我") == "我"
