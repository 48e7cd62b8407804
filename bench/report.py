#!/usr/bin/env python3
"""bench/report.py: turns one scripts/bench.sh run into JSON records, PNG charts and docs/BENCHMARKS.md.

Inputs (in --results, written by scripts/bench.sh): Google Benchmark JSON of zero_bench_stages and
zero_bench_collectives per world size (stages_wN.gbench.json, collectives_wN.gbench.json), of zero_bench_adamw
(adamw.gbench.json) and zero_bench_nvme (nvme.gbench.json, with its own start time, load and file system:
nvme_started, nvme_loadavg_*, nvme_fs), the LoRA example's logs (lora_sS_oO.log) and the machine's load average
at start and end;
and, from a separate run on a GPU machine (bench/gpu/run.sh), RESULTS/gpu/*.json (bench/report_gpu.py renders
those; without them the GPU section says that nothing has been measured).
Outputs: stages.json (one record per configuration, the fields of issue 9), collectives.json, adamw.json,
nvme.json, lora.json, machine.json, charts/*.png, and the Markdown report (--docs).

Only ratios measured within one run are compared (paired per iteration by the benchmarks themselves); absolute
times are printed for orientation and move with the machine's load.
"""
import argparse
import glob
import json
import os
import platform
import re
import statistics
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import report_gpu  # noqa: E402  (bench/report_gpu.py: the GPU section, from RESULTS/gpu/*.json)
import report_zeropp  # noqa: E402  (bench/report_zeropp.py: the ZeRO++ section, from RESULTS/zeropp_*)

DTYPES = {"f32": ("f32", "f32"), "bf16": ("bf16", "f32"), "bf16g": ("bf16", "bf16")}
OFFLOADS = {"none": "none", "optimizer": "optimizer", "params": "optimizer+params"}
CATEGORIES = ["params", "grads", "optimizer", "buffers"]
CALLS = ["begin", "acquire_fwd", "acquire_bwd", "grads_ready", "release", "step", "drain"]
MIB = float(1 << 20)


def fields(name):
    """'Stages/stage:2/offload:none/...' -> {'stage': '2', 'offload': 'none', ...}."""
    return dict(part.split(":", 1) for part in name.split("/") if ":" in part)


def load_gbench(path):
    with open(path) as f:
        data = json.load(f)
    runs = [b for b in data.get("benchmarks", []) if b.get("run_type", "iteration") == "iteration"]
    return data.get("context", {}), runs


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:  # noqa: BLE001 - a missing tool leaves the field empty
        return ""


# ---------------------------------------------------------------------------------------------------- records


def stage_records(results):
    records, errors = [], []
    for path in sorted(glob.glob(os.path.join(results, "stages_w*.gbench.json"))):
        _, runs = load_gbench(path)
        for b in runs:
            f = fields(b["name"])
            if b.get("error_occurred"):
                errors.append(f"{b['name']}: {b.get('error_message', '')}")
                continue
            pd, gd = DTYPES[f["dtype"]]
            stage = int(f["stage"])
            rec = {
                "stage": stage,
                "offload": OFFLOADS[f["offload"]],
                "dtype": f"{pd}/{gd}",
                "param_dtype": pd,
                "grad_dtype": gd,
                "world": int(b["world"]),
                "params": int(b["params"]),
                "params_padded": int(b["params_padded"]),
                "log2_params": int(f["params"].split("^")[1]),
                "d_model": int(b["d_model"]),
                "units": int(b["units"]),
                "comm_elements_per_step": int(b["comm_elements_per_step"]),
                "comm_ratio": b["comm_ratio"],
                "comm_ratio_paper": 3.0 if stage == 3 else 2.0,
                "reduce_scatter_elements": int(b["reduce_scatter_elements"]),
                "all_gather_elements": int(b["all_gather_elements"]),
                "all_reduce_elements": int(b["all_reduce_elements"]),
                "peak_device_bytes": int(b["peak_device_bytes"]),
                "formula_device_bytes": int(b["formula_device_bytes"]),
                "memory_formula_ratio": b["memory_formula_ratio"],
                "device_bytes": {c: int(b[f"dev_{c}"]) for c in CATEGORIES},
                "peak_host_bytes": int(b["peak_host_bytes"]),
                "formula_host_bytes": int(b["formula_host_bytes"]),
                "host_formula_ratio": b["host_formula_ratio"],
                "host_bytes": {c: int(b[f"host_{c}"]) for c in CATEGORIES},
                "step_time_s": b["step_time_s"],
                "nocompute_step_s": b["nocompute_step_s"],
                "compute_s": b["compute_s"],
                "hidden_comm_s": b["hidden_comm_s"],
                "exposed_s": b["exposed_s"],
                "trainer_call_s": {k: b[f"in_{k}_s"] for k in CALLS if f"in_{k}_s" in b},
                "step_vs_stage0": b.get("step_vs_stage0"),
                "nocompute_vs_stage0": b.get("nocompute_vs_stage0"),
                "iterations": int(b["iterations"]),
                "note": "CPU backend: per-unit compute is a sleep; hidden_comm_s is protocol overlap with it, "
                "not GPU overlap",
            }
            records.append(rec)
    records.sort(key=lambda r: (r["world"], r["log2_params"], r["dtype"], r["stage"], r["offload"]))
    return records, errors


def collective_records(results):
    records, notes, errors = [], set(), []
    for path in sorted(glob.glob(os.path.join(results, "collectives_w*.gbench.json"))):
        context, runs = load_gbench(path)
        if "nccl" in context:
            notes.add(context["nccl"])
        for b in runs:
            f = fields(b["name"])
            if b.get("error_occurred"):
                errors.append(f"{b['name']}: {b.get('error_message', '')}")
                continue
            rec = {k: b[k] for k in ("time_s", "algbw_GBps", "busbw_GBps", "raw_time_s", "raw_algbw_GBps",
                                     "raw_busbw_GBps", "vs_raw")}
            rec.update(impl=f["impl"], op=f["op"], world=int(b["world"]), bytes=int(b["bytes"]),
                       wrong=int(b["wrong"]), raw_wrong=int(b["raw_wrong"]), iterations=int(b["iterations"]))
            if "within_5pct" in b:
                rec["within_5pct"] = bool(b["within_5pct"])
            records.append(rec)
    records.sort(key=lambda r: (r["impl"], r["world"], r["op"], r["bytes"]))
    return records, sorted(notes), errors


def adamw_records(results):
    path = os.path.join(results, "adamw.gbench.json")
    if not os.path.exists(path):
        return [], {}
    context, runs = load_gbench(path)
    records = []
    for b in runs:
        f = fields(b["name"])
        records.append({
            "grad": f["grad"], "copy": f["copy"], "log2_n": int(f["n"].split("^")[1]), "threads": int(f["threads"]),
            "pages": f["pages"], "time_s": b["real_time"] / 1e3 if b["time_unit"] == "ms" else b["real_time"],
            "params_per_s": b["params_per_s"], "GBps": b["GBps"], "roofline_GBps": b["roofline_GBps"],
            "roofline_ratio": b["roofline_ratio"], "vs_scalar": b["vs_scalar"], "target": b.get("label", ""),
        })
    return records, context


NVME_FIELDS = ["world", "log2_params", "params", "units", "block_bytes", "queue_depth", "buffers", "step_tier_s",
               "step_host_s", "io_alone_s", "adamw_s", "step_vs_max", "step_vs_host", "tier_GBps", "fio_mixed_GBps",
               "tier_vs_fio", "fio_read_GBps", "fio_write_GBps", "io_bytes_per_step", "state_bytes", "host_budget",
               "host_peak_tier", "bounce_bytes", "host_peak_host", "host_offload_fits", "state_over_budget",
               "bitwise_equal", "wrong"]


def nvme_records(results):
    """zero_bench_nvme's rows (one per model size) and the run's context (fio's version, the directory)."""
    path = os.path.join(results, "nvme.gbench.json")
    if not os.path.exists(path):
        return [], {}, []
    context, runs = load_gbench(path)
    records, errors = [], []
    for b in runs:
        if b.get("error_occurred"):
            errors.append(f"{b['name']}: {b.get('error_message', '')}")
            continue
        rec = {k: b[k] for k in NVME_FIELDS}
        for k in ("world", "log2_params", "params", "units", "block_bytes", "queue_depth", "buffers",
                  "io_bytes_per_step", "state_bytes", "host_budget", "host_peak_tier", "bounce_bytes", "host_peak_host",
                  "host_offload_fits", "bitwise_equal", "wrong"):
            rec[k] = int(round(rec[k]))  # Google Benchmark writes counters as floats
        records.append(rec)
    records.sort(key=lambda r: (r["world"], r["log2_params"]))
    for r in records:
        r["scale"] = 2 ** (r["log2_params"] - records[0]["log2_params"])
    info = {k: context.get(k, "") for k in ("fio", "nvme_dir", "adamw_target")}
    for name in ("nvme_started", "nvme_loadavg_start", "nvme_loadavg_end", "nvme_fs", "nvme_commit", "nvme_machine"):
        p = os.path.join(results, name)
        info[name] = open(p).read().strip() if os.path.exists(p) else ""
    return records, info, errors


LORA_STEP = re.compile(r"^lora step\s+(\d+)/(\d+).*?([\d.]+) tok/s\s+device ([\d.]+) MiB\s+host ([\d.]+) MiB")
LORA_HEAD = re.compile(r"^lora: .*?(\d+) trainable / (\d+) frozen parameters, stage (\d)(.*?), (\d+) ranks")


def lora_records(results):
    records = []
    for path in sorted(glob.glob(os.path.join(results, "lora_s*_o*.log"))):
        m = re.search(r"lora_s(\d)_o(\d)\.log$", path)
        stage, offload = int(m.group(1)), int(m.group(2))
        steps, dev, host, trainable, frozen, world = [], 0.0, 0.0, 0, 0, 2
        with open(path) as f:
            for line in f:
                s = LORA_STEP.match(line)
                if s:
                    steps.append(float(s.group(3)))
                    dev, host = float(s.group(4)), float(s.group(5))
                h = LORA_HEAD.match(line)
                if h:
                    trainable, frozen, world = int(h.group(1)), int(h.group(2)), int(h.group(5))
        if not steps:
            continue
        timed = steps[1:] if len(steps) > 1 else steps  # the first step warms caches and threads
        records.append({
            "stage": stage, "offload": "optimizer" if offload else "none", "world": world,
            "tokens_per_s": statistics.median(timed), "tokens_per_s_steps": steps, "trainable_params": trainable,
            "frozen_params": frozen, "peak_device_mib": dev, "peak_host_mib": host,
        })
    records.sort(key=lambda r: (r["offload"], r["stage"]))
    return records


def machine_info(results, build, adamw_context):
    def read(name):
        p = os.path.join(results, name)
        return open(p).read().strip() if os.path.exists(p) else ""

    cpu = sh("lscpu | sed -n 's/^Model name: *//p' | head -1") or platform.processor()
    mem = sh("awk '/MemTotal/ {printf \"%.1f GiB\", $2 / 1048576}' /proc/meminfo")
    cache = {}
    cache_path = os.path.join(build, "CMakeCache.txt")
    if os.path.exists(cache_path):
        for line in open(cache_path):
            m = re.match(r"^(CMAKE_BUILD_TYPE|ZERO_WITH_CUDA|CMAKE_CXX_COMPILER):\w+=(.*)$", line.strip())
            if m:
                cache[m.group(1)] = m.group(2)
    dirty = sh("git status --porcelain --untracked-files=no | head -1")
    adamw_target = ""
    log = os.path.join(results, "logs", "adamw.log")
    if os.path.exists(log):
        m = re.search(r"AdamWStepCpu target: (\S+)", open(log).read())
        adamw_target = m.group(1).rstrip(",") if m else ""
    info = {
        "date": read("started"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": mem,
        "gpu": sh("nvidia-smi -L 2>/dev/null | head -1") or "none",
        "kernel": platform.release(),
        "os": sh(". /etc/os-release && echo $PRETTY_NAME"),
        "compiler": sh(f"{cache.get('CMAKE_CXX_COMPILER', 'c++')} --version | head -1"),
        "mpi": sh("mpiexec --version 2>/dev/null | head -1"),
        "google_benchmark": sh("dpkg-query -W -f='${Version}' libbenchmark-dev 2>/dev/null"),
        "build_type": cache.get("CMAKE_BUILD_TYPE", ""),
        "cuda_option": cache.get("ZERO_WITH_CUDA", ""),
        "adamw_target": adamw_target,
        # Recorded by bench.sh when the run started; the checkout's state now is only a fallback.
        "commit": read("commit") or (sh("git rev-parse --short HEAD") +
                                     (" + uncommitted changes in the working tree" if dirty else "")),
        "loadavg_start": read("loadavg_start"),
        "loadavg_end": read("loadavg_end"),
    }
    # A partial run (bench.sh --only) renders the report again, possibly on another machine: the facts of the full
    # run that started at `date` stay those recorded when it was reported.
    stored_path = os.path.join(results, "machine.json")
    if os.path.exists(stored_path):
        with open(stored_path) as f:
            stored = json.load(f)
        if stored.get("date") == info["date"]:
            info.update({k: v for k, v in stored.items() if k in info})
    return info


# ---------------------------------------------------------------------------------------------------- charts


def stage_label(r):
    off = {"none": "", "optimizer": "\n+opt off", "optimizer+params": "\n+param off"}[r["offload"]]
    return f"stage {r['stage']}{off}"


def pick_memory_set(stages):
    """The ZeRO paper's figure 1 setting: p = g = 2 when measured, else the largest run available."""
    if not stages:
        return []
    for dtype in ("bf16/bf16", "bf16/f32", "f32/f32"):
        cand = [r for r in stages if r["dtype"] == dtype]
        if cand:
            size, world = max((r["log2_params"], r["world"]) for r in cand)
            return [r for r in cand if r["world"] == world and r["log2_params"] == size]
    return []


def chart_memory(stages, path):
    rows = pick_memory_set(stages)
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=False)
    colors = {"params": "#4c72b0", "grads": "#dd8452", "optimizer": "#55a868", "buffers": "#8172b2"}
    for ax, kind in zip(axes, ("device", "host")):
        bottom = [0.0] * len(rows)
        for c in CATEGORIES:
            vals = [r[f"{kind}_bytes"][c] / MIB for r in rows]
            ax.bar(range(len(rows)), vals, bottom=bottom, label=c, color=colors[c])
            bottom = [b + v for b, v in zip(bottom, vals)]
        if kind == "device":
            ax.plot(range(len(rows)), [r["formula_device_bytes"] / MIB for r in rows], "k_", markersize=28,
                    markeredgewidth=2, label="DESIGN.md formula")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([stage_label(r) for r in rows], fontsize=8)
        ax.set_ylabel("MiB per rank")
        ax.set_title(f"{kind} memory per rank (peak per category)")
        ax.legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"Per-rank memory by category, measured: Ψ = 2^{r0['log2_params']} ({r0['params'] / 1e6:.1f}M), "
                 f"{r0['world']} ranks, {r0['dtype']} params/grads, AdamW")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return rows


def chart_step_time(stages, path):
    if not stages:
        return None
    dtype = "bf16/f32" if any(r["dtype"] == "bf16/f32" for r in stages) else stages[0]["dtype"]
    worlds = sorted({r["world"] for r in stages if r["dtype"] == dtype})
    fig, axes = plt.subplots(1, len(worlds), figsize=(6.5 * len(worlds), 5), squeeze=False)
    for ax, world in zip(axes[0], worlds):
        size = max(r["log2_params"] for r in stages if r["world"] == world and r["dtype"] == dtype)
        rows = [r for r in stages if r["world"] == world and r["dtype"] == dtype and r["log2_params"] == size]
        x = range(len(rows))
        compute = [r["compute_s"] * 1e3 for r in rows]
        exposed = [max(0.0, r["exposed_s"]) * 1e3 for r in rows]
        ax.bar(x, compute, color="#bbbbbb", label="compute (a sleep)")
        ax.bar(x, exposed, bottom=compute, color="#c44e52", label="exposed: engine time beyond compute")
        ax.plot(list(x), [r["nocompute_step_s"] * 1e3 for r in rows], "ko", label="step without compute")
        for i, r in enumerate(rows):  # the paired ratio to stage 0 above each bar
            if r["step_vs_stage0"] is not None:
                top = max(compute[i] + exposed[i], r["nocompute_step_s"] * 1e3)
                ax.annotate(f"×{r['step_vs_stage0']:.2f}", (i, top), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(x))
        ax.set_xticklabels([stage_label(r) for r in rows], fontsize=8)
        ax.set_ylabel("ms per step (median, slowest rank)")
        ax.set_title(f"{world} ranks, Ψ = 2^{size}, {dtype} (×: step / stage 0, paired)", fontsize=10)
        ax.set_ylim(top=ax.get_ylim()[1] * 1.08)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    fig.suptitle("Step time per stage and offload (CPU backend: compute is a sleep; protocol overhead, not GPU "
                 "overlap)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def chart_busbw(colls, path):
    if not colls:
        return None
    worlds = sorted({r["world"] for r in colls})
    ops = ["reduce_scatter", "all_gather", "all_reduce"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    styles = {2: "-", 3: ":", 4: "--"}
    for ax, op in zip(axes, ops):
        for impl in sorted({r["impl"] for r in colls}):
            for world in worlds:
                rows = [r for r in colls if r["op"] == op and r["world"] == world and r["impl"] == impl]
                if not rows:
                    continue
                xs = [r["bytes"] for r in rows]
                ls = styles.get(world, "-.")
                ax.plot(xs, [r["busbw_GBps"] for r in rows], "o" + ls, color="#4c72b0", markersize=3,
                        label=f"Comm ({impl}), {world} ranks")
                ax.plot(xs, [r["raw_busbw_GBps"] for r in rows], "s" + ls, color="#dd8452", markersize=3,
                        label=f"raw {impl.upper()}, {world} ranks")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("bytes (nccl-tests' size)")
        ax.set_title(op)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("busbw GB/s (median)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Bus bandwidth against message size: zero::Comm against the raw library, interleaved in one run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def chart_adamw(adamw, path):
    rows = [r for r in adamw if r["pages"] == "4K"]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    variants = sorted({(r["grad"], r["copy"], r["threads"]) for r in rows})
    for i, (grad, copy, threads) in enumerate(variants):
        sel = sorted((r for r in rows if (r["grad"], r["copy"], r["threads"]) == (grad, copy, threads)),
                     key=lambda r: r["log2_n"])
        color = plt.cm.tab10(i % 10)
        xs = [2 ** r["log2_n"] for r in sel]
        label = f"grad {grad}, copy {copy}, {threads} thr"
        axes[0].plot(xs, [r["roofline_ratio"] for r in sel], "o-", color=color, label=label)
        if threads == 1:
            axes[1].plot(xs, [r["GBps"] for r in sel], "o-", color=color, label=f"AdamW, {label}")
            axes[1].plot(xs, [r["roofline_GBps"] for r in sel], "--", color=color, alpha=0.6)
    axes[0].axhline(1.0, color="k", linewidth=0.8)
    axes[0].set_ylabel("roofline ratio = t(roofline) / t(AdamW), paired")
    axes[0].set_title("AdamW against its roofline (1.0 = bound by memory alone)")
    axes[1].set_ylabel("GB/s (solid: AdamW, dashed: its roofline)")
    axes[1].set_title("Absolute bandwidth, 1 thread (moves with the machine's load)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("parameters")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def chart_lora(lora, path):
    if not lora:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"stage {r['stage']}" + ("\n+opt off" if r["offload"] != "none" else "") for r in lora]
    ax.bar(range(len(lora)), [r["tokens_per_s"] for r in lora], color="#4c72b0")
    ax.set_xticks(range(len(lora)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("tokens/s (median over steps, whole job)")
    ax.set_title(f"LoRA example, {lora[0]['world']} CPU ranks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------- Markdown


def fmt_bytes(b):
    return f"{b / MIB:,.1f}"


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def human_bytes(b):
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= size:
            v = b / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{b} B"


def ratio(x):
    return "" if x is None else f"{x:.2f}"


def stage_rows(rows):
    return [[r["stage"], r["offload"], r["dtype"], f"{r['step_time_s'] * 1e3:.1f}", ratio(r["step_vs_stage0"]),
             f"{r['nocompute_step_s'] * 1e3:.1f}", ratio(r["nocompute_vs_stage0"]), f"{r['compute_s'] * 1e3:.1f}",
             f"{r['hidden_comm_s'] * 1e3:.1f}",
             f"{r['exposed_s'] * 1e3:.1f}", f"{r['comm_ratio']:.4f}", fmt_bytes(r["peak_device_bytes"]),
             f"{r['memory_formula_ratio']:.4f}", fmt_bytes(r["peak_host_bytes"]), f"{r['host_formula_ratio']:.4f}"]
            for r in rows]


STAGE_HEADER = ["stage", "offload", "dtype p/g", "step ms", "step / stage 0", "no-compute ms",
                "no-compute / stage 0", "compute ms", "hidden ms",
                "exposed ms", "comm/Ψ", "device MiB", "device/formula", "host MiB", "host/formula"]


def mib(b):
    return f"{b / MIB:,.1f}"


def nvme_section(nvme, info, errors):
    """The NVMe tier: issue 19's table (goal, measured, reference in the same run), then every model size."""
    md = ["## The NVMe tier: optimizer state on a local disk\n"]
    if not nvme:
        md.append("Not measured in this run (`scripts/bench.sh --only nvme` measures it).\n")
        md += [f"- error: `{e}`" for e in errors]
        return "\n".join(md) + "\n"
    big = nvme[-1]
    md.append(f"`zero_bench_nvme` (see the comment at the top of `bench/nvme_bench.cc`), {big['world']} "
              f"rank{'s' if big['world'] > 1 else ''}, commit {info.get('nvme_commit') or '?'}, run on "
              f"{info.get('nvme_started') or '?'} on {info.get('nvme_machine') or '?'} (load average {(info.get('nvme_loadavg_start') or '?').split()[0]} "
              f"at its start, {(info.get('nvme_loadavg_end') or '?').split()[0]} at its end), the tier and fio in "
              f"the same directory on {info.get('nvme_fs') or '?'}, {info.get('fio') or 'no fio'}: models of "
              f"2^{nvme[0]['log2_params']} to 2^{big['log2_params']} parameters (units of a 1024 × 1024 weight and "
              "a norm), stage 2 with the optimizer offloaded, fp32 AdamW, blocks of "
              f"{human_bytes(int(big['block_bytes']))}, queue depth {int(big['queue_depth'])}, "
              f"{int(big['buffers'])} bounce buffers. Two engines side by side, one with master, m and v in host "
              "memory and one with them on the tier; each iteration steps both, then runs the tier's I/O alone for "
              "the same bytes, the CPU AdamW alone, and fio, so that every ratio is paired within an iteration "
              "(medians over iterations).\n")
    md.append("**This disk is shared and virtual.** It is the machine's root disk (a virtio device), which other "
              "engineers' builds use at the same time, and the host behind it may cache: fio's numbers are what "
              "it gives O_DIRECT here and now, not a datasheet's. The ratios compare the tier with fio and with the "
              "engine's own work measured back to back on that disk.\n")
    ok = lambda good: "yes" if good else "**no**"  # noqa: E731
    step_ratio = big["step_vs_max"]
    fio_ratios = [r["tier_vs_fio"] for r in nvme if r["fio_mixed_GBps"] > 0]
    host = [r["host_peak_tier"] for r in nvme]
    trains = [r for r in nvme if r["state_over_budget"] >= 4]
    step_ratios = ", ".join(f"{r['step_vs_max']:.2f}" for r in nvme)
    fio_text = ", ".join(f"{x:.2f}" for x in fio_ratios)
    host_text = " → ".join(mib(h) for h in host)
    state_text = " → ".join(mib(r["state_bytes"]) for r in nvme)
    fits_up_to = max([r["scale"] for r in nvme if r["host_offload_fits"]], default=0)
    host_constant = max(host) - min(host) <= 16 * 1024 * len(nvme)  # the checksums: 9 B per block of state
    rows = [
        ["tier read and write throughput during a step",
         f"{big['tier_GBps']:.2f} GB/s at {big['scale']}× (bytes moved / time with transfers in flight); tier / fio "
         f"{fio_text} from 1× to {big['scale']}×",
         f"fio, O_DIRECT io_uring, 50/50 read/write, same block size, queue depth and directory: "
         f"{big['fio_mixed_GBps']:.2f} GB/s (reading alone {big['fio_read_GBps']:.2f}, writing alone "
         f"{big['fio_write_GBps']:.2f})", "≥ 0.85",
         ok(bool(fio_ratios) and min(fio_ratios) >= 0.85) if fio_ratios else "fio not run"],
        ["offloaded step time with the tier",
         f"{big['step_tier_s'] * 1e3:.0f} ms at {big['scale']}×: {step_ratio:.2f} × the reference "
         f"({step_ratios} from 1× to {big['scale']}×)",
         f"max(the tier's I/O alone {big['io_alone_s'] * 1e3:.0f} ms, the CPU AdamW alone {big['adamw_s'] * 1e3:.0f} "
         f"ms) for the same bytes; the step with the state in host memory: {big['step_host_s'] * 1e3:.0f} ms",
         "≤ 1.15×", ok(step_ratio <= 1.15)],
        ["host memory with the tier",
         f"{host_text} MiB from 1× to {big['scale']}× (the state on the disk: {state_text} MiB)",
         f"the bounce buffers: {mib(big['bounce_bytes'])} MiB (the rest: gradient and parameter staging, 9 bytes of "
         f"checksum per {human_bytes(int(big['block_bytes']))} of state); a host budget of "
         f"{mib(big['host_budget'])} MiB: host-memory offload fits it "
         + (f"up to {fits_up_to}×" if fits_up_to else "at no size") + ", the tier at every size",
         "constant as the model grows 1× → 8×; a model whose state is ≥ 4× the budget trains",
         ok(host_constant and bool(trains) and all(r["host_peak_tier"] <= r["host_budget"] for r in nvme))
         + (f" ({trains[-1]['state_over_budget']:.1f}× the budget at {trains[-1]['scale']}×)" if trains else "")],
        ["results", "bitwise equal at every size" if all(r["bitwise_equal"] for r in nvme)
         else f"**{int(sum(r['wrong'] for r in nvme))} elements differ**",
         "the same run with host-memory offload (every step's norm, every final parameter)", "bitwise equal",
         ok(all(r["bitwise_equal"] for r in nvme))],
    ]
    md.append(table(["what", "measured", "reference in the same run", "goal", "met"], rows))
    md.append("")
    md.append("Per model size (per rank; times are medians over iterations, ratios the medians of paired ratios):\n")
    md.append(table(["size", "Ψ", "state MiB", "tier host MiB", "bounce MiB", "host-offload MiB", "fits budget",
                     "tier step ms", "host step ms", "I/O alone ms", "AdamW ms", "step / max", "tier GB/s",
                     "fio rw GB/s", "tier / fio", "fio read GB/s", "fio write GB/s", "bitwise"],
                    [[f"{r['scale']}×", f"2^{r['log2_params']}", mib(r["state_bytes"]), mib(r["host_peak_tier"]),
                      mib(r["bounce_bytes"]), mib(r["host_peak_host"]), "yes" if r["host_offload_fits"] else "no",
                      f"{r['step_tier_s'] * 1e3:.1f}", f"{r['step_host_s'] * 1e3:.1f}",
                      f"{r['io_alone_s'] * 1e3:.1f}", f"{r['adamw_s'] * 1e3:.1f}", f"{r['step_vs_max']:.2f}",
                      f"{r['tier_GBps']:.2f}", f"{r['fio_mixed_GBps']:.2f}", f"{r['tier_vs_fio']:.2f}",
                      f"{r['fio_read_GBps']:.2f}", f"{r['fio_write_GBps']:.2f}",
                      "yes" if r["bitwise_equal"] else f"no ({int(r['wrong'])})"] for r in nvme]))
    md.append("")
    md.append("*fits budget*: the host-memory offload opened under the same `host_budget_bytes` as the tier (the "
              "tier's need at the largest size); above it Open fails with OutOfMemory pointing at `nvme_path`. "
              "*tier GB/s* counts the bytes the tier moved during the step over the time it had transfers in "
              "flight (`Engine::nvme_stats`); fio's are read plus write bytes over its run time (fio keeps its "
              "queue full, so it has no idle time to leave out; its 50/50 mix shares the queue depth between reads "
              "and writes, as the tier's does). The I/O alone "
              "streams the same records through the same number of bounce buffers without computing anything; the "
              "step also waits for the first bucket's read and the last one's write, which nothing overlaps, so "
              "*step / max* falls as buckets are added.\n")
    md += [f"- error: `{e}`" for e in errors]
    return "\n".join(md) + "\n"


def write_markdown(args, machine, stages, stage_errors, colls, coll_notes, coll_errors, adamw, lora, charts,
                   phase_times, gpu_recs=None, gpu_charts=None, nvme=None, nvme_info=None, nvme_errors=None):
    rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(args.docs)))  # noqa: E731
    md = []
    md.append("# Benchmarks\n")
    md.append(f"Generated by `{args.command}` ({args.mode} mode) on {machine['date']}; `bench/report.py` wrote "
              "this page from the JSON in `bench/results/`: do not edit it by hand, run the script again.\n")
    md.append("**Read the ratios, not the absolute times.** The machine below has no GPU and two cores that other "
              "engineers' builds were using during the run (load average "
              f"{machine['loadavg_start'].split()[0] if machine['loadavg_start'] else '?'} at the start, "
              f"{machine['loadavg_end'].split()[0] if machine['loadavg_end'] else '?'} at the end), and up to 4 MPI "
              "ranks share those 2 cores. Every benchmark therefore measures what it compares in the same iteration "
              "(Comm and raw MPI back to back, AdamW and its roofline back to back, a step with and without compute "
              "back to back) and reports medians of the paired ratios; the counted quantities (elements "
              "communicated, bytes allocated) are exact and do not depend on the load at all.\n")
    md.append("**CPU only.** On the CPU backend \"device memory\" is host memory with its own accounting and "
              "the trainer's per-unit compute is a sleeping task (it frees the cores for the engine's threads, as "
              "GPU kernels would). What the stage benchmark's hidden/exposed times measure here is the protocol: how "
              "much of the engine's work (collectives, optimizer, copies) runs while the trainer computes. That is "
              "labelled protocol overhead; real overlap numbers need a GPU, and NcclComm against raw NCCL needs one "
              "too (skipped below, saying why). The last section, GPU, comes from a separate run on a machine with "
              "a GPU (`bench/gpu/run.sh`) and has its own machine table.\n")

    md.append("## Machine\n")
    md.append(table(["", ""], [
        ["date (UTC)", machine["date"]], ["CPU", machine["cpu"]], ["cores", machine["cores"]],
        ["memory", machine["memory"]], ["GPU", machine["gpu"]], ["OS", machine["os"]],
        ["kernel", machine["kernel"]], ["compiler", machine["compiler"]], ["MPI", machine["mpi"]],
        ["Google Benchmark", machine["google_benchmark"] + " (Debian's; it warns that it was built as DEBUG: "
         "that concerns its own timer code, not zero's)"],
        ["build", f"{machine['build_type']}, ZERO_WITH_CUDA={machine['cuda_option']}"],
        ["AdamW SIMD target", machine["adamw_target"]], ["commit", machine["commit"]],
        ["load average (1, 5, 15 min) at start", machine["loadavg_start"]],
        ["load average at end", machine["loadavg_end"]]]))
    md.append("")

    md.append("## How to reproduce\n")
    md.append("```sh\nscripts/bench.sh            # everything, about 10 minutes on 2 cores; rewrites bench/results/ "
              "and this page\nscripts/bench.sh --quick    # a smoke run in under 3 minutes (ctest's bench_quick runs "
              "it into the build directory)\n```\n")
    md.append("It installs missing Debian packages (`scripts/deps.sh`, which includes `python3-matplotlib` for the "
              "charts), builds the benchmark targets in `build/` (Release), runs each benchmark under `mpiexec` and "
              "this report, which fails the run when a counted quantity misses its closed form (elements per step, "
              "bytes against the formula, #wrong; times are never asserted). Single benchmarks by hand, for "
              "example:\n")
    md.append("```sh\nmpiexec -n 2 --oversubscribe --bind-to none build/bench/zero_bench_stages --sizes=24 "
              "--dtypes=bf16 --stages=2,3\nmpiexec -n 4 --oversubscribe --bind-to none "
              "build/bench/zero_bench_collectives --max_bytes=67108864\nbuild/bench/zero_bench_adamw "
              "--benchmark_filter='n:2\\^24'\n```\n")
    if phase_times:
        md.append("Wall time of this run's phases:\n\n```\n" + phase_times.rstrip() + "\n```\n")

    # ---- stages
    md.append("## ZeRO stages against each other and against the formulas\n")
    md.append("`zero_bench_stages`: a synthetic decoder (embedding, L blocks of width d with qkv, o, two norms and "
              "a 4d MLP, final norm and head; one unit each) of Ψ ≈ 2^k parameters, AdamW, one micro-step, no "
              "frozen, tied or persistent units, so that DESIGN.md's formulas reduce to the paper's: 2Ψ elements per "
              "step in stages 0–2 and 3Ψ in stage 3. Ψ below is the plan's padded trainable count. Each "
              "(Ψ, dtype) opens the engines of all its stage × offload configurations at once and steps them in turn "
              "within each iteration (the first one rotating), each with and without the compute sleep (6 ns per "
              "parameter, split 1:2 between forward and backward), so that the ratios to stage 0 are paired per "
              "iteration. Times are medians of the slowest rank. A step is timed until its work has completed, "
              "post-step all-gathers included: a training loop overlaps those with the next forward in stages 1–2, "
              "so their times here are upper bounds.\n")
    md.append("Columns: *step* with compute; */ stage 0* the median of the per-iteration ratios to stage 0 (same "
              "Ψ, dtype and iteration); *no-compute* the engine alone; *hidden* = no-compute + compute − step "
              "(engine time that ran behind the compute: protocol overlap on the CPU); *exposed* = step − compute; "
              "*comm/Ψ* = CommCounters::Volume() per step / Ψ (all-reduce counted twice); *device/formula* = the "
              "allocator's peak device bytes per rank / DESIGN.md's bytes for this plan (p + g + K per parameter "
              "with K = 8 for fp32 and 12 for 16-bit parameters, the stage-2/3 gradient pool and stage-3 gather "
              "slots); *host/formula* the same for offload's host bytes (1 when both are zero).\n")
    if stages:
        checks = []
        for world in sorted({r["world"] for r in stages}):
            sel = [r for r in stages if r["world"] == world]
            for st in range(4):
                cr = sorted({round(r["comm_ratio"], 6) for r in sel if r["stage"] == st})
                if cr:
                    checks.append([world, st, ", ".join(f"{c:g}" for c in cr), "3" if st == 3 else "2"])
        md.append("Communication per step over Ψ, every size, dtype and offload setting measured:\n")
        md.append(table(["ranks", "stage", "measured comm/Ψ", "paper"], checks))
        md.append("")
        over = [r["compute_s"] / (6e-9 * r["params"]) for r in stages]
        md.append(f"The compute sleeps asked for 6 ns × Ψ per step and took {min(over):.2f}–{max(over):.2f}× that "
                  f"(median {statistics.median(over):.2f}×): on a loaded machine a sleeping thread waits for a core "
                  "to wake up on. *compute* is the measured sleep, so hidden and exposed times do not inherit that "
                  "error. *hidden* is clamped at 0: a configuration whose step with compute took longer than its "
                  "step without compute plus the sleeps shows 0.\n")
        hid = []
        for st in range(4):
            sel = [r for r in stages if r["stage"] == st]
            if sel:
                zero = sum(1 for r in sel if r["hidden_comm_s"] <= 0)
                vs0 = [r["step_vs_stage0"] for r in sel if r["step_vs_stage0"] is not None]
                share = statistics.median(r["hidden_comm_s"] / r["nocompute_step_s"] for r in sel)
                hid.append([st, len(sel), f"{share:.2f}", f"{zero}/{len(sel)}",
                            f"{statistics.median(vs0):.2f}" if vs0 else ""])
        md.append("Per stage over all configurations: the median share of the engine's own time (no-compute step) "
                  "that the compute hid, how many configurations hid nothing, and the median step time relative to "
                  "stage 0:\n")
        md.append(table(["stage", "configurations", "hidden / no-compute (median)", "hid nothing",
                         "step / stage 0 (median)"], hid))
        md.append("")
        mr = [r["memory_formula_ratio"] for r in stages]
        hr = [r["host_formula_ratio"] for r in stages]
        md.append(f"Memory: device/formula ranges over [{min(mr):.6f}, {max(mr):.6f}] and host/formula over "
                  f"[{min(hr):.6f}, {max(hr):.6f}] across all {len(stages)} configurations (1 = the allocator's "
                  "accounting equals the closed form byte for byte).\n")
    if charts.get("memory"):
        md.append(f"![per-rank memory by category]({rel(charts['memory'])})\n")
    if charts.get("step"):
        md.append(f"![step time per stage]({rel(charts['step'])})\n")
    # Main tables: per world, the size measured in the most configurations (the largest among equals); the rest
    # below, folded.
    main_size = {}
    for world in sorted({r["world"] for r in stages}):
        sizes = [r["log2_params"] for r in stages if r["world"] == world]
        main_size[world] = max(set(sizes), key=lambda k: (sizes.count(k), k))
    for world, size in main_size.items():
        rows = [r for r in stages if r["world"] == world and r["log2_params"] == size]
        p = rows[0]
        md.append(f"### {world} ranks, Ψ = 2^{size} ({p['params']:,} parameters, {p['params_padded']:,} padded; "
                  f"d = {p['d_model']}, {p['units']} units)\n")
        md.append(table(STAGE_HEADER, stage_rows(rows)))
        md.append("")
    calls = [r for r in stages if r["trainer_call_s"] and r["log2_params"] == main_size[r["world"]]]
    if calls:
        md.append("### Where the trainer's thread spends the engine's time\n")
        md.append("In a step with compute, the time inside each kind of engine call (medians, slowest rank; ms). "
                  "On the CPU backend these calls do real work on the trainer's thread that a GPU backend would "
                  "mostly enqueue: `Acquire(u, kBackward)` in stages 2–3 waits for a gradient-pool buffer (the comm "
                  "thread zeroes a buffer once its reduction is done, so the wait is for an earlier unit's "
                  "reduction: with 2 ranks it is near 0; with 4 ranks sharing 2 cores the reductions fall behind "
                  "and the wait that stage 1 spends in *drain* moves here), stage 3's `Acquire` waits for its "
                  "gathers, `Step` "
                  "runs the optimizer on the owned shard (and, with offload, the copies and the host AdamW), and "
                  "*drain* waits for the post-step all-gathers. Engine time spent here cannot hide behind compute "
                  "on this backend.\n")
        dtype = "bf16/f32" if any(q["dtype"] == "bf16/f32" for q in calls) else calls[0]["dtype"]
        md.append(table(["ranks", "stage", "offload", "dtype p/g", "BeginMicroStep", "Acquire fwd", "Acquire bwd",
                         "GradsReady", "Release", "Step", "drain"],
                        [[r["world"], r["stage"], r["offload"], r["dtype"]] +
                         [f"{r['trainer_call_s'].get(k, 0) * 1e3:.1f}" for k in CALLS]
                         for r in calls if r["dtype"] == dtype]))
        md.append("")
    smaller = [r for r in stages if r["log2_params"] != main_size[r["world"]]]
    if smaller:
        md.append("<details><summary>Other Ψ</summary>\n")
        for (world, size) in sorted({(r["world"], r["log2_params"]) for r in smaller}):
            md.append(f"\n{world} ranks, Ψ = 2^{size}:\n")
            md.append(table(STAGE_HEADER, stage_rows([r for r in smaller
                                                      if r["world"] == world and r["log2_params"] == size])))
        md.append("\n</details>\n")
    for e in stage_errors:
        md.append(f"- error: `{e}`")

    # ---- collectives
    md.append("## Collectives: zero::Comm against the raw library\n")
    md.append("`zero_bench_collectives`: fp32, out of place, as nccl-tests reports them (size = the whole collective; "
              "algbw = size / time; busbw = algbw × (n−1)/n for reduce-scatter and all-gather, × 2(n−1)/n for "
              "all-reduce). Each iteration runs Comm and raw back to back (alternating which goes first); *vs raw* is "
              "the median of the paired ratios t(raw)/t(Comm) = busbw(Comm)/busbw(raw), so 1.0 is parity and above 1 "
              "Comm is faster. *#wrong* counts elements that differ from the exact result of crafted inputs, over all "
              "ranks. There is no pass/fail bound on the CPU: MpiComm's reduce-scatter is a ring over MPI_Sendrecv "
              "with a fixed summation order (bitwise reproducible), Open MPI's MPI_Reduce_scatter_block a different "
              "algorithm; large all-reduce is MpiComm's reduce-scatter + all-gather.\n")
    for note in coll_notes:
        md.append(f"- {note}")
    big = [r for r in colls if r["impl"] == "nccl" and "within_5pct" in r]
    if big:
        bad = [f"{r['op']} {human_bytes(r['bytes'])} at {r['world']} ranks ({r['vs_raw']:.3f})"
               for r in big if not r["within_5pct"]]
        md.append("- NcclComm within 5% of raw NCCL at ≥ 64 MiB: " + ("yes, every case" if not bad else
                                                                     "**no**: " + "; ".join(bad)))
    md.append("")
    if charts.get("busbw"):
        md.append(f"![busbw against size]({rel(charts['busbw'])})\n")
    for impl in sorted({r["impl"] for r in colls}):
        for world in sorted({r["world"] for r in colls if r["impl"] == impl}):
            rows = [r for r in colls if r["impl"] == impl and r["world"] == world]
            md.append(f"### {impl}, {world} ranks\n")
            md.append(table(["op", "size", "Comm µs", "algbw GB/s", "busbw GB/s", f"raw {impl} busbw GB/s",
                             "vs raw", "#wrong", "raw #wrong"],
                            [[r["op"], human_bytes(r["bytes"]), f"{r['time_s'] * 1e6:,.1f}", f"{r['algbw_GBps']:.3f}",
                              f"{r['busbw_GBps']:.3f}", f"{r['raw_busbw_GBps']:.3f}", f"{r['vs_raw']:.2f}",
                              r["wrong"], r["raw_wrong"]] for r in rows]))
            md.append("")
    for e in coll_errors:
        md.append(f"- error: `{e}`")

    # ---- adamw
    md.append("## CPU AdamW against its roofline\n")
    md.append("`zero_bench_adamw` (see the comment at the top of `bench/adamw_bench.cc`): the SIMD AdamW used by "
              "the CPU backend and by offload, against a streaming kernel with exactly its memory traffic on the "
              "same threads (its roofline, measured in the same iteration), and against the scalar path. "
              "*roofline ratio* = t(roofline)/t(AdamW), 1.0 = bound by memory alone; bytes per parameter: 24 for "
              "master, m, v read and written + 4 or 2 for the gradient + 2 for a bf16 copy.\n")
    if adamw:
        big = [r["roofline_ratio"] for r in adamw if r["log2_n"] >= 24]
        allr = [r["roofline_ratio"] for r in adamw]
        md.append(f"Median roofline ratio over all {len(allr)} cases {statistics.median(allr):.2f} (range "
                  f"{min(allr):.2f}–{max(allr):.2f})" +
                  (f"; over the {len(big)} cases of 2^24 parameters or more (out of cache) "
                   f"{statistics.median(big):.2f}" if big else "") +
                  ". Single pairs above 1 or far below it are the machine's noise (a neighbour taking a core during "
                  "one of the two kernels), which the medians over iterations and cases absorb; the 2-thread cases "
                  "suffer most, since two threads need both cores that other work was using.\n")
    if charts.get("adamw"):
        md.append(f"![AdamW against roofline]({rel(charts['adamw'])})\n")
    if adamw:
        md.append(table(["grad", "copy", "n", "threads", "pages", "params/s (M)", "GB/s", "roofline GB/s",
                         "roofline ratio", "vs scalar"],
                        [[r["grad"], r["copy"], f"2^{r['log2_n']}", r["threads"], r["pages"],
                          f"{r['params_per_s'] / 1e6:,.0f}", f"{r['GBps']:.2f}", f"{r['roofline_GBps']:.2f}",
                          f"{r['roofline_ratio']:.3f}", f"{r['vs_scalar']:.2f}"] for r in adamw]))
        md.append("")

    # ---- nvme
    md.append(nvme_section(nvme or [], nvme_info or {}, nvme_errors or []))

    # ---- lora
    md.append("## The LoRA example: tokens/s per stage\n")
    if lora:
        r0 = lora[0]
        setting = ("the main job's model and batch (the example's defaults: dim 128, 4 layers, sequences of 128 "
                   "tokens, 4 per rank × 2 micro-steps) on its corpora (fortunes, then the King James Bible)"
                   if args.mode == "full" else "a tiny model on synthetic corpora (quick mode)")
        md.append(f"`lora_finetune lora` on {r0['world']} ranks, {setting}: {r0['trainable_params']:,} trainable "
                  f"LoRA parameters, {r0['frozen_params']:,} frozen, from a base the script pretrains for a few steps "
                  "(throughput does not depend on how well it is trained). Tokens/s of the whole job per optimizer "
                  "step, the median over the steps after the first. These runs are sequential, so unlike the ratios "
                  "above they are exposed to load changes between runs: differences of 20% between stages are within "
                  "this machine's noise.\n")
        s0 = [r for r in lora if r["stage"] == 0 and r["offload"] == "none"]
        s3 = [r for r in lora if r["stage"] == 3 and r["offload"] == "none"]
        if s0 and s3 and s3[0]["peak_device_mib"] > s0[0]["peak_device_mib"]:
            md.append(f"Stage 3 needs more device memory than stage 0 here ({s3[0]['peak_device_mib']:.1f} against "
                      f"{s0[0]['peak_device_mib']:.1f} MiB per rank): for a base this small its fixed buffers (gather "
                      "slots of the largest unit, the gradient pool) outweigh what sharding the frozen base saves; the "
                      "balance turns with the model's size (see the stage benchmark above).\n")
        if charts.get("lora"):
            md.append(f"![LoRA tokens/s per stage]({rel(charts['lora'])})\n")
        md.append(table(["stage", "offload", "tokens/s (median)", "per-step tokens/s", "peak device MiB",
                         "peak host MiB"],
                        [[r["stage"], r["offload"], f"{r['tokens_per_s']:,.0f}",
                          " ".join(f"{t:.0f}" for t in r["tokens_per_s_steps"]), f"{r['peak_device_mib']:.1f}",
                          f"{r['peak_host_mib']:.1f}"] for r in lora]))
        md.append("")
    else:
        md.append("Not measured in this run (the example was not built).\n")

    # ---- ZeRO++ (bench/report_zeropp.py)
    md.append(report_zeropp.section(report_zeropp.records(args.results)))

    # ---- GPU (a separate run on a GPU machine: bench/gpu/run.sh)
    md.append(report_gpu.section(gpu_recs or report_gpu.records(report_gpu.load(None)), gpu_charts or {}, rel))
    return "\n".join(md) + "\n"


def memory_order_violations(stages):
    """Peak device bytes strictly decrease along stage 0 > 1 > 2 > 3 and, with optimizer offload, 1 > 2 > 3 > 3 +
    parameter offload, within each (world, Ψ, dtype) group: the promise users pick ZeRO for (counted bytes, never
    time)."""
    out = []
    groups = {}
    for r in stages:
        groups.setdefault((r["world"], r["log2_params"], r["dtype"]), {})[(r["stage"], r["offload"])] = r
    chains = [[(0, "none"), (1, "none"), (2, "none"), (3, "none")],
              [(1, "optimizer"), (2, "optimizer"), (3, "optimizer"), (3, "optimizer+params")]]
    for (world, log2, dtype), g in sorted(groups.items()):
        for chain in chains:
            present = [c for c in chain if c in g]
            for a, b in zip(present, present[1:]):
                if g[b]["peak_device_bytes"] >= g[a]["peak_device_bytes"]:
                    out.append(f"2^{log2} {dtype} at {world} ranks: stage {b[0]} {b[1]} needs "
                               f"{g[b]['peak_device_bytes']} device bytes, not less than stage {a[0]} {a[1]}'s "
                               f"{g[a]['peak_device_bytes']}")
    return out


def exactness_violations(stages, colls, nvme=()):
    """What the benchmarks count exactly and must match: elements per step (2Ψ or 3Ψ), bytes against DESIGN.md's
    formula, and wrong elements of the collectives. Times are never checked."""
    out = []
    for r in stages:
        name = f"stage {r['stage']} {r['offload']} {r['dtype']} 2^{r['log2_params']} at {r['world']} ranks"
        if r["comm_elements_per_step"] != round(r["comm_ratio_paper"] * r["params_padded"]):
            out.append(f"{name}: {r['comm_elements_per_step']} elements per step, not {r['comm_ratio_paper']:g}Ψ")
        if r["peak_device_bytes"] != r["formula_device_bytes"]:
            out.append(f"{name}: {r['peak_device_bytes']} device bytes, formula {r['formula_device_bytes']}")
        if r["peak_host_bytes"] != r["formula_host_bytes"]:
            out.append(f"{name}: {r['peak_host_bytes']} host bytes, formula {r['formula_host_bytes']}")
    out += memory_order_violations(stages)
    for r in nvme:
        if not r["bitwise_equal"] or r["wrong"]:
            out.append(f"NVMe tier at 2^{r['log2_params']}: {int(r['wrong'])} values differ from host-memory offload")
        if r["host_peak_tier"] > r["host_budget"]:
            out.append(f"NVMe tier at 2^{r['log2_params']}: {r['host_peak_tier']} host bytes over its budget "
                       f"{r['host_budget']}")
    for r in colls:
        if r["wrong"] or r["raw_wrong"]:
            out.append(f"{r['impl']} {r['op']} {r['bytes']} B at {r['world']} ranks: #wrong {r['wrong']}, "
                       f"raw #wrong {r['raw_wrong']}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", required=True)
    ap.add_argument("--docs", required=True)
    ap.add_argument("--build", default="build")
    ap.add_argument("--mode", default="full")
    ap.add_argument("--command", default="scripts/bench.sh")
    ap.add_argument("--strict", action="store_true",
                    help="fail when a counted quantity misses its closed form (comm/Ψ, bytes/formula, #wrong); "
                         "never on time")
    args = ap.parse_args()
    res = args.results
    stages, stage_errors = stage_records(res)
    colls, coll_notes, coll_errors = collective_records(res)
    adamw, adamw_context = adamw_records(res)
    lora = lora_records(res)
    nvme, nvme_info, nvme_errors = nvme_records(res)
    machine = machine_info(res, args.build, adamw_context)
    zeropp = report_zeropp.records(res)
    for name, data in (("stages", stages), ("collectives", colls), ("adamw", adamw), ("nvme", nvme),
                       ("lora", lora), ("machine", machine), ("zeropp", zeropp)):
        with open(os.path.join(res, f"{name}.json"), "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
    chart_dir = os.path.join(res, "charts")
    os.makedirs(chart_dir, exist_ok=True)
    charts = {}
    for key, fn, data in (("memory", chart_memory, stages), ("step", chart_step_time, stages),
                          ("busbw", chart_busbw, colls), ("adamw", chart_adamw, adamw), ("lora", chart_lora, lora)):
        path = os.path.join(chart_dir, f"{key}.png")
        if fn(data, path):
            charts[key] = path
    gpu_recs = report_gpu.records(report_gpu.load(os.path.join(res, "gpu")))
    charts.update({f"gpu_{k}": v for k, v in report_gpu.charts(gpu_recs, chart_dir, plt).items()})
    phase_path = os.path.join(res, "phase_times.txt")
    phase_times = open(phase_path).read() if os.path.exists(phase_path) else ""
    with open(args.docs, "w") as f:
        f.write(write_markdown(args, machine, stages, stage_errors, colls, coll_notes, coll_errors, adamw, lora,
                               charts, phase_times, gpu_recs,
                               {k[4:]: v for k, v in charts.items() if k.startswith("gpu_")}, nvme, nvme_info,
                               nvme_errors))
    missing = [k for k, v in (("stages", stages), ("collectives", colls), ("adamw", adamw)) if not v]
    errors = stage_errors + coll_errors + nvme_errors
    if args.strict:
        errors += exactness_violations(stages, colls, nvme) + report_zeropp.violations(zeropp)
    print(f"report: {len(stages)} stage configurations, {len(colls)} collective rows, {len(adamw)} AdamW rows, "
          f"{len(nvme)} NVMe sizes, {len(lora)} LoRA runs, {len(charts)} charts -> {args.docs}")
    if missing or errors:
        print(f"report: missing {missing}, errors {errors}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
