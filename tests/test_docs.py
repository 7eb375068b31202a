"""README.md and every page of the documentation site (docs/**/*.md) stay true: every benchmark
figure is generated from bench/results/ of one `make bench` run (docs/benchmarks.md's generated
blocks), no other speed, size or memory figure hides in their prose, every command they show
exists, takes the flags it is shown with, and is run somewhere (a make target, a test, or
`make demo`), and the README stays a front door whose links lead to pages and headings that exist.
tests/test_docs_site.py builds the site itself (links and anchors between pages, search, offline)."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from bench import summary

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# README.md first, then every page of the site, by path from the repository root.
PAGES = {"README.md": README, **{path.relative_to(ROOT).as_posix(): path.read_text()
                                 for path in sorted((ROOT / "docs").rglob("*.md"))}}
BENCHMARKS = "docs/benchmarks.md"  # where `make bench` writes the generated blocks
README_LINES = 200  # a front door: what the project is, the two commands, links into the site
# The tests that run DVC for real, on the demo data and on the tiny pipeline.
PIPELINE_TESTS = "".join((ROOT / "tests" / name).read_text() for name in ("test_demo_data.py", "test_demo_pipeline.py"))
# Commands the pages show that run outside this repository's code, and where they are exercised.
ELSEWHERE = {
    "curl": "tests/test_serve_app.py sends the same requests (multipart, base64, url, path, batch, annotate)",
    "git": "git itself; tests/test_demo_pipeline.py commits, clones and tags",
    "ray": "Ray's own CLI; tests/ray_cluster.py runs `ray start --head` and `ray start --address` on loopback",
}


def page_commands() -> list[tuple[str, str]]:
    """(page, command) for every command in the pages' ```sh blocks (continuations joined, comments
    and `&&` split)."""
    found = []
    for page, text in PAGES.items():
        for block in re.findall(r"```sh\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()
                if line and not line.startswith("#"):
                    # `RAY_ADDRESS=... dvc repro` is the command `dvc repro` with a variable set.
                    found += [(page, re.sub(r"^([A-Z_]+=\S+\s+)+", "", part.strip())) for part in line.split("&&")]
    return found


def commands() -> list[str]:
    return [command for _, command in page_commands()]


# --- benchmark figures -------------------------------------------------------------------------

# A speed, size or memory figure: a number with a unit of time, rate, ratio or size (not %, which
# the pages also use for accuracies and data splits).
FIGURE = re.compile(r"(?<![\w.])~?\d[\d,]*(?:\.\d+)?(?:\s?-\s?\d+(?:\.\d+)?)?\s?"
                    r"(?:x\b|×|(?:\w+ )?images/s\b|URLs/s\b|ms\b|s\b|min\b|h\b|hours?\b|minutes?\b|seconds?\b"
                    r"|[KMGT]i?B\b|[KMG]\b|bytes\b)")
# The only such figures allowed outside the generated benchmark blocks, and why. Hand-timed ones
# must stand in a paragraph that says so ("by hand").
HAND_TIMED = {
    "7 min 51 s", "12 min 12 s", "1 min 28 s", "10 min 45 s", "2 min 0 s", "18 min 0 s", "15 min 47 s",
    # make demo / make test wall clock on fresh clones (README's Quick start; getting-started.md includes it)
    "357M", "3.4G",  # du -sh of the serving-only and the full virtual environment (service.md)
}
NOT_MEASURED = {"3 bytes": "`image_size`² x 3 bytes per image: what an image takes in memory, by definition"}


def outside_blocks(text: str) -> str:
    for name in summary.BLOCKS:
        start, end = summary.markers(name)
        text = text[:text.index(start)] + text[text.index(end) + len(end):]
    return text


def figures(text: str) -> list[tuple[str, str]]:
    """(figure, its paragraph) for every speed, size or memory figure; runs like "8 min 27 s" as one."""
    found = []
    for paragraph in re.split(r"\n\s*\n", text):
        flat = " ".join(paragraph.split())
        for match in re.finditer(rf"{FIGURE.pattern}(?:\s{FIGURE.pattern})*", flat):
            found.append((match.group(), flat))
    return found


def stamped(tmp_path: Path, ids: dict[str, str | None], make_bench: bool = True) -> Path:
    """A copy of bench/results/ whose files carry run records with these ids (None: no run record;
    files not named are left as they are)."""
    folder = tmp_path / "results"
    shutil.copytree(summary.RESULTS, folder)
    for name, run_id in ids.items():
        path = folder / f"{name}.json"
        data = json.loads(path.read_text())
        if run_id is None:
            if "run" in data:
                del data["run"]
                path.write_text(json.dumps(data))
            continue
        data["run"] = {"id": run_id, "make_bench": make_bench, "script": f"bench.{name}", "commit": "c0ffee" * 6 + "ab",
                       "dirty": False, "started": "2026-01-01T00:00:00Z", "seconds": 60.0,
                       "machine": {"cpus": 2, "cpu": "Test CPU", "platform": "Linux", "python": "3.11.7"}}
        path.write_text(json.dumps(data))
    return folder


def test_the_benchmarks_page_is_the_one_the_results_files_give():
    text = PAGES[BENCHMARKS]
    assert set(summary.blocks_in(text)) == set(summary.BLOCKS), f"{BENCHMARKS} lacks some bench:NAME markers"
    rendered = summary.render()
    for name, block in summary.blocks_in(text).items():
        assert block == rendered[name].strip(), (
            f"{BENCHMARKS}'s bench:{name} block differs from bench/results/: run "
            f"`python -m bench.summary --write {BENCHMARKS}`")


def test_generated_blocks_live_on_the_benchmarks_page_alone():
    """Other pages link to the figures; a second copy would go stale when `make bench` rewrites one."""
    for page, text in PAGES.items():
        if page != BENCHMARKS:
            assert "<!-- bench:" not in text, f"{page} holds bench markers: link to {BENCHMARKS} instead"


def test_no_speed_size_or_memory_figure_outside_the_generated_blocks_but_the_listed_ones():
    found = []  # (page, figure, paragraph)
    for page, text in PAGES.items():
        found += [(page, figure, paragraph)
                  for figure, paragraph in figures(outside_blocks(text) if page == BENCHMARKS else text)]
    unexplained = sorted({(page, figure) for page, figure, _ in found
                          if figure not in HAND_TIMED and figure not in NOT_MEASURED})
    assert not unexplained, (f"figures not from bench/results/ (page, figure): {unexplained}; put them in a generated "
                             "block (bench/summary.py) or, if they cannot come from `make bench`, list them here")
    for page, figure, paragraph in found:
        if figure in HAND_TIMED:
            assert "by hand" in paragraph, f"{page}: {figure!r} is hand-timed but its paragraph does not say so"
    stale = sorted((HAND_TIMED | set(NOT_MEASURED)) - {figure for _, figure, _ in found})
    assert not stale, f"listed as allowed but no longer in README.md or docs/: {stale}"


def test_the_hand_timed_quick_start_paragraph_is_written_once_and_included_by_the_site():
    """README.md holds it between snippet markers; docs/getting-started.md includes it (pymdownx.snippets),
    so the site shows the same words without a second copy to keep in step."""
    start, end = "<!-- --8<-- [start:timing] -->", "<!-- --8<-- [end:timing] -->"
    assert start in README and end in README, "README.md lost the snippet markers around the hand-timed paragraph"
    assert "by hand" in README[README.index(start):README.index(end)]
    assert '--8<-- "README.md:timing"' in PAGES["docs/getting-started.md"]


def test_the_results_files_are_one_run_or_exactly_the_known_older_files():
    summary.provenance()  # raises NotOneRun, with every problem, otherwise


def test_the_results_files_record_one_make_bench_run():
    origin = summary.provenance()
    if origin["run"] is None:
        pytest.xfail(f"{', '.join(f'{name}.json' for name in origin['unstamped'])} predate run records (the known "
                     "older files, unchanged; docs/benchmarks.md says they are not verified as one run): "
                     "rerun `make bench`")
    run = origin["run"]
    assert run["make_bench"] and run["commit"]
    assert f"`{run['id']}`" in summary.blocks_in(PAGES[BENCHMARKS])["summary"]


def test_one_run_is_named_with_its_commit_and_each_script_s_time(tmp_path):
    folder = stamped(tmp_path, {name: "20260101T000000Z-42" for name in summary.FILES})
    # The small-data benchmark is not part of `make bench`: the one-run check ignores it, its block says so.
    (folder / "small_data.json").write_bytes((summary.RESULTS / "small_data.json").read_bytes())
    origin = summary.provenance(folder)
    assert origin["run"]["id"] == "20260101T000000Z-42" and not origin["unstamped"]
    assert "not part of a `make bench` run" in summary.render(folder)["small-data"]
    paragraph = summary.render(folder)["summary"].split("\n\n")[0]
    assert "`20260101T000000Z-42`" in paragraph and "`c0ffeec0ffee`" in paragraph
    assert "download 60 s" in paragraph and "serve 60 s" in paragraph


@pytest.mark.parametrize(("ids", "make_bench", "problem"), [
    ({"download": "run-a", "input_pipeline": "run-b", "train": "run-a", "serve": "run-a"}, True, "mixes runs"),
    ({name: "standalone-x" for name in summary.FILES}, False, "run on its own"),
    ({"download": None, "input_pipeline": "run-a", "train": None, "serve": None}, True, "with older files"),
])
def test_results_of_different_runs_are_refused(tmp_path, ids, make_bench, problem, capsys):
    folder = stamped(tmp_path, ids, make_bench)
    with pytest.raises(summary.NotOneRun, match=problem):
        summary.render(folder)
    markdown = tmp_path / "benchmarks.md"
    markdown.write_text(PAGES[BENCHMARKS])
    assert summary.main(["--write", str(markdown), "--results", str(folder)]) == 1
    assert problem in capsys.readouterr().err
    assert markdown.read_text() == PAGES[BENCHMARKS]


def test_an_unstamped_file_that_is_not_the_known_older_one_or_a_missing_file_is_refused(tmp_path):
    folder = stamped(tmp_path, {name: None for name in summary.FILES})
    train = folder / "train.json"
    data = json.loads(train.read_text())
    train.write_text(json.dumps({**data, "edited": True}, indent=2) + "\n")  # any change, whatever the schema
    with pytest.raises(summary.NotOneRun, match="train.json records no run"):
        summary.provenance(folder)
    (folder / "serve.json").unlink()
    with pytest.raises(summary.NotOneRun, match="serve.json is missing"):
        summary.provenance(folder)


def test_every_configuration_measured_has_its_rows_and_cached_is_only_compared_with_cached(tmp_path):
    table = summary.table()
    download = json.loads((summary.RESULTS / "download.json").read_text())
    for run in download["runs"]:
        assert table.count(f"{run['workers']} workers in all") == 2, run["workers"]
    serve = json.loads((summary.RESULTS / "serve.json").read_text())
    for precision, run in serve["onnxruntime"].items():
        for name in run["services"]:
            assert table.count(f"{precision} service, {name} (") == 3, (precision, name)
    pipeline = json.loads((summary.RESULTS / "input_pipeline.json").read_text())
    if "ratio_both_cached" not in pipeline["photos"]["read"]:  # older file: our side alone was timed cached
        assert "cached in memory" not in table
    assert not [page for page, text in PAGES.items() if "how the trainers read" in text]

    folder = stamped(tmp_path, {name: "run-a" for name in summary.FILES})
    path = folder / "input_pipeline.json"
    data = json.loads(path.read_text())
    for key in data["sets"]:
        data[key]["read"].update(image_dataset_from_directory_cached_images_per_s=1000.0, ratio_both_cached=1.5)
    path.write_text(json.dumps(data))
    rows = [line for line in summary.table(folder).splitlines() if "both sides cached" in line]
    assert len(rows) == 2 and all("`image_dataset_from_directory(...).cache()`" in row and "1.50x" in row
                                  for row in rows)


def train_results(ratios: dict[tuple[int, str], float], bit_identical: bool = True) -> dict:
    """A bench/train.py results file (the format with sizes, precisions and kill-and-resume), with
    these TFRecord / in-memory ratios and an emulated mixed_float16 at each size."""
    configs = []
    for (size, precision), value in ratios.items():
        memory = 20.0
        configs.append({"image_size": size, "precision": precision, "emulated": False, "warning": None,
                        "warmup_steps": 2, "steps": 10,
                        "runs": {"tfrecord": [memory * value] * 3, "in_memory": [memory] * 3},
                        "tfrecord_images_per_s": memory * value, "in_memory_images_per_s": memory, "ratio": value,
                        "ratio_runs": [value - 0.02, value, value + 0.02]})
    for size in sorted({size for size, _ in ratios}):
        configs.append({"image_size": size, "precision": "mixed_float16", "emulated": True, "warning": "emulated",
                        "warmup_steps": 1, "steps": 2, "runs": {"tfrecord": [2.5]}, "tfrecord_images_per_s": 2.5})
    return {
        "machine": {"cpus": 2, "cpu": "Test CPU", "bf16_instructions": ["avx512_bf16"], "gpus": 0},
        "setup": {"train_images": 1261, "classes": 10, "batch_size": 16, "warmup_steps": 2, "steps": 10, "repeat": 3,
                  "float16_steps": 2, "augmentation": {"flip": True, "rotation": 0.1, "contrast": 0.1}},
        "target_ratio": 0.95, "configs": configs,
        "resume": {"image_size": 128, "epochs": 2, "batch_size": 32, "precision": "float32",
                   "flags": ["--epochs", "2", "--min-steps", "0", "--patience", "0", "--batch-size", "32"],
                   "kill_at": "Epoch 2/", "uninterrupted_s": 200.0, "killed_s": 110.0, "resumed_s": 120.0,
                   "lost_s": 30.0, "lost_fraction": 0.15, "epoch_s": [100.0, 80.0], "backup_bytes": 377_000_000,
                   "backup_files": 3, "backed_up_epoch": 1, "bit_identical": bit_identical},
    }


def test_every_size_and_precision_of_the_training_feed_has_its_row_and_float16_is_marked(tmp_path):
    folder = stamped(tmp_path, {name: "run-a" for name in summary.FILES})
    ratios = {(128, "float32"): 1.01, (128, "mixed_bfloat16"): 0.97, (224, "float32"): 0.99,
              (224, "mixed_bfloat16"): 0.93}
    run = json.loads((folder / "train.json").read_text())["run"]
    (folder / "train.json").write_text(json.dumps({**train_results(ratios), "run": run}))
    rows = [line for line in summary.table(folder).splitlines() if line.startswith("| train |")]
    assert len(rows) == 4  # the emulated float16 is not compared
    for (size, precision), value in ratios.items():
        [line] = [row for row in rows if f"at {size} px, {precision}," in row]
        assert f"| {value:.2f}x | >= 0.95x | {'yes' if value >= 0.95 else '**no**'} |" in line
    block = summary.render(folder)["train"]
    assert "**not met** in 224 px mixed_bfloat16 (worst 0.93x)" in block
    assert block.count("mixed_float16 (emulated: one run of 2 steps) | 2.5 | not measured") == 2
    assert "mixed_bfloat16 over float32, TFRecord-fed: 0.96x at 128 px and 0.94x at 224 px" in block
    assert "30 s lost (15% of the uninterrupted run)" in block and "uninterrupted one: yes" in block

    (folder / "train.json").write_text(json.dumps({**train_results(ratios, bit_identical=False), "run": run}))
    assert "uninterrupted one: **no**" in summary.render(folder)["train"]


def test_the_writer_refuses_a_file_without_markers_or_no_file(tmp_path, capsys):
    plain = tmp_path / "plain.md"
    plain.write_text("# no table here\n")
    assert summary.main(["--write", str(plain)]) == 1
    assert "no <!-- bench:summary:start -->" in capsys.readouterr().err
    assert plain.read_text() == "# no table here\n"
    assert summary.main(["--write", str(tmp_path / "missing.md")]) == 1
    assert "missing.md" in capsys.readouterr().err


def test_every_command_is_known():
    unknown = [(page, command) for page, command in page_commands()
               if command.split()[0] not in {"make", "python", "dvc", *ELSEWHERE}]
    assert not unknown, unknown


def test_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    for page, command in page_commands():
        if command.startswith("make "):
            target = command.split()[1]
            assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"{page}: `{command}`: no such make target"


def help_text(module: str) -> str:
    main = importlib.import_module(module if module != "serve" else "serve.__main__").main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    return out.getvalue()


def test_python_commands_take_the_flags_they_are_shown_with():
    shown: dict[str, set[str]] = {}
    pages: dict[str, set[str]] = {}
    for page, command in page_commands():
        words = shlex.split(command)
        if words[:2] == ["python", "-m"]:
            shown.setdefault(words[2], set()).update(
                word.strip("[]").split("=")[0] for word in words[3:] if word.strip("[").startswith("--"))
            pages.setdefault(words[2], set()).add(page)
    assert {"stages.download", "tools.compare", "serve"} <= set(shown)
    for module, flags in sorted(shown.items()):
        text = help_text(module)
        missing = [flag for flag in sorted(flags) if flag not in text]
        assert not missing, (f"{', '.join(sorted(pages[module]))}: python -m {module} is shown with {missing}, "
                             "which it does not take")


def test_dvc_commands_are_run_by_the_pipeline_tests():
    calls = set(re.findall(r'dvc\(\w+, "([a-z-]+)"(?:, "([a-z-]+)")?', PIPELINE_TESTS))
    groups = {"exp", "metrics", "plots", "remote", "artifacts", "queue"}  # commands with subcommands
    for page, command in page_commands():
        words = shlex.split(command)
        if words[0] != "dvc":
            continue
        if words[1] in groups:
            assert (words[1], words[2]) in calls, (
                f"{page}: `{command}` is not run by the pipeline tests (test_demo_data.py, test_demo_pipeline.py)")
        else:
            assert words[1] in {first for first, _ in calls}, (
                f"{page}: `{command}` is not run by the pipeline tests (test_demo_data.py, test_demo_pipeline.py)")


# --- the README as a front door ----------------------------------------------------------------


def headings(text: str) -> set[str]:
    """The anchors MkDocs (and GitHub, for these headings) gives a page's headings (code blocks skipped)."""
    from markdown.extensions.toc import slugify

    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return {slugify(match, "-") for match in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


def test_the_readme_is_a_front_door():
    lines = README.count("\n")
    assert lines <= README_LINES, (f"README.md has {lines} lines (at most {README_LINES}): move the detail to a page "
                                   "under docs/ and link to it")


def test_the_readme_s_links_lead_to_pages_and_headings_that_exist():
    """GitHub renders the README, not MkDocs, so the site's strict build does not check its links."""
    links = re.findall(r"\]\(([^)\s]+)\)", re.sub(r"^```.*?^```", "", README, flags=re.S | re.M))
    local = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert any(link.startswith("docs/") for link in local), "README.md links to no page of the site"
    for link in local:
        path, _, anchor = link.partition("#")
        target = ROOT / path if path else ROOT / "README.md"
        assert target.is_file(), f"README.md links to {link}: no such file"
        if anchor:
            assert anchor in headings(target.read_text()), f"README.md links to {link}: no such heading"


def test_every_page_under_docs_is_in_the_site_s_nav():
    """A page left out of nav is unreachable on the site (the strict build also says so)."""
    import yaml

    def listed(entries) -> list[str]:  # type: ignore[no-untyped-def]
        found = []
        for entry in entries:
            for value in entry.values() if isinstance(entry, dict) else [entry]:
                found += listed(value) if isinstance(value, list) else [value]
        return found

    nav = listed(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    pages = sorted(page.removeprefix("docs/") for page in PAGES if page.startswith("docs/"))
    assert sorted(nav) == pages
