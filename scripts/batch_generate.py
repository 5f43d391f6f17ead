"""Batch generation as a script (for `ray job submit`): JSONL prompts in, JSONL completions out.

    ray job submit --address http://HEAD:8265 --working-dir . -- python scripts/batch_generate.py \
        --input /shared/prompts.jsonl --output /shared/completions.jsonl [--model NAME] [--deployment raypd]

Attaches to the running deployment named --deployment, or starts one for the batch. The same
as `raypd batch`; see raypd/batch.py for the line format and where results may go (inside a
job: an absolute path on storage that outlives the job, or a URI; a relative one is refused).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypd.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["batch", *sys.argv[1:]]))
