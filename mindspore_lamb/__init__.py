"""mindspore_lamb: the LAMB optimizer for MindSpore, portable across CPU, GPU and Ascend."""
from .lamb import Lamb
from .schedules import WarmupPolynomialDecayLR

__all__ = ["Lamb", "WarmupPolynomialDecayLR"]
__version__ = "0.1.0"
