"""``make bench``: every benchmark case, side by side, JSON per case plus a summary table.

    python -m benchmarks.run                 # full: under ~20 min on 2 idle CPU cores
    python -m benchmarks.run --quick         # short rounds: under ~3 min on 2 idle CPU cores
    python -m benchmarks.run --cases a,e     # a subset
    python -m benchmarks.run --device cuda --compile

Cases (targets are for a 2-core CPU):
  a  training images/s, resnetlab vs an idiomatic PyTorch loop        (ratio >= 1.15)
  b  model FLOP/s over the machine's large-matmul FLOP/s              (>= 0.75)
  c  whole-epoch (fit) images/s over pure train-step images/s         (>= 0.95)
  d  resnet50 inference, resnetlab fused vs torchvision eager, time   (<= 0.85x)
  e  grad checkpointing: peak memory (<= 0.5x) and step time (<= 1.35x)
  f  DDP, 2 processes vs 1, images/s                                  (no target)
  serve  `resnetlab serve` at concurrency 1/8/32 vs in-process predict_images (>= 0.8 at 8),
         micro-batching vs --max-batch 1; zero errors (benchmarks/bench_serve.py -> serve.json)
  backends  `resnetlab serve --backend torch|onnxruntime (fp32, int8)` at concurrency 8 vs the
            same backend in process (>= 0.8)                           (bench_serve.py -> backends.json)
  quantize  int8 (resnetlab quantize, onnxruntime) vs fp32 eager torch: batch-64 latency (>= 1.5x
            faster) and file size (>= 3.5x smaller)                   (bench_serve.py -> quantize.json)
  pipeline  image-folder training pipeline vs torchvision's ImageFolder + transforms.v2,
            images/s (ratio >= 1.3), and start-up on 100,000 files     (bench_pipeline.py)
  landscape  loss-landscape grid points/s, batched (vmap) vs state-dict loop (no target)
  speedrun  wall time to 93% Fashion-MNIST test accuracy (mean of 3 seeds), recipe fashion_speedrun
            vs the same net and schedule in a torchvision DataLoader loop (ratio >= 1.3, <= 10 min;
            bench_speedrun.py; the full case trains 6 runs: ~1 h on 2 idle cores, --quick 1 epoch)

Writes ``benchmarks/results/<case>.json`` and ``benchmarks/results/summary.md`` (the machine it
ran on heads the table). A case that fails is recorded as an error and the others still run;
the exit code is then 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    RESULTS_DIR,
    OtherWork,
    describe_machine,
    fmt_rate,
    fmt_ratio,
    machine_info,
    parse_list,
    pick_device,
    write_json,
)

ALL_CASES = ("a", "b", "c", "d", "e", "f", "serve", "backends", "quantize", "pipeline", "landscape", "scale",
             "speedrun")
INFERENCE_TARGET = 0.85  # (d): resnetlab fused time / torchvision eager time, at most
TITLES = {
    "a": "training images/s vs idiomatic loop",
    "b": "model FLOP/s / matmul FLOP/s",
    "c": "fit epoch images/s / pure step images/s",
    "d": "resnet50 inference time, fused / torchvision eager",
    "e": "grad checkpointing, with / without",
    "f": "DDP images/s, 2 processes / 1",
    "serve": "serve images/s over HTTP / in-process predict_images",
    "backends": "serve images/s at concurrency 8 / in-process, per backend",
    "quantize": "int8 onnxruntime vs fp32 eager torch, latency and size",
    "pipeline": "image-folder pipeline images/s vs torchvision",
    "scale": "multi-node scaling efficiency (model)",
    "landscape": "landscape grid points/s, batched (vmap) / state-dict loop",
    "speedrun": "Fashion-MNIST time to 93%, torchvision loop time / resnetlab time",
}


# ----------------------------------------------------------------------------------------------
# (d): the inference benchmark lives in bench_inference.py (another module's run(quick))


def run_inference(quick: bool, device: torch.device) -> dict[str, Any]:
    """Case (d) from ``benchmarks/bench_inference.py`` when present; ratios as time ratios."""
    path = Path(__file__).resolve().parent / "bench_inference.py"
    machine = machine_info(device)
    if not path.is_file() or importlib.util.find_spec("benchmarks.bench_inference") is None:
        return {"case": "d", "title": TITLES["d"], "machine": machine, "quick": quick,
                "skipped": "benchmarks/bench_inference.py is not present", "results": []}
    from benchmarks import bench_inference

    raw = bench_inference.run(quick=quick, device=str(device))
    rows = []
    for r in raw["results"]:
        tv, ours = r["torchvision_eager"], r["resnetlab_fused"]
        rows.append({"batch": r["batch"], "resnetlab_fused_ms": ours["median_ms"],
                     "torchvision_eager_ms": tv["median_ms"],
                     "resnetlab_fused_images_per_s": ours["images_per_s"],
                     "torchvision_eager_images_per_s": tv["images_per_s"],
                     "ratio": ours["median_ms"] / tv["median_ms"]})
    return {"case": "d", "title": TITLES["d"], "machine": machine, "quick": quick,
            "target": INFERENCE_TARGET, "higher_is_better": False, "results": rows,
            "met": all(r["ratio"] <= INFERENCE_TARGET for r in rows), "source": raw}


# ----------------------------------------------------------------------------------------------
# summary.md


def _yes(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "**no**")


def summary_rows(payloads: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One markdown row per measurement: case, setting, resnetlab, reference, ratio, target, met."""
    rows: list[list[str]] = []
    for case in ALL_CASES:
        p = payloads.get(case)
        if p is None:
            continue
        if "error" in p or "skipped" in p:
            rows.append([case, TITLES[case], "-", "-", "-", "-", "-",
                         f"error: {p['error']}" if "error" in p else f"skipped: {p['skipped']}"])
            continue
        if case == "quantize":  # one measurement set, no per-network results
            rows.extend(_quantize_rows(p))
            continue
        for r in p["results"]:
            rows.extend(_case_rows(case, p, r))
    return rows


def _other_work_line(machine: dict[str, Any]) -> str:
    share = machine.get("other_work_cpu_share")
    if share is None:
        return f"- 1-min load average at the start: {machine['load_average_1min']}"
    verdict = ("other work shared the machine: absolute numbers are low and noisy; the ratios, "
               "measured side by side in alternating rounds, much less so") if share > 0.05 else "a quiet machine"
    return f"- CPU time of other processes during the run: {share:.0%} of the cores ({verdict})"


def _b_note(r: dict[str, Any]) -> str:
    """The ceiling behind (b): the convolutions' own rate over the matmul's, and the step's time
    outside them (absent in results written before these were recorded)."""
    share = r.get("profile", {}).get("time_share", {})
    if not r.get("convolution_only_ratio") or not share:
        return ""
    names = {"batch_norm": "BN", "relu_add_pad": "relu/add/pad"}
    rest = ", ".join(f"{label} {share[g]:.0%}" for g, label in names.items() if g in share)
    return f"convolutions alone {fmt_ratio(r['convolution_only_ratio'])}; time in {rest}"


def _pipeline_rows(p: dict[str, Any], r: dict[str, Any]) -> list[list[str]]:
    tp, su = r["throughput"], r["startup"]
    check = (f"; with data.check_images=true {su['resnetlab_check_images_s']:.1f} s"
             if "resnetlab_check_images_s" in su else "")
    return [["pipeline", f"{tp['images']} JPEGs 500x375 -> {tp['crop']} px, batch {tp['batch']}",
             f"{fmt_rate(tp['resnetlab']['images_per_s'])} img/s",
             f"{fmt_rate(tp['torchvision']['images_per_s'])} img/s ({tp['workers']} workers)",
             f"{fmt_ratio(tp['ratio'])}x", f">= {p['target']}", _yes(tp["ratio"] >= p["target"]),
             f"start-up to the first batch on {su['files']:,} files: {su['resnetlab_s']:.1f} s vs "
             f"ImageFolder {su['torchvision_s']:.1f} s{check}"]]


def _case_rows(case: str, p: dict[str, Any], r: dict[str, Any]) -> list[list[str]]:
    if case == "pipeline":
        return _pipeline_rows(p, r)
    if case == "a":
        base = r["baseline"]
        workers = base.removeprefix("baseline_w")
        return [[case, f"{r['model']}, batch {r['batch']}, {r['image_size']} px",
                 f"{fmt_rate(r['resnetlab']['images_per_s'])} img/s",
                 f"{fmt_rate(r[base]['images_per_s'])} img/s ({workers} workers)",
                 f"{fmt_ratio(r['ratio'])}x", f">= {p['target']}", _yes(r["ratio"] >= p["target"]), ""]]
    if case == "b":
        return [[case, f"{r['model']}, batch {r['batch']}, {r['image_size']} px",
                 f"{r['model_flops_per_s'] / 1e9:.1f} GFLOP/s",
                 f"{p['matmul']['flops_per_s'] / 1e9:.1f} GFLOP/s ({p['matmul']['dtype']} matmul)",
                 fmt_ratio(r["ratio"]), f">= {p['target']}", _yes(r["ratio"] >= p["target"]), _b_note(r)]]
    if case == "c":
        return [[case, f"{r['model']}, batch {r['batch']}, {r['steps_per_epoch']} steps/epoch",
                 f"{fmt_rate(r['fit_images_per_s'])} img/s", f"{fmt_rate(r['pure_step']['images_per_s'])} img/s",
                 fmt_ratio(r["ratio"]), f">= {p['target']}", _yes(r["ratio"] >= p["target"]), ""]]
    if case == "d":
        what = "latency" if r["batch"] == 1 else "time per batch"
        return [[case, f"resnet50, batch {r['batch']} {what}", f"{r['resnetlab_fused_ms']:.1f} ms",
                 f"{r['torchvision_eager_ms']:.1f} ms", f"{fmt_ratio(r['ratio'])}x", f"<= {p['target']}",
                 _yes(r["ratio"] <= p["target"]), ""]]
    if case == "e":
        t = p["targets"]
        setting = f"{r['model']}, batch {r['batch']}"
        rss = f"; RSS {r['with']['peak_rss_mib']:.0f} / {r['without']['peak_rss_mib']:.0f} MiB" \
            if "peak_rss_mib" in r["with"] else ""
        per_block = r.get("per_block_memory_ratio") is not None  # absent in results before the split
        mem_note = f"per block: {fmt_ratio(r['per_block_memory_ratio'])}x" if per_block else ""
        time_note = f"per block: {fmt_ratio(r['per_block_time_ratio'])}x" if per_block else ""
        return [
            [case, f"{setting}: peak memory", f"{r['with']['peak_mib']:.0f} MiB",
             f"{r['without']['peak_mib']:.0f} MiB", f"{fmt_ratio(r['memory_ratio'])}x", f"<= {t['memory']}",
             _yes(r["memory_ratio"] <= t["memory"]), (mem_note + rss).lstrip("; ")],
            [case, f"{setting}: step time", f"{r['with']['seconds_per_step']:.2f} s",
             f"{r['without']['seconds_per_step']:.2f} s", f"{fmt_ratio(r['time_ratio'])}x", f"<= {t['time']}",
             _yes(r["time_ratio"] <= t["time"]), time_note],
        ]
    if case == "scale":
        return _scale_rows(p, r)
    if case == "speedrun":
        from benchmarks.bench_speedrun import summary_row

        return [summary_row(p, r)]
    if case == "serve":
        return _serve_rows(p, r)
    if case == "backends":
        return [[case, f"{p['model']} {p['input']}, {r['backend']}, concurrency 8",
                 f"{fmt_rate(r['server']['images_per_s'])} img/s",
                 f"{fmt_rate(r['in_process']['images_per_s'])} img/s (in-process, batch {r['in_process']['batch']})",
                 f"{fmt_ratio(r['ratio_at_8'])}x", f">= {p['target']}", _yes(r["ratio_at_8"] >= p["target"]),
                 f"p50 {r['server']['p50_ms']:.1f} ms, p99 {r['server']['p99_ms']:.1f} ms; errors "
                 f"{r['server']['errors'] + r['server']['dropped']}"]]
    if case == "landscape":
        return [[case, f"{r['model']}, {r['images']} images, {r['grid_points']} points, chunk {r['chunk']}",
                 f"{r['batched']['points_per_s']:.2f} points/s", f"{r['loop']['points_per_s']:.2f} points/s",
                 f"{fmt_ratio(r['ratio'])}x", "-", "-", f"|loss diff| {r['max_abs_loss_diff']:.0e}"]]
    return [[case, f"{r['model']}, global batch {r['global_batch']}",
             f"{fmt_rate(r['two_processes']['images_per_s'])} img/s",
             f"{fmt_rate(r['one_process']['images_per_s'])} img/s", f"{fmt_ratio(r['ratio'])}x", "-", "-", ""]]


def _quantize_rows(p: dict[str, Any]) -> list[list[str]]:
    """(quantize): latency at batch 1 and 64 (int8 vs fp32 eager torch), then file size."""
    lat, t = p["latency_ms"], p["targets"]
    rows = []
    for b in ("1", "64"):
        speed = p["speedup_vs_torch_fp32"][b]
        rows.append(["quantize", f"{p['model']} {p['input']}, batch {b}, latency",
                     f"{lat['onnxruntime_int8'][b]:.2f} ms (int8)", f"{lat['torch_fp32'][b]:.2f} ms (fp32 torch)",
                     f"{fmt_ratio(speed)}x faster", f">= {t['speedup_64']}" if b == "64" else "-",
                     _yes(speed >= t["speedup_64"]) if b == "64" else "-",
                     f"fp32 onnxruntime {lat['onnxruntime_fp32'][b]:.2f} ms"])
    rows.append(["quantize", f"{p['model']}, file size", f"{p['bytes']['int8'] / 1e6:.2f} MB",
                 f"{p['bytes']['fp32'] / 1e6:.2f} MB", f"{fmt_ratio(p['size_ratio'])}x smaller",
                 f">= {t['size_ratio']}", _yes(p["size_ratio"] >= t["size_ratio"]),
                 f"static QDQ, {p['calibration_images']} calibration images"])
    return rows


def _scale_rows(p: dict[str, Any], r: dict[str, Any]) -> list[list[str]]:
    """(scale): efficiency at 8 and 64 nodes of 8 GPUs; the loopback check as a note on the first."""
    by_nodes = {row["nodes"]: row for row in r["nodes"]}
    e = [f"{n}x8: {by_nodes[n]['efficiency_no_overlap']:.2f}-{by_nodes[n]['efficiency_overlap']:.2f}"
         for n in (8, 64) if n in by_nodes]
    note = ""
    if r is p["results"][0] and "loopback" in p:
        lb = p["loopback"]
        note = (f"loopback 2 x resnet20: measured {lb['measured_step_ms']:.0f} ms/step vs modelled "
                f"{lb['predicted_step_ms']:.0f} ms ({lb['measured_over_predicted']:.2f}x)")
    return [["scale", f"{r['model']}, {r['batch_per_worker']}/worker, step {r['step_ms']:.0f} ms "
             f"({r.get('step_time', 'measured')}), {r['grad_bytes'] / 2**20:.1f} MiB grads, "
             f"{r['node_gbit']:g} Gb/s per node", "; ".join(e), "ideal 1.00", "-", "-", "-", note]]
def _serve_rows(p: dict[str, Any], r: dict[str, Any]) -> list[list[str]]:
    """(serve): one row per concurrency, server images/s vs in-process; batching in the note."""
    mb = r["servers"]["micro_batching"]["runs"]
    one = {x["concurrency"]: x for x in r["servers"]["max_batch_1"]["runs"]}
    ref = r["in_process"]["images_per_s"]
    rows = []
    for x in mb:
        ratio = x["images_per_s"] / ref
        at_8 = x["concurrency"] == 8
        errors = x["errors"] + x["dropped"] + one[x["concurrency"]]["errors"] + one[x["concurrency"]]["dropped"]
        note = (f"p50 {x['p50_ms']:.1f} ms, p99 {x['p99_ms']:.1f} ms; --max-batch 1: "
                f"{fmt_rate(one[x['concurrency']]['images_per_s'])} img/s, micro-batching "
                f"{fmt_ratio(r['batching_speedup'][str(x['concurrency'])])}x that; errors {errors}")
        rows.append(["serve", f"{r['model']} {r['input']}, concurrency {x['concurrency']}",
                     f"{fmt_rate(x['images_per_s'])} img/s",
                     f"{fmt_rate(ref)} img/s (in-process, batch {r['in_process']['batch']})",
                     f"{fmt_ratio(ratio)}x", f">= {p['target']}" if at_8 else "-",
                     _yes(ratio >= p["target"]) if at_8 else "-", note])
    return rows


def _earlier_results(cases: list[str], results_dir: Path = RESULTS_DIR) -> dict[str, dict[str, Any]]:
    """The JSON of ``cases`` already in ``results_dir`` (unreadable or missing ones left out)."""
    out = {}
    for case in cases:
        try:
            out[case] = json.loads((results_dir / f"{case}.json").read_text())
        except (OSError, ValueError):
            continue
    return out


def write_summary(payloads: dict[str, dict[str, Any]], machine: dict[str, Any], quick: bool,
                  seconds: float, results_dir: Path = RESULTS_DIR, ran: list[str] | None = None) -> Path:
    """``summary.md``: this run's machine, then one table row per measurement."""
    ran = sorted(payloads) if ran is None else ran
    flags = (" --quick" if quick else "") + ("" if set(ran) == set(ALL_CASES) else f" --cases {','.join(ran)}")
    head = ["case", "setting", "resnetlab", "reference", "ratio", "target", "met", "note"]
    lines = [
        "# resnetlab benchmarks",
        "",
        f"- machine: {machine['cpu']}, {machine['cores']} cores ({machine['torch_threads']} torch threads)",
        f"- device: {machine['device']} ({machine['device_name']})",
        f"- software: torch {machine['torch']}, torchvision {machine['torchvision']}, python {machine['python']}",
        f"- run: `python -m benchmarks.run{flags}`, {machine['time']}, {seconds / 60:.1f} min",
        _other_work_line(machine),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in summary_rows(payloads):
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")
    earlier = {c: p["machine"]["time"] for c, p in payloads.items()
               if p.get("machine", {}).get("time", machine["time"]) < machine["time"]}
    if earlier:
        lines += ["", "Rows of earlier runs (same results folder): " + ", ".join(
            f"({c}) {t}" for c, t in sorted(earlier.items())) + "."]
    lines += ["", "Reference column: (a) the idiomatic loop, (b) the machine's matmul, (c) the pure train "
              "step, (d) torchvision eager, (e) without grad checkpointing (resnetlab column: the default "
              "checkpointing, segments of ~sqrt(blocks) over all stages but the last; note: one "
              "checkpoint per block over every stage), (f) one process, (serve) the same images "
              "through predict_images in-process in batches of 16, (pipeline) torchvision "
              "ImageFolder + transforms.v2 with the same workers, (landscape) one "
              "load_state_dict + forward per grid point, (speedrun) the same net and schedule in a torchvision "
              "DataLoader loop with per-sample transforms, (scale) the efficiency range for "
              "no overlap - full backward overlap of the all-reduce (formula in scale_model.py). "
              "Details per case in `<case>.json`."]
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short rounds, one model per case (< 3 min on 2 cores)")
    p.add_argument("--cases", help=f"comma-separated subset of {','.join(ALL_CASES)} (default: all)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--compile", action="store_true", help="torch.compile the models in a, b, c (for GPUs)")
    args = p.parse_args(argv)
    cases = parse_list(args.cases, ALL_CASES)
    bad = [c for c in cases if c not in ALL_CASES]
    if bad:
        p.error(f"--cases: unknown {', '.join(bad)}; choose from {', '.join(ALL_CASES)}")
    device = pick_device(args.device)
    others = OtherWork()
    machine = machine_info(device)
    print(f"benchmarks on {describe_machine(machine)}; quick={args.quick}, cases {','.join(cases)}", flush=True)
    t0 = time.perf_counter()
    payloads: dict[str, dict[str, Any]] = {}

    def guarded(names: list[str], fn: Callable[[], dict[str, dict[str, Any]]]) -> None:
        """Run one benchmark module; on failure record the error for its cases and go on."""
        if not names:
            return
        try:
            payloads.update(fn())
        except Exception as e:  # a broken case must not hide the others' numbers
            traceback.print_exc()
            for case in names:
                payloads[case] = {"case": case, "title": TITLES[case], "machine": machine,
                                  "error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"}
                write_json(case, payloads[case])

    train_cases: list[str] = [c for c in ("a", "b", "c") if c in cases]
    if train_cases:
        from benchmarks import bench_train

        guarded(train_cases, lambda: bench_train.run(args.quick, str(device), args.compile,
                                                     cases=tuple(train_cases)))
    if "d" in cases:
        def inference() -> dict[str, dict[str, Any]]:
            payload = run_inference(args.quick, device)
            write_json("d", payload)
            return {"d": payload}

        guarded(["d"], inference)
    if "e" in cases:
        from benchmarks import bench_memory

        guarded(["e"], lambda: {"e": bench_memory.run(args.quick, str(device))})
    if "f" in cases:
        from benchmarks import bench_ddp

        guarded(["f"], lambda: {"f": bench_ddp.run(args.quick, str(device))})
    if "serve" in cases:
        from benchmarks import bench_serve

        guarded(["serve"], lambda: {"serve": bench_serve.run(args.quick, str(device))})
    if "backends" in cases:
        from benchmarks import bench_serve

        guarded(["backends"], lambda: {"backends": bench_serve.run_backends(args.quick)})
    if "quantize" in cases:
        from benchmarks import bench_serve

        guarded(["quantize"], lambda: {"quantize": bench_serve.run_quantize(args.quick)})

    if "pipeline" in cases:
        from benchmarks import bench_pipeline

        guarded(["pipeline"], lambda: {"pipeline": bench_pipeline.run(args.quick)})
    if "landscape" in cases:
        from benchmarks import bench_landscape

        guarded(["landscape"], lambda: {"landscape": bench_landscape.run(args.quick, str(device))})

    if "scale" in cases:
        from benchmarks import scale_model

        guarded(["scale"], lambda: {"scale": scale_model.run(args.quick, str(device))})
    if "speedrun" in cases:
        from benchmarks import bench_speedrun

        guarded(["speedrun"], lambda: {"speedrun": bench_speedrun.run(args.quick, str(device))})

    seconds = time.perf_counter() - t0
    machine["other_work_cpu_share"] = others.share()
    # A subset run keeps the other cases' latest results in the table (each JSON holds its own
    # machine and time, and the summary names the rows that come from earlier runs).
    shown = {**_earlier_results([c for c in ALL_CASES if c not in payloads]), **payloads}
    path = write_summary(shown, machine, args.quick, seconds, ran=sorted(payloads))
    print(path.read_text())
    print(f"wrote {', '.join(sorted(f'{c}.json' for c in payloads))} and summary.md in {RESULTS_DIR} "
          f"({seconds / 60:.1f} min)")
    return 1 if any("error" in v for v in payloads.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
