"""Where a compiled program's time goes: a ``jax.profiler`` trace of it, summed by HLO instruction.

XLA's CPU runtime records every instruction it runs (a fusion, a matmul, a copy...) as a trace event named
by the instruction; :func:`profile` adds up those events over a few calls and joins them with the compiled
HLO text, which gives each instruction's shape, the JAX operation it came from (``op_name`` metadata) and
its kind. ``experiments/benchmark.py --op_profile=N`` prints the result for each mode it measures.

Two caveats when reading the numbers. The runtime runs independent instructions side by side on its
threads, so the summed time of a step can exceed its wall time. And a loop (``while``) is an event of its
own that spans the events of its body: loops are listed, but left out of the totals and of the kinds.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import tempfile
from typing import Any, Callable

import jax

# The kinds an instruction is put in, by what its fused computation contains (the first match wins).
KINDS = ("matmul", "reduce-window", "reduce", "custom-call", "copy/transpose", "elementwise", "loop")
_LOOPS = {"while", "conditional", "call"}
_DATA_MOVEMENT = {"copy", "transpose", "bitcast", "parameter", "constant", "tuple", "get-tuple-element",
                  "reshape"}


@dataclasses.dataclass(frozen=True)
class OpTime:
    """One HLO instruction's share of a call."""

    name: str  # The instruction, as the HLO text and the trace name it (``ynn_fusion.12``, ``copy.3``).
    ms: float  # Milliseconds per call, summed over its runs in the call.
    runs: float  # Runs per call (more than 1 inside a loop).
    kind: str  # One of KINDS.
    shape: str  # Its result, e.g. ``f32[2048,8192]``.
    source: str  # The JAX operation it came from (``op_name``), shortened; "" when XLA made it up.


@dataclasses.dataclass(frozen=True)
class _Instruction:
    shape: str
    opcode: str
    source: str
    calls: str | None  # The fused (or called) computation, if any.


def parse_hlo(hlo_text: str) -> tuple[str, dict[str, _Instruction], dict[str, set[str]]]:
    """(module name, instruction by name, opcodes of each computation) of a compiled HLO module's text."""
    module = re.match(r"HloModule (\S+?),", hlo_text)
    instructions, opcodes, computation = {}, collections.defaultdict(set), None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
        if header:
            computation = header.group(1)
            continue
        found = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
        if not found or computation is None:
            continue
        name, rest = found.group(1), line[found.end():]
        shape, rest = _split_shape(rest)
        opcode = re.match(r"\s*([\w\-]+)", rest)
        if not opcode:
            continue
        opcode = opcode.group(1)
        opcodes[computation].add(opcode)
        source = re.search(r'op_name="([^"]*)"', line)
        calls = re.search(r"(?:calls|body)=%([\w.\-]+)", line)
        instructions[name] = _Instruction(shape, opcode, source.group(1) if source else "",
                                          calls.group(1) if calls else None)
    return (module.group(1) if module else ""), instructions, opcodes


def _split_shape(text: str) -> tuple[str, str]:
    """(the shape at the start of ``text`` without layouts, the rest); a tuple shape ``(...)`` whole."""
    end = text.find(" ") if " " in text else len(text)
    if text.startswith("("):
        depth = 0
        for end, char in enumerate(text, start=1):
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0:
                break
    return re.sub(r"\{[^}]*\}|/\*.*?\*/", "", text[:end]), text[end:]


def kind_of(instruction: _Instruction, opcodes: dict[str, set[str]]) -> str:
    """The instruction's kind (one of KINDS), from its opcode and what its fused computation contains."""
    if instruction.opcode in _LOOPS:
        return "loop"
    inside = opcodes.get(instruction.calls, set()) | {instruction.opcode}
    if inside & {"dot", "convolution"}:
        return "matmul"
    if "reduce-window" in inside:
        return "reduce-window"
    if "reduce" in inside:
        return "reduce"
    if "custom-call" in inside:  # A library call such as top_k's.
        return "custom-call"
    if inside - {"fusion"} <= _DATA_MOVEMENT:
        return "copy/transpose"
    return "elementwise"


def shorten(source: str) -> str:
    """``op_name`` without the repeated prefixes: ``jit(train_step)/transpose(jvp(Transformer))/...`` reads
    ``bwd Transformer/...``, the forward pass ``fwd Transformer/...``."""
    source = re.sub(r"^jit\([^)]*\)/", "", source)
    source = re.sub(r"transpose\(jvp\((\w*)\)\)", r"bwd \1", source)
    return re.sub(r"jvp\((\w*)\)", r"fwd \1", source)


def read_trace(directory: str) -> list[dict[str, Any]]:
    """The complete ('X') events of the newest trace ``jax.profiler`` wrote under ``directory``."""
    paths = sorted(glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not paths:
        raise RuntimeError(f"jax.profiler wrote no *.trace.json.gz under {directory}")
    with gzip.open(paths[-1], "rt") as f:
        return [event for event in json.load(f)["traceEvents"] if event.get("ph") == "X"]


def profile(call: Callable[[], Any], hlo_text: str, calls: int = 3) -> list[OpTime]:
    """Runs ``call`` (one blocking call of the program whose compiled HLO is ``hlo_text``) ``calls`` times
    under a trace; returns its instructions, the most time first."""
    module, instructions, opcodes = parse_hlo(hlo_text)
    with tempfile.TemporaryDirectory() as directory:
        jax.profiler.start_trace(directory)
        try:
            for _ in range(calls):
                jax.block_until_ready(call())
        finally:
            jax.profiler.stop_trace()
        events = read_trace(directory)
    micros, runs = collections.Counter(), collections.Counter()
    for event in events:
        args = event.get("args", {})
        if "hlo_op" in args and args.get("hlo_module", module) == module:
            micros[args["hlo_op"]] += event["dur"]
            runs[args["hlo_op"]] += 1
    if not micros:
        raise RuntimeError(f"the trace has no instruction of module {module!r}: is hlo_text that of call?")
    rows = []
    for name, total in micros.items():
        instruction = instructions.get(name, _Instruction("?", "?", "", None))
        rows.append(OpTime(name, total / calls / 1e3, runs[name] / calls, kind_of(instruction, opcodes),
                           instruction.shape, shorten(instruction.source)))
    return sorted(rows, key=lambda row: -row.ms)


def by_kind(rows: list[OpTime]) -> dict[str, float]:
    """Milliseconds per call of each kind, loops left out (their bodies are counted already)."""
    totals = {kind: 0.0 for kind in KINDS if kind != "loop"}
    for row in rows:
        if row.kind != "loop":
            totals[row.kind] += row.ms
    return totals


def format_profile(rows: list[OpTime], top: int, title: str) -> str:
    """A text table: the kinds' totals, then the ``top`` instructions that took the most time."""
    kinds = by_kind(rows)
    total = sum(kinds.values()) or 1.0
    lines = [f"{title}: {total:.1f} ms of instructions per call (summed over threads; loops not counted)",
             "  " + ", ".join(f"{kind} {ms:.1f} ms ({100 * ms / total:.0f}%)" for kind, ms in kinds.items()),
             f"  {'ms':>8} {'%':>5} {'runs':>5}  {'kind':<14} {'shape':<22} {'instruction':<28} source"]
    for row in rows[:top]:
        share = "" if row.kind == "loop" else f"{100 * row.ms / total:.1f}"
        lines.append(f"  {row.ms:8.2f} {share:>5} {row.runs:5.0f}  {row.kind:<14} {row.shape:<22} "
                     f"{row.name:<28} {row.source[:100]}")
    return "\n".join(lines)
