"""The CPU every benchmark figure is printed with: model, cores and the features that change
what is fast (native bf16, AMX, VNNI, AVX-512), read at run time."""

from __future__ import annotations

import os
import platform
from pathlib import Path

FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_tile", "amx_int8")


def cpu_line() -> str:
    """One line: CPU model, cores, and which of FEATURES this CPU has."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    have = [f for f in FEATURES if f in flags]
    return f"CPU: {model}, {os.cpu_count()} cores; flags: {', '.join(have) or 'none of ' + ', '.join(FEATURES)}"
