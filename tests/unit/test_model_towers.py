"""Towers on a tiny randomly initialised BERT (built here, no download) and once on the real MiniLM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from models.encoder import BaseEncoder, packaged_minilm_path
from models.events import Event, Item
from models.finetune import FineTunedModel
from models.losses import bpr, info_nce, sampled_softmax
from models.registry import build_model
from models.replay import ReplayBuffer
from models.towers import AdapterTower, LoRALinear, TopLayersTower, find_layers, sample_live_rows
from tests.fakes import HashEncoder

TEXTS = ["a rocket to the moon", "fresh pasta with basil", "the striker scored a late goal", "piano"]


@pytest.fixture(scope="module")
def tiny() -> BaseEncoder:
    torch.manual_seed(0)
    # The packaged tokenizer is local files; only its vocabulary size matters to the tiny model.
    tok = AutoTokenizer.from_pretrained(str(packaged_minilm_path()))
    config = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BaseEncoder(model=BertModel(config), tokenizer=tok, device="cpu")


def items(n: int = 12) -> list[Item]:
    return [
        Item(str(i), f"{TEXTS[i % len(TEXTS)]} number {i}", {"genre": ["x", "y"][i % 2]}) for i in range(n)
    ]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_layers_on_cached_lower_states_reproduce_the_base(tiny: BaseEncoder, k: int) -> None:
    tower = TopLayersTower(tiny, k=k, dropout=0.0).eval()
    with torch.no_grad():
        out = tower.run_top(tower.lower(TEXTS)).numpy()
    np.testing.assert_allclose(out, tiny.encode(TEXTS), atol=1e-5)
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    # The top layers and the residual adapter over their pooled output.
    assert any(n.startswith("top.") for n in trainable)
    assert all(n.startswith(("top.", "down.", "up.")) for n in trainable)
    assert len(tower.top) == k


def test_lora_starts_as_the_base_and_trains_only_adapters(tiny: BaseEncoder) -> None:
    tower = TopLayersTower(tiny, k=2, lora_rank=4, dropout=0.0).eval()
    with torch.no_grad():
        out = tower.run_top(tower.lower(TEXTS)).numpy()
    np.testing.assert_allclose(out, tiny.encode(TEXTS), atol=1e-5)
    trainable = [n for n, p in tower.named_parameters() if p.requires_grad]
    in_layers = [n for n in trainable if n.startswith("top.")]
    assert in_layers and all("lora_" in n for n in in_layers)
    assert all(n.startswith(("top.", "down.", "up.")) for n in trainable)
    assert any(isinstance(m, LoRALinear) for m in tower.modules())
    # The encoder's own model is untouched (it still makes the cached base encodings).
    assert not any(isinstance(m, LoRALinear) for m in tiny.model.modules())


def test_top_layers_start_as_the_adapter_and_cache_the_layers_outputs(tiny: BaseEncoder) -> None:
    """Untrained, the tower gives the base encodings (as the adapter does); afterwards the
    layers run only for `live` rows, whose outputs are written into the cache, and `refresh`
    brings every row up to date."""
    m = build_model("top_layers:1", tiny, dim=8, seed=0)
    m.upsert_items(items(6))
    tower = m.net.tower
    assert isinstance(tower, TopLayersTower)
    tower.eval()
    rows = torch.arange(6)
    np.testing.assert_allclose(tower(rows).detach().numpy(), m.catalog.encodings, atol=1e-5)
    with torch.no_grad():
        for p in tower.top.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fresh = tower.run_top([tower._states[r] for r in range(6)]).detach()
    out = tower(rows, live={1: 1.0, 4: 1.0}).detach()
    np.testing.assert_allclose(out[[1, 4]].numpy(), fresh[[1, 4]].numpy(), atol=1e-5)
    stale = out[[0, 2, 3, 5]].numpy()
    np.testing.assert_allclose(stale, m.catalog.encodings[[0, 2, 3, 5]], atol=1e-5)
    np.testing.assert_allclose(tower(rows)[[1, 4]].detach().numpy(), fresh[[1, 4]].numpy(), atol=1e-5)
    tower.refresh()
    np.testing.assert_allclose(tower(rows).detach().numpy(), fresh.numpy(), atol=1e-5)


def test_live_rows_are_a_weighted_stratified_sample() -> None:
    """Half the budget from the targets, half from the other candidates; each stratum's
    weights add up to its size, so the layers' gradient stays unbiased."""
    rng = np.random.default_rng(0)
    cand = list(range(100))
    live = sample_live_rows([3, 5, 7], cand, 8, rng)
    assert len(live) == 8 and all(live[r] == 1.0 for r in (3, 5, 7))
    assert sum(w for r, w in live.items() if r not in (3, 5, 7)) == pytest.approx(97)
    live = sample_live_rows(list(range(40)), cand, 16, rng)
    assert len(live) == 16
    assert sum(w for r, w in live.items() if r < 40) == pytest.approx(40)
    assert sum(w for r, w in live.items() if r >= 40) == pytest.approx(60)
    # Few candidates: every row, weight 1.
    assert sample_live_rows([0], [0, 1, 2], 16, rng) == {0: 1.0, 1: 1.0, 2: 1.0}


def test_cached_layers_run_without_dropout_and_learn_slowly(tiny: BaseEncoder) -> None:
    m = build_model("top_layers:1", tiny, dim=8, seed=0, lr=0.01, layer_lr_multiplier=0.05)
    m.net.train()
    assert not m.net.tower.top.training and m.net.tower.training
    rates = {id(p): g["lr"] for g in m.trainer.optimizer.param_groups for p in g["params"]}
    assert all(rates[id(p)] == pytest.approx(5e-4) for p in m.net.tower.top.parameters())
    assert rates[id(m.net.tower.up.weight)] == pytest.approx(0.01)
    lora = build_model("lora:2", tiny, dim=8, seed=0, lr=0.01, lora_lr_multiplier=0.5)
    trained = [p for p in lora.net.tower.top.parameters() if p.requires_grad]
    rates = {id(p): g["lr"] for g in lora.trainer.optimizer.param_groups for p in g["params"]}
    assert trained and all(rates[id(p)] == pytest.approx(5e-3) for p in trained)


def test_adapter_starts_as_identity() -> None:
    enc = HashEncoder(16)
    tower = AdapterTower(enc, hidden=8).eval()
    np.testing.assert_allclose(tower.encode_texts(TEXTS).detach().numpy(), enc.encode(TEXTS), atol=1e-6)


def test_adapter_folded_into_the_projection_equals_projecting_its_output() -> None:
    """`projected` multiplies the up-projection into P; it must stay P(tower(rows)), with the
    same gradients, for the whole catalog in order and for a subset of rows."""
    from models.catalog import Catalog

    torch.manual_seed(0)
    enc = HashEncoder(16)
    catalog = Catalog(enc)
    catalog.upsert(items())
    tower = AdapterTower(enc, hidden=8).eval()
    tower.sync(catalog, range(len(catalog)))
    torch.nn.init.normal_(tower.up.weight)  # the adapter starts as the identity: move it
    proj = torch.nn.Linear(16, 4, bias=False)
    for rows in (torch.arange(len(catalog)), torch.tensor([5, 0, 3])):
        folded = tower.projected(proj, rows)
        plain = proj(tower(rows))
        torch.testing.assert_close(folded, plain)
        params = [proj.weight, tower.up.weight, tower.down.weight]
        g_folded = torch.autograd.grad(folded.square().sum(), params)
        g_plain = torch.autograd.grad(plain.square().sum(), params)
        for a, b in zip(g_folded, g_plain, strict=True):
            torch.testing.assert_close(a, b)


def test_top_layers_folded_projection_runs_the_live_rows_through_the_layers(tiny: BaseEncoder) -> None:
    """The fold must keep what `TopLayersTower` puts in front of the adapter: the `live` rows
    run through the trained layers, which get their gradient through `projected` as through
    `forward`."""
    m = build_model("top_layers:1", tiny, dim=8, seed=0, dropout=0.0)
    m.upsert_items(items(6))
    tower, proj = m.net.tower, m.net.proj
    with torch.no_grad():
        for p in tower.top.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows, live = torch.arange(6), {1: 1.0, 4: 1.0}
    folded = tower.projected(proj, rows, live)
    folded.square().sum().backward()
    assert any(p.grad is not None for p in tower.top.parameters())
    torch.testing.assert_close(folded, proj(tower(rows, live)), atol=1e-5, rtol=1e-5)


def test_packed_dropout_drops_p_scales_the_rest_and_follows_the_seed() -> None:
    from models.dropout import PackedDropout

    drop = PackedDropout(0.1)
    x = torch.ones(400, 500, requires_grad=True)
    torch.manual_seed(3)
    y = drop(x)
    assert abs(float((y == 0).float().mean()) - 0.1) < 0.005
    assert torch.allclose(y[y != 0], torch.tensor(1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(x·mask/(1-p))/dx = mask/(1-p)
    torch.manual_seed(3)
    assert torch.equal(drop(x), y.detach())  # reproducible from torch's seed
    odd = torch.ones(7, 3)  # an element count that is no multiple of four
    assert drop(odd).shape == (7, 3)
    assert torch.equal(drop.eval()(x), x)
    with pytest.raises(ValueError, match="dropout probability"):
        PackedDropout(1.0)


def test_find_layers_and_bad_k(tiny: BaseEncoder) -> None:
    assert len(find_layers(tiny.model)) == 3
    with pytest.raises(ValueError, match="k must be between 1 and 3"):
        TopLayersTower(tiny, k=4)
    with pytest.raises(ValueError, match="transformers base"):
        TopLayersTower(HashEncoder(8), k=1)
    with pytest.raises(ValueError, match="whole number"):
        build_model("top_layers:x", tiny)


@pytest.mark.parametrize("spec", ["top_layers:1", "lora:2", "adapter"])
def test_every_strategy_learns_end_to_end(tiny: BaseEncoder, spec: str) -> None:
    m = build_model(
        spec,
        tiny,
        dim=8,
        history=4,
        tower_items_per_step=3,
        seed=0,
        publish_every_steps=1,
        events_per_step=13,
    )
    assert isinstance(m, FineTunedModel) and m.spec == spec
    m.upsert_items(items())
    before = m.item_matrix().copy()
    events = [Event(f"e{i}", f"u{i % 3}", float(i), "click", item_id=str(i % 12)) for i in range(24)]
    events.append(Event("q", "u0", 30.0, "search", query="moon rocket", clicked_item_id="0"))
    events.append(Event("q2", "u1", 31.0, "search", query="goal", clicked_item_id="2"))
    losses = [m.learn(events[i : i + 13]).loss for i in range(0, len(events), 13)]
    assert all(np.isfinite(x) for x in losses if x is not None)
    assert not np.allclose(before, m.item_matrix())
    assert m.predict("u0").shape == (12,)
    tuned = [n for n, p in m.net.tower.named_parameters() if p.requires_grad and p.grad is not None]
    if spec != "adapter":
        assert tuned, "the tower's trainable parameters got no gradient"


def test_losses() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 5.0, 0.0]])
    target = torch.tensor([0, 0])
    mask = torch.tensor([[False, True, False], [False, True, False]])
    # Masking the strong wrong candidate of row 2 lowers the loss; the target is never masked.
    assert sampled_softmax(logits, target, mask) < sampled_softmax(logits, target)
    assert sampled_softmax(logits, target, torch.ones(2, 3, dtype=torch.bool)) < 1e-6
    assert bpr(torch.tensor([3.0]), torch.tensor([[0.0, -1.0]])) < bpr(
        torch.tensor([0.0]), torch.tensor([[0.0, -1.0]])
    )
    q = torch.eye(3)
    assert info_nce(q, q) < info_nce(q, q.flip(0))


def test_replay_buffer_keeps_the_newest() -> None:
    buf: ReplayBuffer[int] = ReplayBuffer(5, seed=1)
    buf.extend(range(12))
    assert len(buf) == 5 and set(buf.sample(10)) == {7, 8, 9, 10, 11}
    assert ReplayBuffer(0).sample(3) == []


@pytest.mark.slow
def test_real_packaged_minilm_top_layer_matches_and_trains() -> None:
    enc = BaseEncoder(device="cpu")
    tower = TopLayersTower(enc, k=1, dropout=0.0).eval()
    with torch.no_grad():
        out = tower.run_top(tower.lower(TEXTS)).numpy()
    np.testing.assert_allclose(out, enc.encode(TEXTS), atol=1e-4)
    m = build_model("top_layers:1", enc, seed=0, events_per_step=6)
    m.upsert_items(items(8))
    assert m.item_matrix().shape == (8, 65)
    r = m.learn([Event(f"e{i}", "u", float(i), "click", item_id=str(i)) for i in range(6)])
    assert r.loss is not None and np.isfinite(r.loss)
