"""Serving benchmark as a script: the same as `raypd bench` (see `--help` and raypd/bench/).

    python scripts/bench_serving.py --target local --model tiny-random --sweep-rates 2,4 \
        --num-requests 40 --input-len 64:128 --output-len 16 --slo-ttft-ms 500 --slo-tpot-ms 50 --out bench-results
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypd.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
