#!/usr/bin/env python3
"""Runs a command and samples its resident memory (Linux), to see where a peak comes from.

    scripts/rss-trace.py [--every 0.25] [--out trace.tsv] -- hir demo --out /tmp/demo

Every `--every` seconds it reads VmRSS of the command's process from /proc and writes
`seconds<TAB>rss_mib` lines to `--out`; the command's own output passes through, each
line prefixed with the seconds since start, so its log lines (phases) and the trace can
be lined up. At the end it prints the peak (VmHWM, exact, not sampled) and the time of
the largest sample.
"""

import argparse
import subprocess
import sys
import threading
import time


def status(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--every", type=float, default=0.25)
    ap.add_argument("--out", default="rss-trace.tsv")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        ap.error("no command given")
    start = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)

    def relay():
        for line in p.stdout:
            sys.stdout.write(f"[{time.monotonic() - start:8.2f}] {line}")
            sys.stdout.flush()

    t = threading.Thread(target=relay, daemon=True)
    t.start()
    peak, best = 0.0, (0.0, 0.0)
    hwm = None
    with open(a.out, "w") as out:
        while p.poll() is None:
            rss = status(p.pid, "VmRSS")
            hwm = status(p.pid, "VmHWM") or hwm
            if rss is not None:
                now = time.monotonic() - start
                out.write(f"{now:.2f}\t{rss:.1f}\n")
                if rss > best[1]:
                    best = (now, rss)
            time.sleep(a.every)
    t.join()
    print(f"peak RSS {hwm or best[1]:.0f} MiB (largest sample {best[1]:.0f} MiB at {best[0]:.1f} s); "
          f"trace in {a.out}; exit {p.returncode}")
    sys.exit(p.returncode)


if __name__ == "__main__":
    main()
