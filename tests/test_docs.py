"""The speed figures in README.md and docs/performance.md are the benchmark output they cite."""

import json
import pathlib
import re
import statistics

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODES = ("train", "greedy", "beam")


def cited_records(text: str) -> tuple[str, list[dict]]:
    (path,) = re.findall(r"<!-- benchmark: (\S+) -->", text)
    lines = (ROOT / path).read_text().splitlines()
    return path, [json.loads(line) for line in lines if line.strip()]


def tokens_per_second(record: dict) -> float:
    return record["tgt_tok_per_s"] if record["mode"] == "train" else record["tok_per_s"]


def medians(records: list[dict], tag: str) -> dict[str, dict[str, int]]:
    """Per mode: the median, lowest and highest of the runs' median tokens/s, rounded."""
    out = {}
    for mode in MODES:
        values = [tokens_per_second(r) for r in records if r["tag"] == tag and r["mode"] == mode]
        assert values, (tag, mode)
        out[mode] = dict(median=round(statistics.median(values)), low=round(min(values)),
                         high=round(max(values)), runs=len(values))
    return out


def number(text: str) -> int:
    return int(text.replace(",", ""))


def test_performance_table_is_the_median_of_the_cited_runs():
    text = (ROOT / "docs" / "performance.md").read_text()
    _, records = cited_records(text)
    rows = re.findall(r"^\| `(\w+)` \| (\d+) \| ([\d,]+) \(([\d,]+)-([\d,]+)\) \| ([\d,]+) \(([\d,]+)-([\d,]+)\) "
                      r"\| ([\d,]+) \(([\d,]+)-([\d,]+)\) \|$", text, flags=re.M)
    assert {row[0] for row in rows} == {r["tag"] for r in records}
    for tag, runs, *cells in rows:
        expected = medians(records, tag)
        for i, mode in enumerate(MODES):
            median, low, high = (number(c) for c in cells[3 * i:3 * i + 3])
            assert (median, low, high) == tuple(expected[mode][k] for k in ("median", "low", "high")), (tag, mode)
            assert expected[mode]["runs"] == int(runs)


def test_readme_speed_row_is_the_current_version_in_the_performance_table():
    readme = (ROOT / "README.md").read_text()
    path, records = cited_records(readme)
    assert path in (ROOT / "docs" / "performance.md").read_text()
    (row,) = [line for line in readme.splitlines() if line.startswith("| speed")]
    tag = re.search(r"`(\w+)`", row).group(1)
    quoted = [number(n) for n in re.search(r"\| ([\d,]+) / ([\d,]+) / ([\d,]+) \|", row).groups()]
    assert quoted == [medians(records, tag)[mode]["median"] for mode in MODES]
    cpu_model = next(r["cpu_model"] for r in records if r["tag"] == tag)  # Older versions did not record it.
    assert cpu_model in row
