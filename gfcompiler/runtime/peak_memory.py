"""Peak resident memory of this process, resettable, for measurements in a subprocess.

Linux carries ``ru_maxrss`` across fork and exec (a child of a large parent reports
the parent's peak), so the peak is read from ``VmHWM`` in /proc and reset by writing
5 to ``/proc/self/clear_refs``; where /proc is unavailable, ``ru_maxrss`` is the
fallback. Run measured children with `MEASURE_ENV` so glibc returns large tensors to
the system at once instead of keeping ±20 MB of freed memory around.
"""

from __future__ import annotations

import resource

MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_kib() -> int:
    """Reset the peak mark to the current RSS where the kernel allows; returns the current RSS (KiB)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass
    current = _status_kib("VmRSS")
    return current if current is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_kib() -> int:
    """The peak RSS (KiB) since the last `reset_peak_kib`."""
    peak = _status_kib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
