"""FiLM fusion counts: its unnormalised sum over question-conditioned cells carries "how
many", which softmax attention alone normalises away. (The shared contract is in
test_fusion_contract.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vqa.models.fusion.film import FiLMFusion, glimpse_centres
from vqa.models.norms import SafeBatchNorm1d, SafeBatchNorm2d

GRID, CHANNELS, TEXT_DIM, HIDDEN, MAX_COUNT = 4, 3, 8, 32, 5


def counting_batch(generator: torch.Generator, batch: int = 64):
    """Grids with 0..MAX_COUNT "red" cells among "blue" and empty ones; the question asks for
    red or for blue (one token each), the answer is that colour's count."""
    cells = torch.randint(0, 3, (batch, GRID * GRID), generator=generator)  # 0 empty, 1 red, 2 blue
    colour = torch.randint(1, 3, (batch,), generator=generator)
    for row in range(batch):  # cap the asked colour's count at MAX_COUNT
        where = (cells[row] == colour[row]).nonzero().flatten()
        cells[row, where[MAX_COUNT:]] = 0
    visual = F.one_hot(cells, 3).float().permute(0, 2, 1).reshape(batch, 3, GRID, GRID)
    text = F.one_hot(colour - 1, TEXT_DIM).float().unsqueeze(1)  # [B, 1, D]
    mask = torch.ones(batch, 1, dtype=torch.bool)
    answer = (cells == colour.unsqueeze(1)).sum(1)
    return [visual.contiguous()], text, mask, answer


def trained_accuracy(block: FiLMFusion, head: nn.Module, make_batch, steps: int) -> float:
    """Train ``block`` and ``head`` on ``make_batch(generator)`` batches, then their accuracy
    on 512 fresh questions."""
    optimizer = torch.optim.Adam([*block.parameters(), *head.parameters()], lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        visual, text, mask, answer = make_batch(g)
        loss = F.cross_entropy(head(block(visual, text, mask).features), answer)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    block.eval()
    with torch.no_grad():
        visual, text, mask, answer = make_batch(torch.Generator().manual_seed(1), batch=512)
        return (head(block(visual, text, mask).features).argmax(1) == answer).float().mean().item()


def test_film_learns_to_count_question_selected_cells() -> None:
    torch.manual_seed(0)
    block = FiLMFusion([CHANNELS], TEXT_DIM, hidden_dim=HIDDEN, positional=False)
    accuracy = trained_accuracy(block, nn.Linear(block.out_dim, MAX_COUNT + 1), counting_batch, 400)
    # The most common count is right about a third of the time.
    assert accuracy > 0.95, f"counting accuracy {accuracy:.3f}"


def test_question_norm_removes_what_all_questions_share() -> None:
    """A random-init BERT pools every question to nearly one shared vector; with
    ``question_norm: batch`` the block sees only what tells the questions of a batch apart, so
    adding a shared vector to every token changes nothing. Without it, everything changes."""
    g = torch.Generator().manual_seed(0)
    visual = [torch.randn(8, CHANNELS, GRID, GRID, generator=g)]
    text = torch.randn(8, 5, TEXT_DIM, generator=g)
    mask = torch.ones(8, 5, dtype=torch.bool)
    shared = 10 * torch.randn(TEXT_DIM, generator=g)
    for norm, invariant in (("batch", True), ("none", False)):
        torch.manual_seed(0)
        block = FiLMFusion([CHANNELS], TEXT_DIM, hidden_dim=HIDDEN, question_norm=norm).train()
        with torch.no_grad():
            plain = block(visual, text, mask).features
            shifted = block(visual, text + shared, mask).features
        assert torch.allclose(plain, shifted, atol=1e-4) == invariant, norm


def test_question_norm_rejects_unknown_value() -> None:
    with pytest.raises(ValueError, match="question_norm"):
        FiLMFusion([CHANNELS], TEXT_DIM, hidden_dim=HIDDEN, question_norm="layer")


def test_glimpse_centres_are_where_the_glimpses_look_in_cells() -> None:
    """On a 4 (high) x 8 (wide) grid, a glimpse all on cell (row 1, col 6) looks at
    x = 6.5 - 4 = 2.5, y = 1.5 - 2 = -0.5 cells from the middle; one spread evenly looks at the
    middle; the offset is the first centre minus the second, for each pair in order."""
    height, width = 4, 8
    weights = torch.zeros(2, height * width, 3)
    weights[:, 1 * width + 6, 0] = 1.0  # glimpse 0: one cell
    weights[:, :, 1] = 1.0 / (height * width)  # glimpse 1: everywhere
    weights[0, 3 * width + 0, 2] = weights[1, 0, 2] = 1.0  # glimpse 2: (3, 0) / (0, 0)
    out = glimpse_centres(weights, height, width)
    centres = torch.tensor([[2.5, -0.5], [0.0, 0.0], [-3.5, 1.5]]).expand(2, 3, 2).clone()
    centres[1, 2] = torch.tensor([-3.5, -1.5])
    offsets = torch.stack(
        [
            centres[:, 0] - centres[:, 1],
            centres[:, 0] - centres[:, 2],
            centres[:, 1] - centres[:, 2],
        ],
        dim=1,
    )
    assert torch.allclose(out, torch.cat([centres.flatten(1), offsets.flatten(1)], dim=1))


def red_blue_strip(generator: torch.Generator, batch: int):
    """One red and one blue cell on a 1 x 8 strip (the rest empty), the two cells' positions,
    and which colour each question names first (1: red)."""
    width = 8
    red = torch.randint(0, width, (batch,), generator=generator)
    blue = (red + torch.randint(1, width, (batch,), generator=generator)) % width
    cells = torch.zeros(batch, width, dtype=torch.long)
    cells[torch.arange(batch), red], cells[torch.arange(batch), blue] = 1, 2
    visual = F.one_hot(cells, 3).float().permute(0, 2, 1).reshape(batch, 3, 1, width)
    red_first = torch.randint(0, 2, (batch,), generator=generator)
    answer = torch.where(red_first.bool(), red < blue, blue < red).long()
    return [visual.contiguous()], red_first, answer


def relation_batch(generator: torch.Generator, batch: int = 64):
    """``red_blue_strip``; the question (one token) asks "is red left of blue?" or "is blue
    left of red?", answer yes (1) or no (0)."""
    visual, red_first, answer = red_blue_strip(generator, batch)
    text = F.one_hot(red_first, TEXT_DIM).float().unsqueeze(1)
    mask = torch.ones(batch, 1, dtype=torch.bool)
    return visual, text, mask, answer


def relation_accuracy(glimpse_positions: bool = False, relation_dim: int = 0) -> float:
    """FiLM with no box embeddings trained on ``relation_batch``: with two glimpses, or
    (``relation_dim``) with the relation read-out alone."""
    torch.manual_seed(0)
    block = FiLMFusion(
        [CHANNELS],
        TEXT_DIM,
        hidden_dim=HIDDEN,
        glimpses=0 if relation_dim else 2,
        glimpse_positions=glimpse_positions,
        positional=False,
        relation_dim=relation_dim,
    )
    head = nn.Sequential(nn.Linear(block.out_dim, 32), nn.ReLU(), nn.Linear(32, 2))
    return trained_accuracy(block, head, relation_batch, 300)


def test_glimpse_positions_let_film_compare_two_objects_positions() -> None:
    """ "Is A left of B?" with A and B anywhere on the strip. Without box embeddings the cells
    do not know where they are, so the only positions the head gets are the glimpses' centres
    and their offset: with them the block learns the comparison, without them it is at chance."""
    assert relation_accuracy(glimpse_positions=True) > 0.95
    assert relation_accuracy(glimpse_positions=False) < 0.6  # chance: 0.5


def test_relation_readout_lets_film_compare_two_objects_positions() -> None:
    """The same strip, no glimpses, no box embeddings: each cell's sums of what lies left and
    right of it are all the block knows of positions, and they answer "is A left of B?"."""
    assert relation_accuracy(relation_dim=8) > 0.95


def named_order_batch(generator: torch.Generator, batch: int = 64):
    """``red_blue_strip``, but the question names both colours, in either order: token n is its
    colour's one-hot plus its position's one-hot; the answer is whether the colour named first
    lies left of the one named second. The mean of the two tokens is the same for both orders,
    so only a block that binds each word to its position can answer."""
    visual, red_first, answer = red_blue_strip(generator, batch)
    named = torch.stack([1 - red_first, red_first], dim=1)  # per position: 1 red, 0 blue
    text = torch.cat([F.one_hot(named, 2), torch.eye(2).expand(batch, 2, 2).long()], dim=-1)
    text = F.pad(text.float(), (0, TEXT_DIM - 4))
    mask = torch.ones(batch, 2, dtype=torch.bool)
    return visual, text, mask, answer


@pytest.mark.parametrize(("word_attention", "learns"), [(True, True), (False, False)])
def test_word_attention_binds_each_cell_to_the_words_that_name_it(
    word_attention: bool, learns: bool
) -> None:
    """With its own attention over the words, the red cell reads the red word and with it that
    word's position ("named first"), and the box embeddings say where the cell is: the order
    question is learned. Conditioned on the mean of the words, the block cannot tell the two
    orders apart and stays near chance (0.5)."""
    torch.manual_seed(0)
    block = FiLMFusion([CHANNELS], TEXT_DIM, hidden_dim=HIDDEN, word_attention=word_attention)
    head = nn.Sequential(nn.Linear(block.out_dim, 32), nn.ReLU(), nn.Linear(32, 2))
    accuracy = trained_accuracy(block, head, named_order_batch, 400)
    assert (accuracy > 0.9) == learns, f"accuracy {accuracy:.3f}"
    assert (accuracy < 0.65) == (not learns), f"accuracy {accuracy:.3f}"


def test_word_attention_is_one_way_to_pool_the_words() -> None:
    with pytest.raises(ValueError, match="word_attention and question_glimpses"):
        FiLMFusion(
            [CHANNELS], TEXT_DIM, hidden_dim=HIDDEN, word_attention=True, question_glimpses=2
        )


def test_glimpse_positions_need_glimpses() -> None:
    with pytest.raises(ValueError, match="glimpse_positions needs glimpses"):
        FiLMFusion([CHANNELS], TEXT_DIM, hidden_dim=HIDDEN, glimpse_positions=True)
    with pytest.raises(ValueError, match="relation_dim"):
        FiLMFusion([CHANNELS], TEXT_DIM, hidden_dim=HIDDEN, relation_dim=-1)
    with pytest.raises(ValueError, match="cell_context"):
        FiLMFusion([CHANNELS], TEXT_DIM, hidden_dim=HIDDEN, cell_context=-1)


SAFE_NORMS = [
    (SafeBatchNorm1d, nn.BatchNorm1d, (5, 6)),
    (SafeBatchNorm1d, nn.BatchNorm1d, (2, 6, 3)),
    (SafeBatchNorm2d, nn.BatchNorm2d, (2, 6, 3, 3)),
    (SafeBatchNorm2d, nn.BatchNorm2d, (1, 6, 2, 1)),
]


def trained_pair(safe: type, plain: type, channels: int = 6) -> tuple[nn.Module, nn.Module]:
    """The two norms with the same non-trivial affine and running statistics."""
    torch.manual_seed(0)
    reference = plain(channels)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 2.0)
        reference.bias.normal_()
        reference.running_mean.normal_()
        reference.running_var.uniform_(0.5, 2.0)
        reference.num_batches_tracked.fill_(7)
    norm = safe(channels)
    norm.load_state_dict(reference.state_dict())
    return norm, reference


@pytest.mark.parametrize(
    ("safe", "plain", "shape"), SAFE_NORMS, ids=[f"{s.__name__}-{sh}" for s, _, sh in SAFE_NORMS]
)
def test_safe_batch_norm_is_the_plain_one_with_two_values_per_channel(
    safe: type, plain: type, shape: tuple[int, ...]
) -> None:
    """Outputs, gradients, updated statistics and state-dict keys equal ``nn.BatchNorm*`` bit for
    bit, in train and eval mode, so runs stay reproducible and old checkpoints load."""
    norm, reference = trained_pair(safe, plain)
    assert isinstance(norm, plain)
    assert list(norm.state_dict()) == list(reference.state_dict())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    for train in (True, False):
        norm.train(train)
        reference.train(train)
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        outs = [norm(xs[0]), reference(xs[1])]
        assert torch.equal(outs[0], outs[1])
        upstream = torch.randn(outs[0].shape, generator=torch.Generator().manual_seed(2))
        for out in outs:
            out.backward(upstream)
        assert torch.equal(xs[0].grad, xs[1].grad)
        assert torch.equal(norm.weight.grad, reference.weight.grad)
        assert torch.equal(norm.bias.grad, reference.bias.grad)
        for key, value in reference.state_dict().items():
            assert torch.equal(norm.state_dict()[key], value), key


@pytest.mark.parametrize(
    ("safe", "plain", "shape"),
    [(SafeBatchNorm1d, nn.BatchNorm1d, (1, 6)), (SafeBatchNorm2d, nn.BatchNorm2d, (1, 6, 1, 1))],
    ids=["1d", "2d"],
)
def test_safe_batch_norm_uses_running_statistics_on_one_value_per_channel(
    safe: type, plain: type, shape: tuple[int, ...]
) -> None:
    """Where ``nn.BatchNorm*`` raises, it normalises as in eval mode, passes gradient to its
    input and affine, and learns nothing into its statistics from that single value."""
    norm, reference = trained_pair(safe, plain)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        reference.train()(x)
    before = {key: value.clone() for key, value in norm.state_dict().items()}
    xs = x.clone().requires_grad_()
    out = norm.train()(xs)
    assert torch.equal(out, reference.eval()(x))
    out.pow(2).sum().backward()
    assert xs.grad.abs().sum() > 0
    assert norm.weight.grad.abs().sum() > 0 and norm.bias.grad.abs().sum() > 0
    for key, value in norm.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed"


def domino_batch(generator: torch.Generator, batch: int = 64):
    """A 6 x 6 grid of four 3 x 3 blocks, each empty or holding a domino of two "red" cells,
    upright or lying, with a free row and column between blocks; the question (one token) asks
    for the upright or the lying ones, the answer is how many. Every red cell looks the same:
    which domino it belongs to is in its neighbours."""
    kind = torch.randint(0, 3, (batch, 4), generator=generator)  # 0 none, 1 upright, 2 lying
    grid = torch.zeros(batch, 6, 6, dtype=torch.long)
    for block in range(4):
        row, col = 3 * (block // 2), 3 * (block % 2)
        upright, lying = kind[:, block] == 1, kind[:, block] == 2
        grid[upright, row, col] = grid[upright, row + 1, col] = 1
        grid[lying, row, col] = grid[lying, row, col + 1] = 1
    visual = F.one_hot(grid, CHANNELS).float().permute(0, 3, 1, 2)
    asked = torch.randint(1, 3, (batch,), generator=generator)
    text = F.one_hot(asked - 1, TEXT_DIM).float().unsqueeze(1)
    mask = torch.ones(batch, 1, dtype=torch.bool)
    answer = (kind == asked.unsqueeze(1)).sum(1)
    return [visual.contiguous()], text, mask, answer


@pytest.mark.parametrize(("cell_context", "learns"), [(1, True), (0, False)])
def test_cell_context_lets_a_cell_see_the_object_it_belongs_to(
    cell_context: int, learns: bool
) -> None:
    """Counting upright against lying dominoes: a cell conditioned on its own features cannot
    tell which kind it belongs to (the sum only knows how many red cells there are); one 3 x 3
    context layer over the cells sees the neighbour that says it."""
    torch.manual_seed(0)
    block = FiLMFusion(
        [CHANNELS], TEXT_DIM, hidden_dim=HIDDEN, positional=False, cell_context=cell_context
    )
    accuracy = trained_accuracy(block, nn.Linear(block.out_dim, 5), domino_batch, 400)
    assert (accuracy > 0.9) == learns, f"accuracy {accuracy:.3f}"
    assert (accuracy < 0.7) == (not learns), f"accuracy {accuracy:.3f}"
