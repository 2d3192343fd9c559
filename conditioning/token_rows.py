"""A token table of which only some rows train: the rows of the tokens a run's captions use.

A CLIP token table has 49,408 rows; a shapes caption uses about 20 of them and the whole data set about 50.
Trained as a whole, AdamW would update (decay, and move by its running moments) every row at every step.
`CaptionRowEmbedding` keeps the table as a frozen `weight` and the used rows as a small trainable `rows`; a
token's embedding is its trained row where it has one, else the table's row. `merged_weight` is the plain table
with the trained rows written in, so a saved model folder is a standard `CLIPTextModel`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CaptionRowEmbedding(nn.Module):
    """Token ids -> embeddings from a frozen (V, D) table and trainable rows for `ids` (K,)."""

    def __init__(self, table: nn.Embedding, ids: Tensor) -> None:
        super().__init__()
        # Buffers live with the table, or with `ids` for a table on the meta device (an empty copy to load into).
        device = ids.device if table.weight.device.type == "meta" else table.weight.device
        ids = torch.unique(ids.to(torch.long).cpu())
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= table.num_embeddings:
            raise ValueError(f"ids: token ids must lie in [0, {table.num_embeddings}), got {ids.tolist()[:10]}...")
        self.weight = table.weight
        self.weight.requires_grad_(False)
        self.rows = nn.Parameter(table.weight.detach()[ids.to(table.weight.device)].clone())  # (K, D)
        slot = torch.full((table.num_embeddings,), -1, dtype=torch.long)
        slot[ids] = torch.arange(ids.numel())
        # Rebuilt from the captions by every run, never saved: a checkpoint's `rows` match by their order.
        self.register_buffer("ids", ids.to(device), persistent=False)
        self.register_buffer("slot", slot.to(device), persistent=False)

    @property
    def num_embeddings(self) -> int:
        return self.weight.shape[0]

    def forward(self, input_ids: Tensor) -> Tensor:
        slot = self.slot[input_ids]  # (B, L): a trainable row's index, or -1
        table = F.embedding(input_ids, self.weight)
        trained = F.embedding(slot.clamp(min=0), self.rows)
        return torch.where((slot >= 0)[..., None], trained, table)

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """The (V, D) table with the trained rows written in."""
        merged = self.weight.detach().clone()
        merged[self.ids] = self.rows.detach().to(merged.dtype)
        return merged
