"""Reading processes from /proc: a process tree, its CPU seconds, and its PSS."""

from __future__ import annotations

import os
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(entry / "stat")[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _stat_fields(path: Path) -> list[str]:
    text = path.read_text()
    # Fields after the command name, which is in parentheses and may hold spaces.
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes (and of children they have already waited for)."""
    total = 0
    for pid in pids:
        try:
            fields = _stat_fields(Path(f"/proc/{pid}/stat"))
        except OSError:
            continue
        # utime, stime, cutime, cstime are fields 14-17 of stat; here, after the name, 11-14.
        total += sum(int(x) for x in fields[11:15])
    return total / TICK


def pss_kib(pids: list[int]) -> int:
    """Proportional set size, summed: shared pages count once across the processes."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
    return total
