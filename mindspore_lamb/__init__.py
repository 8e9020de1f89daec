"""mindspore_lamb: the LAMB optimizer for MindSpore (tested on CPU; its composite graph is written for GPU and Ascend)."""
from .diagnostics import TrustRatioMonitor
from .groups import bert_param_groups
from .lamb import Lamb
from .schedules import WarmupPolynomialDecayLR
from .state import check_state
from .train_step import LossScaleTrainStep

__all__ = ["Lamb", "LossScaleTrainStep", "TrustRatioMonitor", "WarmupPolynomialDecayLR", "bert_param_groups",
           "check_state"]
__version__ = "0.2.0"
