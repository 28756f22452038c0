"""Count word frequencies over the Python standard library's own source.

Run it from anywhere; it starts a local cluster (one worker process per
core), counts, prints the 20 most common words and the time taken, and
shuts the cluster down::

    python examples/wordcount.py
    python examples/wordcount.py --address tcp://127.0.0.1:8786   # an existing cluster

What is counted
---------------
* Files: every ``*.py`` file under ``sysconfig.get_paths()['stdlib']``,
  recursively, in sorted order, except anything inside a ``site-packages``
  or ``dist-packages`` directory (third-party code, not the stdlib).
* Text: each file's bytes decoded as UTF-8 with ``errors='replace'``.
* Word: each non-overlapping match of ``[A-Za-z_][A-Za-z0-9_]*``, scanned
  left to right (``re.findall``).  Case is kept (``Self`` and ``self`` are
  different words), digits may follow but not start a word (``0x1F`` gives
  ``x1F``), and non-ASCII letters end a word (``café`` gives ``caf``).

How it is distributed
---------------------
``executor.map`` runs :func:`count_words` once per batch of files, giving
one Counter per batch.  The Counters are then merged pairwise with
``executor.submit(merge, a, b)``, passing futures as arguments, so the
merging happens on the workers and only the final Counter comes back.
The workers read the files themselves: they must see the same filesystem
as this process (true for the local cluster).
"""
from __future__ import annotations

import argparse
import os
import re
import sysconfig
import time
from collections import Counter

WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SKIP_DIRS = frozenset({"site-packages", "dist-packages"})


def list_files(root=None):
    """Sorted paths of the ``.py`` files under ``root`` (default: the stdlib),
    skipping ``site-packages`` and ``dist-packages`` directories."""
    root = sysconfig.get_paths()["stdlib"] if root is None else root
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return out


def words(text):
    """The words of ``text``, in order.

    >>> words("def f(x2): return 0x1F + café")
    ['def', 'f', 'x2', 'return', 'x1F', 'caf']
    """
    return WORD.findall(text)


def count_words(paths):
    """Counter of the words in the files ``paths`` (read as UTF-8, bad
    bytes replaced)."""
    counts = Counter()
    for path in paths:
        with open(path, "rb") as f:
            counts.update(words(f.read().decode("utf-8", errors="replace")))
    return counts


def merge(a, b):
    """A new Counter with the counts of ``a`` and ``b`` added.

    >>> merge(Counter(x=1, y=2), Counter(y=1))
    Counter({'y': 3, 'x': 1})
    """
    out = Counter(a)
    out.update(b)
    return out


def batches(seq, size):
    """``seq`` cut into lists of at most ``size`` items.

    >>> batches([1, 2, 3, 4, 5], 2)
    [[1, 2], [3, 4], [5]]
    """
    return [list(seq[i:i + size]) for i in range(0, len(seq), size)]


def run(executor, files, batch_size=50):
    """Count the words of ``files`` on ``executor``'s cluster; returns a Counter.

    One ``count_words`` task per batch of ``batch_size`` files, then a tree
    of ``merge`` tasks, each merging two results, until one is left.
    """
    futures = executor.map(count_words, batches(list(files), batch_size))
    if not futures:
        return Counter()
    while len(futures) > 1:
        pairs = [executor.submit(merge, a, b) for a, b in zip(futures[::2], futures[1::2])]
        if len(futures) % 2:
            pairs.append(futures[-1])  # the odd one out waits for the next round
        futures = pairs
    return futures[0].result()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--address", default=None,
                        help="scheduler address (default: start a local cluster)")
    parser.add_argument("--batch-size", type=int, default=50, help="files per task (default 50)")
    parser.add_argument("--top", type=int, default=20, help="how many words to print (default 20)")
    args = parser.parse_args(argv)

    from distributed import Executor

    start = time.perf_counter()
    files = list_files()
    with Executor(args.address) as executor:
        started = time.perf_counter()
        counts = run(executor, files, batch_size=args.batch_size)
        counted = time.perf_counter()
    end = time.perf_counter()

    print("%d files, %d words, %d distinct" % (len(files), sum(counts.values()), len(counts)))
    print("top %d words:" % args.top)
    for rank, (word, n) in enumerate(counts.most_common(args.top), 1):
        print("%4d  %-24s %9d" % (rank, word, n))
    print("time: %.2f s counting, %.2f s in all (cluster start and shutdown included)"
          % (counted - started, end - start))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
