"""Summarize a benchmarks/gpu/run_all.sh output folder: one table, and summary.json.

Usage: python benchmarks/gpu/summarize.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _pytest_line(folder: Path, name: str = "pytest_gpu") -> str:
    log = folder / f"{name}.log"
    if not log.is_file():
        return "not run"
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def main() -> None:
    folder = Path(sys.argv[1])
    summary: dict = {
        "pytest_gpu": _pytest_line(folder),
        "pytest_gpu_compile": _pytest_line(folder, "pytest_gpu_compile"),
        "lora": [],
        "dreambooth": None,
    }
    print(f"gpu tests: {summary['pytest_gpu']}")
    print(f"gpu compile test: {summary['pytest_gpu_compile']}")
    print(f"{'variant':<12} {'batch':>5} {'s/step':>8} {'peak GiB':>9} {'warm-up s':>9}  note")
    for name in ("lora_eager", "lora_cudagraphs", "lora_compile"):
        report = _load(folder / f"{name}.json")
        if report is None:
            print(f"{name}: no result")
            continue
        for case in report.get("cases", []):
            summary["lora"].append(case)
            if "error" in case:
                print(
                    f"{case['variant']:<12} {case['batch']:>5} {'-':>8} {'-':>9} {'-':>9}  "
                    f"{case['error'][:70]}"
                )
                continue
            peak = case.get("peak_vram_gib")
            print(
                f"{case['variant']:<12} {case['batch']:>5} {case['s_per_step']:>8.4f} "
                f"{(peak if peak is not None else float('nan')):>9.2f} {case['warmup_s']:>9.1f}"
                f"  {'non-finite loss!' if not case.get('finite_losses', True) else ''}"
            )
    print(
        "anchor: SimpleTuner H100 SD1.x LoRA 512 px batch 1: 0.181 s/step, 2.87 GiB; "
        "goal <= 0.09 s/step, <= 2.9 GiB"
    )
    db = _load(folder / "dreambooth.json")
    summary["dreambooth"] = db
    if db is None:
        print("dreambooth: no result")
    elif db.get("skipped"):
        print(f"dreambooth: skipped ({db['skipped']})")
    else:
        for lever in db.get("levers", []):
            problem = lever.get("error") or lever.get("refused")
            if problem:
                print(f"dreambooth {lever['lever']:<10} failed: {problem.strip()[-120:]}")
            else:
                print(
                    f"dreambooth {lever['lever']:<10} peak VRAM {lever.get('peak_vram_gib')} GiB, "
                    f"{lever.get('s_per_step')} s/step"
                )
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
