"""Run one command and record its wall time and peak memory, summed over its whole process tree.

`/usr/bin/time -v` reports the largest single process; a vLLM stage is three (the stage, the engine core, its
worker), so this samples /proc once a second and keeps the largest sum of RSS over the command and every
descendant, plus the largest single process, and writes both with the wall time as JSON:

    python bench/whole_run.py --out results/vllm-cpu/run.json -- python -m stages.profile vllm_cpu --run
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click

PAGE = os.sysconf("SC_PAGE_SIZE")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # the parent pid is the 2nd field after the parenthesised command name
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we read it
        tree.setdefault(parent, []).append(int(entry))
    return tree


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def tree_rss(root: int) -> tuple[int, int]:
    """(sum of RSS over root and its descendants, largest single RSS among them)."""
    tree, stack, total, largest = _children(), [root], 0, 0
    while stack:
        pid = stack.pop()
        rss = _rss_bytes(pid)
        total, largest = total + rss, max(largest, rss)
        stack.extend(tree.get(pid, []))
    return total, largest


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="JSON file to write.")
@click.option("--interval", default=1.0, show_default=True, help="Seconds between samples of /proc.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def main(out, interval, command):
    """Run COMMAND; write its exit code, wall seconds and peak tree / single-process RSS (MiB) to --out."""
    start = time.monotonic()
    child = subprocess.Popen(list(command))
    peak_tree = peak_single = 0
    while child.poll() is None:
        total, largest = tree_rss(child.pid)
        peak_tree, peak_single = max(peak_tree, total), max(peak_single, largest)
        time.sleep(interval)
    wall = time.monotonic() - start
    record = {
        "command": " ".join(command),
        "exit_code": child.returncode,
        "wall_s": round(wall, 1),
        "peak_tree_rss_mib": round(peak_tree / 2**20),
        "peak_process_rss_mib": round(peak_single / 2**20),
        "sample_interval_s": interval,
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(record, indent=2) + "\n")
    click.echo(json.dumps(record), err=True)
    sys.exit(child.returncode)


if __name__ == "__main__":
    main()
