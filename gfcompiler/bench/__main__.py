"""``python -m gfcompiler.bench --probe-memory DIR BATCH THREADS``: the peak-memory subprocess of gfc bench."""

import sys

from gfcompiler.bench.cli import probe_main

if len(sys.argv) == 5 and sys.argv[1] == "--probe-memory":
    sys.exit(probe_main(sys.argv[2:]))
sys.exit("usage: python -m gfcompiler.bench --probe-memory DIR BATCH THREADS (gfc bench is the command)")
