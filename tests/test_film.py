"""FiLM fusion counts: its unnormalised sum over question-conditioned cells carries "how
many", which softmax attention alone normalises away. (The shared contract is in
test_fusion_contract.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vqa.models.fusion.film import FiLMFusion

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


def test_film_learns_to_count_question_selected_cells() -> None:
    torch.manual_seed(0)
    block = FiLMFusion([CHANNELS], TEXT_DIM, hidden_dim=HIDDEN, positional=False)
    head = nn.Linear(block.out_dim, MAX_COUNT + 1)
    optimizer = torch.optim.Adam([*block.parameters(), *head.parameters()], lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        visual, text, mask, answer = counting_batch(g)
        loss = F.cross_entropy(head(block(visual, text, mask).features), answer)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    block.eval()
    with torch.no_grad():
        visual, text, mask, answer = counting_batch(torch.Generator().manual_seed(1), batch=512)
        accuracy = (head(block(visual, text, mask).features).argmax(1) == answer).float().mean()
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
