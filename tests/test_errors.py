"""Every entry point reports a user error as one line ``error: ...`` with exit status 2, never a traceback."""

import subprocess
import sys

import pytest

from flaxformer_lite import errors
from helpers import ROOT, TINY, script_env


@pytest.mark.parametrize("script, args, message", [
    ("experiments/train.py", ["--nosuchflag"], "error: Unknown command line flag 'nosuchflag'"),
    ("experiments/train.py", [f"--config={TINY}", "--config.model.d_modle=64"],
     "error: --config.model.d_modle=64: 'd_modle' Did you mean \"d_model\""),
    ("experiments/evaluate.py", [], "error: flag --workdir=None: Flag --workdir must have a value other than None."),
    ("experiments/translate.py", ["--workdir=/tmp", "--method=nosuch"], "error: flag --method=nosuch: value should "
                                                                         "be one of <greedy|beam|sample>"),
    ("experiments/visualize.py", ["--workdir=/tmp"], "error: give --text=SENTENCE (attention maps) and/or --curves"),
    ("experiments/benchmark.py", ["--modes=foo"], "error: --modes: unknown ['foo']; expected train, greedy, beam"),
    ("launch/sweep.py", [f"--config={TINY}", "--root=/tmp/x"], f"error: {TINY} has no get_sweep(): pass --sweep="),
    ("launch/sweep.py", [f"--config={TINY}", "--sweep=nosuch.py", "--root=/tmp/x"],
     "error: sweep file nosuch.py not found"),
])
def test_bad_invocations_print_one_error_line_and_exit_2(script, args, message):
    result = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                            timeout=120, env=script_env(), cwd=ROOT)
    assert result.returncode == errors.USAGE_EXIT_STATUS, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert line.startswith(message), line


def test_user_errors_keep_the_builtin_types_callers_catch():
    assert issubclass(errors.ConfigError, ValueError) and issubclass(errors.NotFoundError, FileNotFoundError)
