"""FiLM fusion counts: its unnormalised sum over question-conditioned cells carries "how
many", which softmax attention alone normalises away. (The shared contract is in
test_fusion_contract.py.)"""

from __future__ import annotations

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
    visual = F.one_hot(cells, 3).float().T.reshape(3, GRID, GRID, batch).permute(3, 0, 1, 2)
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
