"""``dynaseg bench data``: load, sample and evaluate a dataset of COCO's size; time and memory.

Each measurement runs in a fresh process (``spawn``), so one cannot inherit another's memory:

- **load**: ``load_coco_instances`` of the training file against faster-coco-eval's ``COCO()`` of
  the same file (seconds; peak and final resident memory).
- **sampling**: an epoch of ``records[i]`` (every annotation built from storage, as the dataset does
  before reading the image) by 4 DataLoader workers forked after loading; then each worker's
  memory from ``/proc/<pid>/smaps_rollup``: PSS and USS (private pages: what the worker alone
  costs). ``layout="objects"`` first turns the records into a list of Python objects, as the
  loader kept them before the packed arrays, for the before / after comparison.
- **evaluation**: ``evaluate_coco`` (bbox and segm) of ``per_image`` detections with RLE masks on
  each of ``eval_images`` images (seconds, peak resident memory).

Linux only (``/proc``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from dynaseg.bench.coco_sized import (
    COCO_TRAIN_SIZE,
    LVIS_TRAIN_SIZE,
    write_coco_sized,
    write_detections,
)

__all__ = ["memory_of", "run_data_benchmark", "format_data_report"]

_MB = 2**20


def memory_of(pid: int | str = "self") -> dict[str, float]:
    """RSS, PSS and USS (private clean + dirty) of a process, and its peak RSS, in MB."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1])
    with open(f"/proc/{pid}/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return {
        "rss_mb": fields["Rss"] / 1024,
        "pss_mb": fields["Pss"] / 1024,
        "uss_mb": (fields["Private_Clean"] + fields["Private_Dirty"]) / 1024,
        "peak_rss_mb": peak / 1024,
    }


def _in_child(fn: Callable[..., dict], *args: Any) -> dict:
    """``fn(*args)`` in a fresh spawned (non-daemonic: it may start workers) process."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    child = ctx.Process(target=_run_and_send, args=(results, fn, *args))
    child.start()
    result = results.get()
    child.join()
    if isinstance(result, BaseException):
        raise result
    return result


def _run_and_send(results: Any, fn: Callable[..., dict], *args: Any) -> None:
    try:
        results.put(fn(*args))
    except Exception as e:  # reaches the parent, which raises it
        results.put(e)


# ----------------------------------------------------------------------------- load
def _load_ours(path: str) -> dict:
    from dynaseg.data.coco import load_coco_instances

    start = time.perf_counter()
    data = load_coco_instances(path, os.path.dirname(path), check_files=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images": len(data.records)} | memory_of()


def _load_faster_coco_eval(path: str) -> dict:
    from faster_coco_eval import COCO

    start = time.perf_counter()
    coco = COCO(path, print_function=lambda *a, **k: None)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images": len(coco.imgs)} | memory_of()


# ----------------------------------------------------------------------------- sampling
class _RecordReader(torch.utils.data.Dataset):
    """Item ``i``: the number of coordinates of record ``i`` (every annotation built); item -1:
    the memory of the worker answering it."""

    def __init__(self, records) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Any:
        if i < 0:
            return {"pid": os.getpid()} | memory_of()
        rec = self.records[i]
        return sum(
            len(p) if isinstance(a.segmentation, list) else 1
            for a in rec.annotations
            for p in (a.segmentation if isinstance(a.segmentation, list) else [0])
        )


def _sample_epoch(path: str, layout: str, num_workers: int, batch_size: int) -> dict:
    from dynaseg.data.coco import load_coco_instances

    data = load_coco_instances(path, os.path.dirname(path), check_files=False)
    records = list(data.records) if layout == "objects" else data.records
    del data
    main_after_load = memory_of()
    n = len(records)
    warnings.filterwarnings("ignore", "This DataLoader will create")  # more workers than CPUs
    batches = [list(range(k, min(k + batch_size, n))) for k in range(0, n, batch_size)]
    batches += [[-1]] * num_workers  # dispatched round-robin: one per worker, after the epoch
    loader = torch.utils.data.DataLoader(
        _RecordReader(records),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=lambda items: items,
        multiprocessing_context="fork",
    )
    start, seen, workers = time.perf_counter(), 0, []
    for batch in loader:
        if isinstance(batch[0], dict):  # the epoch is over (batches arrive in order)
            workers.append(batch[0])
        else:
            seen += len(batch)
            seconds = time.perf_counter() - start
    return {
        "layout": layout,
        "records": seen,
        "seconds": seconds,
        "records_per_s": seen / seconds,
        "main": main_after_load,
        "workers": workers,
    }


# ----------------------------------------------------------------------------- evaluation
def _evaluate(gt_path: str, results_path: str) -> dict:
    from dynaseg.evaluation.coco import evaluate_coco

    start = time.perf_counter()
    metrics = evaluate_coco(gt_path, results_path, ("bbox", "segm"))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "segm_AP": metrics["segm"]["AP"]} | memory_of()


# ----------------------------------------------------------------------------- driver
def run_data_benchmark(
    out_dir: str | Path,
    *,
    lvis: bool = False,
    layouts: tuple[Literal["packed", "objects"], ...] = ("objects", "packed"),
    num_workers: int = 4,
    batch_size: int = 64,
    eval_images: int = 5000,
    per_image: int = 100,
    size: tuple[int, int] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Generate (once, reused from ``out_dir``) and measure; see the module docstring.

    size: (images, instances) of the training file; default COCO's (LVIS v1's with ``lvis``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images, instances = size or (LVIS_TRAIN_SIZE if lvis else COCO_TRAIN_SIZE)
    name = f"{'lvis' if lvis else 'coco'}_{images}x{instances}"
    train = out / f"{name}.json"
    if not train.is_file():
        log(f"writing {train} ({images} images, {instances} instances)...")
        write_coco_sized(train, num_images=images, num_instances=instances, lvis=lvis)
    report: dict[str, Any] = {
        "file": str(train),
        "file_mb": train.stat().st_size / _MB,
        "images": images,
        "instances": instances,
    }
    log("load: ours")
    report["load_ours"] = _in_child(_load_ours, str(train))
    log("load: faster-coco-eval COCO()")
    report["load_faster_coco_eval"] = _in_child(_load_faster_coco_eval, str(train))
    report["sampling"] = []
    for layout in layouts:
        log(f"sampling an epoch with {num_workers} workers ({layout} records)")
        report["sampling"].append(
            _in_child(_sample_epoch, str(train), layout, num_workers, batch_size)
        )
    if eval_images > 0:
        val = out / f"{name}_val{eval_images}.json"
        results = out / f"{name}_val{eval_images}_dets{per_image}.json"
        if not results.is_file():
            log(f"writing {val} and {results}")
            write_coco_sized(
                val,
                num_images=eval_images,
                num_instances=round(instances * eval_images / images),
                lvis=lvis,
                seed=1,
            )
            write_detections(val, results, num_images=eval_images, per_image=per_image)
        log(f"evaluation: {eval_images} images x {per_image} detections")
        report["evaluation"] = _in_child(_evaluate, str(val), str(results)) | {
            "images": eval_images,
            "detections": eval_images * per_image,
        }
    return report


def format_data_report(report: dict) -> str:
    """The report as text tables."""
    lines = [
        f"{report['file']}: {report['images']} images, {report['instances']} instances, "
        f"{report['file_mb']:.0f} MB",
        "",
        f"{'load':<24}{'seconds':>9}{'peak RSS MB':>13}{'RSS after MB':>14}",
    ]
    for key, label in (("load_ours", "dynaseg"), ("load_faster_coco_eval", "faster-coco-eval")):
        r = report[key]
        lines.append(
            f"{label:<24}{r['seconds']:>9.1f}{r['peak_rss_mb']:>13.0f}{r['rss_mb']:>14.0f}"
        )
    lines += [
        "",
        f"{'sampling (one epoch)':<24}{'records/s':>10}{'main USS':>10}  workers PSS / USS MB",
    ]
    for s in report["sampling"]:
        workers = ", ".join(f"{w['pss_mb']:.0f}/{w['uss_mb']:.0f}" for w in s["workers"])
        lines.append(
            f"{s['layout'] + ' records':<24}{s['records_per_s']:>10.0f}"
            f"{s['main']['uss_mb']:>10.0f}  {workers}"
        )
    if "evaluation" in report:
        e = report["evaluation"]
        lines += [
            "",
            f"evaluation of {e['images']} images x {e['detections'] // e['images']} detections "
            f"(bbox + segm): {e['seconds']:.1f} s, peak RSS {e['peak_rss_mb']:.0f} MB",
        ]
    return "\n".join(lines)
