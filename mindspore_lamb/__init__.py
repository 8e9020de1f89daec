"""mindspore_lamb: the LAMB optimizer for MindSpore, portable across CPU, GPU and Ascend."""
from .lamb import Lamb

__all__ = ["Lamb"]
__version__ = "0.1.0"
