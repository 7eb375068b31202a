"""docs/reference/ is generated from the code (tools/reference.py): the committed pages are what the
code gives now, and the code has a description for every parameter and a help for every flag."""

from __future__ import annotations

import argparse
import re

import pytest
import yaml
from pydantic import BaseModel

from tools import reference

ROOT = reference.ROOT


@pytest.fixture(scope="module")
def pages() -> dict:
    return reference.pages()


@pytest.fixture(scope="module")
def commands() -> list[reference.Command]:
    return reference.commands()


def test_the_committed_pages_are_what_the_code_gives(pages):
    for path, text in pages.items():
        committed = (ROOT / path).read_text(encoding="utf-8") if (ROOT / path).is_file() else ""
        assert committed == text, f"{path} is stale: run `python -m tools.reference --write`"


def test_the_pages_do_not_depend_on_the_machine(pages):
    text = "".join(pages.values())
    assert str(ROOT) not in text and "/home/" not in text and "/tmp" not in text
    assert reference.pages() == pages  # and not on the run


def leaf_fields(model: type[BaseModel] = reference.Params, prefix: str = ""):
    for name, field in model.model_fields.items():
        yield prefix + name, field
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from leaf_fields(field.annotation, f"{prefix}{name}.")


def test_every_parameter_and_section_has_a_description():
    missing = [key for key, field in leaf_fields() if not (field.description or "").strip()]
    assert missing == [], "give these a Field(description=...) in imgpipe/params.py"


def all_parsers(commands) -> list[argparse.ArgumentParser]:
    found = [command.parser for command in commands]
    for parser in found:  # subcommands (tools.images list) are appended as they are met
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                found.extend(action.choices.values())
    return found


def test_every_flag_of_every_entry_point_says_what_it_does(commands):
    missing = []
    assert [command.name for command in commands if not command.parser.description] == []
    for parser in all_parsers(commands):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{parser.prog} {choice.dest}" for choice in action._choices_actions if not choice.help]
                continue
            # Only "(default: X)" is not a help; SUPPRESS is for real internals, with a comment why.
            text = re.sub(r"\(?default:? [^)]*\)?", "", action.help or "").strip()
            if action.help != argparse.SUPPRESS and not text:
                missing.append(f"{parser.prog} {'/'.join(action.option_strings) or action.dest}")
    assert missing == [], "add help= to these flags"


def test_entry_points_are_found_in_the_source_not_listed_by_hand(commands):
    names = {command.name for command in commands}
    assert {"stages.download", "stages.pack", "stages.train_resnet", "stages.train_automl", "stages.export",
            "stages.serve", "serve", "serve.predict_folder", "tools.compare", "tools.images",
            "tools.reference"} <= names
    # Every stage dvc.yaml runs is on the page, first and in the pipeline's order.
    stage_modules = list(dict.fromkeys(stage.module for stage in reference.dvc_stages()))
    assert [command.name for command in commands][: len(stage_modules)] == stage_modules


def test_a_parser_built_outside_build_parser_is_an_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "new_tool.py").write_text(
        "import argparse\n\n\ndef main(argv=None):\n"
        "    parser = argparse.ArgumentParser(prog='python -m tools.new_tool')\n"
        "    parser.add_argument('--x', help='x')\n    return parser.parse_args(argv)\n")
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    monkeypatch.setattr(reference, "ROOT", tmp_path)
    monkeypatch.setattr(reference, "SCANNED", ("tools",))
    with pytest.raises(reference.ReferenceError, match=r"^tools/new_tool.py: builds an argparse parser outside"):
        reference.entry_modules()
    assert reference.main([]) == 2
    assert capsys.readouterr().err.startswith("reference: error: tools/new_tool.py: builds an argparse parser")


def table_row(page: str, key: str) -> str:
    rows = [line for line in page.splitlines() if line.startswith(f"| `{key}` {{#{key}}} |")]
    assert len(rows) == 1, f"{key}: not one row on the parameters page"
    return rows[0]


def test_every_params_yaml_key_is_on_the_parameters_page_with_the_stages_that_read_it(pages):
    page = pages[reference.PARAMETERS]
    stages = reference.dvc_stages()
    for key, field in leaf_fields():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            assert f"## `{key}` {{#{key}}}" in page
            continue
        row = table_row(page, key)
        read_by = {stage.name for stage in stages if re.search(rf"\[`{stage.name}`\]", row.split(" | ")[4])}
        assert read_by == {stage.name for stage in reference.readers(key, stages)}, key
    def written(tree: dict, prefix: str = ""):  # params.yaml's own keys, as users see them
        for key, value in tree.items():
            yield from written(value, f"{prefix}{key}.") if isinstance(value, dict) and value else [prefix + key]

    for key in written(yaml.safe_load((ROOT / "params.yaml").read_text())):
        assert reference.readers(key, stages), f"{key}: no dvc.yaml stage declares it"
        table_row(page, key)
    # Checked by hand against dvc.yaml: train_resnet declares train.resnet (all its keys) and
    # train.head; export (a foreach stage) declares pack.resample, train_automl neither of these.
    assert table_row(page, "train.resnet.min_steps").split(" | ")[4] == \
        "[`train_resnet`](commands.md#stages.train_resnet)"
    assert table_row(page, "train.head").split(" | ")[4] == (
        "[`train_resnet`](commands.md#stages.train_resnet), [`train_automl`](commands.md#stages.train_automl)")
    assert table_row(page, "pack.resample").split(" | ")[4] == (
        "[`pack`](commands.md#stages.pack), [`export`](commands.md#stages.export)")
    assert table_row(page, "pack.resample").split(" | ")[1:4] == [
        "one of `nearest`, `box`, `bilinear`, `hamming`, `bicubic`, `lanczos`", "`bilinear`",
        "Resampling filter of the resize: nearest, box, bilinear, hamming, bicubic or lanczos."]
    # Each key's flag, and the stage that takes it.
    assert "`--min-steps` ([`stages.train_resnet`](commands.md#stages.train_resnet))" in \
        table_row(page, "train.resnet.min_steps")


def test_a_flag_help_says_what_the_key_does_with_its_default(commands):
    download = next(c.parser for c in commands if c.name == "stages.download")
    action = next(a for a in download._actions if a.dest == "download__min_side")
    field = reference.Params.model_fields["download"].annotation.model_fields["min_side"]
    assert action.help == f"{field.description} (params.yaml default: 32)"


def test_the_commands_page_links_each_override_to_its_parameter(pages):
    page = pages[reference.COMMANDS]
    assert "## `python -m stages.train_resnet` {#stages.train_resnet}" in page
    assert "| `--min-steps` | `MIN_STEPS` | [`train.resnet.min_steps`](parameters.md#train.resnet.min_steps) |" in page
    assert "### `python -m tools.images list` {#tools.images.list}" in page
    anchors = set(re.findall(r"\{#([\w.]+)\}", pages[reference.PARAMETERS]))
    assert set(re.findall(r"\]\(parameters\.md#([\w.]+)\)", page)) <= anchors


def test_markdown_text_shows_as_written():
    assert reference.markdown("a | b <c> *d* _e_ x_y [f] {g} ``h|i``") == \
        r"a \| b &lt;c&gt; \*d\* \_e\_ x_y \[f\] \{g\} `h|i`"
