"""Drop-in modules: same constructors, forward signatures and state_dict keys as their torch.nn twins."""
from .normalization import AddLayerNorm, AddRMSNorm, LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm", "AddLayerNorm", "AddRMSNorm"]
