"""bench/report_zeropp.py: the ZeRO++ section of docs/BENCHMARKS.md (bench/report.py calls it).

Inputs (in RESULTS, written by scripts/bench.sh's zeropp phase): zero_bench_zeropp's Google Benchmark JSON on one
machine (zeropp_w4.gbench.json, 4 ranks in "nodes" of 2) and on the namespace cluster (zeropp_cluster.gbench.json,
with zeropp_cluster_links.txt: what each host's link carried, and zeropp_cluster_counted.txt: what its ranks
counted; or zeropp_cluster_skipped.txt saying why there is none), and the example's pretraining logs
(zeropp_lora_{plain,zeropp8,zeropp4}.log). Nothing here is typed in: every number comes from those files.
"""
import json
import os
import re
import statistics

CONFIG_TEXT = {
    "stage3": "plain stage 3",
    "hpz": "hpZ",
    "qwz": "qwZ",
    "qgz4": "qgZ, 4 bits",
    "qgz8": "qgZ, 8 bits",
    "zeropp8": "hpZ + qwZ + qgZ 8 bits",
    "zeropp4": "hpZ + qwZ + qgZ 4 bits",
}


def _fields(name):
    return dict(part.split(":", 1) for part in name.split("/") if ":" in part)


def _runs(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        data = json.load(f)
    out = []
    for b in data.get("benchmarks", []):
        if b.get("run_type", "iteration") != "iteration":
            continue
        f = _fields(b["name"])
        rec = {"config": f.get("config", "?"), "log2_params": int(f.get("params", "2^0")[2:]),
               "error": b.get("error_message") if b.get("error_occurred") else None}
        for k in ("world", "nodes", "ranks_per_node", "params_padded", "step_time_s", "time_vs_stage3",
                  "inter_node_bytes", "intra_node_bytes", "formula_inter_bytes", "inter_formula_ratio",
                  "inter_psi_equiv", "inter_vs_stage3", "paper_equiv", "volume_ratio"):
            if k in b:
                rec[k] = b[k]
        out.append(rec)
    return out


def _lora(path):
    if not os.path.exists(path):
        return None
    steps, val = [], None
    for line in open(path):
        m = re.match(r"pretrain step +(\d+)/(\d+) +loss ([0-9.]+)", line)
        if m:
            steps.append((int(m.group(1)), float(m.group(3))))
        m = re.match(r"pretrain: validation loss ([0-9.]+)", line)
        if m:
            val = float(m.group(1))
    return {"steps": steps, "validation_loss": val}


def records(results):
    """Everything the section shows, as plain data (report.py writes it to zeropp.json)."""
    rec = {"one_host": _runs(os.path.join(results, "zeropp_w4.gbench.json")),
           "cluster": _runs(os.path.join(results, "zeropp_cluster.gbench.json")),
           "cluster_skipped": None, "links": {}, "counted": {}, "lora": {}}
    skipped = os.path.join(results, "zeropp_cluster_skipped.txt")
    if os.path.exists(skipped):
        rec["cluster_skipped"] = open(skipped).read().strip()
    links = os.path.join(results, "zeropp_cluster_links.txt")
    if os.path.exists(links):
        for i, line in enumerate(open(links)):
            parts = line.split()
            if len(parts) == 3:
                rec["links"][i] = {"tx": int(parts[1]), "rx": int(parts[2])}
    counted = os.path.join(results, "zeropp_cluster_counted.txt")
    if os.path.exists(counted):
        for line in open(counted):
            m = re.match(r"zero_bench_zeropp: node (\d+) counted (\d+) bytes", line)
            if m:
                rec["counted"][int(m.group(1))] = int(m.group(2))
    for name in ("plain", "zeropp8", "zeropp4"):
        run = _lora(os.path.join(results, f"zeropp_lora_{name}.log"))
        if run:
            rec["lora"][name] = run
    return rec


def violations(rec):
    """Counted quantities that must equal their formula (--strict): bytes across nodes per step."""
    out = []
    for where in ("one_host", "cluster"):
        for r in rec[where]:
            if r.get("error"):
                out.append(f"zero_bench_zeropp {where} {r['config']}: {r['error']}")
            elif r.get("inter_node_bytes") != r.get("formula_inter_bytes"):
                out.append(f"zero_bench_zeropp {where} {r['config']} 2^{r['log2_params']}: "
                           f"{r.get('inter_node_bytes')} bytes across nodes per step, formula "
                           f"{r.get('formula_inter_bytes')}")
    for node, c in rec["counted"].items():
        if node in rec["links"] and rec["links"][node]["tx"] < c:
            out.append(f"namespace host {node}: its link carried {rec['links'][node]['tx']} bytes, less than the {c} "
                       "its ranks counted across nodes")
    return out


def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _mb(b):
    return f"{b / 1e6:,.2f}"


def _bytes_rows(runs):
    rows = []
    for r in runs:
        if r.get("error"):
            rows.append([CONFIG_TEXT.get(r["config"], r["config"]), "error: " + r["error"]] + [""] * 7)
            continue
        rows.append([CONFIG_TEXT.get(r["config"], r["config"]), _mb(r["inter_node_bytes"]),
                     _mb(r["formula_inter_bytes"]), f"{r['inter_formula_ratio']:.4f}", f"{r['inter_psi_equiv']:.3f}",
                     f"{r['inter_vs_stage3']:.3f}", f"**{r['paper_equiv']:.2f}Ψ**" if r["config"] == "zeropp4"
                     else f"{r['paper_equiv']:.2f}Ψ", _mb(r["intra_node_bytes"]), f"{r['volume_ratio']:.2f}"])
    return rows


BYTES_HEADER = ["configuration", "across nodes MB", "formula MB", "counted / formula", "Ψ-equiv. (bf16)",
                "vs stage 3", "paper's accounting", "inside nodes MB", "Volume / Ψ"]


def section(rec):
    md = ["## ZeRO++: traffic between nodes\n"]
    md.append("`zero_bench_zeropp` (see the comment at the top of `bench/zeropp_bench.cc`): a synthetic decoder in "
              "bf16 (parameters and gradients, the ZeRO++ paper's setting) at stage 3, one micro-step, with each of "
              "ZeRO++'s techniques (`Options::zeropp`, README \"ZeRO++\") and all three together, against plain stage "
              "3 in the same run. Bytes are per optimizer step and per node: what the ranks of a node sent to ranks "
              "of other nodes (*across nodes*) and to each other (*inside nodes*), counted message by message by the "
              "Comms (`CommCounters::inter_node_bytes`, `intra_node_bytes`), summed over the node's ranks. *formula* "
              "is `src/engine_zeropp.cc`'s: gathers (N−1)·Σ s·p per gather of each bucket (hpZ: the forward one "
              "only; qwZ: Pq(s, 8) instead of s·p), reductions (N−1)·Σ s·g (qgZ: L·(n−1)·Σ Pq(s, bits)), for N ranks "
              "on n nodes of L, s a bucket's shard and Pq the quantized payload (256-element blocks, an fp32 scale "
              "each). *Ψ-equiv.* divides by 2Ψ bytes: bf16 elements per parameter that crossed a node's link; plain "
              "stage 3's ring sends 3Ψ·(N−1)/N of them. The ZeRO++ paper counts plain stage 3 as 3Ψ and its own as "
              "0.75Ψ, leaving out the (N−1)/N of rings and the scales: *paper's accounting* is 3Ψ × *vs stage 3*, "
              "the same ratio in its units. *Volume / Ψ* is the ZeRO paper's volume of the engine's own Comm "
              "(CommCounters::Volume(), in elements or quantized bytes), 3 for plain stage 3.\n")
    one = rec["one_host"]
    if one:
        r0 = one[0]
        md.append(f"### {r0['world']:.0f} ranks in {r0['nodes']:.0f} nodes of {r0['ranks_per_node']:.0f} on one machine, "
                  f"Ψ = 2^{r0['log2_params']} ({r0['params_padded']:,.0f} padded parameters)\n")
        md.append(_table(BYTES_HEADER, _bytes_rows(one)))
        z = [r for r in one if r["config"] == "zeropp4" and not r.get("error")]
        if z:
            md.append(f"\nhpZ + qwZ + qgZ with 4-bit gradients: {z[0]['paper_equiv']:.2f}Ψ in the paper's accounting "
                      f"(goal ≤ 0.75Ψ), {z[0]['inter_psi_equiv']:.3f}Ψ of bf16 elements per node, counted equal to "
                      "the formula. Against plain stage 3's 6Ψ(N−1)/N bytes per node the formula gives, in the "
                      "paper's accounting, 3Ψ × [1.016 + 0.516 (N−L)/(N−1)] / 6 (qwZ's 1 + 4/256 bytes per parameter "
                      "once per step, qgZ's 0.5 + 4/256 on L(n−1) of every N−1 ring steps' worth): 0.68Ψ for 2 nodes "
                      "of 2, tending to 0.77Ψ with many nodes, where the paper's 0.75Ψ leaves out the scales. 8-bit "
                      "gradients add 0.25Ψ (N−L)/(N−1).\n")
    md.append("### Timed on hosts made of network namespaces, with limited links\n")
    if rec["cluster"]:
        r0 = rec["cluster"][0]
        md.append(f"The same benchmark as one job over {r0['nodes']:.0f} hosts × {r0['ranks_per_node']:.0f} ranks "
                  "(`scripts/netns_cluster.sh`: each host a network namespace with a veth link to a bridge, Open MPI "
                  "over TCP between hosts and shared memory inside, every link limited to 100 Mbit/s each way by tc), "
                  "the nodes as MPI found them. Step times are the slowest rank's; *time vs stage 3* is the median of "
                  "the ratios paired per iteration, *bytes vs stage 3* what the link's share predicts when the link is "
                  "the bottleneck. The quantization's CPU time and the intra-host traffic (which has no limit) come on "
                  "top, so the time ratio sits above the bytes ratio.\n")
        rows = []
        for r in rec["cluster"]:
            if r.get("error"):
                rows.append([CONFIG_TEXT.get(r["config"], r["config"]), "error: " + r["error"], "", "", "", ""])
                continue
            rows.append([CONFIG_TEXT.get(r["config"], r["config"]), f"{r['step_time_s'] * 1e3:,.0f}",
                         f"{r.get('time_vs_stage3', 0):.2f}", f"{r['inter_vs_stage3']:.3f}",
                         _mb(r["inter_node_bytes"]), f"{r['inter_formula_ratio']:.4f}"])
        md.append(_table(["configuration", "step ms", "time vs stage 3", "bytes vs stage 3", "across nodes MB",
                          "counted / formula"], rows))
        if rec["counted"]:
            md.append("\nWhat each host's link carried over the whole run (the kernel's counters of its veth end, "
                      "TCP/IP headers and MPI's own messages included) against the bytes its ranks counted to other "
                      "nodes:\n")
            md.append(_table(["host", "link sent MB", "ranks counted MB", "overhead"],
                             [[n, _mb(rec["links"][n]["tx"]), _mb(c), f"{rec['links'][n]['tx'] / c - 1:+.1%}"]
                              for n, c in sorted(rec["counted"].items()) if n in rec["links"] and c > 0]))
        md.append("")
    elif rec["cluster_skipped"]:
        md.append(f"Not run here: {rec['cluster_skipped']}\n")
    else:
        md.append("Not run in this run.\n")
    md.append("### The example's pretraining with and without ZeRO++\n")
    lora = rec["lora"]
    if "plain" in lora:
        plain = lora["plain"]
        md.append("`lora_finetune pretrain` of the tiny model of `tests/lora_zeropp_test.sh` (dim 32, 2 layers, "
                  "synthetic corpus) on 4 ranks in 2 nodes of 2, stage 3, against the same run without ZeRO++. The "
                  "stated tolerance (README \"ZeRO++\"; `lora_zeropp` asserts it): within 1% at step 31 and 15% in "
                  "validation loss after 200 steps; a small model at this learning rate amplifies any perturbation "
                  "(another seed of the unquantized run ends about 5% away).\n")
        names = [n for n in ("plain", "zeropp8", "zeropp4") if n in lora]
        text = {"plain": "without ZeRO++", "zeropp8": "hpZ + qwZ + qgZ 8 bits", "zeropp4": "hpZ + qwZ + qgZ 4 bits"}
        rows = []
        for n in names:
            run = lora[n]
            at31 = dict(run["steps"]).get(31)
            last = run["steps"][-1] if run["steps"] else (0, 0)
            pv = plain["validation_loss"]
            rows.append([text[n], f"{at31:.4f}" if at31 else "", f"{last[1]:.4f} (step {last[0]})",
                         f"{run['validation_loss']:.4f}" if run["validation_loss"] else "",
                         f"{run['validation_loss'] / pv - 1:+.1%}" if run["validation_loss"] and pv else ""])
        md.append(_table(["run", "loss at step 31", "last training loss", "validation loss", "vs without"], rows))
        md.append("")
    else:
        md.append("Not measured in this run (the example was not built).\n")
    return "\n".join(md) + "\n"
