"""Drop-in modules: same constructors, forward signatures and state_dict keys as their torch.nn twins."""
from .activation import MultiheadAttention
from .dropout import Dropout
from .normalization import AddLayerNorm, AddRMSNorm, HFRMSNorm, LayerNorm, RMSNorm
from .quantized import Int8Linear, QATLinear
from .transformer import (Transformer, TransformerDecoder, TransformerDecoderLayer, TransformerEncoder,
                          TransformerEncoderLayer)

__all__ = ["Dropout", "LayerNorm", "RMSNorm", "HFRMSNorm", "AddLayerNorm", "AddRMSNorm", "Int8Linear", "QATLinear",
           "MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer", "TransformerEncoder",
           "TransformerDecoder", "Transformer"]
