"""What every benchmark report carries: the machine it ran on (results are written by io.write_text)."""

from __future__ import annotations

import os
import platform


def machine_description() -> dict:
    """CPU model, cores, torch threads and versions, and the GPU when there is one."""
    import torch  # here, not at import: `bench volume` times the import of torch in its subprocess

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import datetime

    d = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
         "python": platform.python_version(),
         "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
         # other jobs on the machine: timings taken under load are slower, and this says so
         "load_average_1_5_15_min": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name(0)
    return d


def describe(m: dict) -> str:
    """One line for a report's head: the machine, threads, torch, date and load."""
    load = m.get("load_average_1_5_15_min")
    return (f"{m.get('gpu') or m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}; "
            f"{m.get('date_utc', '?')} UTC" + (f", load average {load[0]:.1f}" if load else ""))
