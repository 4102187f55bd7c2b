"""Drop-in modules: same constructors, forward signatures and state_dict keys as their torch.nn twins."""
from .normalization import AddLayerNorm, AddRMSNorm, LayerNorm, RMSNorm
from .quantized import Int8Linear, QATLinear

__all__ = ["LayerNorm", "RMSNorm", "AddLayerNorm", "AddRMSNorm", "Int8Linear", "QATLinear"]
