"""`pneumoscan.loop`, kept for the imports that name it: the loop is `pneumoscan.training.loop`."""

from pneumoscan.training.loop import Epochs, Mixup, _Step, averaged_weights, fit

__all__ = ["Epochs", "Mixup", "_Step", "averaged_weights", "fit"]
