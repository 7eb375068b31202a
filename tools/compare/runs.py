"""Neptune runs without a Neptune server: the offline operation logs on disk, replayed.

Each run Neptune records offline is a folder of JSON operation logs. They are read with the
client's own parser and replayed through its own operation classes, so what is read is exactly
what Neptune would have shown: name, tags, parameters, final metrics, learning curves, and the
files uploaded to it (pictures).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Points = list[tuple[float | None, float]]  # a series: (step, value) in the order logged
TRIAL_KEY = re.compile(r"trials/(\d+)/(.+)")  # AutoKeras' trials/<n>/... (imgpipe/training/automl.py)
FINISHED = "COMPLETED"  # KerasTuner's status of a trial that ran to the end (its oracle ranks only these)


@dataclass
class Upload:
    """A file uploaded to a run. ``copied``: Neptune kept a copy in the run's folder (upload_path/);
    otherwise ``file`` is the workspace file the run pointed at (runs recorded before the Tracker
    kept copies), which a later run may have overwritten since: ``overwritten_by`` names it."""

    file: Path
    extension: str
    copied: bool
    overwritten_by: str = ""  # run_id of the first later run that wrote over the workspace file

    @property
    def kept(self) -> bool:
        """Whether ``file`` still holds what this run uploaded."""
        return not self.overwritten_by and self.file.is_file()


@dataclass
class RunRecord:
    """A run rebuilt from its operation log: single values and series, keyed by 'a/b' paths."""

    folder: Path
    run_id: str
    created: str
    values: dict[str, Any] = field(default_factory=dict)
    series: dict[str, Points] = field(default_factory=dict)
    sets: dict[str, set[str]] = field(default_factory=dict)
    uploads: dict[str, Upload] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.values.get("sys/name") or self.run_id[:8])

    @property
    def experiment(self) -> str:
        """The DVC experiment the run belongs to (`dvc exp show` lists it by this name), if any."""
        return str(self.values.get("source/dvc_experiment", ""))

    @property
    def tags(self) -> list[str]:
        return sorted(self.sets.get("sys/tags", set()))

    @property
    def trials(self) -> list[int]:
        """The AutoKeras trials recorded (trials/<n>/...), in order; none for other runs."""
        keys = [*self.values, *self.series]
        return sorted({int(match[1]) for key in keys if (match := TRIAL_KEY.fullmatch(key))})

    @property
    def best_trial(self) -> int | None:
        """The finished trial with the lowest score (its best val_loss), as KerasTuner's oracle ranks them."""
        scored = [(score, n) for n in self.trials
                  if self.values.get(f"trials/{n}/status") == FINISHED
                  and isinstance(score := self.values.get(f"trials/{n}/score"), int | float)]
        return min(scored)[1] if scored else None

    def trial_series(self, trial: int) -> dict[str, Points]:
        """One trial's per-epoch series, named as a run's own: trials/2/train/loss -> train/loss."""
        prefix = f"trials/{trial}/"
        return {key[len(prefix):]: points for key, points in self.series.items() if key.startswith(prefix)}

    @property
    def curves(self) -> dict[str, Points]:
        """The run's series to compare with other runs': its own, and for an AutoKeras run the best
        trial's (trials/<best>/train/loss as train/loss) where it has none of its own."""
        own = {key: points for key, points in self.series.items() if not TRIAL_KEY.fullmatch(key)}
        best = self.best_trial
        return {**(self.trial_series(best) if best is not None else {}), **own}


def _replayer(record: RunRecord):  # type: ignore[no-untyped-def]
    """An OperationVisitor (Neptune's own) that applies each operation to ``record``."""
    from neptune.internal.operation_visitor import OperationVisitor

    class Replay(OperationVisitor[None]):
        def _assign(self, op) -> None:  # type: ignore[no-untyped-def]
            record.values["/".join(op.path)] = op.value

        visit_assign_float = visit_assign_int = visit_assign_bool = visit_assign_string = _assign
        visit_assign_datetime = _assign

        def visit_log_floats(self, op) -> None:  # type: ignore[no-untyped-def]
            record.series.setdefault("/".join(op.path), []).extend((v.step, v.value) for v in op.values)

        def visit_clear_float_log(self, op) -> None:  # type: ignore[no-untyped-def]
            record.series["/".join(op.path)] = []

        def visit_add_strings(self, op) -> None:  # type: ignore[no-untyped-def]
            record.sets.setdefault("/".join(op.path), set()).update(op.values)

        def visit_remove_strings(self, op) -> None:  # type: ignore[no-untyped-def]
            record.sets.setdefault("/".join(op.path), set()).difference_update(op.values)

        def visit_clear_string_set(self, op) -> None:  # type: ignore[no-untyped-def]
            record.sets["/".join(op.path)] = set()

        def visit_upload_file(self, op) -> None:  # type: ignore[no-untyped-def]
            # A path (File(path), the client's default) or a copy it saved (File.from_content).
            copied = not op.file_path
            file = Path(op.file_path) if op.file_path else record.folder / "upload_path" / op.tmp_file_name
            record.uploads["/".join(op.path)] = Upload(file, op.ext, copied)

        def visit_delete_attribute(self, op) -> None:  # type: ignore[no-untyped-def]
            key = "/".join(op.path)
            for store in (record.values, record.series, record.sets, record.uploads):
                store.pop(key, None)

        def _ignore(self, op) -> None:  # type: ignore[no-untyped-def]
            pass  # file sets, images series and artifacts: the trainers record none of them

        visit_assign_artifact = visit_upload_file_content = visit_upload_file_set = _ignore
        visit_log_strings = visit_log_images = visit_clear_string_log = visit_clear_image_log = _ignore
        visit_config_float_series = visit_delete_files = visit_track_files_to_artifact = _ignore
        visit_clear_artifact = visit_copy_attribute = _ignore

    return Replay()


def read_run(folder: Path) -> RunRecord:
    from imgpipe.training.tracking import import_neptune

    import_neptune()  # first, so the client's deprecation notice (about our choice of client) is not printed
    from neptune.core.components.queue.json_file_splitter import JsonFileSplitter
    from neptune.internal.operation import Operation

    meta = json.loads((folder / "metadata.json").read_text())
    record = RunRecord(folder, meta.get("containerId", folder.name), meta.get("createdAt", ""))
    replay = _replayer(record)
    logs = sorted(folder.glob("data-*.log"), key=lambda p: int(p.stem.split("-")[1]))
    for log_file in logs:
        splitter = JsonFileSplitter(log_file)
        try:
            while (entry := splitter.get()) is not None:
                Operation.from_dict(entry["obj"]).accept(replay)
        finally:
            splitter.close()
    return record


def find_runs(neptune_dir: Path) -> list[RunRecord]:
    """Every offline run under ``neptune_dir``; one that cannot be read is left out with a warning naming it."""
    runs = []
    for folder in sorted(neptune_dir.glob("*/run__*")):
        if not (folder / "metadata.json").is_file():
            log.warning("left out the offline run %s: it has no metadata.json (not a finished Neptune folder)", folder)
            continue
        try:
            runs.append(read_run(folder))
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a damaged log: one run lost, not the comparison
            log.warning("left out the offline run %s: unreadable (%s: %s)", folder, type(exc).__name__, exc)
    mark_overwritten(runs)
    return runs


def mark_overwritten(runs: list[RunRecord]) -> None:
    """Set ``overwritten_by`` on each workspace picture a later run wrote over: DVC experiments and
    reruns write the same reports/ files. A later run wrote over it if it uploaded the same path, or
    (since the Tracker keeps copies, which name no path) kept a copy with the bytes the file now holds."""
    later_paths: dict[Path, str] = {}
    later_copies: dict[str, str] = {}
    for record in sorted(runs, key=lambda r: r.created, reverse=True):  # newest first: each sees only later runs
        for upload in record.uploads.values():
            if not upload.copied and upload.file.is_file():
                upload.overwritten_by = later_paths.get(upload.file) or later_copies.get(_digest(upload.file), "")
        for upload in record.uploads.values():
            if not upload.copied:
                later_paths[upload.file] = record.run_id
            elif upload.file.is_file():
                later_copies[_digest(upload.file)] = record.run_id


def _digest(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def final_metrics(record: RunRecord) -> dict[str, float | bool]:
    """The run's final values under metrics/: numbers, and flags such as metrics/beats_baseline."""
    return {key: value for key, value in record.values.items()
            if key.startswith("metrics/") and isinstance(value, int | float)}


def differing_parameters(runs: list[RunRecord]) -> list[str]:
    """The parameters/ paths with two or more values among the runs that have them. A parameter only
    some runs have is no difference: each trainer records its own (train/resnet/..., train/automl/...)."""
    keys = {key for r in runs for key in r.values if key.startswith("parameters/")}
    return sorted(key for key in keys if len({repr(r.values[key]) for r in runs if key in r.values}) > 1)
