"""alexnet-mp: the two-GPU, model-parallel AlexNet of Krizhevsky et al. (2012), and the layouts it is compared with."""

from alexnet_mp.model import LRN, AlexNet, AlexNet2012, AlexNetOWT

__all__ = ["LRN", "AlexNet", "AlexNet2012", "AlexNetOWT"]
