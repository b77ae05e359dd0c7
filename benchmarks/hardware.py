"""What a benchmark's figures were measured on."""

from __future__ import annotations

import contextlib
import os
import platform
from typing import Any

import jax


def hardware() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    # /proc/cpuinfo names the CPU on Linux; elsewhere keep platform's answer.
    with (
        contextlib.suppress(OSError),
        open('/proc/cpuinfo', encoding='utf-8') as f,
    ):
        for line in f:
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    dev = jax.devices()[0]
    return {
        'backend': jax.default_backend(),
        'device': dev.device_kind,
        'num_devices': jax.device_count(),
        'cpu': cpu,
        'cpu_count': os.cpu_count(),
        'jax': jax.__version__,
    }
