"""Folds the GPU run's junit XML and pytest-benchmark JSON into one report: gpu_report.json."""
import json
import platform
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch


def tests_summary(path: Path) -> dict:
    if not path.exists():
        return {"error": f"{path.name} missing: the test run did not finish"}
    root = ET.parse(path).getroot()
    suites = root.findall("testsuite") if root.tag == "testsuites" else [root]
    out = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    out["failed"] = [
        f"{case.get('classname')}::{case.get('name')}: {(bad.get('message') or '')[:300]}"
        for s in suites for case in s.iter("testcase") for bad in list(case) if bad.tag in ("failure", "error")
    ]
    return out


def bench_summary(path: Path) -> list:
    if not path.exists():
        return [{"error": f"{path.name} missing: the benchmark run did not finish"}]
    data = json.loads(path.read_text())
    return [
        {"name": b["name"], "group": b.get("group"), "mean_ms": b["stats"]["mean"] * 1e3,
         "stddev_ms": b["stats"]["stddev"] * 1e3, "rounds": b["stats"]["rounds"], **b.get("extra_info", {})}
        for b in data.get("benchmarks", [])
    ]


def main(out_dir: str) -> None:
    out = Path(out_dir)
    report = {
        "machine": {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "torch": torch.__version__, "python": platform.python_version()},
        "tests": tests_summary(out / "gpu_tests.xml"),
        "benchmarks": bench_summary(out / "gpu_bench.json"),
    }
    try:
        import triton
        report["machine"]["triton"] = triton.__version__
    except ImportError:
        report["machine"]["triton"] = None
    (out / "gpu_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({"tests": report["tests"], "benchmarks": len(report["benchmarks"])}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
