"""ML-Decoder (Ridnik et al. 2021): a query-based classification head that replaces global pooling + fc.

Reads top to bottom: the group settings, the one decoder layer (cross-attention only), then the head. The head
takes the backbone's last feature map (B, C, H, W) and computes, in the reference's order:

    tokens  = relu(embed_standart(features as (B, HW, C)))                  (B, HW, E)
    t       = the G frozen queries, one copy per image, sequence-first      (G, B, E)
    t       = decoder layer(t, tokens)                                      (G, B, E)
    logits  = (t[g] @ duplicate_pooling[g] for every group g), flattened, cut to num_classes, + bias

Module names follow the authors' ML_Decoder code (`head.decoder.embed_standart.weight`, `head.decoder.layers.0.
multihead_attn.in_proj_weight`, `head.decoder.duplicate_pooling`, ...; "standart" is their spelling), so their
checkpoints load as they are and ours load in their code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_GROUPS = 100
DEFAULT_EMBEDDING = 768
NUM_HEADS = 8
FEEDFORWARD = 2048
DROPOUT = 0.1


def num_groups(num_classes: int, groups: int | None = None) -> int:
    """Queries G: `groups` (100 when unset or -1), never more than num_classes (COCO: 80, "full decoding")."""
    wanted = DEFAULT_GROUPS if groups is None or groups < 0 else groups
    return min(wanted, num_classes)


def group_size(num_classes: int, groups: int) -> int:
    """Classes per group D = ceil(num_classes / G), computed as the reference does: int(N / G + 0.999)."""
    return int(num_classes / groups + 0.999)


class CrossAttentionDecoderLayer(nn.Module):
    """The reference's decoder layer: no self-attention, post-norm, dropout 0.1 everywhere in training.

    t = norm1(t + dropout(t)); t = norm2(t + dropout(attn(t, m, m))); t = norm3(t + dropout(ffn(t))).
    """

    def __init__(self, embedding: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(embedding)
        self.multihead_attn = nn.MultiheadAttention(embedding, NUM_HEADS, dropout=DROPOUT)
        self.norm2 = nn.LayerNorm(embedding)
        self.linear1 = nn.Linear(embedding, FEEDFORWARD)
        self.linear2 = nn.Linear(FEEDFORWARD, embedding)
        self.norm3 = nn.LayerNorm(embedding)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, DROPOUT, self.training)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """queries (G, B, E), memory (HW, B, E), both sequence-first as in the reference."""
        t = self.norm1(queries + self._dropout(queries))  # the reference adds the queries to themselves
        attended = self.multihead_attn(t, memory, memory, need_weights=False)[0]
        t = self.norm2(t + self._dropout(attended))
        hidden = self._dropout(F.relu(self.linear1(t)))
        return self.norm3(t + self._dropout(self.linear2(hidden)))


class DecoderWeights(nn.Module):
    """Holds the head's tensors under the reference's names (`decoder.*` in the state dict)."""

    def __init__(self, num_features: int, num_classes: int, groups: int, embedding: int) -> None:
        super().__init__()
        self.embed_standart = nn.Linear(num_features, embedding)
        self.query_embed = nn.Embedding(groups, embedding)  # N(0, 1), never trained
        self.query_embed.requires_grad_(False)
        self.layers = nn.ModuleList([CrossAttentionDecoderLayer(embedding)])
        self.duplicate_pooling = nn.Parameter(torch.empty(groups, embedding, group_size(num_classes, groups)))
        self.duplicate_pooling_bias = nn.Parameter(torch.zeros(num_classes))
        nn.init.xavier_normal_(self.duplicate_pooling)


class MLDecoderHead(nn.Module):
    """ML-Decoder on a (B, C, H, W) feature map -> (B, num_classes) logits."""

    def __init__(self, num_features: int, num_classes: int, groups: int | None = None,
                 embedding: int = DEFAULT_EMBEDDING) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.groups = num_groups(num_classes, groups)
        self.embedding = embedding
        self.decoder = DecoderWeights(num_features, num_classes, self.groups, embedding)

    def extra_repr(self) -> str:
        return f"classes={self.num_classes}, groups={self.groups}, embedding={self.embedding}"

    def group_fc(self, t: torch.Tensor) -> torch.Tensor:
        """(G, B, E) -> (B, num_classes): every group's own E x D matrix, as one batched matmul."""
        out = torch.bmm(t, self.decoder.duplicate_pooling)  # (G, B, D)
        out = out.transpose(0, 1).flatten(1)  # (B, G * D): group-major, as the reference lays classes out
        return out[:, : self.num_classes] + self.decoder.duplicate_pooling_bias

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tokens = F.relu(self.decoder.embed_standart(features.flatten(2).transpose(1, 2)))  # (B, HW, E)
        # detach: the queries stay fixed even if someone switches requires_grad back on.
        queries = self.decoder.query_embed.weight.detach()
        t = queries.unsqueeze(1).expand(-1, features.shape[0], -1)  # (G, B, E)
        memory = tokens.transpose(0, 1)  # (HW, B, E)
        for layer in self.decoder.layers:
            t = layer(t, memory)
        return self.group_fc(t)
