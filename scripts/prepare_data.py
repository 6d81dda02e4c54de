"""Write the offline datasets as extract SOURCEs: Fashion-MNIST folders, a Tux Paint CSV.

    python scripts/prepare_data.py fashion-mnist --out data/fmnist [--limit N]
    python scripts/prepare_data.py tuxpaint --out data/tuxpaint.csv
"""

from __future__ import annotations

import argparse
from pathlib import Path

from featcache.datasets import write_fashion_mnist, write_tuxpaint_csv


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dataset", choices=["fashion-mnist", "tuxpaint"])
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, help="first N images of each split (fashion-mnist)")
    a = p.parse_args()
    if a.dataset == "fashion-mnist":
        for split in ("train", "test"):
            print(write_fashion_mnist(Path(a.out), split, a.limit))
    else:
        print(write_tuxpaint_csv(Path(a.out)))


if __name__ == "__main__":
    main()
