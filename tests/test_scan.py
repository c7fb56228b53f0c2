"""SCAN generated from the grammar: the command set, its interpretation, and the paper's splits."""

import pytest

from flaxformer_lite.data import scan


@pytest.fixture(scope="module")
def examples():
    return scan.generate_examples()


def test_grammar_generates_all_20910_distinct_commands(examples):
    commands = [example["inputs"] for example in examples]
    assert len(commands) == scan.NUM_COMMANDS == 20_910
    assert len(set(commands)) == 20_910


def test_generation_order_is_fixed(examples):
    again = scan.generate_examples()
    assert again == examples
    # Grammar order: the single S phrases come first, then "S and S", then "S after S".
    assert examples[0] == {"inputs": "walk opposite left", "targets": "LTURN LTURN WALK"}
    assert examples[101]["inputs"] == "jump thrice"
    assert examples[102]["inputs"] == "walk opposite left and walk opposite left"
    assert examples[-1]["inputs"] == "jump thrice after jump thrice"


@pytest.mark.parametrize(
    "command, actions",
    [
        ("jump around right", "RTURN JUMP RTURN JUMP RTURN JUMP RTURN JUMP"),
        ("walk after run twice", "RUN RUN WALK"),
        ("turn opposite left", "LTURN LTURN"),
        ("jump twice after walk left", "LTURN WALK JUMP JUMP"),
        ("look thrice and turn right", "LOOK LOOK LOOK RTURN"),
        ("run opposite right thrice and jump", "RTURN RTURN RUN RTURN RTURN RUN RTURN RTURN RUN JUMP"),
        ("turn around left twice", "LTURN LTURN LTURN LTURN LTURN LTURN LTURN LTURN"),
        ("walk", "WALK"),
        ("turn left", "LTURN"),
        ("look right", "RTURN LOOK"),
    ],
)
def test_interpretation_examples(examples, command, actions):
    assert scan.interpret(command) == actions
    # The generator, which composes actions while it expands the grammar, agrees with the parser.
    assert {"inputs": command, "targets": actions} in examples


def test_generator_and_parser_agree_on_every_command(examples):
    mismatches = [ex for ex in examples if scan.interpret(ex["inputs"]) != ex["targets"]]
    assert mismatches == []


@pytest.mark.parametrize(
    "not_a_command",
    ["turn", "turn twice", "jump and turn", "walk left left", "walk around", "jump and", "fly",
     "walk and run and look", ""],
)
def test_commands_outside_the_grammar_are_rejected(not_a_command):
    with pytest.raises(ValueError, match="Not a SCAN command"):
        scan.interpret(not_a_command)


def test_turn_appears_only_through_d(examples):
    for example in examples:
        words = example["inputs"].split()
        for i, word in enumerate(words):
            if word == "turn":
                assert words[i + 1] in ("left", "right", "opposite", "around"), example


@pytest.mark.parametrize(
    "name, train_size, test_size",
    [("simple", 16_728, 4_182), ("length", 16_990, 3_920), ("addprim_jump", 14_670, 7_706)],
)
def test_split_sizes_match_the_standard_release(name, train_size, test_size):
    split = scan.make_split(name)
    assert (len(split["train"]), len(split["test"])) == (train_size, test_size)


def _commands(examples):
    return [example["inputs"] for example in examples]


@pytest.mark.parametrize("name", ["simple", "length"])
def test_simple_and_length_splits_partition_all_commands(examples, name):
    split = scan.make_split(name)
    train, test = set(_commands(split["train"])), set(_commands(split["test"]))
    assert len(train) == len(split["train"]) and len(test) == len(split["test"])  # no repeats
    assert not train & test
    assert train | test == set(_commands(examples))


def test_simple_split_is_seeded_and_keeps_grammar_order(examples):
    first, second = scan.make_split("simple"), scan.make_split("simple")
    assert first == second
    position = {command: i for i, command in enumerate(_commands(examples))}
    for part in ("train", "test"):
        indices = [position[command] for command in _commands(first[part])]
        assert indices == sorted(indices)
    # A random split, not a cut of the grammar order: both halves have "and" and "after" commands.
    assert any(" after " in command for command in _commands(first["test"]))
    assert any(" and " in command for command in _commands(first["test"]))
    # Pinned: the draw is part of the dataset's definition, so a change to it must be deliberate.
    assert _commands(first["test"][:3]) == ["walk left twice", "walk opposite right", "walk right thrice"]


def test_length_split_cuts_at_22_actions():
    split = scan.make_split("length")
    assert max(scan.num_actions(ex) for ex in split["train"]) == 22
    assert min(scan.num_actions(ex) for ex in split["test"]) == 24  # no command has 23 actions
    assert max(scan.num_actions(ex) for ex in split["test"]) == 48


def test_addprim_jump_split(examples):
    split = scan.make_split("addprim_jump")
    primitive = {"inputs": "jump", "targets": "JUMP"}
    train_without_primitive = [ex for ex in split["train"] if ex != primitive]
    assert split["train"].count(primitive) == scan.ADDPRIM_JUMP_REPEATS == 1467
    assert all("jump" not in ex["inputs"].split() for ex in train_without_primitive)
    assert len(train_without_primitive) == 13_203
    test = set(_commands(split["test"]))
    with_jump = {command for command in _commands(examples) if "jump" in command.split()}
    assert test == with_jump - {"jump"}
    assert len(test) == len(split["test"]) == 7_706
    # Every command is in exactly one side, apart from the primitive, which is only in train.
    assert set(_commands(train_without_primitive)) | test | {"jump"} == set(_commands(examples))


def test_addprim_jump_without_repeats():
    split = scan.make_split("addprim_jump", addprim_repeats=1)
    assert len(split["train"]) == 13_204
    assert len(split["test"]) == 7_706
    with pytest.raises(ValueError, match="at least 1"):
        scan.make_split("addprim_jump", addprim_repeats=0)


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="Unknown SCAN split 'mcd1'"):
        scan.make_split("mcd1")
