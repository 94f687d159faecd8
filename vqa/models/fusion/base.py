"""Shared pieces of every fusion block: the output contract, masked attention helpers, the
grid-and-words inputs and the single-stage base class.

A fusion block is an ``nn.Module`` built by Hydra with ``_partial_: true`` and finished by
``VQAModel`` with the dimensions only the encoders know::

    fusion = cfg_partial(visual_channels=[512, 1024, 2048], text_dim=768)
    out = fusion(visual=[B,C_s,H_s,W_s]..., text=[B,N,D_t], text_mask=[B,N] bool)

and exposes ``out_dim`` so the answer head can be sized. The attention mechanisms the blocks
share (guided, parallel, alternating and multi-head affinity attention, attention pooling)
live in ``vqa.models.fusion.attention``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from vqa.models.norms import SafeBatchNorm1d, SafeBatchNorm2d

GRID_NORMS = ("batch", "none")
QUESTION_NORMS = ("batch", "none")
# Scale of an unnormalised read-out (a sum over cells): O(1..10) on the grids in use without
# dividing by the number of cells, which would make a count depend on the grid size.
SUM_SCALE = 1.0 / 8.0


def summed(cells: Tensor) -> Tensor:
    """The unnormalised read-out of cells [B, M, D] -> [B, D]: their sum, scaled by
    ``SUM_SCALE``. A count survives it; a mean or a softmax would divide it away."""
    return cells.sum(dim=1) * SUM_SCALE


@dataclass
class FusionOutput:
    """Fused features plus the attention maps worth plotting.

    ``attention`` keys start with ``image`` ([B, H_s, W_s], sums to 1 over the grid) or
    ``question`` ([B, N], sums to 1 over real tokens, exactly 0 on padding).
    """

    features: Tensor
    attention: dict[str, Tensor] = field(default_factory=dict)


class FusionBlock(nn.Module):
    """Base class: stores the input dimensions and the ``out_dim`` contract.

    ``LEGACY_KEYS`` maps older parameter names of a block to its current ones (prefixes relative
    to the block, e.g. ``{"affinity.": "attention.affinity."}``; the longest matching prefix
    wins), so a state dict saved before a rename still loads: ``load_state_dict`` renames a key
    when the renamed key is one of the block's own, also when the block sits inside a larger
    model. ``upgrade_legacy_keys`` does the same for code that checks keys before loading.
    """

    out_dim: int
    LEGACY_KEYS: ClassVar[Mapping[str, str]] = {}

    def __init__(self, visual_channels: list[int], text_dim: int) -> None:
        super().__init__()
        if not visual_channels:
            raise ValueError("fusion needs at least one visual stage (visual_channels is empty)")
        self.visual_channels = list(visual_channels)
        self.text_dim = int(text_dim)
        self.register_load_state_dict_pre_hook(_rename_legacy_keys)

    def forward(self, visual: list[Tensor], text: Tensor, text_mask: Tensor) -> FusionOutput:
        raise NotImplementedError

    # A batch often asks several questions about one image (data.group_by_image). VQAModel
    # therefore calls ``prepare_visual`` once per distinct image, repeats its output per
    # question, and calls ``fuse``. A block whose per-image work does not depend on the
    # question (a projection of the grid, say) overrides both, so that work is not repeated
    # per question, and defines ``forward`` as ``fuse(prepare_visual(visual), ...)``. By
    # default nothing is prepared and ``fuse`` is ``forward``.

    def prepare_visual(self, visual: list[Tensor]) -> list[Tensor]:
        """Question-independent work on the stage maps of distinct images: tensors [U, ...]."""
        return visual

    def fuse(self, prepared: list[Tensor], text: Tensor, text_mask: Tensor) -> FusionOutput:
        """The per-question rest, on ``prepare_visual``'s output repeated per question."""
        return self(prepared, text, text_mask)

    def current_keys(self, keys: Iterable[str]) -> dict[str, str]:
        """Each of ``keys`` (relative to the block) -> its current name: renamed by
        ``LEGACY_KEYS`` where that gives one of the block's own keys, else unchanged."""
        keys = list(keys)
        if not self.LEGACY_KEYS:
            return {key: key for key in keys}
        own = self.state_dict(keep_vars=True).keys()
        olds = sorted(self.LEGACY_KEYS, key=len, reverse=True)
        current = {}
        for key in keys:
            old = next((old for old in olds if key.startswith(old)), None)
            renamed = key if old is None else self.LEGACY_KEYS[old] + key[len(old) :]
            current[key] = renamed if renamed in own else key
        return current

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """``nn.Module.load_state_dict`` (older names renamed), refusing in plain words a strict
        load whose keys do not match this block's."""
        if strict:
            given = set(self.current_keys(state_dict).values())
            own = set(self.state_dict(keep_vars=True))
            unknown, missing = sorted(given - own), sorted(own - given)
            if unknown or missing:
                problems = [
                    f"{label} {', '.join(keys)}"
                    for label, keys in (
                        ("the block has no parameter or buffer named", unknown),
                        ("the state dict lacks", missing),
                    )
                    if keys
                ]
                raise RuntimeError(
                    f"this state dict does not fit {type(self).__name__}: {'; '.join(problems)}"
                    f" (older names are renamed with {type(self).__name__}.LEGACY_KEYS first). "
                    "It was probably saved from another fusion block, or from this one built "
                    "with other options (form, mode, steps, num_heads, glimpses, "
                    "spatial_constraint, positional, ...)."
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _rename_legacy_keys(
    block: FusionBlock, state_dict: dict[str, Any], prefix: str, *_: Any
) -> None:
    """Load pre-hook: the block's keys in ``state_dict`` renamed in place by ``LEGACY_KEYS``."""
    if not block.LEGACY_KEYS:
        return
    ours = [key[len(prefix) :] for key in state_dict if key.startswith(prefix)]
    for key, renamed in block.current_keys(ours).items():
        if renamed != key:
            state_dict[prefix + renamed] = state_dict.pop(prefix + key)


def upgrade_legacy_keys(model: nn.Module, state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with the older parameter names of every fusion block in ``model`` renamed to
    the current ones, for code that compares keys before ``load_state_dict`` (which renames by
    itself)."""
    upgraded = dict(state)
    for name, module in model.named_modules():
        if isinstance(module, FusionBlock):
            _rename_legacy_keys(module, upgraded, f"{name}." if name else "")
    return upgraded


def flatten_grid(feature_map: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, H*W, C] (row-major cells, matching ``grid_boxes``)."""
    return feature_map.flatten(2).transpose(1, 2)


def grid_boxes(height: int, width: int, device=None, dtype=None) -> Tensor:
    """Normalised (x1, y1, x2, y2) box of every grid cell, row-major: [H*W, 4]."""
    ys = torch.arange(height, device=device, dtype=dtype or torch.float32)
    xs = torch.arange(width, device=device, dtype=dtype or torch.float32)
    y1, x1 = torch.meshgrid(ys / height, xs / width, indexing="ij")
    boxes = torch.stack([x1, y1, x1 + 1.0 / width, y1 + 1.0 / height], dim=-1)
    return boxes.reshape(height * width, 4)


def keep_top_k(logits: Tensor, k: int | None, valid: Tensor | None = None) -> Tensor:
    """Boolean mask of the ``k`` largest valid logits along the last dim (sparse attention).

    ``k=None`` or ``k >=`` a row's number of valid keys keeps every valid key of that row, so
    top-k then equals dense.
    """
    # Without a mask every key is kept: ``logits == logits`` rather than ``ones_like``, whose
    # all-True result the ONNX exporter may fold into a constant of the traced shape.
    keep = logits == logits if valid is None else valid.expand_as(logits)
    if k is None:
        return keep
    # No static k reaches topk and no Python branch looks at a length: an exported graph then
    # serves any question length, and k is clamped per row to the keys that row really has.
    scores = logits.masked_fill(~keep, float("-inf"))
    ranked = scores.sort(dim=-1, descending=True).values
    count = keep.sum(dim=-1, keepdim=True)
    kth = ranked.gather(-1, (count.clamp(max=k) - 1).clamp_min(0))
    return keep & (scores >= kth)


def masked_softmax(logits: Tensor, mask: Tensor | None = None, dim: int = -1) -> Tensor:
    """Softmax that gives exactly 0 to masked positions (``mask`` True = keep).

    Rows with no valid position return all zeros instead of NaN.
    """
    if mask is None:
        return torch.softmax(logits, dim=dim)
    mask = mask.expand_as(logits)
    logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    weights = torch.softmax(logits, dim=dim) * mask
    return weights / weights.sum(dim=dim, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)


def add_log_prior(logits: Tensor, prior: Tensor | None) -> Tensor:
    """``logits + log(prior)`` over the last (cell) dim: the spatial constraint's one form.

    softmax(l + log w) is proportional to w * exp(l), so a smaller weight lowers its cell's
    share whatever the sign of l; scaling l by w would raise it where l < 0. ``prior`` [1, M]
    broadcasts over any leading dims of ``logits`` [..., M].
    """
    if prior is None:
        return logits
    # Clamped so a saturated sigmoid cannot turn a whole row into -inf.
    return logits + prior.clamp_min(torch.finfo(prior.dtype).tiny).log()


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x [B, N, D] over real tokens (mask [B, N] True = real)."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def masked_max(x: Tensor, mask: Tensor) -> Tensor:
    """Max of x [B, N, D] over real tokens (padding never wins)."""
    return x.masked_fill(~mask.unsqueeze(-1), torch.finfo(x.dtype).min).amax(1)


def joint(image: Tensor, question: Tensor) -> Tensor:
    """``[v, q, v * q]``: the product term lets the linear layer after it gate visual content
    by the question."""
    return torch.cat([image, question, image * question], dim=-1)


class CellContext(nn.Module):
    """One residual 3 x 3 conv layer over a grid of cells [U, D, H, W], run once per image.

    A cell is an s x s patch, smaller than most objects, so on its own it sees part of a shape
    (an edge, a corner); a 3 x 3 neighbourhood of cells covers most of one. With it, every
    cell of "the red square" can say "square" before the question is asked, which is what
    telling "the red circle" from "the red square" apart (one colour, two referents) and
    counting shapes need. The residual keeps the cell's own features as they were.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1), SafeBatchNorm2d(dim), nn.ReLU()
        )

    def forward(self, cells: Tensor) -> Tensor:
        return cells + self.layer(cells)


def context_layers(dim: int, layers: int) -> nn.Sequential:
    """The ``cell_context`` option: ``layers`` ``CellContext`` layers over cells ``dim`` wide,
    applied in turn; 0 gives an empty Sequential (the identity, no parameters)."""
    if layers < 0:
        raise ValueError(f"cell_context must be >= 0 (0: off), got {layers}")
    return nn.Sequential(*(CellContext(dim) for _ in range(layers)))


class SpatialGrid(nn.Module):
    """Turns one ResNet stage into grid tokens that know where they are.

    Each cell's normalised box is embedded and added to the projected cell feature, so
    relational questions ("left of") are answerable; ``constraint`` additionally yields the
    spatial-constraint weights w = sigmoid(MLP(box)) per cell, a prior over cells that the
    attention blocks apply with ``add_log_prior`` (early fusion pools by w directly).
    ``norm="batch"`` batch-normalises the stage's channels before the projection: maps that no
    trained BatchNorm has normalised (a frozen random encoder read from the feature cache)
    otherwise kept parallel, alternating and multihead at the question-only prior. Off here
    (cot's key grid reads normalised conv outputs); on by default in ``GridAndWords``, the
    start of the single-stage blocks (their ``grid_norm``).
    """

    def __init__(
        self,
        in_channels: int,
        dim: int,
        positional: bool = True,
        constraint: bool = False,
        norm: str = "none",
        stride: int = 1,
        context: int = 0,
    ) -> None:
        super().__init__()
        if norm not in GRID_NORMS:
            raise ValueError(f"grid_norm={norm!r} must be one of {GRID_NORMS}")
        if stride < 1:
            raise ValueError(f"grid_stride={stride} must be >= 1")
        self.norm = SafeBatchNorm2d(in_channels) if norm == "batch" else nn.Identity()
        # stride 1: each cell on its own (a 1x1 projection). stride s: each s x s patch of a finer
        # cached map is read by a trained conv, which sees the shape of what lies in the patch.
        self.proj = (
            nn.Linear(in_channels, dim)
            if stride == 1
            else nn.Sequential(
                nn.Conv2d(in_channels, dim, stride, stride=stride), SafeBatchNorm2d(dim), nn.ReLU()
            )
        )
        self.stride = stride
        self.position = nn.Linear(4, dim) if positional else None
        self.constraint = (
            nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1)) if constraint else None
        )
        # Created last, so a grid without it draws its initial weights as before.
        self.context = context_layers(dim, context)

    def forward(self, feature_map: Tensor) -> tuple[Tensor, Tensor | None]:
        """[B, C, H, W] -> (tokens [B, H*W, dim], constraint weights [1, H*W] or None)."""
        cells = self.cells(feature_map)
        height, width = cells.shape[1:3]
        return cells.flatten(1, 2), self.prior(height, width, cells)

    def cells(self, feature_map: Tensor) -> Tensor:
        """[B, C, H, W] -> the positioned tokens as a grid, [B, H / stride, W / stride, dim]."""
        normed = self.norm(feature_map)
        if self.stride > 1:
            normed = self.proj(normed)
        # The grid's size is read off the map (never computed from the stride), so an exported
        # graph keeps it tied to its input.
        h, w = normed.shape[-2:]
        tokens = flatten_grid(normed)
        if self.stride == 1:
            tokens = self.proj(tokens)
        if len(self.context):
            tokens = flatten_grid(self.context(tokens.transpose(1, 2).unflatten(-1, (h, w))))
        if self.position is not None:
            boxes = grid_boxes(h, w, device=feature_map.device, dtype=tokens.dtype)
            tokens = tokens + self.position(boxes)
        return tokens.unflatten(1, (h, w))

    def prior(self, height: int, width: int, like: Tensor) -> Tensor | None:
        """The spatial-constraint weights of a ``height`` x ``width`` grid, [1, H*W] (None
        without ``constraint``), on ``like``'s device and dtype."""
        if self.constraint is None:
            return None
        boxes = grid_boxes(height, width, device=like.device, dtype=like.dtype)
        return torch.sigmoid(self.constraint(boxes)).squeeze(-1).unsqueeze(0)


@dataclass
class GridWords:
    """What the single-stage blocks attend over: cells [B,M,D], words [B,N,D], their masks."""

    cells: Tensor
    words: Tensor
    mask: Tensor
    constraint: Tensor | None
    height: int
    width: int


class GridAndWords(nn.Module):
    """The common start of the single-stage blocks: the last visual stage as positioned grid
    tokens and the words projected to the same width.

    ``grid`` (per image) and ``words`` (per question) are separate so a block can project each
    image once however many questions ask about it (``FusionBlock.prepare_visual``). Padding is
    zeroed before the projection so junk in padded positions (even inf/nan) stays out of every
    product and gradient downstream.
    """

    def __init__(
        self,
        visual_channels: list[int],
        text_dim: int,
        dim: int,
        positional: bool = True,
        spatial_constraint: bool = False,
        grid_norm: str = "batch",
        grid_stride: int = 1,
        cell_context: int = 0,
    ) -> None:
        super().__init__()
        self.grid = SpatialGrid(
            visual_channels[-1],
            dim,
            positional,
            spatial_constraint,
            grid_norm,
            grid_stride,
            cell_context,
        )
        self.text_proj = nn.Linear(text_dim, dim)

    def cells(self, visual: list[Tensor]) -> Tensor:
        """The grid tokens of each image, [B, H, W, D] (the grid's shape kept for the maps)."""
        return self.grid.cells(visual[-1])

    def words(self, cells: Tensor, text: Tensor, text_mask: Tensor) -> GridWords:
        """``cells`` [B, H, W, D] (one row per question) and the projected words."""
        mask = text_mask.bool()
        words = self.text_proj(text.masked_fill(~mask.unsqueeze(-1), 0.0))
        height, width = cells.shape[1:3]
        prior = self.grid.prior(height, width, cells)
        return GridWords(cells.flatten(1, 2), words, mask, prior, height, width)

    def forward(self, visual: list[Tensor], text: Tensor, text_mask: Tensor) -> GridWords:
        return self.words(self.cells(visual), text, text_mask)


class ConditionedCells(nn.Module):
    """Every grid cell transformed by the question before any pooling (FiLM's idea, Perez et
    al., AAAI 2018): an MLP over ``[cell, q, cell * q]``, q being the mean of the real question
    tokens, projected to the cells' width and (``question_norm="batch"``) batch-normalised.

    Softmax attention over raw cells can only mix cells whose projection already tells the
    asked-about objects apart; a conditioned cell first asks "is this a red triangle?" of its
    own features, non-linearly, and every cell receives gradient whatever the attention picks.
    Centring q across the batch matters for a text encoder trained from scratch, whose mean
    tokens are nearly one shared vector: without it ``cell * q`` hardly depends on the question.
    The output is non-negative (ReLU), so its sum over cells is an unnormalised read-out that
    keeps counts.

    The MLP's first layer is linear in its three inputs, so the cell's share of it
    (``cell_term``) is computed once per image and only ``q`` and ``cell * q`` per question.

    ``word_attention``: each cell reads the question through its own attention over the words
    (``cell_questions``), so q is per cell: the mean has one slot for both "the red circle" and
    "the blue square" of "is the red circle left of the blue square?", and a red circle's cell
    can take the phrase that names it, a blue square's the other.
    """

    def __init__(
        self,
        cell_dim: int,
        question_dim: int,
        hidden_dim: int,
        question_norm: str = "batch",
        question_glimpses: int = 0,
        word_attention: bool = False,
    ) -> None:
        super().__init__()
        if word_attention and question_glimpses:
            raise ValueError("word_attention and question_glimpses are two ways to pool the words")
        if question_norm not in QUESTION_NORMS:
            raise ValueError(f"question_norm={question_norm!r} must be one of {QUESTION_NORMS}")
        if question_glimpses < 0:
            raise ValueError(f"question_glimpses must be >= 0, got {question_glimpses}")
        self.question = nn.Linear(question_dim * max(1, question_glimpses), cell_dim)
        self.norm = SafeBatchNorm1d(cell_dim) if question_norm == "batch" else nn.Identity()
        self.mlp = nn.Sequential(
            nn.Linear(3 * cell_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
        )
        # Created last: without glimpses the parameters are drawn as before the option existed.
        self.word_score = (
            nn.Linear(question_dim, question_glimpses, bias=False) if question_glimpses else None
        )
        # Keys from the words (N per question), not queries from the cells (M of them): the same
        # bilinear form cell^T W word, at a cost per cell of cell_dim, not question_dim x cell_dim.
        self.word_key = nn.Linear(question_dim, cell_dim, bias=False) if word_attention else None
        self.cell_norm = (
            SafeBatchNorm1d(cell_dim) if word_attention and question_norm == "batch" else None
        )

    def cell_term(self, cells: Tensor) -> Tensor:
        """The cells' share of the first layer, [..., cell_dim] -> [..., hidden_dim]."""
        return cells @ self._first_layer_weights()[0].T

    def pooled_question(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """q [B, cell_dim] from the question tokens [B, N, question_dim] (padding zeroed)."""
        return self.question_and_weights(tokens, mask)[0]

    def question_and_weights(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """q [B, cell_dim], read from the mean of the real tokens or, with ``question_glimpses``
        G, from G word-attention glimpses concatenated, and the weight of each word [B, N] (the
        glimpses' mean; uniform over the real words without). A mean has one slot for both "the
        red circle" and "the blue square" of "is the red circle left of the blue square?"; a
        glimpse can take each."""
        pooled, weights = self._pool_words(tokens, mask)
        return self.norm(self.question(pooled)), weights

    def _pool_words(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        if self.word_score is None:
            real = mask.to(tokens.dtype)
            return masked_mean(tokens, mask), real / real.sum(1, keepdim=True).clamp_min(1.0)
        scores = self.word_score(tokens).masked_fill(~mask.unsqueeze(-1), float("-inf"))
        weights = torch.softmax(scores, dim=1)  # [B, N, G]
        return (weights.transpose(1, 2) @ tokens).flatten(1), weights.mean(-1)

    def cell_questions(self, cells: Tensor, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """With ``word_attention``: each cell's own q [B, M, cell_dim], from its scaled
        dot-product attention over the real words (cells [B, M, cell_dim] the queries, tokens
        [B, N, question_dim] projected the keys and the values), and each word's mean weight
        over the cells [B, N]. The projection is linear and the weights sum to 1, so the words
        are projected once and then pooled per cell."""
        logits = cells @ self.word_key(tokens).transpose(1, 2) / cells.shape[-1] ** 0.5
        weights = masked_softmax(logits, mask.unsqueeze(1))  # [B, M, N]
        question = weights @ self.question(tokens)
        if self.cell_norm is not None:
            question = self.cell_norm(question.transpose(1, 2)).transpose(1, 2)
        return question, weights.mean(dim=1)

    def forward(self, cells: Tensor, cell_term: Tensor, question: Tensor) -> Tensor:
        """cells [B, M, cell_dim] with their ``cell_term`` [B, M, hidden], q [B, cell_dim] (or
        per cell, [B, M, cell_dim]) -> conditioned cells [B, M, hidden_dim]."""
        _, w_question, w_product = self._first_layer_weights()
        question_term = question @ w_question.T + self.mlp[0].bias
        if question.dim() == 2:  # one q per question, broadcast over its cells
            question_term, question = question_term.unsqueeze(1), question.unsqueeze(1)
        hidden = cell_term + question_term + (cells * question) @ w_product.T
        return self.mlp[1:](hidden)

    def _first_layer_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """The first layer's weight split by input: cell, question, cell * question."""
        return self.mlp[0].weight.split(self.mlp[0].in_features // 3, dim=1)


class RelationReadout(nn.Module):
    """Where the conditioned cells lie relative to each other, read in time linear in the cells.

    "Is A left of B?" needs, for A's cells, whether B's cells lie to their right. A sum over
    cells weighs each object's position by its area, and a softmax glimpse must first find the
    right object; neither compares two objects. Here every conditioned cell c_m is projected
    to ``dim`` (z_m), and each cell also receives the sums of z over the cells left of its
    column, right of it, above its row and below it (exclusive cumulative sums, so the cost is
    linear in the cells, not quadratic as a relation network's pairs). A per-cell layer over
    ``[z_m, left_m, right_m, above_m, below_m]`` with a ReLU can then fire on "I am A and there
    is B to my right"; its scaled sum over cells is the read-out ``[B, out_dim]``.
    """

    def __init__(self, in_dim: int, dim: int, out_dim: int) -> None:
        super().__init__()
        self.project = nn.Linear(in_dim, dim)
        self.combine = nn.Linear(5 * dim, out_dim)

    def forward(self, cells: Tensor, height: int, width: int) -> Tensor:
        """cells [B, H*W, in_dim] (row-major) -> [B, out_dim]."""
        z = self.project(cells).unflatten(1, (height, width))  # [B, H, W, d]
        columns, rows = z.sum(dim=1), z.sum(dim=2)  # [B, W, d], [B, H, d]
        left = columns.cumsum(dim=1) - columns
        right = columns.sum(dim=1, keepdim=True) - left - columns
        above = rows.cumsum(dim=1) - rows
        below = rows.sum(dim=1, keepdim=True) - above - rows
        # The layer is linear in its five inputs, and four of them depend on the cell's column
        # or row only: each is applied once per column / row, then broadcast over the grid.
        w_cell, w_left, w_right, w_above, w_below = self.combine.weight.split(z.shape[-1], dim=1)
        by_column = (left @ w_left.T + right @ w_right.T) * SUM_SCALE  # [B, W, out]
        by_row = (above @ w_above.T + below @ w_below.T) * SUM_SCALE  # [B, H, out]
        hidden = z @ w_cell.T + self.combine.bias + by_column.unsqueeze(1) + by_row.unsqueeze(2)
        return torch.relu(hidden).sum(dim=(1, 2)) * SUM_SCALE


class CoAttended(NamedTuple):
    """What a co-attention gives a single-stage block: the attended image and question vectors
    [B, D] and the maps to plot, image [B, M] and question [B, N]."""

    image: Tensor
    question: Tensor
    image_att: Tensor
    question_att: Tensor


class SingleStageFusion(FusionBlock):
    """A block over the last visual stage: ``GridAndWords`` inputs, one co-attention between
    the grid cells and the words, and ``[v, q, v * q]`` projected to ``hidden_dim``.

    ``attention`` builds the co-attention module, called as ``attention(cells, words, mask,
    prior, top_k, dropout, residual)`` and returning a ``CoAttended`` (see
    ``vqa.models.fusion.attention``). It is a factory, called between the inputs and
    ``out_proj``, so the layers are created, and drawn from the random generator, in the order
    the blocks always used (a seed gives the same initial weights). A block that combines its
    inputs another way (hierarchical, early) passes no ``attention``, gets no ``out_proj`` and
    writes its own ``attend``; ``attention_dropout=None``: no dropout on the attention.

    Options every co-attention block shares (off by default):

    * ``grid_stride`` s > 1: the grid is the stage map read in s x s patches by a trained conv
      (``SpatialGrid``), so a finer cached map keeps the grid, and the attention's cost, small;
    * ``cell_conditioning``: the cells pass through ``ConditionedCells`` (the question asks
      every cell first) before the co-attention reads them;
    * ``count``: the conditioned cells' scaled sum is appended to the output, an unnormalised
      read-out that softmax pooling cannot give ("how many"); needs ``cell_conditioning``.

    The grid is projected once per distinct image (``prepare_visual``), not once per question;
    ``attend`` reads the (conditioned) cells and the words per question.
    """

    def __init__(
        self,
        visual_channels: list[int],
        text_dim: int,
        hidden_dim: int,
        attention: Callable[[], nn.Module] | None = None,
        *,
        top_k: int | None = None,
        attention_dropout: float | None = None,
        residual: bool = False,
        positional: bool = True,
        spatial_constraint: bool = False,
        grid_norm: str = "batch",
        grid_stride: int = 1,
        cell_conditioning: bool = False,
        count: bool = False,
        question_norm: str = "batch",
        cell_context: int = 0,
    ) -> None:
        super().__init__(visual_channels, text_dim)
        if count and not cell_conditioning:
            raise ValueError(
                "count reads the question-conditioned cells: it needs cell_conditioning=true"
            )
        self.top_k = top_k
        self.residual = residual
        self.out_dim = hidden_dim
        self.inputs = GridAndWords(
            self.visual_channels,
            self.text_dim,
            hidden_dim,
            positional,
            spatial_constraint,
            grid_norm,
            grid_stride,
            cell_context,
        )
        self.attention = None
        if attention is not None:
            self.attention = attention()
            self.out_proj = nn.Linear(3 * hidden_dim, hidden_dim)
        self.dropout = None if attention_dropout is None else nn.Dropout(attention_dropout)
        # Created last, so the default blocks draw their initial weights as before.
        self.conditioning = (
            ConditionedCells(hidden_dim, hidden_dim, hidden_dim, question_norm)
            if cell_conditioning
            else None
        )
        self.count = count
        if count:
            self.out_dim += hidden_dim

    def prepare_visual(self, visual: list[Tensor]) -> list[Tensor]:
        """Per distinct image: the grid tokens [U, H, W, D] and, with ``cell_conditioning``, their
        share of its first layer."""
        cells = self.inputs.cells(visual)
        if self.conditioning is None:
            return [cells]
        return [cells, self.conditioning.cell_term(cells)]

    def fuse(self, prepared: list[Tensor], text: Tensor, text_mask: Tensor) -> FusionOutput:
        x = self.inputs.words(prepared[0], text, text_mask)
        if self.conditioning is not None:
            question = self.conditioning.pooled_question(x.words, x.mask)
            x.cells = self.conditioning(x.cells, prepared[1].flatten(1, 2), question)
        out = self.attend(x)
        if self.count:
            out.features = torch.cat([out.features, summed(x.cells)], dim=-1)
        return out

    def attend(self, x: GridWords) -> FusionOutput:
        """The block's own reading of the cells (conditioned, with ``cell_conditioning``) and
        the words of each question: here the co-attention, ``[v, q, v * q]`` projected."""
        if self.attention is None:
            raise NotImplementedError(
                f"{type(self).__name__} builds no attention, so it must override attend()"
            )
        out: CoAttended = self.attention(
            x.cells, x.words, x.mask, x.constraint, self.top_k, self.dropout, self.residual
        )
        return FusionOutput(
            features=self.out_proj(joint(out.image, out.question)),
            attention={
                "image": out.image_att.unflatten(-1, (x.height, x.width)),
                "question": out.question_att,
            },
        )

    def forward(self, visual: list[Tensor], text: Tensor, text_mask: Tensor) -> FusionOutput:
        return self.fuse(self.prepare_visual(visual), text, text_mask)
