"""Benchmarks (`make bench`): the entry point of the ``scripts.bench`` package, which holds the code
and documents the sections and options (``python scripts/benchmark.py --help``).

    python scripts/benchmark.py                      # everything, quick-start sizes (< 10 min, 2 CPUs)
    python scripts/benchmark.py --quick              # tiny sizes (what the tests run)
    python scripts/benchmark.py --sections gpu       # on a CUDA machine (scripts/gpu_check.sh)
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `scripts.bench` when run as `python scripts/benchmark.py`
    sys.path.insert(0, str(ROOT))

from scripts.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
