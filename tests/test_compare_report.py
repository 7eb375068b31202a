"""python -m tools.compare --html: the report of real offline runs, opened in headless Chromium.

The runs are recorded by the project's Tracker in Neptune's offline mode, as the trainers record
them: a two-experiment ResNet sweep (DVC_EXP_NAME) and an AutoKeras search whose best trial is
not its last. The first ResNet run uploads its pictures the way runs did before the Tracker kept
copies (the workspace file's path only); the second writes over those files.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from imgpipe.cli import StageError
from imgpipe.training.tracking import Tracker
from tests.browser import chromium
from tools.compare.report import label, write_report
from tools.compare.runs import RunRecord, find_runs

RESNET_PICTURES = Path("reports/train_resnet/pictures")


def picture(path: Path, color: tuple[int, int, int]) -> Path:
    """A tiny PNG, one colour per run and picture, so that no two uploads hold the same bytes."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 16), color).save(path)
    return path


def finals(val: float) -> dict:
    return {"val": {"accuracy": val, "macro_f1": val - 0.01}, "test": {"accuracy": val - 0.02, "macro_f1": val - 0.03},
            "beats_baseline": val > 0.75}


def resnet_run(lr: float, accuracy: list[float], val: float, shade: int, old_style: bool) -> None:
    tracker = Tracker("resnet50v2", tags=["resnet50v2", "8px"])
    tracker.set("parameters", {"train": {"resnet": {"learning_rate": lr, "epochs": len(accuracy)}}, "image_size": 8})
    for epoch, value in enumerate(accuracy, start=1):
        tracker.log("train/accuracy", value, step=epoch)
        tracker.log("train/loss", 1 - value, step=epoch)
    tracker.set("metrics", finals(val))
    confusion = picture(RESNET_PICTURES / "confusion.png", (shade, 0, 0))
    curves = picture(RESNET_PICTURES / "curves.png", (0, shade, 0))
    # Before the Tracker kept copies, Neptune recorded only the workspace file's path (File(path)).
    tracker.run["pictures/confusion"].upload(str(confusion))
    if old_style:
        tracker.run["pictures/curves"].upload(str(curves))
    else:
        tracker.upload("pictures/curves", curves)
    tracker.stop()


def automl_run() -> None:
    tracker = Tracker("autokeras", tags=["autokeras", "8px"])
    tracker.set("parameters", {"train": {"automl": {"max_trials": 3}}, "image_size": 8})
    for trial, (score, accuracy) in enumerate([(0.5, [0.3, 0.5]), (0.2, [0.4, 0.8]), (0.4, [0.2, 0.6])]):
        tracker.set(f"trials/{trial}/status", "COMPLETED")
        tracker.set(f"trials/{trial}/score", score)
        tracker.log("trials/score", score, step=trial)
        for epoch, value in enumerate(accuracy, start=1):
            tracker.log(f"trials/{trial}/train/accuracy", value, step=epoch)
            tracker.log(f"trials/{trial}/train/loss", 1 - value, step=epoch)
    tracker.set("metrics", finals(0.8))
    tracker.upload("pictures/confusion", picture(Path("reports/train_automl/pictures/confusion.png"), (0, 0, 200)))
    tracker.stop()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("workspace")
    with pytest.MonkeyPatch.context() as env:
        env.chdir(root)
        for name in ("NEPTUNE_MODE", "NEPTUNE_API_TOKEN", "NEPTUNE_DATA_DIRECTORY", "DVC_ROOT"):
            env.delenv(name, raising=False)
        env.setenv("DVC_EXP_NAME", "lr-001")
        resnet_run(0.01, [0.3, 0.5, 0.7], val=0.7, shade=100, old_style=True)
        # The second experiment writes over the first one's pictures: confusion.png is uploaded by
        # path again (as before), curves.png as a copy (as the Tracker does now).
        env.setenv("DVC_EXP_NAME", "lr-01")
        resnet_run(0.1, [0.5, 0.8, 0.9], val=0.9, shade=200, old_style=False)
        env.delenv("DVC_EXP_NAME")
        automl_run()
    return root


@pytest.fixture(scope="module")
def runs(workspace) -> list[RunRecord]:
    return sorted(find_runs(workspace / ".neptune"), key=lambda r: r.created)


def test_runs_know_their_pictures_and_the_best_trial(runs):
    first, second, automl = runs
    assert [r.experiment for r in runs] == ["lr-001", "lr-01", ""]
    # The first run's workspace files now hold the second run's pictures: both rules see it.
    pictures = {key: upload for key, upload in first.uploads.items() if key.startswith("pictures/")}
    assert {key: upload.overwritten_by for key, upload in pictures.items()} == {
        "pictures/confusion": second.run_id, "pictures/curves": second.run_id}
    assert not any(upload.kept for upload in pictures.values())
    assert second.uploads["pictures/confusion"].kept and not second.uploads["pictures/confusion"].copied
    assert second.uploads["pictures/curves"].copied and second.uploads["pictures/curves"].kept
    assert second.uploads["pictures/curves"].file.parent == second.folder / "upload_path"
    assert automl.trials == [0, 1, 2] and automl.best_trial == 1  # lowest val_loss, not the last
    assert automl.curves["train/accuracy"] == automl.series["trials/1/train/accuracy"] == [(1, 0.4), (2, 0.8)]
    assert automl.trial_series(2)["train/loss"] == [(1, 0.8), (2, pytest.approx(0.4))]
    assert second.curves == second.series and second.best_trial is None


def test_the_best_trial_is_the_lowest_score_among_finished_trials():
    run = RunRecord(Path("run"), "id", "", values={
        "trials/0/status": "COMPLETED", "trials/0/score": 0.3, "trials/1/status": "FAILED", "trials/1/score": 0.1,
        "trials/2/status": "RUNNING", "trials/3/status": "COMPLETED", "trials/3/score": 0.2})
    assert run.trials == [0, 1, 2, 3] and run.best_trial == 3
    assert RunRecord(Path("run"), "id", "", values={"trials/0/status": "FAILED"}).best_trial is None


def test_a_diverged_series_is_drawn_without_its_nan_points(tmp_path):
    run = RunRecord(Path("run"), "0123456789", "", series={
        "train/loss": [(1, 2.0), (2, float("nan")), (3, 1.0)], "train/val_loss": [(1, float("inf"))]})
    write_report([run], tmp_path / "report.html")
    html = (tmp_path / "report.html").read_text()
    assert 'data-series="train/loss"' in html and "train/val_loss" not in html  # nothing left to draw
    (points,) = re.findall(r'class="curve" data-run="0123456789"[^>]* points="([^"]*)"', html)
    assert len(points.split()) == 2  # the two finite points


def test_the_report_is_one_self_contained_file_and_the_same_each_time(workspace, runs, tmp_path):
    write_report(runs, tmp_path / "a.html")
    write_report(sorted(find_runs(workspace / ".neptune"), key=lambda r: r.created), tmp_path / "b.html")
    html = (tmp_path / "a.html").read_bytes()
    assert html == (tmp_path / "b.html").read_bytes()
    text = html.decode()
    links = re.findall(r"""(?:src|href)=["']?([^"'\s>]+)""", text)
    assert links and all(link.startswith(("data:image/", "#")) for link in links), links
    assert not re.search(r"https?:|//|@import|url\(", re.sub(r"data:image/[^\"]+", "", text))


def test_a_report_path_that_is_not_html_is_refused(runs, tmp_path):
    with pytest.raises(StageError, match=r"curves\.png: the report is one HTML page"):
        write_report(runs, tmp_path / "curves.png")


def test_an_unreadable_run_is_left_out_with_a_warning_naming_it(tmp_path, caplog):
    broken = tmp_path / ".neptune" / "offline" / "run__broken"
    broken.mkdir(parents=True)
    (broken / "metadata.json").write_text("{")  # cut short: the disk filled while it was written
    with caplog.at_level(logging.WARNING, logger="tools.compare.runs"):
        assert find_runs(tmp_path / ".neptune") == []
    assert "run__broken: unreadable" in caplog.text


def test_the_report_in_a_browser(runs, tmp_path):
    from playwright.sync_api import expect

    first, second, automl = runs
    report = tmp_path / "report.html"
    write_report(runs, report)
    with chromium() as browser:
        page = browser.page(width=1280, height=900)
        page.goto(report.as_uri())
        assert browser.foreign_requests() == [report.as_uri()]  # the file itself, and nothing else

        names = page.locator("table.runs tbody th")
        expect(names).to_have_text([r.name for r in runs])
        expect(page.locator("table.runs tbody td:nth-child(3)")).to_have_text(["lr-001", "lr-01", ""])
        heads = page.locator("table.runs thead th[data-column]")
        assert [h.get_attribute("title") for h in heads.all()] == [
            "run", "id", "experiment", "metrics/val/accuracy", "metrics/test/accuracy", "metrics/val/macro_f1",
            "metrics/test/macro_f1", "metrics/beats_baseline", "parameters/train/resnet/learning_rate"]
        expect(page.locator('th[title="parameters/train/resnet/learning_rate"]')).to_have_class(re.compile("differs"))

        # Sorting: a click sorts best first, Enter on the focused button reverses.
        val_accuracy = page.locator('th[title="metrics/val/accuracy"]')
        val_accuracy.locator("button").click()
        expect(val_accuracy).to_have_attribute("aria-sort", "descending")
        expect(page.locator("table.runs tbody td:nth-child(2)")).to_have_text(
            [r.run_id[:8] for r in (second, automl, first)])
        val_accuracy.locator("button").focus()
        page.keyboard.press("Enter")
        expect(val_accuracy).to_have_attribute("aria-sort", "ascending")
        expect(page.locator("table.runs tbody td:nth-child(2)")).to_have_text(
            [r.run_id[:8] for r in (first, automl, second)])

        # Every run in every chart: a curve and a legend line; AutoKeras' other trials faded beneath.
        charts = page.locator("figure.series")
        assert [c.get_attribute("data-series") for c in charts.all()] == ["train/accuracy", "train/loss",
                                                                           "trials/score"]
        for chart in charts.all()[:2]:
            for run in runs:
                expect(chart.locator(f'svg .curve[data-run="{run.run_id}"]')).to_have_count(1)
                expect(chart.locator(f'.legend [data-run="{run.run_id}"]')).to_contain_text(label(run))
            expect(chart.locator(f'svg .trial[data-run="{automl.run_id}"]')).to_have_count(2)
            expect(chart.locator(f'svg .curve[data-run="{automl.run_id}"]')).to_have_attribute("data-trial", "best")
        expect(charts.last.locator(f'.legend [data-run="{first.run_id}"]')).to_contain_text("no values")

        # Pictures: the kept ones shown, the first run's overwritten ones named as not kept.
        for run, count in ((first, 0), (second, 2), (automl, 1)):
            expect(page.locator(f'section.run[data-run="{run.run_id}"] img')).to_have_count(count)
        assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        expect(page.locator(f'section.run[data-run="{first.run_id}"] .not-kept')).to_have_count(2)
        expect(page.locator(f'section.run[data-run="{first.run_id}"] .not-kept').first).to_contain_text(
            f"was overwritten by a later run, {label(second)}")

        # A picture's button enlarges it to the whole row, and back.
        zoom = page.locator(f'section.run[data-run="{second.run_id}"] .zoom').first
        zoom.click()
        expect(zoom).to_have_attribute("aria-pressed", "true")
        assert page.locator(f'section.run[data-run="{second.run_id}"] figure').first.bounding_box()["width"] > 1000

        assert page.evaluate("document.scrollingElement.scrollWidth <= innerWidth")  # no sideways scrolling
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert (tmp_path / "report.png").stat().st_size > 10_000
