"""imgpipe.logs: TensorFlow's start-up notices are kept off the terminal, everything else shows."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from imgpipe.logs import filtered_stderr_lines

ROOT = Path(__file__).resolve().parents[1]
# What TensorFlow 2.21 prints on import on a CPU machine (copied from a real run).
STARTUP = """\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1796158445.113240   23006 port.cc:153] oneDNN custom operations are on. You may see slightly different numerical results due to floating-point round-off errors from different computation orders. To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.
I0000 00:00:1796158445.114312   23006 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
I0000 00:00:1796156517.366912    6193 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use available CPU instructions in performance-critical operations.
To enable the following instructions: AVX2 AVX512F AVX512_VNNI AVX512_BF16 AVX_VNNI FMA, in other operations, rebuild TensorFlow with the appropriate compiler flags.
E0000 00:00:1796158447.869425   23006 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)
"""  # noqa: E501


def test_known_notices_are_dropped_and_real_messages_kept():
    real = ["W0000 00:00:1796158447.869425   23006 some_op.cc:12] a real warning",
            "E0000 00:00:1796158447.869425   23006 loader.cc:40] could not load the plugin",
            "Traceback (most recent call last):"]
    assert filtered_stderr_lines(STARTUP + "\n".join(real)) == real


def test_a_stage_that_imports_tensorflow_prints_none_of_its_notices(tmp_path):
    """The first import of TensorFlow after imgpipe's (as in every stage) shows none of the notices;
    with IMGPIPE_VERBOSE=1 TensorFlow's own log is back."""
    script = "import imgpipe, keras, tensorflow as tf; print(int(tf.constant(2) + 1))"
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    quiet = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == "3\n"
    assert quiet.stderr == ""
    loud = subprocess.run([sys.executable, "-c", "from imgpipe import logs; logs.setup(verbose=True); " + script],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert loud.returncode == 0, loud.stderr
    assert "cudart_stub.cc" in loud.stderr or "port.cc" in loud.stderr


def test_verbose_flag_and_environment_variable_turn_on_debug_lines(tmp_path):
    """`--verbose` on any entry point (read by imgpipe.cli.run) or IMGPIPE_VERBOSE=1 sets the
    pipeline's loggers to DEBUG; without either they log INFO and up."""
    script = ("import logging, sys\n"
              "from imgpipe.cli import run\n"
              "run(lambda: print(logging.getLogger('imgpipe.x').getEffectiveLevel()), 'x')\n")
    env = {key: value for key, value in os.environ.items() if key != "IMGPIPE_VERBOSE"}

    def level(*args: str, **extra: str) -> str:
        done = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env={**env, **extra},
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert level() == str(logging.INFO)
    assert level("--verbose") == level("-v") == str(logging.DEBUG)
    assert level(IMGPIPE_VERBOSE="1") == str(logging.DEBUG)
    shown = subprocess.run([sys.executable, "-m", "stages.download", "--help"], cwd=ROOT, capture_output=True,
                           text=True, timeout=60).stdout
    assert "-v, --verbose" in shown and "IMGPIPE_VERBOSE=1" in shown
