"""torch.nn.Dropout on fastattn's Philox dropout (fastattn.ops.dropout): the same constructor, forward and meaning;
the mask is drawn by the counter-based kernel and regenerated in the backward instead of stored."""
from torch import Tensor, nn

from ..ops.dropout import dropout
from ._fx import fx_leaf
from ._torchscript import refuse_script


class Dropout(nn.Dropout):
    """torch.nn.Dropout(p, inplace) on fastattn's kernels."""

    @fx_leaf
    def forward(self, input: Tensor) -> Tensor:
        return dropout(input, self.p, self.training, self.inplace)

    __prepare_scriptable__ = refuse_script
