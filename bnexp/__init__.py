"""bnexp: batch normalization experiments on CIFAR-10 with a hand-written NumPy network."""

__version__ = "0.1.0"
