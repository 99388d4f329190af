"""Peak extra CPU memory of a call, replayed from the allocator's events via torch.profiler.

torch.profiler (profile_memory=True) records every allocation and free; its memory profile
(`prof._memory_profile().timeline`, also behind `export_memory_timeline`) lists them as
(time, CREATE | DESTROY | PREEXISTING, key, bytes). Replaying CREATE (+) and DESTROY (-) in time
order gives the bytes allocated since the call started and not yet freed, and its maximum.
"""
from __future__ import annotations

from torch.profiler import ProfilerActivity, profile


def peak_extra_bytes(fn) -> tuple[int, object]:
    """(peak bytes allocated during fn() and not yet freed at that moment, fn's result)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        result = fn()
    events = sorted((t, str(a), size) for t, a, _key, size in prof._memory_profile().timeline
                    if str(a).endswith(("CREATE", "DESTROY")))
    cur = peak = 0
    for _, action, size in events:
        cur += size if action.endswith("CREATE") else -size
        peak = max(peak, cur)
    return peak, result
