"""What a results file under benchmarks/results/ records besides its figures: the command that was run, the date,
the machine (cores, CPU model), the onnxcam that was timed, and the 1/5/15-minute load average at the start and
at the end, with a line saying whether other work loaded the machine (1-minute load at the start over LOADED).

    run = begin()                 # first thing, before any model is built
    ...                           # the measurement
    end(run)                      # load at the end
    write("soak", "# Soak test ...\\n\\n" + "\\n".join(describe(run) + lines), {"run": run, **figures})
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
LOADED = 1.0  # 1-minute load average at the start above which a run is labelled as on a loaded machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command() -> str:
    """The command line as typed from a checkout's root (with PYTHONPATH where it was set)."""
    prefix = f"PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} " if os.environ.get("PYTHONPATH") else ""
    return prefix + shlex.join(["python", *sys.argv])


def onnxcam_source() -> str:
    """Where the onnxcam that ran was imported from, and the commit of its checkout (and whether files outside
    benchmarks/ had uncommitted changes)."""
    import onnxcam

    folder = Path(onnxcam.__file__).resolve().parent
    try:
        git = ["git", "-C", str(folder)]
        root = subprocess.run([*git, "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                              check=True).stdout.strip()
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return str(folder)
    return f"{folder} (commit {commit}{', with uncommitted changes outside benchmarks/' if dirty else ''})"


def begin() -> dict:
    return {"command": command(), "started": time.strftime("%Y-%m-%d %H:%M %Z"), "cores": os.cpu_count(),
            "cpu": cpu_model(), "onnxcam": onnxcam_source(),
            "load at start": [round(value, 2) for value in os.getloadavg()]}


def end(run: dict) -> dict:
    run["ended"] = time.strftime("%Y-%m-%d %H:%M %Z")
    run["load at end"] = [round(value, 2) for value in os.getloadavg()]
    run["loaded"] = run["load at start"][0] > LOADED
    return run


def describe(run: dict) -> list[str]:
    """Markdown lines for one run (after end())."""
    start, finish = (" / ".join(f"{v:.2f}" for v in run[key]) for key in ("load at start", "load at end"))
    if run["loaded"]:
        verdict = (f"**The machine was loaded**: 1-minute load average {run['load at start'][0]:.2f} at the start "
                   f"on {run['cores']} cores (over {LOADED}), other work sharing the cores: times are slower and "
                   "noisier than on a quiet machine.")
    else:
        verdict = (f"The machine was quiet at the start (1-minute load average {run['load at start'][0]:.2f}, "
                   f"not over {LOADED}); the load at the end includes this run's own work.")
    same_day = run["started"][:10] == run["ended"][:10]
    return [f"- Command: `{run['command']}`",
            f"- Date: {run['started']} to {run['ended'][11:] if same_day else run['ended']}",
            f"- Machine: {run['cores']} cores, {run['cpu']}", f"- onnxcam: {run['onnxcam']}",
            f"- Load average (1 / 5 / 15 min): {start} at the start, {finish} at the end", f"- {verdict}"]


def write(name: str, markdown: str, data: dict) -> Path:
    """benchmarks/results/NAME.md and NAME.json."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(markdown.rstrip("\n") + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path} and {name}.json")
    return path
