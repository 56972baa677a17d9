"""The machine's details, printed at the top of every benchmark."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or the platform's processor string)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_summary() -> str:
    """CPU, cores, memory, Python and torch versions and threads, in a few lines."""
    import torch

    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        memory = f"{pages * page_size / 2**30:.1f} GiB"
    except (ValueError, OSError):
        memory = "unknown"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu only"
    return "\n".join(
        [
            f"cpu: {cpu_model()} x {os.cpu_count()} logical cores; memory {memory}",
            f"python {platform.python_version()}; torch {torch.__version__} "
            f"({torch.get_num_threads()} intra-op threads); device: {device}",
            f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        ]
    )
