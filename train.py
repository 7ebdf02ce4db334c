"""Entry point for `accelerate launch train.py --mode paper-split` (arguments: `--help`)."""
from alexnet_mp.cli import train_main

if __name__ == "__main__":  # not again in a process spawned to decode JPEGs on a GPU
    train_main()
