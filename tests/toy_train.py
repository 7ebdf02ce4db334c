"""train.py with the toy layout (tests/toy_layout.py) registered: the one line a new layout adds to the
registry, then the program as users run it (`python -m tests.toy_train ARGS`, once per rank)."""

from alexnet_mp.cli import train_main
from alexnet_mp.strategies import LAYOUTS
from tests.toy_layout import ConvsApart

LAYOUTS[ConvsApart.name] = ConvsApart

if __name__ == "__main__":
    train_main()
