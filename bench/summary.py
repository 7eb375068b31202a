"""The benchmark figures of docs/benchmarks.md, generated from bench/results/*.json of one `make bench` run.

    python -m bench.summary                     print every generated block
    python -m bench.summary --write             replace the blocks between docs/benchmarks.md's bench markers
    python -m bench.summary --write PAGE.md     the same in another Markdown file

The site's benchmarks page (docs/benchmarks.md) holds generated blocks between
``<!-- bench:NAME:start -->`` and ``<!-- bench:NAME:end -->``: the run the figures come from and
the table of every headline figure against its target (``summary``), then one block of details
per benchmark. Every figure in them is read from the results files (or computed from figures read
there), and each names the configuration it was measured in. ``make bench`` ends with
``--write docs/benchmarks.md``, and tests/test_docs.py checks the page's blocks against this
rendering and that neither README.md nor any page under docs/ has a speed, size or memory figure
outside them except the few it lists as not benchmark figures.

One run: every bench script records ``"run"`` (``bench.provenance``: the run id that
``make bench`` exports to all its scripts, the git commit, start time, seconds). Results of
different runs, or of a script run on its own, are refused. The files written before run
records existed are accepted only as the exact files listed in UNSTAMPED, and the page then
says in so many words that they are not verified to be one run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# The page `make bench` writes the generated blocks into (`--write` without a file).
PAGE = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
# The files `make bench` writes, in its order. Other files in bench/results/ are not part of it.
FILES = ("download", "scale", "input_pipeline", "train", "serve")
# Results files written before the bench scripts recorded their run, accepted only byte for byte
# (sha256) and only all together, as {name: (sha256, where they came from)}; their figures are
# shown marked as not verified as one run. Empty since the `make bench` run of 2026-12-02.
UNSTAMPED: dict[str, tuple[str, str]] = {}
BLOCKS = ("summary", "download", "pack-read", "train", "serve", "small-data")
# Not a `make bench` script (a quarter of an hour of training at 224 px): its block says so.
SMALL_DATA = "small_data.json"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"


class NotOneRun(ValueError):
    """The results files are not one `make bench` run (or not the known older files)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def load(results: Path = RESULTS) -> dict[str, dict]:
    return {name: json.loads((results / f"{name}.json").read_text())
            for name in FILES if (results / f"{name}.json").is_file()}


def provenance(results: Path = RESULTS) -> dict:
    """``{"run": the shared run record, or None for the known older files, "unstamped": [...]}``;
    raises NotOneRun with every problem found."""
    loaded = load(results)
    problems = [f"bench/results/{name}.json is missing" for name in FILES if name not in loaded]
    stamped = {name: data["run"] for name, data in loaded.items() if data.get("run")}
    unstamped = [name for name in loaded if name not in stamped]
    for name in unstamped:
        digest = hashlib.sha256((results / f"{name}.json").read_bytes()).hexdigest()
        if UNSTAMPED.get(name, ("",))[0] != digest:
            problems.append(f"bench/results/{name}.json records no run (no \"run\" from bench.provenance) and is "
                            "not the known older file")
    for name, run in stamped.items():
        if not run.get("make_bench"):
            problems.append(f"bench/results/{name}.json is from {run.get('script', name)} run on its own "
                            f"({run.get('id')}), not from `make bench`")
    ids = {run.get("id") for run in stamped.values()}
    if len(ids) > 1:
        problems.append("bench/results/ mixes runs: " + ", ".join(f"{name}.json {run.get('id')}"
                                                                  for name, run in sorted(stamped.items())))
    commits = {run.get("commit") for run in stamped.values()}
    if len(ids) == 1 and len(commits) > 1:
        problems.append(f"one run id, several commits: {sorted(map(str, commits))}")
    if stamped and unstamped:
        problems.append(f"bench/results/ mixes run {sorted(ids)[0]} ({', '.join(sorted(stamped))}) with older files "
                        f"that record no run ({', '.join(sorted(unstamped))})")
    if problems:
        raise NotOneRun(problems)
    if unstamped:
        return {"run": None, "unstamped": sorted(unstamped, key=FILES.index)}
    first = stamped[FILES[0]]
    return {"run": {**first, "seconds": {name: stamped[name].get("seconds") for name in FILES}}, "unstamped": []}


# --- formatting -------------------------------------------------------------------------------


def ratio(value: float) -> str:
    return f"{value:.2f}x"


def share(value: float) -> str:
    return f"{value:.0%}"


def seconds(value: float) -> str:
    return f"{value:.2f} s"


def listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def old_machine(result: dict) -> str:
    info = result.get("machine", {})
    cpu = info.get("processor") or info.get("platform", "").split("-with-")[0] or "?"
    return f"{info.get('cpus', '?')} CPUs, {cpu}"


def threads(processes: int, per_process: int) -> str:
    return f"{processes} process{'es' if processes != 1 else ''} x {per_process} threads"


def ours_setup(ours: dict) -> str:
    """This stage's configuration in one download run: processes x concurrent downloads each."""
    if "fetches_per_core" in ours:
        return (f"{ours['processes']} process{'es' if ours['processes'] != 1 else ''} x "
                f"{ours['fetches_per_core']} concurrent downloads")
    if "processes" in ours:
        return threads(ours["processes"], ours["threads_per_process"])
    return "processes not recorded"


def megabytes(value: float) -> str:
    return f"{value:.0f} MB" if value >= 10 else f"{value:.1f} MB"


# --- the headline table -----------------------------------------------------------------------


def download_config(result: dict, run: dict) -> tuple[str, dict]:
    """The words naming one download configuration, and img2dataset's faster configuration in it."""
    best = max(run["img2dataset"], key=lambda r: r["images_per_s"])
    words = (f"{result['urls']} URLs ({share(result['bad_fraction'])} bad), {result['latency_s'] * 1000:g} ms added "
             f"latency, {run['workers']} workers in all (this stage: {ours_setup(run['ours'])}), median of "
             f"{result['repeat']}")
    return words, best


def serve_services(serve: dict, precision: str) -> list[tuple[str, str, dict]]:
    """(configuration name, its flags in words, its results) for every service configuration measured."""
    run = serve["onnxruntime"][precision]
    out = []
    for name, levels in run["services"].items():
        flags = run.get("service_flags", {}).get(name)
        if flags is None:  # older results: the flags bench/serve.py passed for each configuration
            one_at_a_time = ["--workers", "1"] if name == "one batch at a time" else []
            flags = ["--max-batch", str(run["service_max_batch"]), *one_at_a_time]
        out.append((name, f"`{' '.join(flags)}`", levels))
    return out


def raw_words(run: dict, seconds: float) -> str:
    best = run["raw_best"]
    tried = sum(len(batches) for batches in run["raw_images_per_second"].values())
    return (f"raw ONNX Runtime alone ({best['configuration']}, batch {best['batch']}: the fastest of the {tried} "
            f"raw configurations, measured again for {seconds:g} s)")


def rows(loaded: dict[str, dict]) -> list[list[str]]:
    out: list[list[str]] = []

    def row(bench: str, compared: str, value: float, target: float, unit: Callable[[float], str] = ratio,
            at_most: bool = False) -> None:
        wanted = share(target) if unit is share else seconds(target) if unit is seconds else f"{target:g}x"
        met = value <= target if at_most else value >= target
        out.append([bench, compared, unit(value), f"{'<=' if at_most else '>='} {wanted}", "yes" if met else "**no**"])

    if download := loaded.get("download"):
        targets = download["targets"]
        for run in download["runs"]:
            words, best = download_config(download, run)
            row("download", f"images/s against img2dataset at {threads(best['processes'], best['threads_per_process'])}"
                            f" (the faster of its {len(run['img2dataset'])} configurations at this concurrency); "
                            f"{words}", run["ratio_vs_best_img2dataset"], targets["ratio_vs_best_img2dataset"])
            limit = f"{run['workers']} workers / {download['latency_s'] * 1000:g} ms"
            row("download", f"URLs/s inside the stage as a share of the latency-bound limit ({limit} = "
                            f"{run['latency_bound_limit_urls_per_s']:g} URLs/s); {words}",
                run["fraction_of_latency_limit"], targets["fraction_of_latency_limit"], share)
    if (scale := loaded.get("scale")) and "rows" in scale:
        figures = scale["rows"]
        small, large = figures["runs"][0], figures["runs"][-1]
        row("download", f"the stage's own peak RSS (the coordinator, `--engine processes`) at {large['rows']} manifest "
                        f"rows over {small['rows']} rows ({megabytes(large['coordinator_peak_rss_mb'])} against "
                        f"{megabytes(small['coordinator_peak_rss_mb'])}); local {scale_source(scale)}",
            figures["coordinator_peak_rss_ratio_largest_over_smallest"],
            scale["targets"]["coordinator_peak_rss_ratio_largest_over_smallest"], at_most=True)
    if pipeline := loaded.get("input_pipeline"):
        targets, setup = pipeline["targets"], pipeline.get("setup", {})
        size, batch = setup.get("image_size", 224), setup.get("batch_size", pipeline["training"]["batch_size"])
        for key in ("photos", "digits"):
            name = pipeline["sets"][key]
            pack, read = pipeline[key]["pack"], pipeline[key]["read"]
            processes = (f"`stages.pack` {setup['pack_processes']} processes, img2dataset "
                         f"{threads(setup['img2dataset_processes'], setup['img2dataset_threads_per_process'])}"
                         if setup else "processes not recorded")
            row("pack", f"images/s, `stages.pack` against img2dataset `border` resize to TFRecord, both PNG level 1 at "
                        f"{size} px ({processes}); {name}; whole-command wall time, median of {pack['runs']}",
                pack["ratio"], targets["pack_ratio"])
            row("read", f"images/s, neither side cached: `make_dataset` on the TFRecords against "
                        f"`image_dataset_from_directory` on the images; {name}; batch {batch}, {size} px, "
                        "augmentation off, second pass", read["ratio"], targets["read_ratio"])
            if "ratio_both_cached" in read:
                row("read", f"images/s, both sides cached in memory after the first pass: `make_dataset(cache=True)` "
                            f"against `image_dataset_from_directory(...).cache()`; {name}; batch {batch}, {size} px, "
                            "augmentation off, second pass", read["ratio_both_cached"], targets["read_ratio"])
        training = pipeline["training"]
        row("read", f"training input images/s (`make_dataset`, augmentation on; {pipeline['sets']['photos']}) "
                    f"against ResNet50V2 `train_on_batch` images/s on random tensors; batch {training['batch_size']}, "
                    f"{size} px",
            training["input_over_training"], targets["input_over_training"])
    if (train := loaded.get("train")) and "configs" not in train:  # the older format: one size, float32
        setup = train["setup"]
        row("train", f"training images/s fed by the TFRecord pipeline (augmentation on) against the same images as an "
                     f"in-memory tensor; ResNet50V2, {setup['train_images']} demo digits at {setup['image_size']} px, "
                     f"batch {setup['batch_size']}, {setup['steps_per_epoch']} steps x {setup['timed_epochs']} timed "
                     f"epochs, median of {setup['repeat']} alternating runs", train["ratio"], train["target_ratio"])
    elif train:
        # Every size and precision compared has its row, so the target is met in all or the table says where not.
        setup = train["setup"]
        for config in train_compared(train):
            runs = config["ratio_runs"]
            row("train", f"training images/s fed by the stage's TFRecord input (`training_epochs`, augmentation "
                         f"{'on' if setup['augmentation'] else 'off'}) against the same images as an in-memory "
                         f"tensor; ResNet50V2, {setup['train_images']} demo digits at {config['image_size']} px, "
                         f"{config['precision']}, batch {setup['batch_size']}, {config['steps']} timed steps after "
                         f"{config['warmup_steps']} warm-up, median of {plural(len(runs), 'interleaved run')} each "
                         f"(per-repeat ratios {span(runs, ratio)})", config["ratio"], train["target_ratio"])
    if serve := loaded.get("serve"):
        keras = serve["keras_per_request"]
        for precision, run in serve["onnxruntime"].items():
            targets = {key: value["target"] for key, value in serve["targets"][precision].items()}
            for name, flags, levels in serve_services(serve, precision):
                service = f"{precision} service, {name} ({flags})"
                raw = raw_words(run, serve["seconds_per_level"])
                row("serve", f"{service}, images/s at concurrency 32 against {raw}",
                    levels["32"]["images_per_second"] / run["raw_best"]["images_per_second"],
                    targets["service_c32_vs_raw_onnxruntime"])
                row("serve", f"{service}, images/s against per-request Keras (fp32), both at concurrency 32",
                    levels["32"]["images_per_second"] / keras["32"]["images_per_second"],
                    targets["service_c32_vs_keras_c32"])
                row("serve", f"single-image p50 latency (concurrency 1), per-request Keras (fp32) over the {service}",
                    keras["1"]["p50_ms"] / levels["1"]["p50_ms"], targets["keras_p50_c1_vs_service_p50_c1"])
        if (annotate := serve.get("annotate")) and not annotate_run_of_its_own(serve):
            shape, worst = max(annotate["methods"]["occlusion"].items(), key=lambda item: item[1]["median_s"])
            row("serve", f"`/annotate` by occlusion, end to end, {shape} JPEG ({occlusion_words(worst)}); "
                         f"{annotate_setup(annotate)}", worst["median_s"], annotate["budget_s"], seconds, at_most=True)
    return out


def table(results: Path = RESULTS) -> str:
    return markdown_table(["benchmark", "configuration and comparison", "measured", "target", "met"],
                          rows(load(results)))


def run_paragraph(results: Path = RESULTS) -> str:
    origin, loaded = provenance(results), load(results)
    run = origin["run"]
    if run is None:
        notes = [f"`{name}.json` ({old_machine(loaded[name])}) {UNSTAMPED[name][1]}" for name in origin["unstamped"]]
        return ("**Not verified as one run.** These results files were written before the bench scripts recorded "
                "which run produced them (no run id, commit or start time in them), so nothing in them shows they "
                f"come from one `make bench` run, and by the record they do not: {'; '.join(notes)}. The figures "
                "below are theirs, shown as recorded; the next `make bench` replaces them with files of one run.")
    machine = run.get("machine", {})
    commit = (run.get("commit") or "unknown")[:12]
    dirty = " with uncommitted changes" if run.get("dirty") else ""
    took = ", ".join(f"{name} {seconds:g} s" for name, seconds in run["seconds"].items())
    took += f"; {sum(seconds or 0 for seconds in run['seconds'].values()):g} s in all"
    return (f"Every figure below is from one `make bench` run, `{run['id']}`, at commit `{commit}`{dirty}, started "
            f"{run.get('started')} on {machine.get('cpus', '?')} CPUs ({machine.get('cpu', '?')}; "
            f"{machine.get('platform', '?')}). Each script's wall time: {took}.")


# --- the details ------------------------------------------------------------------------------


def download_block(download: dict) -> str:
    cpu = [run["ours"]["cpu_ms_per_url"] for run in download["runs"]]
    cpus = download["machine"]["cpus"]
    latency = download["latency_s"] * 1000
    output = download.get("output")
    sampled = (", all its processes' CPU read from /proc" if "cpu_ms_per_url_rusage" in download["runs"][0]["ours"]
               else "")
    writes = ("this stage its tar shards and img2dataset its `webdataset` tar shards, both" if output
              else "both tools write plain files")
    intro = (f"{download['urls']} image URLs on a loopback server that adds {latency:g} ms to every request, "
             f"{share(download['bad_fraction'])} of them bad (404, HTML, truncated, empty); {writes} "
             f"without resizing, at the same total concurrency; medians of {download['repeat']} interleaved "
             f"runs; wall time of the whole command. img2dataset runs in each of its configurations at every "
             f"concurrency. The latency-bound limit is workers / {latency:g} ms; the CPU-bound limit is {cpus} cores "
             f"divided by this stage's measured CPU time per URL ({min(cpu):g}-{max(cpu):g} ms here{sampled}, the "
             f"server sharing the same cores). The share of the latency limit counts URLs/s inside the stage "
             f"(interpreter start excluded), since the limit is about steady-state fetching.")
    configs = sorted({r["processes"] for run in download["runs"] for r in run["img2dataset"]})
    header = ["workers in all", "this stage: processes x concurrent downloads", "latency-bound limit (URLs/s)",
              "CPU-bound limit (URLs/s)", "this stage (images/s)"]
    header += [f"img2dataset, {processes} process{'es' if processes != 1 else ''} (images/s)"
               for processes in configs]
    header += ["ratio to the faster img2dataset", "share of latency limit", "bound by"]
    body = []
    for run in download["runs"]:
        ours = run["ours"]
        theirs = {r["processes"]: r for r in run["img2dataset"]}
        cells = [str(run["workers"]), ours_setup(ours),
                 f"{run['latency_bound_limit_urls_per_s']:g}", f"{run['cpu_bound_limit_urls_per_s']:g}",
                 f"{ours['images_per_s']:g}"]
        cells += [f"{theirs[p]['images_per_s']:g} ({theirs[p]['threads_per_process']} threads each)" if p in theirs
                  else "" for p in configs]
        cpu_bound = run["cpu_bound_limit_urls_per_s"] < run["latency_bound_limit_urls_per_s"]
        cells += [ratio(run["ratio_vs_best_img2dataset"]), share(run["fraction_of_latency_limit"]),
                  "the cores (CPU limit below latency limit)" if cpu_bound else "latency"]
        body.append(cells)
    text = intro + "\n\n" + markdown_table(header, body)
    for run in download["runs"]:
        if "local_ray_cost" in run:
            text += "\n\n" + local_ray_text(run)
    return text


def local_ray_text(run: dict) -> str:
    """What a private local Ray (``--engine ray``) costs against the process pool, in the same repeats."""
    cost, ray_run, ours = run["local_ray_cost"], run["ours_local_ray"], run["ours"]
    wall, inside = cost["ray_over_processes_seconds"], cost["ray_over_processes_seconds_inside_stage"]
    repeats = ", ".join(f"{value:.2f}x" for value in wall["all_repeats"])
    phases = ray_run.get("phases_s", {})
    start = phases.get("engine_start_and_first_task")
    where = (f"; of its {ray_run['seconds_inside_stage']:g} s inside the stage, {start:g} s went to starting Ray and "
             f"its first task (the process pool: {ours['phases_s']['engine_start_and_first_task']:g} s)"
             if start is not None and "engine_start_and_first_task" in ours.get("phases_s", {}) else "")
    keeps = cost["single_machine_default"] == "processes"
    verdict = (f"more than the {cost['limit'] - 1:.0%} a local Ray may cost before the process pool stays the "
               "single-machine default, so it stays" if keeps
               else f"within {cost['limit'] - 1:.0%} of the process pool")
    return (f"The same stage with `--engine ray` (a private Ray it starts on 127.0.0.1, {ray_run['processes']} CPUs, "
            f"{ray_run['fetches_per_core']} concurrent downloads per CPU), in the same interleaved repeats at "
            f"{run['workers']} workers in all: {ray_run['images_per_s']:g} images/s against {ours['images_per_s']:g}; "
            f"its whole-command time over the process pool's, repeat by repeat, {ratio(wall['median'])} median "
            f"({repeats}; {ratio(inside['median'])} inside the stage){where}. That is {verdict}.")


def scale_source(scale: dict) -> str:
    return f"rows of distinct {scale['source']['images']}"


def scale_block(scale: dict) -> str:
    """bench/scale.py: rows and memory, DVC on the output, one Ray node against two."""
    source = scale["source"]
    parts = [f"`python -m bench.scale`: the download stage at scale on local files, no network: "
             f"{source['distinct_images']} distinct {source['images']} of about {source['bytes_each']} bytes each, "
             f"{source['labels']} labels; "
             f"{', '.join(f'`{flag}`' for flag in source['stage_flags'])}; one run each."]
    if figures := scale.get("rows"):
        body = []
        for run in figures["runs"]:
            phases = ", ".join(f"{name.replace('_', ' ')} {phase['seconds']:g} s"
                               for name, phase in run["phases"].items())
            duplicates = f" ({run['duplicate_rows']} duplicate rows)" if run["duplicate_rows"] else ""
            body.append([f"{run['rows']}{duplicates}", str(run["kept"]), str(run["shards"]),
                         f"{run['seconds_inside_stage']:g} s", f"{run['rows_per_s']:g}",
                         megabytes(run["coordinator_peak_rss_mb"]),
                         ", ".join(megabytes(mb) for mb in run["worker_peak_rss_mb"]), phases])
        header = ["manifest rows", "images kept", "shards", "inside the stage", "rows/s", "stage's peak RSS",
                  "each worker's peak RSS", "phases (from the files the stage creates)"]
        target = scale["targets"]["coordinator_peak_rss_ratio_largest_over_smallest"]
        measured = figures["coordinator_peak_rss_ratio_largest_over_smallest"]
        parts.append(markdown_table(header, body))
        parts.append(f"The stage's own peak RSS (it logs it) at {figures['largest_rows']} rows over "
                     f"{figures['smallest_rows']}: {ratio(measured)} (target at most {target:g}x: "
                     f"{'met' if measured <= target else 'not met'}); the largest worker's peak "
                     f"(VmHWM, read from /proc during the run): "
                     f"{ratio(figures['max_worker_peak_rss_ratio_largest_over_smallest'])}.")
    if dvc := scale.get("dvc"):
        body = []
        for name, words in (("shards", "the stage's tar shards"), ("loose", "loose files, `<label>/<sha256>.png`")):
            r = dvc[name]
            body.append([f"{dvc['images']} images as {words}", str(r["files"]), megabytes(r["bytes"] / 2**20),
                         f"{r['dvc_add_s']:g} s", f"{r['dvc_push_s']:g} s", f"{r['dvc_status_cloud_s']:g} s"])
        body.append(["loose over shards", "", "", ratio(dvc["dvc_add_loose_over_shards"]),
                     ratio(dvc["dvc_push_loose_over_shards"]), ratio(dvc["dvc_status_cloud_loose_over_shards"])])
        overhead = (dvc["shards"]["bytes"] - dvc["loose"]["bytes"]) / dvc["images"]
        parts.append(f"DVC on the output: each in a fresh git + DVC repository with its own cache and "
                     f"{dvc['remote']} as the remote (DVC's defaults otherwise).\n\n"
                     + markdown_table(["", "files", "size", "`dvc add`", "`dvc push`", "`dvc status -c`"], body)
                     + f"\n\nThe shards are larger by {overhead:.0f} bytes an image: tar gives each member a 512-byte "
                     "header and pads it to 512 bytes, and each image has a JSON member beside it, which only shows "
                     "with images this small.")
    if nodes := scale.get("nodes"):
        same = nodes["shards_byte_identical"]
        identical = ("byte-identical shards in all three" if same["one_node_vs_two_nodes"] and same["ray_vs_processes"]
                     else "**different shards**")
        body = []
        for key, words in (("processes", "`--engine processes` (the reference)"),
                           ("one_node", "`--engine ray`, a private local Ray: one node, 2 CPUs (started by the stage)"),
                           ("two_nodes", "`--engine ray --ray-address`: two nodes on loopback, 1 CPU each "
                                         f"(started beforehand, in {nodes['two_node_cluster_start_s']:g} s)")):
            run = nodes[key]
            phases = run.get("phases", {})
            body.append([words, f"{run['seconds_inside_stage']:g} s",
                         f"{phases['engine_start_and_first_task']['seconds']:g} s"
                         if "engine_start_and_first_task" in phases else "",
                         f"{phases['map']['seconds']:g} s" if "map" in phases else "", f"{run['rows_per_s']:g}"])
        parts.append(f"One Ray node against two on the same {nodes['cores']} cores, {nodes['rows']} rows: "
                     f"{identical}. No speed-up is expected (the two nodes share the one node's cores): this shows the "
                     "stage runs on a cluster and writes the same bytes; the cluster's figures are not a scaling "
                     "result.\n\n"
                     + markdown_table(["", "inside the stage", "engine start and first task", "map after it", "rows/s"],
                                      body))
    loads = [value for section in (scale.get("rows", {}).get("runs", []),
                                   [scale["nodes"][k] for k in ("processes", "one_node", "two_nodes")]
                                   if "nodes" in scale else [])
             for run in section for value in run.get("load_average_before_after", [])]
    if loads:
        parts.append(f"The machine's 1-minute load average during these runs: {min(loads):g}-{max(loads):g} on "
                     f"{scale['machine']['cpus']} CPUs (other jobs included), one run each: single figures, not "
                     "medians.")
    return "\n\n".join(parts)


def pack_read_block(pipeline: dict) -> str:
    setup = pipeline.get("setup")
    size = setup["image_size"] if setup else 224
    processes = (f"`stages.pack` with {setup['pack_processes']} processes, img2dataset with "
                 f"{threads(setup['img2dataset_processes'], setup['img2dataset_threads_per_process'])}"
                 if setup else "process counts not recorded in this results file")
    runs = {pipeline[key]["pack"]["runs"] for key in pipeline["sets"]}
    intro = (f"At {size}x{size}; whole-command wall time for packing (TensorFlow import included, median of "
             f"{listing(sorted(map(str, runs)))} interleaved runs; {processes}), second pass for reading "
             "(augmentation off in both).")
    cached = all("ratio_both_cached" in pipeline[key]["read"] for key in pipeline["sets"])
    header = ["images", "pack (images/s)", "img2dataset `border` to TFRecord", "ratio", "read, not cached",
              "`image_dataset_from_directory`, not cached", "ratio"]
    if cached:
        header += ["read, cached", "`image_dataset_from_directory(...).cache()`", "ratio"]
    body = []
    for key, name in pipeline["sets"].items():
        pack, read = pipeline[key]["pack"], pipeline[key]["read"]
        cells = [name, f"{pack['ours_images_per_s']:g}", f"{pack['img2dataset_images_per_s']:g}", ratio(pack["ratio"]),
                 f"{read['ours_images_per_s']:g}", f"{read['image_dataset_from_directory_images_per_s']:g}",
                 ratio(read["ratio"])]
        if cached:
            cells += [f"{read['ours_cached_images_per_s']:g}",
                      f"{read['image_dataset_from_directory_cached_images_per_s']:g}", ratio(read["ratio_both_cached"])]
        body.append(cells)
    training = pipeline["training"]
    photos = pipeline["photos"]["read"]
    target = pipeline["targets"]["read_ratio"]
    uncached = [f"{ratio(pipeline[key]['read']['ratio'])} on {key}" for key in pipeline["sets"]]
    met = all(pipeline[key]["read"]["ratio"] >= target for key in pipeline["sets"])
    text = (f"The training input pipeline with augmentation on delivers "
            f"{photos['ours_with_augmentation_images_per_s']:g} images/s on the photos against ResNet50V2's "
            f"{training['resnet50v2_images_per_s']:g} training images/s at batch {training['batch_size']} on this CPU: "
            f"{ratio(training['input_over_training'])}. Reading without a cache, the {target:g}x target is "
            f"{'met' if met else 'not met'} here ({listing(uncached)}).")
    if not cached:
        text += (" This results file times our reader cached but Keras' only uncached, which is no comparison, so "
                 "no cached figure is shown; `make bench` now times both sides cached.")
    return intro + "\n\n" + markdown_table(header, body) + "\n\n" + text


def train_compared(train: dict) -> list[dict]:
    """The sizes and precisions measured with both feeds (not an emulated mixed_float16)."""
    return [config for config in train["configs"] if "ratio" in config]


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def span(values: list[float], unit: Callable[[float], str] = lambda value: f"{value:.1f}") -> str:
    low, high = min(values), max(values)
    return unit(low) if unit(low) == unit(high) else f"{unit(low)}-{unit(high)}"


def augmentation_words(augmentation: dict | None) -> str:
    if not augmentation:
        return "augmentation off"
    words = [f"{key} {value:g}" if isinstance(value, float) else key
             for key, value in augmentation.items() if value]
    return "augmented: " + (", ".join(words) if words else "nothing on")


def resume_text(resume: dict | None) -> str:
    if resume is None:
        return "Kill and resume: not measured in this run (`--skip-resume`)."
    epochs = resume["epoch_s"]
    later = (f"an epoch took {epochs[-1]:g} s here after the first ({epochs[0]:g} s, graph tracing included)"
             if len(epochs) > 1 else f"an epoch took {epochs[0]:g} s here")
    identical = "yes" if resume["bit_identical"] else "**no**"
    return (f"Kill and resume: `python -m stages.train_resnet` on the {resume['image_size']} px records, "
            f"{resume['precision']}, `{' '.join(resume['flags'])}` (everything else from params.yaml), whole "
            f"commands: run uninterrupted, then killed with SIGKILL as it printed `{resume['kill_at']}` (epoch "
            f"{resume['backed_up_epoch']} backed up: {megabytes(resume['backup_bytes'] / 2**20)} in "
            f"{resume['backup_files']} files) and run again: {resume['killed_s']:g} s + {resume['resumed_s']:g} s "
            f"against {resume['uninterrupted_s']:g} s, {resume['lost_s']:g} s lost "
            f"({share(resume['lost_fraction'])} of the uninterrupted run); the resumed `model.keras` is bit-identical "
            f"to the uninterrupted one: {identical}. A kill inside an epoch also loses that epoch's finished steps: "
            f"{later}.")


def train_block(train: dict) -> str:
    if "configs" not in train:
        return train_block_v1(train)
    setup, target = train["setup"], train["target_ratio"]
    body = []
    for config in train["configs"]:
        runs = config["runs"]
        if "ratio" in config:
            body.append([f"{config['image_size']} px", config["precision"],
                         f"{config['tfrecord_images_per_s']:.1f} ({span(runs['tfrecord'])})",
                         f"{config['in_memory_images_per_s']:.1f} ({span(runs['in_memory'])})",
                         ratio(config["ratio"]), span(config["ratio_runs"], ratio)])
        else:
            body.append([f"{config['image_size']} px",
                         f"{config['precision']} (emulated: one run of {plural(config['steps'], 'step')})",
                         f"{config['tfrecord_images_per_s']:.1f}", "not measured", "", ""])
    header = ["size", "precision", "TFRecord-fed images/s (runs)", "in memory images/s (runs)", "ratio",
              "per-repeat ratios"]
    compared = train_compared(train)
    repeats = sorted({len(config["ratio_runs"]) for config in compared})
    intro = (f"ResNet50V2 as the stage builds and trains it (its head, optimizer, loss and class weights; seeded, "
             f"untrained), batch {setup['batch_size']}, on the {setup['train_images']} training digits packed at "
             f"each size, fed by (a) the stage's own training input, `training_epochs` (the TFRecords read, "
             f"shuffled, PNG-decoded and {augmentation_words(setup['augmentation'])}), and (b) the same images "
             "decoded in memory as one tensor (shuffled, not augmented), the fastest feed there is. One model per "
             f"size and precision (Keras' global policy); each run is {setup['warmup_steps']} untimed steps (graph "
             f"tracing on the first, the pipeline's start on every run) then {setup['steps']} timed steps, a and b "
             f"alternating, {listing([str(n) for n in repeats]) if repeats else '?'} "
             f"run{'s' if repeats != [1] else ''} of each. Medians, with "
             "the range of the runs; the ratio is a / b of the medians, with the range of the per-repeat ratios "
             "(each a run over the b run beside it).")
    text = []
    if compared:
        worst = min(compared, key=lambda config: config["ratio"])
        failed = [f"{c['image_size']} px {c['precision']}" for c in compared if c["ratio"] < target]
        text.append(f"The target, a ratio of at least {target:g} in every configuration compared, is "
                    + (f"met; the worst is {ratio(worst['ratio'])} ({worst['image_size']} px {worst['precision']})."
                       if not failed else f"**not met** in {listing(failed)} (worst {ratio(worst['ratio'])})."))
    by = {(c["image_size"], c["precision"]): c for c in train["configs"]}
    rate = "tfrecord_images_per_s"
    speedups = [f"{ratio(by[size, 'mixed_bfloat16'][rate] / by[size, 'float32'][rate])} at {size} px"
                for size in sorted({c["image_size"] for c in train["configs"]})
                if (size, "float32") in by and (size, "mixed_bfloat16") in by]
    if speedups:
        instructions = train["machine"].get("bf16_instructions")
        text.append(f"mixed_bfloat16 over float32, TFRecord-fed: {listing(speedups)} (this CPU's bfloat16 "
                    f"instructions: {', '.join(instructions) if instructions else 'none listed'}).")
    if emulated := [c for c in train["configs"] if "ratio" not in c]:
        text.append(f"CPUs have no float16 arithmetic, so {listing(sorted({c['precision'] for c in emulated}))} is "
                    "emulated here (the stage warns so) and slow: one TFRecord-fed run per size, after one warm-up "
                    "step, shown to complete the table, not compared.")
    paragraphs = [intro, markdown_table(header, body), " ".join(text), resume_text(train.get("resume"))]
    return "\n\n".join(paragraph for paragraph in paragraphs if paragraph)


def train_block_v1(train: dict) -> str:
    """The older format (one size, float32, no kill and resume), as its file recorded it."""
    setup, runs = train["setup"], train["runs"]
    met = "met" if train["ratio"] >= train["target_ratio"] else "not met"
    return (f"ResNet50V2 training images/s ({setup['train_images']} demo digits at {setup['image_size']} px, batch "
            f"{setup['batch_size']}, {setup['steps_per_epoch']} steps a timed epoch, {setup['timed_epochs']} timed "
            f"epochs after a warm-up one) fed by the real TFRecord pipeline with augmentation, against the same images "
            f"from an in-memory tensor; medians of {setup['repeat']} alternating runs: pipeline "
            f"{train['tfrecord_pipeline_images_per_s']:g}, in memory {train['in_memory_images_per_s']:g} training "
            f"images/s, ratio {train['ratio']:g} against a target of at least {train['target_ratio']:g}: {met} (runs: "
            f"pipeline {listing([f'{r:g}' for r in runs['tfrecord_pipeline']])}, in memory "
            f"{listing([f'{r:g}' for r in runs['in_memory']])}).")


def serve_block(serve: dict) -> str:
    keras = serve["keras_per_request"]
    body = []
    for precision, run in serve["onnxruntime"].items():
        best = run["raw_best"]
        body.append([f"{precision}: raw ONNX Runtime alone ({best['configuration']}, batch {best['batch']})",
                     f"{best['images_per_second']:.1f}", "", ""])
        for name, flags, levels in serve_services(serve, precision):
            for level, figures in levels.items():
                body.append([f"{precision} service, {name} ({flags}), concurrency {level}",
                             f"{figures['images_per_second']:.1f}", f"{figures['p50_ms']:.0f} ms",
                             f"{figures['p99_ms']:.0f} ms"])
    for level, figures in keras.items():
        body.append([f"Keras fp32, one `model.predict` per request, concurrency {level}",
                     f"{figures['images_per_second']:.1f}", f"{figures['p50_ms']:.0f} ms",
                     f"{figures['p99_ms']:.0f} ms"])
    intro = (f"{serve['model']}. Closed-loop clients send photo-sized JPEGs over keep-alive connections with "
             f"prebuilt requests, {serve['seconds_per_level']:g} s per concurrency level, to each service in its own "
             f"process; every service configuration measured is listed, with its flags.")
    ceilings = [f"{precision} {ratio(run['raw_best']['images_per_second'] / keras['32']['images_per_second'])}"
                for precision, run in serve["onnxruntime"].items()]
    text = ("Raw ONNX Runtime alone (no HTTP, no decoding, no batching) over per-request Keras at concurrency 32, "
            f"the most any service on this graph could reach against Keras here: {listing(ceilings)}.")
    block = intro + "\n\n" + markdown_table(["", "images/s", "p50", "p99"], body) + "\n\n" + text
    return block + ("\n\n" + annotate_block(serve) if "annotate" in serve else "")


def annotate_run_of_its_own(serve: dict) -> dict | None:
    """The run record of serve.json's ``annotate`` figures when ``--only annotate`` measured them
    apart from the rest of the file; None when they come from the same run."""
    run = serve["annotate"].get("run")
    return run if run and run.get("id") != (serve.get("run") or {}).get("id") else None


def occlusion_words(figures: dict) -> str:
    rows, cols = figures["patches"]
    return (f"{rows} rows x {cols} columns of patches of about {figures['patch_px']} px hidden one at a time, "
            f"{figures['forward_passes']:g} forward passes in all")


def annotate_setup(annotate: dict) -> str:
    flags = " ".join(annotate["service_flags"])
    pinned = "pinned to " if annotate["pinned"] else "on "
    return (f"{annotate['model']}, the service {pinned}{annotate['cores']} cores (`{flags}`), one request at a "
            f"time, median of {annotate['repeats']} runs interleaved with the other method's")


def annotate_block(serve: dict) -> str:
    """/annotate end to end per attention method (serve.attention), and where the figures come from."""
    annotate = serve["annotate"]
    body = []
    for method, shapes in annotate["methods"].items():
        for shape, figures in shapes.items():
            how = (f"occlusion ({occlusion_words(figures)})" if method == "occlusion"
                   else f"class activation map ({figures['forward_passes']:g} forward pass)")
            body.append([f"{how}, {shape} JPEG", seconds(figures["median_s"]),
                         f"{seconds(figures['min_s'])} - {seconds(figures['max_s'])}"])
    worst = annotate["occlusion_worst_median_s"]
    text = (f"`/annotate` (client to annotated PNG) by each attention method: {annotate_setup(annotate)}. Budget for "
            f"occlusion: at most {seconds(annotate['budget_s'])}; slowest shape's median {seconds(worst)}: "
            f"{'met' if annotate['met'] else '**not met**'}.")
    if annotate_run_of_its_own(serve):
        text += (f" Measured apart from the figures above, by `python -m bench.serve --only annotate` "
                 f"({run_origin(serve['annotate'])}), not in the `make bench` run.")
    return text + "\n\n" + markdown_table(["", "median", "range"], body)


def small_data_table(section: dict) -> str:
    """One set's before and after: the parameters that differ, val and test, the verdict, time."""
    rows = section["configs"].values()
    differing = [key for key in next(iter(rows))["params"] if len({str(row["params"].get(key)) for row in rows}) > 1]
    body = []
    for name, row in section["configs"].items():
        changed = ", ".join(f"`{key}` {row['params'].get(key)}" for key in differing)
        val, test = row["val"], row["test"]
        body.append([f"{name} ({changed})", f"{val['accuracy']:.3f} / {val['macro_f1']:.3f}",
                     f"{test['accuracy']:.3f} / {test['macro_f1']:.3f}", f"{val['baseline_macro_f1']:.3f}",
                     "yes" if row["beats_baseline"] else "**no**", f"{row['best_epoch']} of {row['epochs_run']}",
                     f"{max(row['val_loss']):.2f}", f"{row['seconds']:.0f} s"])
    header = ["configuration", "val accuracy / macro-F1", "test accuracy / macro-F1", "guess macro-F1",
              "beats baseline", "best epoch", "highest val loss", "time"]
    return markdown_table(header, body)


def run_origin(section: dict) -> str:
    run = section.get("run") or {}
    if not run:
        return "a run from before its results recorded one: no commit or start time in the file"
    dirty = " with uncommitted changes" if run.get("dirty") else ""
    return (f"`{run['id']}`, commit `{(run.get('commit') or 'unknown')[:12]}`{dirty}, started "
            f"{run.get('started')}, {run.get('machine', {}).get('cpus', '?')} CPUs")


def split_sizes(section: dict) -> str:
    pack = section.get("pack") or {}
    return f"{sum(pack.values()) if pack else '?'} images ({listing([f'{n} {split}' for split, n in pack.items()])})"


def small_data_block(results: dict) -> str:
    """Before and after on the small set and, when measured, on the demo digits, each with the
    run its figures come from (runs of their own, not part of `make bench`)."""
    small = results["small"]
    digits = f", {' and '.join(small['digits'])}" if small.get("digits") else ""
    text = (f"`python -m bench.small_data`, run on its own ({run_origin(small)}; not part of a "
            f"`make bench` run): ResNet50V2 from scratch at 224 px on {split_sizes(small)}, photos of two handwritten "
            f"digits{digits}, the old defaults against the new, everything else as in `params.yaml`.\n\n"
            + small_data_table(small))
    if "demo" in results:
        demo = results["demo"]
        text += (f"\n\n`python -m bench.small_data --demo`, run on its own ({run_origin(demo)}): the demo digits, "
                 f"{split_sizes(demo)} in 10 classes, at 64 px without flips, {demo.get('epochs', '?')} epochs, the "
                 "old defaults against the new.\n\n" + small_data_table(demo))
    return text


def render(results: Path = RESULTS) -> dict[str, str]:
    """Every generated block by name; raises NotOneRun for results that are not one run."""
    paragraph = run_paragraph(results)
    loaded = load(results)
    return {"summary": paragraph + "\n\n" + table(results),
            "download": download_block(loaded["download"])
            + ("\n\n" + scale_block(loaded["scale"]) if "scale" in loaded else ""),
            "pack-read": pack_read_block(loaded["input_pipeline"]),
            "train": train_block(loaded["train"]),
            "serve": serve_block(loaded["serve"]),
            **({"small-data": small_data_block(json.loads((results / SMALL_DATA).read_text()))}
               if (results / SMALL_DATA).is_file() else {})}


def blocks_in(text: str) -> dict[str, str]:
    """The generated blocks of a Markdown text, by name (those it has)."""
    found = {}
    for name in BLOCKS:
        start, end = markers(name)
        if start in text and end in text:
            found[name] = text[text.index(start) + len(start):text.index(end)].strip()
    return found


def replace_blocks(text: str, blocks: dict[str, str]) -> str:
    for name, block in blocks.items():
        start, end = markers(name)
        head, tail = text[:text.index(start)], text[text.index(end):]
        text = head + start + "\n" + block + "\n" + tail
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.summary", description=__doc__.split("\n")[0])
    parser.add_argument("--write", type=Path, nargs="?", const=PAGE, metavar="MARKDOWN",
                        help="replace the generated blocks in this file (default: docs/benchmarks.md)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results folder (default: bench/results)")
    args = parser.parse_args(argv)
    try:
        blocks = render(args.results)
    except NotOneRun as exc:
        print("bench.summary: the results are not one `make bench` run, refusing:\n  " + "\n  ".join(exc.problems),
              file=sys.stderr)
        return 1
    if not args.write:
        print("\n\n".join(f"{markers(name)[0]}\n{block}\n{markers(name)[1]}" for name, block in blocks.items()))
        return 0
    try:
        text = args.write.read_text()
    except OSError as exc:
        print(f"{args.write}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    missing = [name for name in BLOCKS if not all(marker in text for marker in markers(name))]
    if missing:
        print(f"{args.write}: no {' / '.join(markers(missing[0]))} markers (missing: {', '.join(missing)})",
              file=sys.stderr)
        return 1
    args.write.write_text(replace_blocks(text, blocks))
    print(f"bench.summary: {len(blocks)} blocks written to {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
