"""What every bench script records about where it ran (imported by their
result writers): cores, CPU model, memory, platform, and the commit."""
import os
import platform
import subprocess


def machine(note=None):
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    mem_kib = int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal")))
    m = {"cpus": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem_kib / 2**20, 1), "gpu": None,
         "platform": platform.platform()}
    if note:
        m["note"] = note
    return m


def commit():
    return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
