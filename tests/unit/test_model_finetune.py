"""The fine-tuned interest model on fakes and tiny random transformers (no download, fast)."""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import replace

import numpy as np
import pytest
import torch

from models.core import InterestModel
from models.events import Event, Item, UserProfile
from models.finetune import FineTunedModel, profile_text
from models.finetune.versions import version_id
from models.registry import available, build_model
from tests.fakes import HashEncoder

WORDS = ["space", "rocket", "pasta", "soup", "goal", "league", "piano", "guitar", "roses", "soil"]


def catalog(n: int = 40, seed: int = 0) -> list[Item]:
    rng = np.random.default_rng(seed)
    return [Item(str(i), f"item {i} {' '.join(rng.choice(WORDS, 2))}") for i in range(n)]


def walk_events(n_items: int, n_users: int, steps: int, seed: int = 0) -> list[Event]:
    """Every user walks item i -> i+1 (a learnable sequential pattern), users interleaved in time."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(n_items, size=n_users)
    out, t = [], 1_000_000.0
    for k in range(steps):
        for u in range(n_users):
            t += 7.0
            item = str((int(starts[u]) + k) % n_items)
            out.append(Event(f"e{u}-{k}", f"u{u}", t, "click", item_id=item))
    return out


def model(**kw: object) -> FineTunedModel:
    # A version per batch (DP too): these tests look at what learning does to the published vectors.
    opts = {
        "dim": 16,
        "history": 8,
        "seed": 0,
        "publish_every_steps": 1,
        "dp_publish_every_steps": 1,
        "events_per_step": 1,
        **kw,
    }
    m = FineTunedModel(HashEncoder(24), "adapter", **opts)
    m.upsert_items(catalog())
    return m


def test_registry_knows_the_strategies() -> None:
    assert {"adapter", "top_layers", "lora", "decayed_mean"} <= set(available())
    m = build_model("adapter", HashEncoder(16), dim=8, half_life_s=3600.0, rating_max=5.0)
    assert isinstance(m, InterestModel) and m.name == "adapter"


def test_unknown_option_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown model option"):
        FineTunedModel(HashEncoder(8), "adapter", learning_rate=1.0)


def test_option_overrides_are_parsed_per_label_and_checked() -> None:
    from models.finetune.options import parse_overrides

    labels = ["lora:8", "adapter@p10", "adapter"]
    got = parse_overrides(
        ["lora:8:lr=0.001", "adapter@p10:publish_every_steps=10", "adapter@p10:dim=null"], labels
    )
    assert got == {"lora:8": {"lr": 0.001}, "adapter@p10": {"publish_every_steps": 10, "dim": None}}
    for bad, why in (
        ("adapter:learning_rate=1", "not a model option"),
        ("adapter:lr", "expected LABEL:FIELD=JSON"),
        ("adapter:lr=fast", "not JSON"),
        ("adapter@p3:lr=0.1", "not a fine-tuned model of --models"),
        ("adapter:id_dropout=1.5", "id_dropout must be in"),
    ):
        with pytest.raises(ValueError, match=why):
            parse_overrides([bad], labels)


def test_id_dropout_hides_the_id_parts_of_the_dropped_rows_from_a_step() -> None:
    """At 1.0 every row is dropped in training: the id residuals and biases never get a gradient
    (text and popularity still learn); at 0 they do. Serving is never dropped."""
    for p, moved in ((1.0, False), (0.0, True)):
        m = model(id_dropout=p, id_evidence_events=0.0, weight_decay=0.0)
        proj = m.net.proj.weight.detach().clone()
        m.learn(walk_events(40, 6, 4))
        ids_moved = bool(m.net.item_emb.detach().abs().sum() > 0 or m.net.item_bias.detach().abs().sum() > 0)
        assert ids_moved is moved, p
        assert not torch.equal(m.net.proj.weight.detach(), proj)


def test_cooccurrence_features_enter_item_vectors_and_replays_are_scored_without_them() -> None:
    """Co-occurrence factors are refitted at each publish and reach the item vectors through a
    map learned from zero; a replayed target (whose own event is in the counts) is scored
    with the factors left out, history and candidates alike."""
    m = model(cooc_rank=4, replay_per_step=8)
    # Per user pass: were its targets replayed, the item vectors its history read, and the
    # co-occurrence part of those vectors at the time.
    calls: list[tuple[bool, torch.Tensor, torch.Tensor]] = []
    original = m.trainer._states_of

    def spy(episodes: list, targets: list, vec: torch.Tensor, col: dict[int, int]) -> torch.Tensor:
        kinds = {t.replayed for _, t in targets}
        assert len(kinds) == 1  # fresh and replayed targets never share a pass
        part = m.cooc_part(torch.tensor(sorted(col, key=col.__getitem__)))
        assert part is not None
        calls.append((kinds.pop(), vec.detach().clone(), part.detach().clone()))
        return original(episodes, targets, vec, col)

    m.trainer._states_of = spy  # type: ignore[method-assign]
    events = walk_events(40, 6, 6)
    for b in range(0, len(events), 6):
        m.learn(events[b : b + 6])
    assert m.cooc is not None and m.cooc.refits > 0
    assert np.any(m.cooc.features)
    assert m.net.cooc is not None and m.net.cooc.weight.detach().abs().sum() > 0
    # In a step with both, the replayed targets' pass reads the vectors less exactly the
    # co-occurrence part (non-zero once the map moved off zero); the fresh ones keep it.
    pairs = [(a, b) for a, b in itertools.pairwise(calls) if not a[0] and b[0]]
    assert pairs
    (_, fresh, part), (_, blind, _) = pairs[-1]
    assert part.abs().sum() > 0
    np.testing.assert_allclose((fresh - blind).numpy(), part.numpy(), atol=1e-6)
    vec = m.user_vector("u0")
    assert vec is not None
    np.testing.assert_allclose(m.predict("u0"), m.item_matrix() @ vec, rtol=1e-5)
    for bad in (-1, 2.5, "x"):
        with pytest.raises(ValueError, match="cooc_rank"):
            model(cooc_rank=bad)
    with pytest.raises(ValueError, match="privacy"):
        model(cooc_rank=4, dp_noise_multiplier=1.0)
    # Unset: on at rank 32, off under DP.
    default = model()
    assert default.cooc is not None and default.cooc.rank == 32 and default.config()["cooc_rank"] == 32
    assert model(dp_noise_multiplier=1.0).cooc is None
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="cooc_checkpoint_every"):
            model(cooc_checkpoint_every=bad)


def learn_and_record_publishes(m: FineTunedModel) -> dict[str, tuple[bytes, str | None, np.ndarray]]:
    """Learn a walk in batches of 6; each published version's weights, base and counts then."""
    published: dict[str, tuple[bytes, str | None, np.ndarray]] = {}
    events = walk_events(40, 6, 8)
    for b in range(0, len(events), 6):
        snap = m.learn(events[b : b + 6]).snapshot
        if snap is not None and snap.weights is not None:
            assert m.cooc is not None
            m.cooc.counts.flush()
            published[snap.version] = (snap.weights, snap.weights_base, np.array(m.cooc.counts.matrix))
    return published


def test_cooccurrence_counts_travel_with_the_weights() -> None:
    """A restart goes on counting from the published version: every few versions' weights carry
    all the counts, the others the pairs since and the version that has them (`weights_base`)."""
    a = model(cooc_rank=4, cooc_checkpoint_every=3)
    # The version a worker registers before its first publish (`ensure_published`): a checkpoint,
    # its snapshot the very bytes its id digests (a worker that stopped before publishing again
    # once wrote a blob naming itself as its checkpoint, and the next start failed to load it).
    first = a.snapshot()
    assert first.weights is not None and first.weights_base is None
    assert version_id(a.spec, first.weights, a.encoder.version) == first.version
    published = learn_and_record_publishes(a)
    snap = a.snapshot()
    assert snap.weights is not None and version_id(a.spec, snap.weights, a.encoder.version) == snap.version
    checkpoints = [v for v, (_, base, _) in published.items() if base is None]
    deltas = [v for v, (_, base, _) in published.items() if base is not None]
    assert checkpoints and deltas
    weights_of = {v: w for v, (w, _, _) in published.items()}.get
    for version in (checkpoints[-1], deltas[-1]):
        blob, base, counts = published[version]
        assert counts.sum() > 0
        b = model(cooc_rank=4, cooc_checkpoint_every=3)
        b.load_weights(blob, weights_of)
        assert b.model_version == version  # the same bytes again: the worker reports the version it loaded
        assert b.cooc is not None
        np.testing.assert_array_equal(b.cooc.counts.matrix, counts)
        assert b.weights_base() == (base or version)  # a snapshot of it now adds to its checkpoint
    # The checkpoint gone (or a caller that will not train, like `istream explain`): the pairs since.
    blob, base, counts = published[deltas[-1]]
    c = model(cooc_rank=4, cooc_checkpoint_every=3)
    c.load_weights(blob, lambda v: None)
    assert c.cooc is not None and 0 < c.cooc.counts.matrix.sum() < counts.sum()
    # A base that holds no counts (not a checkpoint): the same, with a warning, never a crash.
    d = model(cooc_rank=4, cooc_checkpoint_every=3)
    d.load_weights(blob, lambda v: blob)
    assert d.cooc is not None and d.cooc.counts.matrix.sum() == c.cooc.counts.matrix.sum()
    np.testing.assert_allclose(c.item_matrix(), b.item_matrix(), rtol=1e-5, atol=1e-6)  # factors came along
    # Weights of another rank, or without the factors, or with them into a model without:
    # loaded, the factors starting afresh (a changed ISTREAM_MODEL_COOC_RANK is no crash).
    for opts, src in (
        ({"cooc_rank": 2}, blob),
        ({"cooc_rank": 0}, blob),
        ({"cooc_rank": 4}, model(cooc_rank=0).weights()),
    ):
        other = model(**opts)
        other.load_weights(src, weights_of)
        assert other.cooc is None or not np.any(other.cooc.counts.matrix)
    # A scale-out follower serves the factors and fetches no checkpoint (one per adopted version).
    asked: list[str] = []
    f = model(cooc_rank=4, cooc_checkpoint_every=3)
    f.train_shared = False
    f.load_weights(blob, lambda v: asked.append(v))
    assert not asked
    np.testing.assert_allclose(f.item_matrix(), b.item_matrix(), rtol=1e-5, atol=1e-6)


def test_cooccurrence_counts_are_bounded_and_a_restart_prunes_alike() -> None:
    """`cooc_max_pairs`: each checkpoint's counts keep at most that many pairs, and a worker
    restored from a later version (the checkpoint plus the pairs since) counts what the
    publisher counts, pair for pair."""
    a = model(cooc_rank=4, cooc_checkpoint_every=2, cooc_max_pairs=20)
    published = learn_and_record_publishes(a)
    for _, base, counts in published.values():
        if base is None:
            assert np.count_nonzero(np.triu(counts, 1)) <= 20
    assert any(np.count_nonzero(np.triu(c, 1)) > 20 for _, base, c in published.values() if base)
    version = next(v for v, (_, base, _) in reversed(published.items()) if base is not None)
    blob, _, counts = published[version]
    b = model(cooc_rank=4, cooc_checkpoint_every=2, cooc_max_pairs=20)
    b.load_weights(blob, {v: w for v, (w, _, _) in published.items()}.get)
    assert b.cooc is not None
    np.testing.assert_array_equal(b.cooc.counts.matrix, counts)
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match="cooc_max_pairs"):
            model(cooc_max_pairs=bad)


def test_scores_are_the_published_inner_product() -> None:
    m = model()
    m.learn(walk_events(40, 6, 3))
    for user in ("u0", "u3"):
        vec = m.user_vector(user)
        assert vec is not None and vec.shape == (m.dim,) and vec[-1] == 1.0
        np.testing.assert_allclose(m.predict(user), m.item_matrix() @ vec, rtol=1e-5)
    assert m.item_matrix().shape == (40, m.dim)


@pytest.mark.parametrize("blocks", [0, 2])
def test_learns_a_sequential_pattern(blocks: int) -> None:
    """After some batches the next item of the walk ranks near the top (chance: rank ~20 of 40)."""
    m = model(lr=0.01, dim=24, events_per_step=10, blocks=blocks)
    events = walk_events(40, 30, 12)
    ranks = []
    for b in range(0, len(events), 30):
        batch = events[b : b + 30]
        if b >= len(events) // 2:
            for e in batch:
                state = m.users[e.user_id]
                scores = m.predict(e.user_id).copy()
                seen = [m.catalog.index[i] for i in state.seen]
                scores[seen] = -np.inf
                target = scores[m.catalog.index[e.item_id]]
                ranks.append(int((scores > target).sum()) + 1)
        m.learn(batch)
    # Chance: the next item ranks ~17th among the ~34 unseen items.
    assert np.mean(ranks) < 10 and np.mean(np.asarray(ranks) <= 3) > 0.3, np.mean(ranks)


def test_snapshots_every_n_steps_with_weights_and_items() -> None:
    m = model(publish_every_steps=2, events_per_step=10)
    first = m.model_version
    events = walk_events(40, 5, 4)
    r1 = m.learn(events[:10])
    assert r1.snapshot is None and r1.model_version == first
    r2 = m.learn(events[10:20])
    snap = r2.snapshot
    assert snap is not None and snap.version == m.model_version != first
    assert snap.parent == first and snap.weights and len(snap.item_ids) == 40
    assert snap.item_vectors.shape == (40, m.dim)
    assert r2.model_version == snap.version
    assert all(u.vector.shape == (m.dim,) for u in r2.updates.values())


def test_between_publishes_user_vectors_use_the_published_weights() -> None:
    """A vector names a model version: it must come from that version's weights, not the live ones."""
    events = walk_events(40, 5, 4)
    trained = model(publish_every_steps=100, publish_every_s=1e9, lr=0.05)
    frozen = model(lr=0.0)  # publishes every batch, but its weights never move
    first = trained.model_version
    trained.learn(events[:10])
    frozen.learn(events[:10])
    r = trained.learn(events[10:])
    frozen.learn(events[10:])
    assert r.model_version == first and r.snapshot is None
    live = {n: p for n, p in trained.net.named_parameters() if n in trained.versions.serving}
    assert any(not torch.equal(p, trained.versions.serving[n]) for n, p in live.items())  # training moved on
    for user in ("u0", "u2", "u4"):
        np.testing.assert_allclose(trained.user_vector(user), frozen.user_vector(user), rtol=1e-5, atol=1e-6)
    # Item vectors too (the bias column also holds popularity counts, which move with every batch).
    np.testing.assert_allclose(trained.item_matrix()[:, :-1], frozen.item_matrix()[:, :-1], rtol=1e-5)


def test_user_state_round_trips_through_json() -> None:
    a = model()
    a.learn(walk_events(40, 4, 5))
    blob = a.weights()
    state = json.loads(json.dumps(a.get_user_state("u1")))
    b = model()
    b.load_weights(blob)
    b.set_user_state("u1", state)
    np.testing.assert_allclose(b.user_vector("u1"), a.user_vector("u1"), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b.item_matrix(), a.item_matrix(), rtol=1e-4, atol=1e-5)
    b.forget_user("u1")
    assert b.user_vector("u1") is None and b.get_user_state("u1") is None


def test_cold_start_says_which_prior_applied() -> None:
    m = model()
    m.set_profiles([UserProfile("p", {"age": 34, "occupation": "engineer"})])
    events = [
        Event("s1", "searcher", 10.0, "search", query="rocket space", clicked_item_id="3"),
        Event("p1", "p", 11.0, "click", item_id="4"),
        Event("n1", "nobody", 12.0, "click", item_id="5"),
        Event("n2", "nobody", 13.0, "click", item_id="6"),
    ]
    result = m.learn(events)
    assert result.updates["searcher"].cold_start == "search"
    assert result.updates["p"].cold_start == "profile"
    assert result.updates["nobody"].cold_start == "popularity"
    assert m.learn([Event("n3", "nobody", 14.0, "click", item_id="7")]).updates["nobody"].cold_start is None
    # A user the model never saw is ranked by the popularity prior: the bias column alone.
    np.testing.assert_allclose(m.predict("stranger"), m.item_matrix()[:, -1], rtol=1e-6)
    assert profile_text({"age": 34, "gender": "F"}) == "user | age: 30s | gender: F"


def test_clicks_with_impressions_searches_and_ratings_all_train() -> None:
    m = model(rating_weight=1.0, search_weight=1.0, hard_negative_weight=1.0, budget_unit="events")
    events = [
        Event("c1", "a", 1.0, "click", item_id="1", impressions=("2", "3", "unknown")),
        Event("s1", "a", 2.0, "search", query="pasta soup", clicked_item_id="4"),
        Event("s2", "b", 2.5, "search", query="goal league", clicked_item_id="5"),
        Event("s3", "b", 2.6, "search", query="no click here"),
        Event("r1", "b", 3.0, "rating", item_id="6", rating=2.0),
        Event("r2", "a", 4.0, "rating", item_id="7", rating=5.0),
        Event("x1", "a", 5.0, "click", item_id="not-in-catalog"),
    ]
    before = {k: v.detach().clone() for k, v in m.net.state_dict().items()}
    r = m.learn(events)
    assert r.loss is not None and np.isfinite(r.loss)
    assert set(r.updates) == {"a", "b"} and r.updates["a"].n_applied == 4
    changed = [k for k, v in m.net.state_dict().items() if not torch.equal(v, before[k])]
    assert "rating_bias" in changed and "w_short.weight" in changed and "w_text" in changed
    # An item's own row learns once the item has evidence (counts from the batch before).
    assert "item_emb" not in changed
    m.learn([replace(e, event_id=e.event_id + "'", ts=e.ts + 10) for e in events])
    assert not torch.equal(m.net.item_emb.detach()[: len(before["item_emb"])], before["item_emb"])
    assert m.predict_rating("b", "6") is not None and m.predict_rating("b", "nope") is None
    kinds = {e["kind"] for e in m.explain("a", top=20)}
    assert {"search", "click", "rating", "long_term"} <= kinds


def test_other_modality_embeddings_are_fused(caplog: pytest.LogCaptureFixture) -> None:
    m = model()
    plain = m.item_matrix()[0].copy()
    m.upsert_items([Item("0", catalog()[0].text, embedding=(1.0, 0.0, 0.5, 0.2))])
    assert m.net.fuse is not None and m.net.fuse.in_features == 4
    assert not np.allclose(m.item_matrix()[0], plain)
    with caplog.at_level(logging.WARNING):
        m.upsert_items([Item("1", "odd one", embedding=(1.0, 2.0))])
    assert "embedding has 2 dimensions" in caplog.text
    r = m.learn([Event("e", "u", 1.0, "click", item_id="0"), Event("f", "u", 2.0, "click", item_id="1")])
    assert r.loss is not None and m.net.fuse.weight.grad is not None


def test_new_items_enter_with_zero_residual_and_are_rankable() -> None:
    m = model()
    m.learn(walk_events(40, 4, 3))
    m.upsert_items([Item("new", "rocket space piano")])
    assert m.item_ids()[-1] == "new" and m.item_matrix().shape[0] == 41
    assert float(m.net.item_emb[-1].detach().abs().sum()) == 0.0
    assert m.predict("u0").shape == (41,)
    m.learn([Event("z", "u0", 2e6, "click", item_id="new")])


def test_rollback_restores_the_last_good_weights() -> None:
    m = model(rollback_window=10, rollback_patience=2, rollback_threshold=0.5)
    good = {k: v.clone() for k, v in m.net.state_dict().items()}
    for _ in range(10):
        m.trainer.check_rollback(1.0)
    with torch.no_grad():
        m.net.item_emb.add_(1.0)  # training went somewhere bad
    m.trainer.check_rollback(5.0)
    assert m.trainer.rollbacks == 0
    m.trainer.check_rollback(5.0)
    assert m.trainer.rollbacks == 1
    torch.testing.assert_close(m.net.item_emb.detach(), good["item_emb"])


def test_explain_shares_add_up() -> None:
    m = model()
    m.set_profiles([UserProfile("u2", {"occupation": "writer"})])
    m.learn(walk_events(40, 4, 6))
    parts = m.explain("u2", top=100)
    assert parts[0]["weight"] >= parts[1]["weight"] or abs(parts[0]["weight"]) >= abs(parts[1]["weight"])
    assert sum(p["weight"] for p in parts) == pytest.approx(1.0, abs=1e-3)
    assert m.explain("nobody") == []


def test_same_seed_same_numbers() -> None:
    events = walk_events(40, 5, 4)
    a, b = model(seed=3, deterministic=True), model(seed=3, deterministic=True)
    for m in (a, b):
        for i in range(0, len(events), 5):
            m.learn(events[i : i + 5])
    np.testing.assert_array_equal(a.item_matrix(), b.item_matrix())
    np.testing.assert_array_equal(a.user_vector("u4"), b.user_vector("u4"))
    assert a.model_version == b.model_version


def test_sampled_negatives_for_large_catalogs() -> None:
    m = model(full_softmax_max=10, random_negatives=8)
    r = m.learn(
        [
            Event("a", "u", 1.0, "click", item_id="1", impressions=("2",)),
            Event("b", "u", 2.0, "click", item_id="9"),
        ]
    )
    assert r.loss is not None and np.isfinite(r.loss)
    m2 = model(loss="bpr")
    assert np.isfinite(m2.learn(walk_events(40, 3, 3)).loss)


def test_events_before_their_items_arrive() -> None:
    """A worker can see events before the catalog records they name (topics are read in parallel)."""
    m = FineTunedModel(HashEncoder(24), "adapter", dim=8, history=4, events_per_step=1)
    r = m.learn([Event("a", "u", 1.0, "click", item_id="1"), Event("b", "u", 2.0, "click", item_id="2")])
    assert r.updates["u"].vector.shape == (9,)
    m.upsert_items(catalog(5))
    r = m.learn([Event("c", "u", 3.0, "click", item_id="3")])
    assert r.loss is not None and np.isfinite(r.loss)
    assert {e["item_id"] for e in m.explain("u", top=5) if e.get("item_id")} == {"1", "2", "3"}


def test_user_state_checkpoint_is_compact_and_reads_the_first_layout() -> None:
    from models.user_state import UserState

    m = model(history=50)
    events = walk_events(40, 2, 60)
    events.append(Event("s1", "u0", events[-1].ts + 1, "search", query="moon rocket", clicked_item_id="3"))
    m.learn(events)
    state = m.users["u0"]
    doc = json.loads(json.dumps(m.get_user_state("u0")))
    back = UserState.from_json(doc, m.opts.history)
    assert list(back.recent) == list(state.recent) and back.seen == state.seen
    assert any(b.query == "moon rocket" for b in back.recent)
    np.testing.assert_array_equal(back.long_term, state.long_term)
    assert (back.n_events, back.last_ts, back.cold_start) == (state.n_events, state.last_ts, state.cold_start)
    # States checkpointed before the columnar layout still load.
    first = {
        "recent": [b.to_json() for b in state.recent],
        "long_term": doc["long_term"],
        "n_events": state.n_events,
        "last_ts": state.last_ts,
        "seen": sorted(state.seen),
    }
    old = UserState.from_json(first, m.opts.history)
    assert list(old.recent) == list(state.recent) and old.seen == state.seen
    assert len(json.dumps(doc)) < 0.8 * len(json.dumps(first))


def test_a_scale_out_follower_neither_trains_nor_publishes() -> None:
    m = model(publish_every_steps=1)
    m.train_shared = False
    before = {n: p.detach().clone() for n, p in m.net.named_parameters()}
    version = m.model_version
    r = m.learn(walk_events(40, 5, 4))
    assert r.snapshot is None and r.loss is None and r.model_version == version
    assert all(torch.equal(p, before[n]) for n, p in m.net.named_parameters())
    assert set(r.updates) == {f"u{i}" for i in range(5)}  # its users' vectors still move on


def test_popularity_counts_decay_per_event_in_one_batch_update() -> None:
    """The batch update (one decay per batch, each event pre-decayed by those after it) keeps
    the counts that decaying after every event gives, and events at one timestamp do not age
    each other."""
    m = model()
    m.upsert_items(catalog())
    events = walk_events(40, 6, 10)
    events = [replace(e, ts=float(k // 3)) for k, e in enumerate(events)]  # ties of three
    hl = np.asarray(m.opts.popularity_half_lives_events, dtype=np.float64)
    decay = 0.5 ** (1.0 / hl)
    expected = np.zeros_like(m.popularity.counts)
    pending: list[int] = []  # rows of the current timestamp, counted once it closes
    last = None
    for i in range(0, len(events), 7):
        batch = events[i : i + 7]
        m.popularity.update([e.ts for e in batch], [m.catalog.row(e.target_item) for e in batch])
        for e in batch:
            if last is not None and e.ts > last:
                for r in pending:
                    expected[r] += 1.0
                expected *= decay ** len(pending)
                pending = []
            pending.append(m.catalog.row(e.target_item))
            last = e.ts
        # The open timestamp's events count in full, undecayed.
        now = expected.copy()
        for r in pending:
            now[r] += 1.0
        np.testing.assert_allclose(m.popularity.counts, now, rtol=1e-12)


def test_returns_to_an_item_train_no_ranking_but_their_searches_do() -> None:
    m = model(events_per_step=1000)  # nothing trains yet: the targets wait in `pending`
    m.upsert_items(catalog())
    m.learn(
        [
            Event("c1", "a", 1.0, "click", item_id="1"),
            Event("s1", "a", 2.0, "search", query="pasta soup", clicked_item_id="1"),
            Event("c2", "a", 3.0, "click", item_id="2"),
        ]
    )
    targets = [t for ep in m.trainer.pending for t in ep.targets]
    assert [(t.row, t.positive, t.query) for t in targets] == [
        (m.catalog.row("1"), True, None),
        (m.catalog.row("1"), False, "pasta soup"),  # a return: no ranking, the search still trains
        (m.catalog.row("2"), True, None),
    ]


def test_hypergradient_rate_moves_within_its_range() -> None:
    m = model(lr_hypergradient=5.0, lr_hypergradient_range=(0.5, 2.0))
    m.upsert_items(catalog())
    events = walk_events(40, 8, 12)
    seen = set()
    for i in range(0, len(events), 9):
        m.learn(events[i : i + 9])
        seen.add(round(m.trainer._lr_mult, 6))
        assert 0.5 <= m.trainer._lr_mult <= 2.0
    assert len(seen) > 2  # it moved
    # Each step sets the optimiser's rate from the multiplier as it stands before the step.
    trainer = m.trainer
    set_to: list[tuple[float, float]] = []
    original = trainer._set_lr_multiplier

    def spy(mult: float) -> None:
        set_to.append((mult, trainer._lr_mult * trainer.drift.lr_multiplier))
        original(mult)

    trainer._set_lr_multiplier = spy  # type: ignore[method-assign]
    m.learn(walk_events(40, 8, 2, seed=1))
    assert set_to and all(a == pytest.approx(b) for a, b in set_to)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(m.opts.lr * set_to[-1][0], rel=1e-6)


def test_budget_counted_in_positives_pays_only_for_what_trains_ranking() -> None:
    m = model(events_per_step=2, budget_unit="positives")
    m.upsert_items(catalog())
    first = [Event("c1", "a", 1.0, "click", item_id="1"), Event("c2", "a", 2.0, "click", item_id="2")]
    m.learn(first)
    assert m.trainer.steps == 1  # two positives: one step
    returns = [Event(f"s{k}", "a", 3.0 + k, "search", query="pasta", clicked_item_id="1") for k in range(6)]
    m.learn(returns)
    assert m.trainer.steps == 1  # six events, no positive (all returns): no step
    m.learn([Event("c3", "a", 10.0, "click", item_id="3"), Event("c4", "a", 11.0, "click", item_id="4")])
    assert m.trainer.steps == 2


def test_an_unknown_budget_unit_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="budget_unit must be"):
        model(budget_unit="batches")


def test_lookahead_pairs_are_the_later_fresh_positives_within_k_behaviours() -> None:
    """The state that ranks a fresh positive also ranks the user's next positives until the
    vector is rewritten: pairs (that target, a later positive's item) within k behaviours, of
    the same episode only, never from or to a replayed or non-positive target."""
    from models.finetune.episodes import Target, lookahead_pairs

    targets = [
        (0, Target(pos=1, row=10, positive=True)),
        (0, Target(pos=2, row=11, positive=False)),  # a return or a low rating: trains no ranking
        (0, Target(pos=3, row=12, positive=True)),
        (0, Target(pos=6, row=13, positive=True)),
        (1, Target(pos=2, row=20, positive=True)),
        (1, Target(pos=3, row=21, positive=True, replayed=True)),
        (1, Target(pos=4, row=22, positive=True)),
    ]
    assert lookahead_pairs(targets, 2) == [(0, 12, 2), (4, 22, 6)]
    assert lookahead_pairs(targets, 3) == [(0, 12, 2), (2, 13, 3), (4, 22, 6)]
    assert lookahead_pairs(targets, 0) == []


def test_lookahead_losses_reach_the_interest_part_and_never_the_biases() -> None:
    """A later positive's cross-entropy from an earlier state moves the user and item vectors
    (the dot products), never the item biases: those are the prior a user without history is
    served, and stay learned from each event's own state."""
    from types import SimpleNamespace

    from models.finetune.episodes import Target
    from models.finetune.options import FineTuneOptions
    from models.finetune.trainer import Trainer

    flat = [(0, Target(pos=1, row=0, positive=True)), (0, Target(pos=2, row=3, positive=True))]
    dots = torch.randn(2, 5, requires_grad=True)
    bias = torch.randn(5, requires_grad=True)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, 0] = True  # the second state had item 0
    stub = SimpleNamespace(opts=FineTuneOptions(lookahead_targets=2))
    out = Trainer._lookahead(stub, flat, [0, 1], dots + bias, bias, mask, None)  # type: ignore[arg-type]
    assert out is not None
    ce, owner = out
    assert owner.tolist() == [0]  # item 3 ranked from the first state too
    row = (dots + bias)[0].detach()
    expected = torch.logsumexp(row, 0) - row[3]
    assert float(ce[0].detach()) == pytest.approx(float(expected), rel=1e-5)  # the biases count, held fixed
    ce.sum().backward()
    assert bias.grad is None or not bias.grad.any()
    assert dots.grad is not None and dots.grad[0].abs().sum() > 0
    stub.opts = FineTuneOptions(lookahead_targets=0)
    assert Trainer._lookahead(stub, flat, [0, 1], dots + bias, bias, mask, None) is None  # type: ignore[arg-type]
