"""Entry point for `accelerate launch train.py --mode paper-split` (arguments: `--help`)."""
from alexnet_mp.cli import train_main

train_main()
