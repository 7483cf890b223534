"""Progress of long work, for a person at a terminal or reading a log file.

`progress(items, total, description, units)` passes `items` through and shows how far the work
is: on a terminal, a tqdm bar redrawn in place; anywhere else (a log file, a pipe, a cluster
job's output), where redrawn frames would pile up or never be seen, a plain line with the
count, the share done, the time so far and the time left: every few seconds (`REPORT_SECONDS`),
and once the work has run a while, every tenth of its time so far (an hour's work: a line every
few minutes). Work that ends within those first seconds prints nothing there. What is counted
is the caller's business (evaluate.py's batches, task_scoring.py's items); the training loop
keeps its own bar.
"""

import sys
import time

from tqdm import tqdm

REPORT_SECONDS = 5.0  # between two progress lines in a log file


def progress(items, total, description, units, size=None, file=None):
    """`items`, one at a time, while the progress is shown on `file` (default: stderr): `total`
    `units` ("batches") in all, `size(item)` of them in each item (default: one)."""
    file = file or sys.stderr
    size = size or (lambda item: 1)
    if getattr(file, "isatty", lambda: False)():
        with tqdm(total=total, desc=description, unit=units, dynamic_ncols=True, file=file) as bar:
            for item in items:
                yield item  # the caller works on it before asking for the next
                bar.update(size(item))
        return
    start = last = time.monotonic()
    done, reported = 0, False
    for item in items:
        yield item
        done += size(item)
        now = time.monotonic()
        if now - last >= max(REPORT_SECONDS, (now - start) / 10) and done < total:
            last, reported = now, True
            left = (total - done) * (now - start) / done
            print(f"{description}: {done:,}/{total:,} {units} ({done / total:.0%}), "
                  f"{duration(now - start)}, about {duration(left)} left", file=file, flush=True)
    if reported:
        print(f"{description}: {done:,} {units} in {duration(time.monotonic() - start)}",
              file=file, flush=True)


def duration(seconds):
    """`42 s`, `3 min 05 s`, `2 h 07 min`: as precise as a person reading a log needs."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
