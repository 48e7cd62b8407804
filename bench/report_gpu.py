"""bench/report_gpu.py: the GPU section of docs/BENCHMARKS.md (issue 16's table), for bench/report.py.

Inputs: RESULTS/gpu/*.json as bench/gpu/run.sh writes them on a machine with a GPU: zero_bench_gpu.json and
zero_bench_gpu_card24.json (Google Benchmark JSON with the machine in its context), lora_vs_torch.json and
gpu_run.json (wall times). Outputs: the section's Markdown and its charts (step time by stage and offload, memory
by category against zero::Estimate, tokens/s beside PyTorch). Nothing here measures or invents a number: a row
without a result in those files says "not measured", and with no files at all the section says so.

Functions: load(gpu_dir) -> data, records(data) -> recs, charts(recs, chart_dir, plt) -> {name: path},
section(recs, charts, rel) -> Markdown text.
"""
import glob
import json
import os
import statistics

GIB = float(1 << 30)
MIB = float(1 << 20)
CATEGORIES = ["params", "grads", "optimizer", "buffers"]

# Issue 16's rows: key, what, reference measured in the same run, goal (text), and how a ratio meets it.
ROWS = [
    ("optimizer", "AdamW / SGD device kernels (fp32 and bf16 params with fp32 master, fp32 and bf16 grads)",
     "a streaming kernel with exactly the same bytes read and written", "≥ 0.90 of its speed", (">=", 0.90)),
    ("norm", "gradient norm of a step (all buckets, one host synchronisation, bitwise equal to the CPU)",
     "one streaming read of the same gradient bytes", "≤ 1.5× its time", ("<=", 1.5)),
    ("copy", "offload copies (gradient shard down, parameters up), pinned",
     "cudaMemcpyAsync of the same bytes between the same buffers", "≥ 0.85 of it", (">=", 0.85)),
    ("offload_step", "offloaded step (stage 2 and 3 + optimizer offload)",
     "max(copy time, CPU AdamW time on all cores) for the same bytes", "≤ 1.15×", ("<=", 1.15)),
    ("overhead", "engine overhead at 1 rank, stages 0–3",
     "the same model, a plain loop with the same fused AdamW kernel, no zero", "≤ 1.05× step time", ("<=", 1.05)),
    ("prefetch", "stage-3 prefetch: exposed gather time (CUDA events)",
     "a step whose gathers are forced exposed (prefetch_bytes = 0)",
     "≥ 80% hidden when compute per unit exceeds its gather time", (">=", 0.80)),
    ("lora", "the main job's tokens/s: the LoRA example at SmolLM2-135M's shape",
     "PyTorch 2.11 + PEFT, same shapes, bf16, same batch and sequence length", "≥ 0.8×", (">=", 0.80)),
    ("card24", "\"24 GB card\": the largest LLaMA shape the host allows, capacity 24 GiB, Stage::kAuto",
     "—", "chooses, trains; peak device bytes (CUDA runtime) ≤ 24 GiB", (">=", 1.0)),
]


def fields(name):
    """'Norm/grad:bf16/case:step/iterations:10/manual_time' -> {'grad': 'bf16', 'case': 'step', ...}."""
    return dict(part.split(":", 1) for part in name.split("/") if ":" in part)


def load(gpu_dir):
    """Every JSON file in gpu_dir, by kind: gbench files by their program, the others by their 'row' key."""
    data = {"gbench": {}, "lora": None, "run": None, "files": []}
    if not gpu_dir or not os.path.isdir(gpu_dir):
        return data
    for path in sorted(glob.glob(os.path.join(gpu_dir, "*.json"))):
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            continue
        data["files"].append(os.path.basename(path))
        if isinstance(doc, dict) and "benchmarks" in doc:
            data["gbench"][os.path.splitext(os.path.basename(path))[0]] = doc
        elif isinstance(doc, dict) and doc.get("row") == "lora_vs_torch":
            data["lora"] = doc
        elif isinstance(doc, dict) and doc.get("row") == "gpu_run":
            data["run"] = doc
    return data


def meets(value, rule):
    if value is None:
        return None
    op, bound = rule
    return value >= bound if op == ">=" else value <= bound


def records(data):
    """Per row kind, a list of dicts with the counters that matter, plus the context and errors."""
    recs = {k: [] for k, *_ in ROWS}
    recs["errors"], recs["context"], recs["card24_context"] = [], {}, {}
    bench = data["gbench"].get("zero_bench_gpu")
    if bench:
        recs["context"] = bench.get("context", {})
    card = data["gbench"].get("zero_bench_gpu_card24")
    if card:
        recs["card24_context"] = card.get("context", {})
        if not recs["context"]:
            recs["context"] = recs["card24_context"]
    for doc in (bench, card):
        if not doc:
            continue
        for b in doc.get("benchmarks", []):
            if b.get("run_type", "iteration") != "iteration":
                continue
            name = b["name"]
            kind = name.split("/", 1)[0]
            f = fields(name)
            if b.get("error_occurred"):
                recs["errors"].append(f"{name.split('/iterations')[0]}: {b.get('error_message', '')}")
                continue
            if kind == "Optimizer":
                recs["optimizer"].append({"opt": f["opt"], "param": f["param"], "grad": f["grad"], "n": f["n"],
                                          "kernel_s": b["kernel_s"], "stream_s": b["stream_s"], "GBps": b["GBps"],
                                          "stream_GBps": b["stream_GBps"], "ratio": b["ratio"]})
            elif kind == "Norm":
                recs["norm"].append({"grad": f["grad"], "case": f["case"], "norm_s": b["norm_s"],
                                     "stream_s": b["stream_s"], "per_bucket_s": b["per_bucket_s"],
                                     "ratio": b["ratio"], "bitwise": bool(b["bitwise_cpu"]),
                                     "buckets": int(b["buckets"]), "elements": int(b["elements"]),
                                     "GBps": b["GBps"], "stream_GBps": b["stream_GBps"]})
            elif kind == "OffloadCopy":
                recs["copy"].append({"dir": f["dir"], "bytes": int(b["bytes"]), "zero_GBps": b["zero_GBps"],
                                     "raw_GBps": b["raw_GBps"], "ratio": b["ratio"], "pinned": bool(b["pinned"]),
                                     "cudahostalloc_GBps": b.get("cudahostalloc_GBps"),
                                     "pageable_GBps": b.get("pageable_GBps")})
            elif kind == "OffloadStep":
                recs["offload_step"].append({"stage": int(f["stage"]), "shape": f["shape"], "step_s": b["step_s"],
                                             "copy_s": b["copy_s"], "copy_serial_s": b["copy_serial_s"],
                                             "cpu_adamw_s": b["cpu_adamw_s"], "ratio": b["ratio"],
                                             "ratio_serial": b["ratio_serial"], "params": int(b["params"]),
                                             "host_bytes": int(b["host_bytes"]),
                                             "cpu_threads": int(b.get("cpu_threads", 0))})
            elif kind == "EngineOverhead":
                rec = {"stage": int(f["stage"]), "shape": f["shape"], "tokens": int(f["tokens"]),
                       "engine_s": b["engine_s"], "plain_s": b["plain_s"], "ratio": b["ratio"],
                       "tflops": b["tflops"], "plain_tflops": b["plain_tflops"], "params": int(b["params"]),
                       "device_bytes": int(b["device_bytes"]), "estimate_bytes": int(b.get("estimate_bytes", 0)),
                       "runtime_open_bytes": int(b.get("runtime_open_bytes", 0))}
                rec["dev"] = {c: int(b.get(f"dev_{c}", 0)) for c in CATEGORIES}
                rec["est"] = {c: int(b.get(f"est_{c}", 0)) for c in CATEGORIES}
                recs["overhead"].append(rec)
            elif kind == "Prefetch":
                recs["prefetch"].append({"offload_params": f["offload_params"] == "1", "shape": f["shape"],
                                         "tokens": int(f["tokens"]), "exposed_s": b["exposed_s"],
                                         "exposed_forced_s": b["exposed_forced_s"], "hidden": b["hidden"],
                                         "step_s": b["step_s"], "step_forced_s": b["step_forced_s"],
                                         "compute_per_unit_s": b["compute_per_unit_s"],
                                         "gather_per_unit_s": b["gather_per_unit_s"]})
            elif kind == "Card24":
                recs["card24"].append({"label": b.get("label", ""), "tokens_per_s": b["tokens_per_s"],
                                       "step_s": b["step_s"], "peak": int(b["peak_device_bytes_runtime"]),
                                       "within": bool(b["within_capacity"]), "engine": int(b["engine_device_bytes"]),
                                       "trainer": int(b["trainer_device_bytes"]),
                                       "reserved": int(b["reserved_bytes"]), "host": int(b["host_bytes"]),
                                       "params": int(b["params"]), "capacity": int(b["capacity_bytes"]),
                                       "tokens": int(b["tokens"]), "tflops": b.get("tflops")})
    lora = data["lora"]
    if lora:
        torch = {(t.get("batch"), t.get("seq"), t.get("micro", 1)): t for t in lora.get("pytorch", [])}
        for r in lora.get("example", []):
            t = torch.get((r["batch"], r["seq"], r.get("micro", 1)), {})
            recs["lora"].append({"batch": r["batch"], "seq": r["seq"], "micro": r.get("micro", 1),
                                 "stage": r["stage"], "tokens_per_s": r["tokens_per_s"],
                                 "torch_tokens_per_s": r.get("torch_tokens_per_s"), "ratio": r.get("ratio"),
                                 "peak_device_mib": r.get("peak_device_mib"),
                                 "torch_peak_mib": (t.get("peak_memory_bytes") or 0) / MIB or None,
                                 "torch": {k: t.get(k) for k in ("torch", "peft", "lora_impl", "attn")}})
        recs["lora_model"] = lora.get("model", "")
    recs["run"] = data["run"]
    return recs


# ---------------------------------------------------------------------------------------------------- summary


def summary(recs):
    """Per row of ROWS: (measured text, ratio text, met: True/False/None)."""
    out = {}

    def worst(vals, rule):
        vals = [v for v in vals if v is not None]
        if not vals:
            return None
        return min(vals) if rule[0] == ">=" else max(vals)

    for key, _what, _ref, _goal, rule in ROWS:
        rows = recs.get(key, [])
        if not rows:
            out[key] = ("not measured", "—", None)
            continue
        if key == "optimizer":
            w = worst([r["ratio"] for r in rows], rule)
            text = f"{len(rows)} kernels, {min(r['GBps'] for r in rows):,.0f}–{max(r['GBps'] for r in rows):,.0f} GB/s"
        elif key == "norm":
            big = [r for r in rows if r["case"] == "step"] or rows
            w = worst([r["ratio"] for r in big], rule)
            ok_bits = all(r["bitwise"] for r in rows)
            text = (f"{max(r['norm_s'] for r in big) * 1e3:.2f} ms for {big[0]['elements'] / 1e9:.2f}G elements; "
                    f"1 wait; bitwise {'yes' if ok_bits else 'NO'}")
            if not ok_bits:
                out[key] = (text, f"{w:.2f}", False)
                continue
        elif key == "copy":
            w = worst([r["ratio"] for r in rows if r["dir"] != "duplex"] or [r["ratio"] for r in rows], rule)
            pinned = all(r["pinned"] for r in rows)
            text = (f"{min(r['zero_GBps'] for r in rows):.1f}–{max(r['zero_GBps'] for r in rows):.1f} GB/s, "
                    + ("pinned" if pinned else "**pageable fallback**"))
        elif key == "offload_step":
            w = worst([r["ratio"] for r in rows], rule)
            text = ", ".join(f"stage {r['stage']} {r['params'] / 1e9:.2f}B: {r['step_s']:.2f} s" for r in rows)
        elif key == "overhead":
            w = worst([r["ratio"] for r in rows], rule)
            text = ", ".join(f"stage {r['stage']} {r['engine_s'] * 1e3:.1f} ms" for r in sorted(rows, key=lambda r: r["stage"]))
        elif key == "prefetch":
            covered = [r for r in rows if r["compute_per_unit_s"] > r["gather_per_unit_s"]]
            w = worst([r["hidden"] for r in covered], rule)
            text = ", ".join(f"{'host' if r['offload_params'] else 'device'} gathers: {r['exposed_s'] * 1e3:.1f} ms "
                             f"exposed of {r['exposed_forced_s'] * 1e3:.1f}" for r in rows)
            if w is None:
                out[key] = (text + " (compute per unit below gather time: goal not applicable)", "—", None)
                continue
        elif key == "lora":
            w = worst([r["ratio"] for r in rows], rule)
            text = ", ".join(f"{r['batch']}×{r['seq']}×{r['micro']} stage {r['stage']}: {r['tokens_per_s'] or 0:,.0f} "
                             f"vs {r['torch_tokens_per_s'] or 0:,.0f} tok/s" for r in rows)
        elif key == "card24":
            r = rows[0]
            text = (f"{r['label']}, {r['tokens_per_s']:,.0f} tok/s, peak {r['peak'] / GIB:.2f} GiB "
                    f"of {r['capacity'] / GIB:.0f}")
            out[key] = (text, "—", r["within"])
            continue
        out[key] = (text, "—" if w is None else f"{w:.2f}", meets(w, rule))
    return out


# ---------------------------------------------------------------------------------------------------- charts


def charts(recs, chart_dir, plt):
    """PNG charts under chart_dir (only for rows with results). Returns {name: path}."""
    out = {}
    os.makedirs(chart_dir, exist_ok=True)
    over = sorted(recs.get("overhead", []), key=lambda r: r["stage"])
    off = sorted(recs.get("offload_step", []), key=lambda r: (r["shape"], r["stage"]))
    if over or off:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), squeeze=False)
        ax = axes[0][0]
        if over:
            labels = ["plain loop"] + [f"stage {r['stage']}" for r in over]
            vals = [statistics.median(r["plain_s"] for r in over) * 1e3] + [r["engine_s"] * 1e3 for r in over]
            ax.bar(range(len(vals)), vals, color=["#999999"] + ["#4c72b0"] * len(over))
            for i, r in enumerate(over):
                ax.annotate(f"×{r['ratio']:.3f}", (i + 1, vals[i + 1]), ha="center", va="bottom", fontsize=8)
            ax.set_xticks(range(len(vals)))
            ax.set_xticklabels(labels, fontsize=8)
            ax.set_ylabel("ms per step (median)")
            ax.set_title(f"{over[0]['shape']}, {over[0]['tokens']} tokens: step time, 1 rank (×: / plain, paired)",
                         fontsize=9)
        ax = axes[0][1]
        if off:
            x = range(len(off))
            ax.bar([i - 0.2 for i in x], [r["step_s"] for r in off], width=0.4, color="#c44e52", label="zero step")
            ax.bar([i + 0.2 for i in x], [max(r["copy_s"], r["cpu_adamw_s"]) for r in off], width=0.4,
                   color="#999999", label="max(copy, CPU AdamW)")
            ax.set_xticks(list(x))
            ax.set_xticklabels([f"stage {r['stage']}\n{r['shape']}" for r in off], fontsize=8)
            ax.set_ylabel("seconds per optimizer step")
            ax.set_title("Optimizer offload: step against its bound", fontsize=9)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(chart_dir, "gpu_step.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out["step"] = path
    if over and any(sum(r["est"].values()) for r in over):
        fig, ax = plt.subplots(figsize=(9, 4.5))
        colors = {"params": "#4c72b0", "grads": "#dd8452", "optimizer": "#55a868", "buffers": "#8172b2"}
        for side, key, hatch in ((-0.2, "dev", ""), (0.2, "est", "//")):
            bottom = [0.0] * len(over)
            for c in CATEGORIES:
                vals = [r[key][c] / GIB for r in over]
                ax.bar([i + side for i in range(len(over))], vals, width=0.4, bottom=bottom, color=colors[c],
                       hatch=hatch, edgecolor="white", label=c if key == "dev" else None)
                bottom = [b + v for b, v in zip(bottom, vals)]
        ax.plot(range(len(over)), [r["runtime_open_bytes"] / GIB for r in over], "k_", markersize=30,
                markeredgewidth=2, label="CUDA runtime (Open + InitParams)")
        ax.set_xticks(range(len(over)))
        ax.set_xticklabels([f"stage {r['stage']}\nmeasured | estimate" for r in over], fontsize=8)
        ax.set_ylabel("GiB on the device")
        ax.set_title("Engine memory by category: accounting (solid) against zero::Estimate (hatched)", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(chart_dir, "gpu_memory.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out["memory"] = path
    lora = recs.get("lora", [])
    if lora:
        fig, ax = plt.subplots(figsize=(8, 4))
        x = range(len(lora))
        ax.bar([i - 0.2 for i in x], [r["tokens_per_s"] or 0 for r in lora], width=0.4, color="#4c72b0",
               label="zero's LoRA example")
        ax.bar([i + 0.2 for i in x], [r["torch_tokens_per_s"] or 0 for r in lora], width=0.4, color="#dd8452",
               label="PyTorch")
        ax.set_xticks(list(x))
        ax.set_xticklabels([f"{r['batch']}×{r['seq']}×{r['micro']}\nstage {r['stage']}" for r in lora], fontsize=8)
        ax.set_ylabel("tokens/s (median over steps)")
        ax.set_title("LoRA at SmolLM2-135M's shape, one GPU", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(chart_dir, "gpu_lora.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out["lora"] = path
    return out


# ---------------------------------------------------------------------------------------------------- Markdown


def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _met(m):
    return "—" if m is None else ("yes" if m else "**no**")


HOW = ("On a machine with a GPU, from the repository root (binaries from a CUDA build, e.g. the GPU kit's bundle):\n\n"
       "```sh\nbench/gpu/run.sh --quick --build BUILD --out bench/results/gpu   # every row, small (the one-command "
       "GPU run)\nbench/gpu/run.sh --build BUILD --out bench/results/gpu           # full sizes\n```\n\n"
       "then commit `bench/results/gpu/*.json` and run `bench/report.py` (or `scripts/bench.sh`) here to render "
       "this section.\n")


def section(recs, chart_paths, rel):
    md = ["## GPU: zero against the hardware's limits (issue 16)\n"]
    measured = any(recs.get(k) for k, *_ in ROWS)
    if not measured:
        md.append("**No GPU results yet.** `bench/results/gpu/` holds no measurement: nothing below has run on a "
                  "GPU, and no number is given until it has. These are the rows `bench/gpu/run.sh` measures (each "
                  "ratio against its reference in the same run) and their goals:\n")
        md.append(_table(["row", "reference (same run)", "goal", "measured"],
                         [[what, ref, goal, "not measured"] for _k, what, ref, goal, _r in ROWS]))
        md.append("")
        for e in recs.get("errors", []):
            md.append(f"- skipped: `{e}`")
        md.append(HOW)
        return "\n".join(md) + "\n"
    ctx = recs.get("context", {})
    mode = ctx.get("mode", "?")
    md.append(f"Measured by `bench/gpu/run.sh` ({mode} mode) on {ctx.get('gpu', '?')}; every ratio is against its "
              "reference measured in the same run (paired per iteration where the row allows), medians over "
              "iterations. " + ("Quick mode: small sizes and few iterations, to cover every row in one short GPU "
                                "visit; the full mode's sizes are the ones the goals are about. " if mode == "quick"
                                else "") + "\n")
    run = recs.get("run")
    md.append(_table(["", ""], [
        ["GPU", f"{ctx.get('gpu', '?')} ({ctx.get('gpu_sms', '?')} SMs, "
                f"{int(ctx.get('gpu_memory_bytes', 0) or 0) / GIB:.0f} GiB, cc {ctx.get('gpu_cc', '?')})"],
        ["driver / CUDA runtime", f"{ctx.get('driver', '?')} / {ctx.get('cuda_runtime', '?')}"],
        ["NCCL / cuBLAS", f"{ctx.get('nccl', '?')} / {ctx.get('cublas', '?')}"],
        ["clocks (SM, memory, max SM, max memory, °C, W, pstate) before", ctx.get("clocks_before", "?")],
        ["… after", ctx.get("clocks_after", "?")],
        ["host", f"{ctx.get('cpu', '?')}, {ctx.get('cpu_cores', '?')} cores, {ctx.get('host_memory', '?')}"],
        ["commit", ctx.get("commit", "?")],
        ["date", ctx.get("date", "?")],
        ["wall time of the run", (f"{run['wall_s']} s (" + ", ".join(f"{p['name']} {p['wall_s']} s"
                                                                       for p in run.get("phases", [])) + ")")
         if run else "?"]]))
    md.append("")
    s = summary(recs)
    md.append(_table(["row", "reference (same run)", "measured", "worst ratio", "goal", "met"],
                     [[what, ref, s[k][0], s[k][1], goal, _met(s[k][2])] for k, what, ref, goal, _r in ROWS]))
    md.append("")
    for e in recs.get("errors", []):
        md.append(f"- error: `{e}`")
    if recs.get("errors"):
        md.append("")
    if chart_paths.get("step"):
        md.append(f"![GPU step time by stage and offload]({rel(chart_paths['step'])})\n")
    if chart_paths.get("memory"):
        md.append(f"![GPU memory by category against zero::Estimate]({rel(chart_paths['memory'])})\n")
    if chart_paths.get("lora"):
        md.append(f"![tokens/s beside PyTorch]({rel(chart_paths['lora'])})\n")
    if recs["optimizer"]:
        md.append("### Optimizer kernels against a same-bytes streaming kernel\n")
        md.append(_table(["optimizer", "params", "grads", "n", "kernel ms", "GB/s", "stream GB/s", "ratio"],
                         [[r["opt"], r["param"], r["grad"], r["n"], f"{r['kernel_s'] * 1e3:.3f}", f"{r['GBps']:,.0f}",
                           f"{r['stream_GBps']:,.0f}", f"{r['ratio']:.3f}"] for r in recs["optimizer"]]))
        md.append("")
    if recs["norm"]:
        md.append("### Gradient norm of a step against one streaming read\n")
        md.append(_table(["grads", "case", "buckets", "elements", "norm ms (1 wait)", "stream ms", "ratio",
                          "one wait per bucket ms", "bitwise = CPU"],
                         [[r["grad"], r["case"], r["buckets"], f"{r['elements']:,}", f"{r['norm_s'] * 1e3:.3f}",
                           f"{r['stream_s'] * 1e3:.3f}", f"{r['ratio']:.2f}", f"{r['per_bucket_s'] * 1e3:.3f}",
                           "yes" if r["bitwise"] else "**no**"] for r in recs["norm"]]))
        md.append("")
    if recs["copy"]:
        md.append("### Offload copies\n")
        md.append(_table(["direction", "bytes", "zero GB/s", "cudaMemcpyAsync GB/s", "ratio", "cudaHostAlloc GB/s",
                          "pageable GB/s", "zero's host memory"],
                         [[r["dir"], f"{r['bytes'] / GIB:.1f} GiB", f"{r['zero_GBps']:.1f}", f"{r['raw_GBps']:.1f}",
                           f"{r['ratio']:.3f}", f"{r['cudahostalloc_GBps'] or 0:.1f}", f"{r['pageable_GBps'] or 0:.1f}",
                           "pinned" if r["pinned"] else "**pageable fallback**"] for r in recs["copy"]]))
        md.append("")
    if recs["offload_step"]:
        md.append("### Offloaded optimizer step\n")
        md.append(_table(["stage", "shape", "parameters", "step s", "copy s (both ways at once)", "copy s (serial)",
                          "CPU AdamW s", "ratio", "ratio (serial copies)", "host GiB"],
                         [[r["stage"], r["shape"], f"{r['params'] / 1e9:.2f}B", f"{r['step_s']:.3f}",
                           f"{r['copy_s']:.3f}", f"{r['copy_serial_s']:.3f}", f"{r['cpu_adamw_s']:.3f}",
                           f"{r['ratio']:.2f}", f"{r['ratio_serial']:.2f}", f"{r['host_bytes'] / GIB:.1f}"]
                          for r in recs["offload_step"]]))
        md.append("")
    if recs["overhead"]:
        md.append("### Engine overhead at one rank\n")
        md.append(_table(["stage", "shape", "tokens", "zero ms", "plain ms", "ratio", "zero TFLOP/s",
                          "device GiB (accounting)", "zero::Estimate GiB", "CUDA runtime GiB (Open)"],
                         [[r["stage"], r["shape"], r["tokens"], f"{r['engine_s'] * 1e3:.2f}",
                           f"{r['plain_s'] * 1e3:.2f}", f"{r['ratio']:.3f}", f"{r['tflops']:.0f}",
                           f"{r['device_bytes'] / GIB:.2f}", f"{r['estimate_bytes'] / GIB:.2f}",
                           f"{r['runtime_open_bytes'] / GIB:.2f}"] for r in sorted(recs["overhead"],
                                                                               key=lambda r: r["stage"])]))
        md.append("")
    if recs["prefetch"]:
        md.append("### Stage-3 prefetch\n")
        md.append(_table(["gathers", "shape", "tokens", "exposed ms", "forced exposed ms", "hidden",
                          "compute per unit ms", "gather per unit ms", "step ms", "forced step ms"],
                         [["host → device" if r["offload_params"] else "device", r["shape"], r["tokens"],
                           f"{r['exposed_s'] * 1e3:.2f}", f"{r['exposed_forced_s'] * 1e3:.2f}", f"{r['hidden']:.2f}",
                           f"{r['compute_per_unit_s'] * 1e3:.2f}", f"{r['gather_per_unit_s'] * 1e3:.2f}",
                           f"{r['step_s'] * 1e3:.1f}", f"{r['step_forced_s'] * 1e3:.1f}"] for r in recs["prefetch"]]))
        md.append("")
    if recs["lora"]:
        md.append("### The main job beside PyTorch\n")
        md.append(f"Model: {recs.get('lora_model', '')}.\n")
        md.append(_table(["batch × seq × micro", "stage", "zero tokens/s", "PyTorch tokens/s", "ratio",
                          "zero peak device MiB", "PyTorch peak MiB", "PyTorch"],
                         [[f"{r['batch']}×{r['seq']}×{r['micro']}", r["stage"], f"{r['tokens_per_s'] or 0:,.0f}",
                           f"{r['torch_tokens_per_s'] or 0:,.0f}", "" if r["ratio"] is None else f"{r['ratio']:.2f}",
                           f"{r['peak_device_mib'] or 0:,.0f}", f"{r['torch_peak_mib'] or 0:,.0f}",
                           ", ".join(f"{k} {v}" for k, v in r["torch"].items() if v)] for r in recs["lora"]]))
        md.append("")
    if recs["card24"]:
        md.append("### The \"24 GB card\"\n")
        md.append(_table(["choice", "parameters", "tokens/step", "tokens/s", "peak device GiB (CUDA runtime)",
                          "engine GiB (accounting)", "trainer GiB", "reserved GiB", "host GiB", "within capacity"],
                         [[r["label"], f"{r['params'] / 1e9:.2f}B", r["tokens"], f"{r['tokens_per_s']:,.0f}",
                           f"{r['peak'] / GIB:.2f}", f"{r['engine'] / GIB:.2f}", f"{r['trainer'] / GIB:.2f}",
                           f"{r['reserved'] / GIB:.2f}", f"{r['host'] / GIB:.1f}", "yes" if r["within"] else "**no**"]
                          for r in recs["card24"]]))
        md.append("")
    md.append(HOW)
    return "\n".join(md) + "\n"
