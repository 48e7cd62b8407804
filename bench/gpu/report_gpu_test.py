#!/usr/bin/env python3
"""bench/gpu/report_gpu_test.py: the GPU section of bench/report.py (bench/report_gpu.py) renders what it is given
and nothing else. ctest runs it (report_gpu_test).

The inputs are synthetic fixtures (bench/gpu/testdata/*.json, every one marked FIXTURE / "not a measurement"): they
check parsing, the goal column and the rendering, never performance. Checked: with no results the section says so
and shows no measured value; with the fixtures every row is parsed, each "met" verdict follows its goal's
direction (>= or <=), a bitwise failure, a pageable fallback, a skipped case and a prefetch row whose compute does
not cover its gathers are reported as such, the three charts are written, and bench/report.py puts the section
into the page it writes.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
FIXTURES = os.path.join(HERE, "testdata")


def load_module():
    spec = importlib.util.spec_from_file_location("report_gpu", os.path.join(BENCH, "report_gpu.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


rg = load_module()


class EmptyResults(unittest.TestCase):
    def test_says_nothing_was_measured(self):
        with tempfile.TemporaryDirectory() as d:
            recs = rg.records(rg.load(d))
            md = rg.section(recs, {}, lambda p: p)
        self.assertIn("No GPU results yet", md)
        for _key, what, _ref, goal, _rule in rg.ROWS:
            self.assertIn(what, md)
            self.assertIn(goal, md)
        self.assertEqual(md.count("not measured"), len(rg.ROWS))
        self.assertNotIn("worst ratio", md)  # no results table

    def test_missing_directory_is_empty(self):
        recs = rg.records(rg.load(os.path.join(tempfile.gettempdir(), "no-such-dir-for-report-gpu")))
        self.assertTrue(all(not recs[k] for k, *_ in rg.ROWS))


class FixtureResults(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.recs = rg.records(rg.load(FIXTURES))

    def test_every_row_parsed(self):
        counts = {k: len(self.recs[k]) for k, *_ in rg.ROWS}
        self.assertEqual(counts, {"optimizer": 2, "norm": 2, "copy": 2, "offload_step": 1, "overhead": 2,
                                  "prefetch": 1, "lora": 1, "card24": 1})
        self.assertEqual(len(self.recs["errors"]), 1)  # the skipped Prefetch case
        self.assertIn("fixture: a skipped case", self.recs["errors"][0])

    def test_goal_verdicts_follow_each_direction(self):
        s = rg.summary(self.recs)
        self.assertEqual(s["optimizer"][1:], ("0.85", False))  # worst of 0.95, 0.85 against >= 0.90
        self.assertEqual(s["norm"][1:], ("1.20", True))  # the step case (the LoRA case is latency) against <= 1.5
        self.assertEqual(s["copy"][1:], ("0.95", True))
        self.assertIn("pageable fallback", s["copy"][0])
        self.assertEqual(s["offload_step"][1:], ("1.25", False))
        self.assertEqual(s["overhead"][1:], ("1.12", False))  # worst of 1.05 (met) and 1.12
        self.assertIsNone(s["prefetch"][2])  # compute per unit below gather time: not applicable
        self.assertIn("not applicable", s["prefetch"][0])
        self.assertEqual(s["lora"][1:], ("0.70", False))
        self.assertTrue(s["card24"][2])

    def test_bitwise_failure_fails_the_norm_row(self):
        recs = rg.records(rg.load(FIXTURES))
        recs["norm"][0]["bitwise"] = False
        text, _ratio, met = rg.summary(recs)["norm"]
        self.assertFalse(met)
        self.assertIn("bitwise NO", text)

    def test_section_and_charts(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with tempfile.TemporaryDirectory() as d:
            paths = rg.charts(self.recs, d, plt)
            self.assertEqual(sorted(paths), ["lora", "memory", "step"])
            for p in paths.values():
                self.assertGreater(os.path.getsize(p), 1000)
            md = rg.section(self.recs, paths, lambda p: os.path.basename(p))
        self.assertNotIn("No GPU results yet", md)
        self.assertIn("FIXTURE GPU (not a measurement)", md)
        for heading in ("Optimizer kernels", "Gradient norm", "Offload copies", "Offloaded optimizer step",
                        "Engine overhead", "Stage-3 prefetch", "beside PyTorch", "24 GB card"):
            self.assertIn(heading, md)
        self.assertIn("open-llama-3b: stage 2 + optimizer offload", md)
        self.assertIn("123 s (zero_bench_gpu 60 s)", md)  # the run's wall time
        self.assertIn("![GPU step time by stage and offload](gpu_step.png)", md)
        self.assertIn("| 0.95 | ≥ 0.85 of it | yes |", md)


class ReportWiring(unittest.TestCase):
    def test_report_py_renders_the_section(self):
        with tempfile.TemporaryDirectory() as d:
            shutil.copytree(FIXTURES, os.path.join(d, "gpu"))
            docs = os.path.join(d, "BENCHMARKS.md")
            # No CPU results in this directory: report.py still writes the page (and exits 1 for what is missing).
            subprocess.run([sys.executable, os.path.join(BENCH, "report.py"), "--results", d, "--docs", docs,
                            "--build", d], capture_output=True, text=True, timeout=120)
            with open(docs) as f:
                page = f.read()
            self.assertTrue(os.path.exists(os.path.join(d, "charts", "gpu_step.png")))
        self.assertIn("## GPU: zero against the hardware's limits (issue 16)", page)
        self.assertIn("FIXTURE GPU (not a measurement)", page)
        self.assertIn("(../charts/gpu_step.png)".replace("../", ""), page)


if __name__ == "__main__":
    unittest.main(verbosity=2)
