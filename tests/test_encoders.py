"""Visual (torchvision ResNet) and text (transformers BERT) encoders, offline and tiny."""

from __future__ import annotations

import dataclasses
import os
import socket
import urllib.error
from pathlib import Path

import huggingface_hub
import pytest
import torch
import transformers
from torch import nn
from torchvision.models import get_model
from torchvision.ops import FrozenBatchNorm2d
from transformers import BertConfig, BertModel

from vqa.models.text import BertTextEncoder
from vqa.models.visual import ResNetEncoder

TINY_BERT = {
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 32,
}
VOCAB = 40


def images(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- ResNet


def test_resnet_returns_requested_stages_in_order_with_channels_and_strides() -> None:
    encoder = ResNetEncoder("resnet18", stages=["layer3", "layer2"]).eval()
    assert encoder.stage_names == ["layer2", "layer3"]
    assert encoder.out_channels == [128, 256]
    assert list(encoder.stage_channels().items()) == [("layer2", 128), ("layer3", 256)]
    with torch.no_grad():
        features = encoder(images(size=64))
    assert list(features) == ["layer2", "layer3"]  # by name, in network order
    assert [tuple(f.shape) for f in features.values()] == [(2, 128, 8, 8), (2, 256, 4, 4)]
    assert encoder.stage_shapes(64) == {"layer2": (128, 8, 8), "layer3": (256, 4, 4)}


def test_resnet_stops_after_deepest_stage() -> None:
    encoder = ResNetEncoder("resnet18", stages=["layer2"])
    assert list(encoder.body) == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2"]
    full = get_model("resnet18", weights=None)
    dropped = n_params(full.layer3) + n_params(full.layer4) + n_params(full.fc)
    assert n_params(encoder) == n_params(full) - dropped


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stages": ["layer5"]}, "stages"),
        ({"stages": []}, "stages"),
        ({"stages": ["layer2", "layer2"]}, "stages"),
        ({"stages": ["layer2"], "freeze": "layer3"}, "freeze"),
        ({"arch": "resnet19"}, "arch"),
        ({"bn": "sync"}, "bn"),
        ({"weights": "IMAGENET9K"}, "IMAGENET1K_V1"),
    ],
)
def test_resnet_rejects_bad_configuration(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ResNetEncoder(**{"arch": "resnet18", **kwargs})


def test_resnet_partial_freeze_keeps_frozen_part_fixed_in_train_mode() -> None:
    encoder = ResNetEncoder("resnet18", stages=["layer3"], freeze="layer1", bn="train").train()
    frozen = ("conv1", "bn1", "layer1")
    for name, param in encoder.body.named_parameters():
        assert param.requires_grad is (not name.startswith(frozen)), name
    assert not encoder.body["layer1"].training and not encoder.body["bn1"].training
    assert encoder.body["layer2"].training
    stats_before = {
        name: buf.clone() for name, buf in encoder.body.named_buffers() if "running_mean" in name
    }
    encoder(images())
    for name, before in stats_before.items():
        moved = not torch.equal(encoder.body.get_buffer(name), before)
        assert moved is (not name.startswith(frozen)), name


def test_resnet_fully_frozen_is_deterministic_feature_extractor() -> None:
    encoder = ResNetEncoder("resnet18", stages=["layer2"], freeze="all", bn="train")
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not any(m.training for m in encoder.modules() if isinstance(m, nn.BatchNorm2d))
    x = images()
    train_out = encoder(x)["layer2"]
    torch.testing.assert_close(encoder.eval()(x)["layer2"], train_out)


def test_resnet_init_seed_fixes_random_weights_whatever_the_run_seed() -> None:
    """A frozen random encoder is one feature function: the quick-start's feature cache is
    shared by runs with any seed, and drawing it leaves the run's own random stream alone."""

    def build(run_seed: int, init_seed: int | None) -> tuple[ResNetEncoder, torch.Tensor]:
        torch.manual_seed(run_seed)
        encoder = ResNetEncoder("resnet18", stages=["layer1"], freeze="all", init_seed=init_seed)
        return encoder, torch.rand(3)  # the next draw of the run's generator

    seeded_a, after_a = build(1, init_seed=0)
    seeded_b, _ = build(2, init_seed=0)
    for a, b in zip(seeded_a.state_dict().values(), seeded_b.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    torch.manual_seed(1)
    assert torch.equal(after_a, torch.rand(3)), "init_seed consumed the run's generator"

    run_a, _ = build(1, init_seed=None)
    run_b, _ = build(2, init_seed=None)
    assert not torch.equal(run_a.body["conv1"].weight, run_b.body["conv1"].weight)


def test_resnet_frozen_bn_uses_frozen_batchnorm_and_warns_without_weights() -> None:
    with pytest.warns(UserWarning, match="random weights"):
        encoder = ResNetEncoder("resnet18", stages=["layer1"], bn="frozen")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in encoder.modules())
    norms = [m for m in encoder.modules() if isinstance(m, FrozenBatchNorm2d)]
    encoder.train()
    assert norms and not any(m.training for m in norms)
    # The convolutions still train; only the normalisation is fixed.
    assert all(p.requires_grad for p in encoder.parameters())


def twin_encoders(**kwargs) -> tuple[ResNetEncoder, ResNetEncoder]:
    """A plain resnet18 and one built with ``kwargs``, holding the same weights."""
    plain = ResNetEncoder("resnet18", stages=["layer1", "layer2"], freeze="stem")
    other = ResNetEncoder("resnet18", stages=["layer1", "layer2"], freeze="stem", **kwargs)
    other.load_state_dict(plain.state_dict())
    return plain, other


def test_resnet_channels_last_matches_the_plain_encoder() -> None:
    plain, fast = twin_encoders(channels_last=True)
    x = images()
    with torch.no_grad():
        expected, features = plain(x).values(), fast(x).values()
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in features)
    for actual, reference in zip(features, expected, strict=True):
        torch.testing.assert_close(actual, reference, atol=1e-4, rtol=1e-4)


def test_resnet_gradient_checkpointing_gives_the_same_gradients() -> None:
    plain, checkpointed = twin_encoders(gradient_checkpointing=True)
    x = images(size=32)
    for encoder, expected_runs in ((plain, 1), (checkpointed, 2)):
        runs: list[int] = []
        encoder.body["layer2"].register_forward_pre_hook(lambda *_, runs=runs: runs.append(1))
        sum(f.square().mean() for f in encoder(x).values()).backward()
        assert len(runs) == expected_runs  # a checkpointed stage is recomputed in backward
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(b.grad, a.grad, msg=name)


def test_resnet_description_says_what_the_encoder_computes() -> None:
    encoder = ResNetEncoder("resnet18", stages=["layer3", "layer1"], freeze="stem")
    spec = encoder.describe()
    assert (spec.arch, spec.stages, spec.channels) == ("resnet18", ("layer1", "layer3"), (64, 256))
    assert spec.stage_channels() == encoder.stage_channels()
    with torch.no_grad():
        maps = encoder.eval()(images(size=32))
    assert spec.stage_channels() == {name: m.shape[1] for name, m in maps.items()}
    assert list(spec.stage_digests()) == ["layer1", "layer3"]
    assert spec.weights_digest == spec.stage_digests()["layer3"]
    assert not spec.frozen and "body.layer1.0.conv1.weight" in spec.trainable
    assert "body.conv1.weight" not in spec.trainable  # the frozen stem
    dataclasses.replace(spec)  # plain data: copies and compares by value
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.arch = "resnet50"  # type: ignore[misc]
    frozen = ResNetEncoder("resnet18", stages=["layer1"], freeze="all").describe()
    assert frozen.frozen and frozen.trainable == ()


def test_resnet_weights_digest_follows_the_weights_not_the_layout() -> None:
    plain, same = twin_encoders()
    assert plain.describe() == same.describe()
    reference, fast = twin_encoders(channels_last=True, gradient_checkpointing=True)
    assert fast.describe().digests == reference.describe().digests  # the same maps
    bn_frozen = ResNetEncoder("resnet18", stages=["layer1", "layer2"], bn="frozen")
    bn_frozen.load_state_dict(plain.state_dict(), strict=False)  # no num_batches_tracked
    assert bn_frozen.describe().digests == plain.describe().digests
    with torch.no_grad():
        same.body["layer2"][1].conv2.weight[0, 0, 0, 0] += 1e-3
    changed = same.describe().stage_digests()
    assert changed["layer1"] == plain.describe().stage_digests()["layer1"]  # layer1 unaffected
    assert changed["layer2"] != plain.describe().stage_digests()["layer2"]
    original, other = twin_encoders()
    other.body["bn1"].running_var.mul_(2)  # a buffer changes the maps as much as a weight
    assert set(other.describe().digests).isdisjoint(original.describe().digests)
    other.body["bn1"].num_batches_tracked += 1  # never read by an eval forward
    other.body["bn1"].running_var.div_(2)
    assert other.describe().digests == original.describe().digests


def test_resnet_stage_shapes_leave_batch_norm_statistics_alone() -> None:
    encoder = ResNetEncoder("resnet18", stages=["layer2"], bn="train").train()
    before = {name: buf.clone() for name, buf in encoder.named_buffers()}
    assert encoder.stage_shapes(48) == {"layer2": (128, 6, 6)}
    assert encoder.training and encoder.body["layer2"].training
    for name, buf in encoder.named_buffers():
        assert torch.equal(buf, before[name]), name


def test_resnet101_instantiates_and_runs() -> None:
    encoder = ResNetEncoder("resnet101", stages=["layer3", "layer4"]).eval()
    assert encoder.out_channels == [1024, 2048]
    assert len(encoder.body["layer3"]) == 23  # the 101-layer block layout, not a smaller arch
    with torch.no_grad():
        features = encoder(images(batch=1, size=64))
    assert [tuple(f.shape) for f in features.values()] == [(1, 1024, 4, 4), (1, 2048, 2, 2)]


def test_resnet_offline_weights_fail_fast_naming_cache_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts = []

    def unreachable(url: str, *args, **kwargs) -> None:
        attempts.append(url)
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    timeout_before = socket.getdefaulttimeout()
    with pytest.raises(OSError) as excinfo:
        ResNetEncoder("resnet18", weights="IMAGENET1K_V1", bn="frozen")
    cache_file = os.path.join(str(tmp_path), "checkpoints", "resnet18-f37072fd.pth")
    assert cache_file in str(excinfo.value)
    assert attempts == ["https://download.pytorch.org/models/resnet18-f37072fd.pth"]
    assert socket.getdefaulttimeout() == timeout_before


# ----------------------------------------------------------------------------- BERT


def tokens(lengths: list[int], width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=g)
    mask = (torch.arange(width) < torch.tensor(lengths).unsqueeze(1)).long()
    return ids * mask, mask  # 0 = [PAD] on padding


def tiny_bert(**kwargs) -> BertTextEncoder:
    torch.manual_seed(0)
    return BertTextEncoder(None, pretrained=False, config=TINY_BERT, vocab_size=VOCAB, **kwargs)


def test_bert_shapes_vocab_and_no_unused_parameters() -> None:
    encoder = tiny_bert()
    assert encoder.hidden_size == 16
    assert encoder.model.get_input_embeddings().num_embeddings == VOCAB
    ids, mask = tokens([6, 3], 6)
    features = encoder(ids, mask)
    assert features.shape == (2, 6, 16)
    features.square().sum().backward()
    # No pooler: every parameter is used, as DDP requires.
    assert all(p.grad is not None for p in encoder.parameters())


def test_bert_real_tokens_ignore_padding() -> None:
    encoder = tiny_bert().eval()
    ids, mask = tokens([6, 3], 6)
    more_ids = torch.cat([ids, torch.randint(1, VOCAB, (2, 4))], dim=1)
    more_ids[1, 3:6] = torch.randint(1, VOCAB, (3,))  # junk ids under existing padding too
    more_mask = torch.cat([mask, torch.zeros(2, 4, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        short, long = encoder(ids, mask), encoder(more_ids, more_mask)
    real = mask.bool()
    torch.testing.assert_close(long[:, :6][real], short[real], atol=1e-5, rtol=0)


def test_bert_freeze_stops_gradients_and_dropout() -> None:
    ids, mask = tokens([5, 5], 5)
    live = tiny_bert().train()
    assert not torch.allclose(live(ids, mask), live(ids, mask))  # dropout is on
    frozen = tiny_bert(freeze=True).train()
    assert not any(p.requires_grad for p in frozen.parameters())
    assert not frozen.training
    torch.testing.assert_close(frozen(ids, mask), frozen(ids, mask))


def test_bert_gradient_checkpointing_matches_plain() -> None:
    ids, mask = tokens([5, 2], 5)
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        encoder = BertTextEncoder(
            None,
            pretrained=False,
            config={**TINY_BERT, **no_dropout},
            vocab_size=VOCAB,
            gradient_checkpointing=checkpointing,
        ).train()
        assert encoder.model.is_activation_checkpointing is checkpointing
        encoder(ids, mask).square().sum().backward()
        grads.append(encoder.model.embeddings.word_embeddings.weight.grad)
    torch.testing.assert_close(grads[1], grads[0])


def test_bert_pretrained_loads_a_local_checkpoint_and_grows_vocab(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = BertModel(BertConfig(vocab_size=VOCAB, **TINY_BERT)).eval()
    reference.save_pretrained(tmp_path)
    encoder = BertTextEncoder(str(tmp_path), pretrained=True, vocab_size=VOCAB + 2).eval()
    assert encoder.model.get_input_embeddings().num_embeddings == VOCAB + 2
    assert encoder.model.pooler is None
    ids, mask = tokens([4, 2], 4)
    with torch.no_grad():
        torch.testing.assert_close(encoder(ids, mask), reference(ids, mask).last_hidden_state)
    # The architecture alone (random init) from the same directory's config.json.
    architecture = BertTextEncoder(str(tmp_path), pretrained=False)
    assert architecture.model.config.num_hidden_layers == TINY_BERT["num_hidden_layers"]
    assert not torch.equal(
        architecture.model.embeddings.word_embeddings.weight,
        reference.embeddings.word_embeddings.weight,
    )


def test_bert_offline_mode_fails_fast_with_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="hf download coattn-vqa-tests/absent-model"):
        BertTextEncoder("coattn-vqa-tests/absent-model")


def test_bert_unreachable_hub_tries_cache_then_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def unreachable(name: str, **kwargs) -> None:
        calls.append(kwargs.get("local_files_only", False))
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", unreachable)
    with pytest.raises(OSError, match="HF_HOME"):
        BertTextEncoder("bert-base-uncased")
    assert calls == [True, False]


def test_trainable_batch_norm_survives_one_image_with_a_one_cell_map() -> None:
    """Image-grouped batches can hold one image (its questions fill the batch), and a small
    image reaches layer4 as one cell: one value per channel, where nn.BatchNorm2d raises."""
    encoder = ResNetEncoder("resnet18", stages=["layer4"], bn="train").train()
    image = torch.randn(1, 3, 32, 32, requires_grad=True)
    (stage,) = encoder(image).values()
    assert stage.shape == (1, 512, 1, 1)
    assert torch.isfinite(stage).all()
    stage.sum().backward()
    assert image.grad is not None and torch.isfinite(image.grad).all()
