"""The SCAN command-to-action task (Lake & Baroni, 2018), generated from its grammar.

"Generalization without systematicity: On the compositional skills of sequence-to-sequence recurrent
networks" defines SCAN by a phrase-structure grammar of navigation commands and a compositional
interpretation of each command as a sequence of actions. The grammar is finite (20,910 commands), so the
project generates the whole task here instead of downloading the authors' text files: there is nothing to
fetch, nothing to checksum, and the grammar itself documents what the data are.

Grammar (the paper's supplementary material)::

    C -> S and S | S after S | S
    S -> V twice | V thrice | V
    V -> D[1] opposite D[2] | D[1] around D[2] | D | U
    D -> U left | U right | turn left | turn right
    U -> walk | look | run | jump

``D[1]`` and ``D[2]`` are the first and second word of a ``D``: ``walk left`` gives ``walk opposite left`` and
``walk around left``; ``turn left`` gives ``turn opposite left`` and ``turn around left``. ``turn`` only ever
appears through ``D``: ``turn`` alone, ``turn twice`` and so on are not commands.

Splits (``make_split``) follow the paper and the standard release (github.com/brendenlake/SCAN):

* ``simple``: a random 80/20 split of all commands, 16,728 train / 4,182 test. The draw ranks commands by
  a seeded SHA-256 hash (``SIMPLE_SPLIT_SEED``), so it is fixed on every machine and library version, but
  it is not the same draw as the released files.
* ``length``: train on commands whose action sequence has at most 22 actions, test on longer ones:
  16,990 train / 3,920 test, the same cut and sizes as the standard release (the cut is deterministic,
  so the same commands).
* ``addprim_jump``: train on every command without ``jump`` (13,203) plus the primitive ``jump -> JUMP``;
  test on every other command containing ``jump`` (7,706). The standard release's training file has
  14,670 lines, i.e. those 13,203 commands and 1,467 copies of the primitive (10% of the file); we do the
  same by default (``ADDPRIM_JUMP_REPEATS``) so that results compare with the literature, and
  ``make_split`` takes ``addprim_repeats=1`` for a training set of distinct examples (13,204).
"""

from __future__ import annotations

import hashlib
import itertools

PRIMITIVES: dict[str, str] = {"walk": "WALK", "look": "LOOK", "run": "RUN", "jump": "JUMP"}
"""The ``U`` words and the action each one denotes."""

DIRECTIONS: dict[str, str] = {"left": "LTURN", "right": "RTURN"}
"""The directions and the turn action each one denotes."""

REPEATS: dict[str, int] = {"twice": 2, "thrice": 3}
"""The ``S`` modifiers and how many times each repeats its ``V``."""

NUM_COMMANDS = 20_910
"""How many distinct commands the grammar generates (the paper's figure, checked by the tests)."""

SPLIT_NAMES = ("simple", "length", "addprim_jump")
"""The splits ``make_split`` knows."""

SIMPLE_SPLIT_SEED = "scan-simple-0"
"""Salt of the hash that draws the ``simple`` split; part of the dataset's definition, so never change it."""

SIMPLE_TRAIN_FRACTION = 0.8

LENGTH_SPLIT_MAX_TRAIN_ACTIONS = 22
"""Longest action sequence in the ``length`` split's training set (the paper's cut-off)."""

ADDPRIM_JUMP_REPEATS = 1467
"""Copies of ``jump -> JUMP`` in the ``addprim_jump`` training set, as in the standard release (10% of it)."""

Example = dict[str, str]


def _v_phrases() -> list[tuple[str, list[str]]]:
    """Every ``V`` with its actions, in grammar order.

    For each ``D`` (primitives, then ``turn``; left, then right): ``D[1] opposite D[2]``, ``D[1] around D[2]``,
    ``D``; then each ``U``. ``turn`` adds no action of its own, only its direction's turn.
    """
    phrases = []
    for first in [*PRIMITIVES, "turn"]:
        primitive = _primitive_actions(first)
        for direction, turn in DIRECTIONS.items():
            phrases.append((f"{first} opposite {direction}", [turn, turn, *primitive]))
            phrases.append((f"{first} around {direction}", [turn, *primitive] * 4))
            phrases.append((f"{first} {direction}", [turn, *primitive]))
    for word, action in PRIMITIVES.items():
        phrases.append((word, [action]))
    return phrases


def _s_phrases() -> list[tuple[str, list[str]]]:
    """Every ``S`` with its actions, in grammar order: each ``V`` plain, then twice, then thrice."""
    phrases = []
    for v_words, v_actions in _v_phrases():
        phrases.append((v_words, v_actions))
        for modifier, count in REPEATS.items():
            phrases.append((f"{v_words} {modifier}", v_actions * count))
    return phrases


def generate_examples() -> list[Example]:
    """All 20,910 SCAN examples ``{'inputs': command, 'targets': actions}``, in a fixed grammar order.

    The order is: every single ``S``, then every ``S and S``, then every ``S after S`` (left ``S`` outer loop),
    so an index into this list names one command for good.
    """
    s_phrases = _s_phrases()
    examples = [{"inputs": words, "targets": " ".join(actions)} for words, actions in s_phrases]
    for conjunction in ("and", "after"):
        for (left, left_actions), (right, right_actions) in itertools.product(s_phrases, repeat=2):
            # "x1 and x2" does x1 then x2; "x1 after x2" does x2 then x1.
            actions = left_actions + right_actions if conjunction == "and" else right_actions + left_actions
            examples.append({"inputs": f"{left} {conjunction} {right}", "targets": " ".join(actions)})
    return examples


def interpret(command: str) -> str:
    """The action sequence of one command, by parsing it with the grammar (independent of the generator).

    Raises:
      ValueError: if ``command`` is not generated by the grammar.
    """
    words = command.split()
    for conjunction in ("and", "after"):
        if conjunction in words:
            position = words.index(conjunction)
            left = _interpret_s(words[:position], command)
            right = _interpret_s(words[position + 1 :], command)
            actions = left + right if conjunction == "and" else right + left
            return " ".join(actions)
    return " ".join(_interpret_s(words, command))


def _interpret_s(words: list[str], command: str) -> list[str]:
    if words and words[-1] in REPEATS:
        return _interpret_v(words[:-1], command) * REPEATS[words[-1]]
    return _interpret_v(words, command)


def _interpret_v(words: list[str], command: str) -> list[str]:
    d_first_words = (*PRIMITIVES, "turn")
    match words:
        case [primitive] if primitive in PRIMITIVES:
            return [PRIMITIVES[primitive]]
        case [first, direction] if first in d_first_words and direction in DIRECTIONS:
            return [DIRECTIONS[direction], *_primitive_actions(first)]
        case [first, "opposite", direction] if first in d_first_words and direction in DIRECTIONS:
            return [DIRECTIONS[direction], DIRECTIONS[direction], *_primitive_actions(first)]
        case [first, "around", direction] if first in d_first_words and direction in DIRECTIONS:
            return [DIRECTIONS[direction], *_primitive_actions(first)] * 4
    raise ValueError(f"Not a SCAN command: {command!r} (cannot parse {' '.join(words)!r})")


def _primitive_actions(first_word: str) -> list[str]:
    """The action a ``D[1]`` word adds after its turns: a primitive's action, or none for ``turn``."""
    return [PRIMITIVES[first_word]] if first_word in PRIMITIVES else []


def num_actions(example: Example) -> int:
    """Length of an example's action sequence, the quantity the ``length`` split is cut on."""
    return len(example["targets"].split())


def make_split(name: str, *, addprim_repeats: int = ADDPRIM_JUMP_REPEATS) -> dict[str, list[Example]]:
    """One of the paper's splits as ``{'train': [...], 'test': [...]}``; lists are random-access sources.

    Within each list, examples keep the grammar order of ``generate_examples`` (the ``addprim_jump``
    primitive copies come last in train), so the output is deterministic and training code shuffles.

    Args:
      name: one of ``SPLIT_NAMES``.
      addprim_repeats: copies of ``jump -> JUMP`` in the ``addprim_jump`` training set (ignored otherwise).
    """
    examples = generate_examples()
    if name == "simple":
        # A hash rather than a random generator: no library's stream can change which commands are drawn.
        def rank(example: Example) -> bytes:
            return hashlib.sha256(f"{SIMPLE_SPLIT_SEED}\0{example['inputs']}".encode()).digest()

        num_train = round(SIMPLE_TRAIN_FRACTION * len(examples))
        train_commands = {ex["inputs"] for ex in sorted(examples, key=rank)[:num_train]}
        return {
            "train": [ex for ex in examples if ex["inputs"] in train_commands],
            "test": [ex for ex in examples if ex["inputs"] not in train_commands],
        }
    if name == "length":
        return {
            "train": [ex for ex in examples if num_actions(ex) <= LENGTH_SPLIT_MAX_TRAIN_ACTIONS],
            "test": [ex for ex in examples if num_actions(ex) > LENGTH_SPLIT_MAX_TRAIN_ACTIONS],
        }
    if name == "addprim_jump":
        if addprim_repeats < 1:
            raise ValueError(f"addprim_repeats must be at least 1, got {addprim_repeats}")
        primitive = {"inputs": "jump", "targets": PRIMITIVES["jump"]}
        with_jump = [ex for ex in examples if "jump" in ex["inputs"].split()]
        without_jump = [ex for ex in examples if "jump" not in ex["inputs"].split()]
        return {
            "train": without_jump + [primitive] * addprim_repeats,
            "test": [ex for ex in with_jump if ex["inputs"] != "jump"],
        }
    raise ValueError(f"Unknown SCAN split {name!r}; known: {', '.join(SPLIT_NAMES)}")

