"""Data preparation with an empty tokenized cache, then from the cache, as a sweep job pays it.

Times `data.prepare` on the packaged ShareGPT with the SmolLM2 tokenizer: the first call tokenizes every usable
conversation and writes the cache (in a fresh temporary NEFTLAB_CACHE), each later call reads the file, selects
its seed's rows and cuts them at --max-length. The file read and the config are the same in both.

    python benchmarks/tokenization.py [--max-samples N] [--max-length 512] [--repeats 3]
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

from neftlab import data, models  # noqa: E402
from neftlab.config import compose  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-samples", default="null", help="examples per job (null: all)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = compose(f"data.max_samples={args.max_samples}", f"data.max_length={args.max_length}")
    tokenizer = models.load_tokenizer(cfg.model)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["NEFTLAB_CACHE"] = cache
        times = []
        for seed in range(1 + args.repeats):
            start = time.perf_counter()
            prepared = data.prepare(cfg.data, tokenizer, causal=True, seed=seed)
            times.append(time.perf_counter() - start)
        size = sum(f.stat().st_size for f in Path(cache).rglob("*") if f.is_file())
    print(f"cores: {os.cpu_count()}; {len(prepared.train)} train + {len(prepared.eval)} eval examples of "
          f"<= {args.max_length} tokens; cache {size / 2**20:.0f} MiB")
    print(f"first (tokenize everything, write the cache): {times[0]:.1f} s")
    print(f"from the cache, other seeds: min {min(times[1:]):.2f} s, median {statistics.median(times[1:]):.2f} s")


if __name__ == "__main__":
    main()
