"""README.md stays true: its benchmark table is the measured one, and every command it shows exists,
takes the flags it is shown with, and is run somewhere (a make target, a test, or `make demo`)."""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest

from bench import summary

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PIPELINE_TESTS = (ROOT / "tests" / "test_demo_pipeline.py").read_text()
# Commands the README shows that run outside this repository's code, and where they are exercised.
ELSEWHERE = {
    "curl": "tests/test_serve_app.py sends the same requests (multipart, base64, url, path, batch, annotate)",
    "git": "git itself; tests/test_demo_pipeline.py commits, clones and tags",
}


def commands() -> list[str]:
    """Every command in the README's ```sh blocks (continuations joined, comments and `&&` split)."""
    found = []
    for block in re.findall(r"```sh\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                found += [part.strip() for part in line.split("&&")]
    return found


def test_the_benchmark_table_is_the_one_the_results_files_give():
    start, end = README.index(summary.START), README.index(summary.END)
    assert README[start + len(summary.START):end].strip() == summary.table().strip(), (
        "README's benchmark table differs from bench/results/: run `python -m bench.summary --write README.md`")


def test_the_table_writer_refuses_a_file_without_markers_or_no_file(tmp_path, capsys):
    plain = tmp_path / "plain.md"
    plain.write_text("# no table here\n")
    assert summary.main(["--write", str(plain)]) == 1
    assert "no <!-- bench-summary:start -->" in capsys.readouterr().err
    assert plain.read_text() == "# no table here\n"
    assert summary.main(["--write", str(tmp_path / "missing.md")]) == 1
    assert "missing.md" in capsys.readouterr().err


def test_every_command_is_known():
    kinds = {command.split()[0] for command in commands()}
    assert kinds <= {"make", "python", "dvc", *ELSEWHERE}, kinds


def test_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    for command in commands():
        if command.startswith("make "):
            target = command.split()[1]
            assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"README: `{command}`: no such make target"


def help_text(module: str) -> str:
    main = importlib.import_module(module if module != "serve" else "serve.__main__").main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    return out.getvalue()


def test_python_commands_take_the_flags_they_are_shown_with():
    shown: dict[str, set[str]] = {}
    for command in commands():
        words = shlex.split(command)
        if words[:2] == ["python", "-m"]:
            shown.setdefault(words[2], set()).update(
                word.strip("[]").split("=")[0] for word in words[3:] if word.strip("[").startswith("--"))
    assert {"stages.download", "tools.compare", "serve"} <= set(shown)
    for module, flags in sorted(shown.items()):
        text = help_text(module)
        missing = [flag for flag in sorted(flags) if flag not in text]
        assert not missing, f"README: python -m {module} is shown with {missing}, which it does not take"


def test_dvc_commands_are_run_by_the_pipeline_tests():
    calls = set(re.findall(r'dvc\(\w+, "([a-z-]+)"(?:, "([a-z-]+)")?', PIPELINE_TESTS))
    groups = {"exp", "metrics", "plots", "remote", "artifacts", "queue"}  # commands with subcommands
    for command in commands():
        words = shlex.split(command)
        if words[0] != "dvc":
            continue
        if words[1] in groups:
            assert (words[1], words[2]) in calls, f"README: `{command}` is not run by tests/test_demo_pipeline.py"
        else:
            assert words[1] in {first for first, _ in calls}, (
                f"README: `{command}` is not run by tests/test_demo_pipeline.py")
