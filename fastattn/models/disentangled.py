"""DeBERTa-v2 / v3's disentangled attention for BERT (``BERTConfig.rel_pos_buckets`` > 0; bert_hf.py imports it).

The scores of query i and key j add, to q_i . k_j, a content-to-position term q_i . K(r) and a position-to-content
term k_j . Q(r), where r is the bucketed relative position i - j (exact up to rel_pos_buckets / 2, log-spaced out
to rel_pos_max, the sign kept) and K, Q are the layer's own key and query projections of a table of 2 x
rel_pos_buckets relative embeddings, shared by the layers and normalised once (the encoder's ``rel_emb``,
``rel_norm``). Every term is scaled by 1 / sqrt(3 head_dim). The two position terms become one float bias (B, H, L, L)
the fused kernel adds to the scores (as T5's relative bias: inference on the kernel, gradients through the reference
attention in training)."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.attention import attention
from .layers import Attention, _torch_attention


def relative_buckets(L: int, buckets: int, max_distance: int, device) -> Tensor:
    """(L, L) long: the bucket of i - j for query i and key j, as transformers' make_log_bucket_position, offset by
    ``buckets`` into [0, 2 buckets): the row of the relative-embedding table both position terms read."""
    rel = torch.arange(L, device=device)[:, None] - torch.arange(L, device=device)[None, :]
    mid = buckets // 2
    near = (rel < mid) & (rel > -mid)
    far = torch.where(near, torch.full_like(rel, mid - 1), rel.abs()).float()
    # (in float32, as transformers computes it: the ceil must land where its does)
    log = torch.ceil(torch.log(far / mid) / torch.log(torch.tensor((max_distance - 1) / mid)) * (mid - 1)) + mid
    bucket = torch.where(far <= mid, rel.float(), log * torch.sign(rel.float())).long()
    return (bucket + buckets).clamp(0, 2 * buckets - 1)


class DisentangledAttention(Attention):
    """Attention whose scores add DeBERTa's content-to-position and position-to-content terms (module docstring).
    ``forward(x, rel=(table (2 buckets, d_model) normalised, index (L, L) from relative_buckets), ...)``."""

    def forward(self, x: Tensor, *, rel: Tuple[Tensor, Tensor], key_padding_mask: Optional[Tensor] = None,
                **unused) -> Tensor:
        B, L, _ = x.shape
        H, D = self.n_head, self.head_dim
        table, index = rel
        w, b = self.wqkv.weight, self.wqkv.bias
        q, k, v = (t.view(B, L, H, D).transpose(1, 2) for t in self.wqkv(x).split(H * D, -1))  # (B, H, L, D)
        # the table through this layer's query and key projections, times the scale: (H, 2 buckets, D) each
        scale = (3 * D) ** -0.5
        pos_q, pos_k = ((F.linear(table, w[s], None if b is None else b[s]) * scale).view(-1, H, D).transpose(0, 1)
                        for s in (slice(0, H * D), slice(H * D, 2 * H * D)))
        bias = torch.gather(q @ pos_k.transpose(-1, -2), -1, index.expand(B, H, L, L))  # q_i . K(r_ij)
        # k_j . Q(r_ij) (the bucket of i - j is minus that of j - i), gathered straight into (i, j) order: row j of
        # the (B, H, L, 2 buckets) products, flattened, at j * 2 buckets + index[i, j]
        n = pos_q.shape[1]
        flat = (torch.arange(L, device=x.device) * n + index).view(1, 1, L * L).expand(B, H, L * L)
        bias += torch.gather((k @ pos_q.transpose(-1, -2)).view(B, H, L * n), -1, flat).view(B, H, L, L)
        p = self.dropout if self.training else 0.0
        if self.backend == "torch":
            out = _torch_attention(q, k, v, None, key_padding_mask, p, scale=scale, bias=bias)
        else:
            out = attention(q, k, v, attn_mask=bias, key_padding_mask=key_padding_mask, dropout_p=p, scale=scale)
        return self.wo(out.transpose(1, 2).reshape(B, L, H * D))
