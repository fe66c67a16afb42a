"""Runs a command and measures its whole process tree.

Usage: proctree.py OUT.json -- COMMAND [ARGS...]

Writes {"wall_s", "user_s", "sys_s", "cpu_s", "peak_rss_mb", "rc"} to OUT.json:
- user/sys: the rusage of the command and every descendant it waited for (os.wait4), which
  covers worker processes of a multiprocessing pool;
- peak RSS: the largest sum, over the live process tree, of each process's resident set
  (VmRSS from /proc), sampled every 20 ms; shared pages are counted once per process, as
  `ps` does.
"""

import json
import os
import subprocess
import sys
import threading
import time


def tree_rss_kb(root):
    children = {}
    rss = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(d))
            with open(f"/proc/{d}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss[int(d)] = int(line.split()[1])
                        break
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
            continue
    total, stack = 0, [root]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack.extend(children.get(p, []))
    return total


def main():
    out = sys.argv[1]
    assert sys.argv[2] == "--"
    cmd = sys.argv[3:]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss_kb(proc.pid))
            done.wait(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    done.set()
    th.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    res = {
        "wall_s": wall,
        "user_s": ru.ru_utime,
        "sys_s": ru.ru_stime,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "peak_rss_mb": peak[0] / 1024,
        "rc": proc.returncode,
    }
    with open(out, "w") as f:
        json.dump(res, f)
    sys.exit(0 if proc.returncode == 0 else 1)


if __name__ == "__main__":
    main()
