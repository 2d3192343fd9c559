"""What a measurement ran on, recorded with every table."""

from __future__ import annotations

import os
import platform
import resource
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe_machine(device: torch.device | str = "cpu") -> str:
    """One line: CPU model, usable cores, torch threads, torch version and the device (with its GPU name)."""
    device = torch.device(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    where = str(device)
    if device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    return (
        f"{cpu_model()}, {cores} cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, device {where}"
    )


def peak_resident_mb() -> float:
    """This process's peak resident memory in MB (VmHWM). Unlike ru_maxrss, which a child started with fork +
    exec inherits from its parent, it is the process's own: what a benchmark's worker should report."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: the best available
