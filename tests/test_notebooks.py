"""notebooks/ is stored without outputs (the tiny pipeline test executes every notebook)."""

from __future__ import annotations

import json

from tools import notebooks


def test_the_three_notebooks_are_stored_without_outputs():
    names = [path.stem for path in notebooks.notebooks()]
    assert names == ["1_dataset", "2_experiments", "3_error_analysis"]
    for path in notebooks.notebooks():
        assert notebooks.dirty_cells(json.loads(path.read_text())) == [], path
    assert notebooks.main([]) == 0


def test_the_check_catches_outputs_and_strip_removes_only_them(tmp_path, capsys):
    source = notebooks.notebooks()[0]
    notebook = json.loads(source.read_text())
    code = next(cell for cell in notebook["cells"] if cell["cell_type"] == "code")
    code["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["hello\n"]}]
    code["execution_count"] = 3
    run = tmp_path / "run.ipynb"
    run.write_text(json.dumps(notebook))

    assert notebooks.main([str(run)]) == 1
    assert "run.ipynb: cells [" in capsys.readouterr().err
    assert notebooks.main(["--strip", str(run)]) == 0
    assert notebooks.main([str(run)]) == 0
    assert json.loads(run.read_text()) == json.loads(source.read_text())


def test_a_missing_or_broken_notebook_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "broken.ipynb").write_text("{not json")
    for name in ("missing.ipynb", "broken.ipynb"):
        assert notebooks.main([str(tmp_path / name)]) == 2
        assert f"{name}: not a readable notebook" in capsys.readouterr().err
