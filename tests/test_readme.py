"""The README stays true: CI runs its test command, its Python example runs, its preset table is right."""

import math
import pathlib
import re

import flax.linen as nn
import jax
import numpy as np

import flaxformer_lite as ffl

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_ci_runs_exactly_the_readme_test_command():
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "pytest" in ci_command
    assert ci_command in [block.strip() for block in code_blocks("bash")]


def test_python_example_runs_as_written():
    (example,) = code_blocks("python")
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (1, 4, ffl.preset("tiny").padded_target_vocab_size)


def test_preset_table_parameter_counts():
    rows = re.findall(r"^\| `(\w+)`.*\| ([\d.]+)([KM]) (?:\(paper: \d+M\) )?\|$", README, flags=re.M)
    assert {name for name, _, _ in rows} == set(ffl.PRESETS)
    for name, number, unit in rows:
        ones = np.ones((1, 4), np.int32)
        shapes = jax.eval_shape(lambda: ffl.Transformer(ffl.preset(name)).init(jax.random.key(0), ones, ones))
        count = sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(nn.unbox(shapes)))
        scale = {"K": 1e3, "M": 1e6}[unit]
        assert round(count / scale, len(number.partition(".")[2])) == float(number), name
