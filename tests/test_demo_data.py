"""The demo data and the data stages of the DVC pipeline, run for real with DVC in a temporary copy
of the repository: the generated data matches data.dvc, and `dvc repro` of download and pack
reproduces the committed dvc.lock. (The whole pipeline runs in tests/test_demo_pipeline.py, on a
tiny configuration; the two files run side by side.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.pipeline import ROOT, copy_pipeline, dvc, tree
from tests.shard_files import kept_images
from tools import demo_data


def test_demo_data_regenerates_byte_identical(tmp_path):
    demo_data.main(["--out", str(tmp_path / "one")])
    demo_data.main(["--out", str(tmp_path / "two")])
    one = tree(tmp_path / "one")
    assert one == tree(tmp_path / "two")
    assert len([name for name in one if name.startswith(("images/", "local/"))]) == 1797
    formats = {name.rsplit(".", 1)[-1] for name in one}
    assert formats == {"png", "jpg", "csv", "yaml"}


def test_demo_data_refuses_to_overwrite_without_force(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(SystemExit, match="exists; pass --force"):
        demo_data.main(["--out", str(tmp_path / "data")])


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git + DVC repository holding this project's pipeline files and freshly generated demo data."""
    repo = copy_pipeline(tmp_path_factory.mktemp("repo"))
    demo_data.main(["--out", str(repo / "data")])
    return repo


def test_generated_data_matches_data_dvc(repo):
    # What `make data` does on a fresh clone: generate, then cache it under the committed hash.
    dvc(repo, "add", "-q", "data")
    assert (repo / "data.dvc").read_bytes() == (ROOT / "data.dvc").read_bytes()
    assert "up to date" in dvc(repo, "status", "data.dvc")


def lock_entries(lock_text: str, *stages: str) -> dict:
    return {name: yaml.safe_load(lock_text)["stages"][name] for name in stages}


@pytest.mark.slow
def test_repro_of_the_data_stages_reproduces_the_committed_lock(repo):
    # The trainers are too slow for the suite at demo size: they run below on a tiny overlay.
    committed = lock_entries((ROOT / "dvc.lock").read_text(), "download", "pack")
    dvc(repo, "repro", "pack")
    assert lock_entries((repo / "dvc.lock").read_text(), "download", "pack") == committed, (
        "a fresh `dvc repro` gives other dvc.lock entries than the committed ones: "
        "run `dvc repro` and commit dvc.lock after changing a stage"
    )
    images = tree(repo / "build/images")
    assert len(kept_images(repo / "build/images")) == 1797

    dvc(repo, "repro", "-f", "pack")
    assert lock_entries((repo / "dvc.lock").read_text(), "download", "pack") == committed
    assert tree(repo / "build/images") == images
    assert "Running stage" not in dvc(repo, "repro", "pack")


@pytest.mark.slow
def test_demo_trains_at_its_own_size_without_touching_params_yaml(repo):
    params = (repo / "params.yaml").read_text()
    assert "image_size: 224" in params  # the default for users' own photos
    from imgpipe.records.read import record_image_size

    dvc(repo, "repro", "pack")
    assert record_image_size(repo / "build/tfrecords") == 64  # from data/params.yaml, the demo data's settings
    assert (repo / "params.yaml").read_text() == params
