"""What machine a benchmark ran on: CPU, cores, load, GPU, library versions, threads."""

from __future__ import annotations

import datetime as dt
import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):  # Windows
        return None


def machine_info(engine=None) -> dict:
    import torch
    import transformers

    info = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": None,
        "load_average_1_5_15": load_average(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if engine is not None:
        info.update(device=engine.device_kind, device_name=engine.device_name, dtype=engine.dtype_name,
                    target=engine.target_name, draft=engine.draft_name, warmup=engine.warmup_stats)
    return info


def describe(info: dict) -> str:
    """One line naming the machine, for table headers."""
    dev = info.get("device", "?")
    where = info.get("gpu") if dev == "cuda" else f"{info['cpu_model']}, {info['logical_cores']} logical cores"
    load = info.get("load_average_1_5_15")
    load_s = f", load {load[0]:.2f}" if load else ""
    return (f"{dev} ({where}{load_s}), {info.get('dtype', '?')}, torch {info['torch']} / transformers "
            f"{info['transformers']}, {info['torch_threads']} torch threads, {info['date_utc']}")
