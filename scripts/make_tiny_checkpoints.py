# SPDX-License-Identifier: Apache-2.0
"""Writes the tiny test checkpoints (target + three drafters); see dflash_sglang/testing/tiny.py.

    python scripts/make_tiny_checkpoints.py OUT_DIR [--block-size N] [--seed S]
"""

import argparse

from dflash_sglang.testing.tiny import write_tiny_checkpoints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write target/, drafter/, drafter-agree/, drafter-disagree/ into")
    parser.add_argument("--block-size", type=int, default=8, help="the drafters' block_size (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the tokenizer corpus and weights")
    args = parser.parse_args()
    for name, path in write_tiny_checkpoints(args.out_dir, seed=args.seed, block_size=args.block_size).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
