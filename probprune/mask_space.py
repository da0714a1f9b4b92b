"""The mask space: every prunable unit of a model, its type, its layer and the parameters it removes.

Units live in one flat vector of length N, ordered by type: head groups, then MLP channel blocks, then layers.
A mask is a ``[N]`` (or ``[K, N]``) array of 0/1; probabilities share the same layout.

- head unit: one KV group with its query heads (GQA) or one head (MHA). Cost: its rows of q/k/v (and biases) plus
  its columns of o_proj. With ``query_heads=True`` a head unit is one query head instead (for models with one KV
  head per layer, where a KV group is the whole attention): it owns its q rows and o_proj columns, and its KV head,
  kept while any of its query heads is, is charged to the group's query heads in equal shares.
- channel unit: a block of ``channel_block`` MLP intermediate channels (1 = single channels, as in the paper).
  Cost: their rows of gate/up (and biases) plus their columns of down_proj.
- layer unit: a whole decoder layer. Cost: everything in it (heads, channels, norms, biases), so a head inside a
  dropped layer is never counted twice (see :func:`kept_params`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

HEAD, CHANNEL, LAYER = 0, 1, 2
TYPE_NAMES = {HEAD: "head", CHANNEL: "channel", LAYER: "layer"}


@dataclass(frozen=True)
class LayerShape:
    """Shapes of one decoder layer, as the adapter reads them from the model."""

    num_kv_heads: int
    group_size: int  # query heads per KV head
    head_dim: int
    hidden_size: int
    intermediate_size: int
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    norm_params: int = 0  # parameters of the layer's norms (removed only with the layer)
    attn_fixed: int = 0  # attention parameters no head owns (q/k norms): present while any head is kept

    @property
    def num_query_heads(self) -> int:
        return self.num_kv_heads * self.group_size

    def attn_params(self, n_q: int, n_kv: int) -> int:
        """Parameters of ``n_q`` query heads over ``n_kv`` KV heads: q, k, v rows (and biases) + o_proj columns."""
        d, h = self.head_dim, self.hidden_size
        cost = (n_q + 2 * n_kv) * d * h + n_q * d * h
        if self.qkv_bias:
            cost += (n_q + 2 * n_kv) * d
        return cost

    def attn_total(self, n_q: int, n_kv: int) -> int:
        """All attention parameters with ``n_q`` query heads over ``n_kv`` KV heads (shared ones included)."""
        return self.attn_params(n_q, n_kv) + (self.attn_fixed if n_kv else 0)

    @property
    def head_unit_cost(self) -> int:
        """Parameters of one KV group with its query heads."""
        return self.attn_params(self.group_size, 1)

    def query_unit_costs(self) -> list[int]:
        """Per query head of one KV group: its own rows and columns plus an equal share of the KV head's (the
        remainder of the share goes to the group's first head, so the group's costs sum to ``head_unit_cost``)."""
        own = self.attn_params(1, 0)
        kv = self.attn_params(0, 1)
        share, rest = divmod(kv, self.group_size)
        return [own + share + (rest if j == 0 else 0) for j in range(self.group_size)]

    @property
    def channel_cost(self) -> int:
        return 3 * self.hidden_size + (2 if self.mlp_bias else 0)

    @property
    def layer_params(self) -> int:
        total = self.attn_total(self.num_query_heads, self.num_kv_heads) + self.intermediate_size * self.channel_cost
        total += self.norm_params
        if self.o_bias:
            total += self.hidden_size
        if self.mlp_bias:
            total += self.hidden_size
        return total


@dataclass(frozen=True)
class LayerKeep:
    """What a mask keeps of one decoder layer (sorted CPU long tensors, possibly empty).

    Attributes:
        kv_heads: kept KV heads (= KV groups).
        q_heads: kept query heads, all belonging to kept KV heads; with KV-group units these are every query head
            of the kept groups (group ``j`` owns query heads ``j·group_size … (j+1)·group_size − 1``).
        channels: kept MLP intermediate channels, in the model's channel order.
    """

    kv_heads: torch.Tensor
    q_heads: torch.Tensor
    channels: torch.Tensor

    @property
    def empty(self) -> bool:
        return self.kv_heads.numel() == 0 and self.channels.numel() == 0


@dataclass
class MaskSpace:
    """All prunable units of one model.

    Attributes:
        layers: per-layer shapes.
        channel_block: channels per channel unit (the last block of a layer may be smaller).
        unit_type: ``[N]`` int8, HEAD / CHANNEL / LAYER.
        unit_layer: ``[N]`` int32, decoder layer index of each unit.
        unit_index: ``[N]`` int32, index of the unit inside its layer (KV group, or query head with
            ``query_heads``; channel block; 0 for layers).
        query_heads: head units are query heads (every layer must have at most one KV head), not KV groups.
        cost: ``[N]`` int64, parameters removed by the unit alone.
        channel_perm: per layer, an ``[I]`` permutation of channels; block b holds
            ``channel_perm[l][b*channel_block:(b+1)*channel_block]``. Identity unless blocks were formed by ranking.
        total_params: all parameters of the model (embeddings and head included).
    """

    layers: list[LayerShape]
    include_heads: bool = True
    include_channels: bool = True
    include_layers: bool = False
    channel_block: int = 1
    total_params: int = 0
    channel_perm: list[np.ndarray] | None = None
    query_heads: bool = False
    unit_type: np.ndarray = field(init=False)
    unit_layer: np.ndarray = field(init=False)
    unit_index: np.ndarray = field(init=False)
    cost: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if self.channel_block < 1:
            raise ValueError(f"channel_block must be >= 1, got {self.channel_block}")
        if self.channel_perm is None:
            self.channel_perm = [np.arange(ls.intermediate_size) for ls in self.layers]
        if self.query_heads and self.include_heads:
            many = [li for li, ls in enumerate(self.layers) if ls.num_kv_heads > 1]
            if many:
                raise ValueError(
                    f"query-head units need at most one KV head per layer; layer {many[0]} has "
                    f"{self.layers[many[0]].num_kv_heads} (use KV-group units)"
                )
        types, lays, idx, cost = [], [], [], []
        if self.include_heads:
            for li, ls in enumerate(self.layers):
                if self.query_heads:
                    for j, c in enumerate(ls.query_unit_costs() * ls.num_kv_heads):
                        types.append(HEAD), lays.append(li), idx.append(j), cost.append(c)
                    continue
                for g in range(ls.num_kv_heads):
                    types.append(HEAD), lays.append(li), idx.append(g), cost.append(ls.head_unit_cost)
        if self.include_channels:
            for li, ls in enumerate(self.layers):
                for b in range(self.blocks_in_layer(li)):
                    width = min(self.channel_block, ls.intermediate_size - b * self.channel_block)
                    types.append(CHANNEL), lays.append(li), idx.append(b), cost.append(width * ls.channel_cost)
        if self.include_layers:
            for li, ls in enumerate(self.layers):
                types.append(LAYER), lays.append(li), idx.append(0), cost.append(ls.layer_params)
        self.unit_type = np.asarray(types, dtype=np.int8)
        self.unit_layer = np.asarray(lays, dtype=np.int32)
        self.unit_index = np.asarray(idx, dtype=np.int32)
        self.cost = np.asarray(cost, dtype=np.int64)
        if len(self.unit_type) == 0:
            raise ValueError("the mask space is empty: enable at least one of heads, channels, layers")

    # ----------------------------------------------------------------------------------------------- structure
    @property
    def num_units(self) -> int:
        return int(self.unit_type.shape[0])

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def blocks_in_layer(self, layer: int) -> int:
        return -(-self.layers[layer].intermediate_size // self.channel_block)

    def type_slice(self, unit_type: int) -> slice:
        """Contiguous range of the flat vector that holds one unit type (empty slice if absent)."""
        where = np.flatnonzero(self.unit_type == unit_type)
        if where.size == 0:
            return slice(0, 0)
        return slice(int(where[0]), int(where[-1]) + 1)

    def unit_groups(self) -> list[np.ndarray]:
        """Index arrays of the groups scores are normalised within: heads of one layer, channel units of one layer,
        and all layer units together (non-empty groups only)."""
        groups = []
        for t in (HEAD, CHANNEL):
            for li in range(self.num_layers):
                sel = np.flatnonzero((self.unit_type == t) & (self.unit_layer == li))
                if sel.size:
                    groups.append(sel)
        sel = np.flatnonzero(self.unit_type == LAYER)
        if sel.size:
            groups.append(sel)
        return groups

    def type_counts(self) -> dict[str, int]:
        return {TYPE_NAMES[t]: int((self.unit_type == t).sum()) for t in (HEAD, CHANNEL, LAYER)}

    @property
    def prunable_params(self) -> int:
        """Parameters that some unit can remove (attention + MLP projections; norms too when layers are units)."""
        total = 0
        for ls in self.layers:
            total += self._sublayer_params(ls)
            if self.include_layers:
                total += ls.layer_params - self._sublayer_params(ls)
        return total

    @staticmethod
    def _sublayer_params(ls: LayerShape) -> int:
        return ls.attn_total(ls.num_query_heads, ls.num_kv_heads) + ls.intermediate_size * ls.channel_cost

    # --------------------------------------------------------------------------------------------- mask algebra
    def full_mask(self) -> np.ndarray:
        return np.ones(self.num_units, dtype=np.float32)

    def expand(self, masks: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        """Turn flat unit masks into per-layer masks.

        Args:
            masks: ``[K, N]`` (or ``[N]``) 0/1 values (floats allowed for soft masks).

        Returns:
            ``heads``: ``[K, L, G_max]`` (per KV group), ``qheads``: ``[K, L, Q_max]`` (per query head),
            ``channels``: ``[K, L, I_max]`` (per channel, in the model's channel order), ``layers``: ``[K, L]``.
            Units not in the space are 1; layers with fewer heads/channels than the maximum are padded with 1.
            With KV-group units a query head carries its group's value; with query-head units a KV group carries
            the largest value of its query heads (a KV head is kept while any of its query heads is).
        """
        if isinstance(masks, np.ndarray) and not masks.flags.writeable:  # e.g. from Ray's object store
            masks = masks.copy()
        m = torch.as_tensor(masks, dtype=torch.float32)
        squeeze = m.dim() == 1
        if squeeze:
            m = m[None]
        if m.shape[-1] != self.num_units:
            raise ValueError(f"mask has {m.shape[-1]} units, the mask space has {self.num_units}")
        k, n_layers = m.shape[0], self.num_layers
        g_max = max(ls.num_kv_heads for ls in self.layers)
        q_max = max(ls.num_query_heads for ls in self.layers)
        i_max = max(ls.intermediate_size for ls in self.layers)
        heads = torch.ones(k, n_layers, g_max)
        qheads = torch.ones(k, n_layers, q_max)
        channels = torch.ones(k, n_layers, i_max)
        layers = torch.ones(k, n_layers)
        ut = torch.tensor(self.unit_type)  # copies: a space received from Ray's object store holds read-only arrays
        ul = torch.tensor(self.unit_layer, dtype=torch.long)
        ui = torch.tensor(self.unit_index, dtype=torch.long)
        hsel = ut == HEAD
        if hsel.any():
            if self.query_heads:
                qheads[:, ul[hsel], ui[hsel]] = m[:, hsel]
                for li, ls in enumerate(self.layers):
                    if ls.num_kv_heads:
                        q = qheads[:, li, : ls.num_query_heads].view(k, ls.num_kv_heads, ls.group_size)
                        heads[:, li, : ls.num_kv_heads] = q.amax(dim=2)
            else:
                heads[:, ul[hsel], ui[hsel]] = m[:, hsel]
                for li, ls in enumerate(self.layers):
                    qheads[:, li, : ls.num_query_heads] = heads[:, li, : ls.num_kv_heads].repeat_interleave(
                        ls.group_size, dim=1
                    )
        src, dst = self._channel_scatter()
        if src.numel():
            channels.view(k, -1)[:, dst] = m[:, src]  # every channel takes its block's value, in one indexing op
        lsel_t = ut == LAYER
        if lsel_t.any():
            layers[:, ul[lsel_t]] = m[:, lsel_t]
        out = {"heads": heads, "qheads": qheads, "channels": channels, "layers": layers}
        if squeeze:
            out = {k_: v[0] for k_, v in out.items()}
        return out

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_scatter"}  # a cache: rebuilt where it is needed

    def _channel_scatter(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(src, dst)``: channel ``dst`` (flat in ``[L, I_max]``, the model's channel order) takes the value of unit
        ``src`` (its block). Built once per space: per-layer indexing cost more than the forward on a GPU."""
        cached = self.__dict__.get("_scatter")
        if cached is not None:
            return cached
        i_max = max(ls.intermediate_size for ls in self.layers)
        ul = np.asarray(self.unit_layer)
        chan_units = np.flatnonzero(np.asarray(self.unit_type) == CHANNEL)
        src, dst = [], []
        for li in range(self.num_layers):
            units = chan_units[ul[chan_units] == li]  # this layer's blocks, in unit order
            if units.size == 0:
                continue
            width = self.layers[li].intermediate_size
            src.append(np.repeat(units, self.channel_block)[:width])
            dst.append(li * i_max + np.asarray(self.channel_perm[li], dtype=np.int64))
        src_t = torch.from_numpy(np.concatenate(src).astype(np.int64)) if src else torch.empty(0, dtype=torch.long)
        dst_t = torch.from_numpy(np.concatenate(dst)) if dst else torch.empty(0, dtype=torch.long)
        self.__dict__["_scatter"] = (src_t, dst_t)
        return src_t, dst_t

    def plan(self, masks: torch.Tensor | np.ndarray | dict, k: int = 0) -> list[LayerKeep | None]:
        """What one binary mask keeps, layer by layer: the single "mask → kept indices" map of probprune.

        Args:
            masks: a ``[N]`` or ``[K, N]`` mask, or the output of :meth:`expand` (to plan several masks from one
                expansion).
            k: which mask, when several are given.

        Returns:
            One entry per decoder layer: ``None`` where the layer unit is off (a dropped layer), else a
            :class:`LayerKeep` of sorted CPU long tensors (possibly empty).
        """
        e = masks if isinstance(masks, dict) else self.expand(masks)
        if e["layers"].dim() == 1:
            e = {key: v[None] for key, v in e.items()}
        # numpy: a few microseconds per small op where torch takes tens (this runs per mask and layer)
        keep_layer, heads, qheads, channels = (
            e[key][k].detach().cpu().numpy() > 0.5 for key in ("layers", "heads", "qheads", "channels")
        )
        out: list[LayerKeep | None] = []
        for li, ls in enumerate(self.layers):
            if not keep_layer[li]:
                out.append(None)
                continue
            kv = np.flatnonzero(heads[li, : ls.num_kv_heads])  # [g]
            q = np.flatnonzero(qheads[li, : ls.num_query_heads])  # [q]
            q = q[np.isin(q // max(ls.group_size, 1), kv)]  # query heads of kept KV heads only
            chans = np.flatnonzero(channels[li, : ls.intermediate_size])  # [c]
            out.append(LayerKeep(*(torch.from_numpy(a.astype(np.int64, copy=False)) for a in (kv, q, chans))))
        return out

    def kept_params(self, mask: np.ndarray) -> int:
        """Prunable parameters a binary mask keeps, counting nested units once (a dropped layer keeps nothing)."""
        mask = np.asarray(mask)
        if mask.shape != (self.num_units,):
            raise ValueError(f"mask must have shape ({self.num_units},), got {mask.shape}")
        kept = 0
        for ls, keep in zip(self.layers, self.plan(mask)):
            if keep is None:
                continue
            kept += ls.attn_total(int(keep.q_heads.numel()), int(keep.kv_heads.numel()))
            kept += int(keep.channels.numel()) * ls.channel_cost
            if self.include_layers:
                kept += ls.layer_params - self._sublayer_params(ls)
        return kept

    def sparsity(self, mask: np.ndarray) -> dict[str, float]:
        """Fraction of prunable and of total parameters a binary mask removes."""
        removed = self.prunable_params - self.kept_params(mask)
        return {
            "prunable": removed / self.prunable_params,
            "total": removed / self.total_params if self.total_params else float("nan"),
        }
