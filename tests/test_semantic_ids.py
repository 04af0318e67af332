from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import save_file

from leadre import semantic_ids as sids
from leadre.cli import main
from leadre.embed import MiniLMEncoder, ad_texts, embed_texts
from leadre.schema import DataError, read_data_dir
from leadre.sid import load_sid_table, parse
from leadre.split import leave_one_out
from tests.conftest import shared_dataset


class WordsEncoder:
    """A fast stand-in for MiniLM: hashed bag of words, so equal texts get equal vectors and shared words count."""

    name = "test-words"

    def __init__(self) -> None:
        self.calls = 0
        self.texts: list[str] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        self.texts += texts
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                out[i, zlib.crc32(word.encode()) % 64] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def blobs(n_per: int = 50, centers: int = 8, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((centers, dim)) * 10
    labels = np.repeat(np.arange(centers), n_per)
    return (mu[labels] + rng.standard_normal((len(labels), dim))).astype(np.float32), labels


@pytest.fixture()
def built(tiny_data_dir: Path, tmp_path: Path) -> tuple[Path, WordsEncoder]:
    """Text-only S-IDs, so that equal texts get equal codes."""
    encoder = WordsEncoder()
    sids.build_sids(tiny_data_dir, tmp_path / "sids", behaviour_weight=0.0, encoder=encoder,
                    cache_dir=tmp_path / "cache", progress=False)
    return tmp_path / "sids", encoder


# ------------------------------------------------------------------------------------------------ k-means and RQ

def test_effective_codes_adapts_to_small_catalogues() -> None:
    assert sids.effective_codes(128, 256) == 12
    assert sids.effective_codes(3883, 256) == 63
    assert sids.effective_codes(100_000, 256) == 256
    assert sids.effective_codes(1, 256) == 1
    assert sids.effective_codes(10_000, 32) == 32


def test_kmeans_recovers_clusters_deterministically() -> None:
    x, labels = blobs()
    c1, a1 = sids.kmeans(x, 8, seed=3)
    c2, a2 = sids.kmeans(x, 8, seed=3)
    assert np.array_equal(a1, a2) and np.array_equal(c1, c2)
    # each true blob maps to exactly one code and vice versa
    assert len(set(zip(labels, a1))) == 8 and len(set(a1)) == 8


def test_kmeans_handles_duplicates_and_bad_k() -> None:
    x = np.repeat(np.eye(3, dtype=np.float32), 10, axis=0)  # 3 distinct points, 30 rows
    centroids, assign = sids.kmeans(x, 5, seed=0)
    assert centroids.shape == (5, 3) and assign.min() >= 0 and assign.max() < 5
    assert len(set(assign)) == 3
    with pytest.raises(ValueError, match="k=40"):
        sids.kmeans(x, 40)


def test_kmeans_reseeds_empty_clusters() -> None:
    x, _ = blobs(centers=4)
    _, assign = sids.kmeans(x, 16, seed=1)
    assert len(set(assign)) == 16


def test_residual_kmeans_and_quantize_agree() -> None:
    x, _ = blobs(n_per=40, centers=10, dim=24)
    books, codes = sids.residual_kmeans(x, levels=3, k=12, seed=0)
    assert [c.shape for c, _ in books] == [(12, 24)] * 3 and codes.shape == (400, 3)
    assert all((parent == -1).all() for _, parent in books)  # one codebook shared per level
    assert np.array_equal(sids.quantize(x, books), codes)
    assert np.array_equal(sids.residual_kmeans(x, 3, 12, seed=0)[1], codes)
    assert not np.array_equal(sids.residual_kmeans(x, 3, 12, seed=1)[1], codes)


def test_tree_kmeans_splits_each_code_by_its_own_codebook() -> None:
    x, labels = blobs(n_per=30, centers=6, dim=16)
    books, codes = sids.tree_kmeans(x, levels=2, k=6, seed=0)
    (top, top_parent), (leaf, leaf_parent) = books
    assert top.shape == (6, 16) and (top_parent == -1).all()
    # every first-level code (a blob) gets min(k, members) = 6 children of its own
    assert np.array_equal(np.bincount(leaf_parent), [6] * 6) and leaf.shape == (36, 16)
    assert all(len(set(labels[codes[:, 0] == c])) == 1 for c in range(6))
    # a second-level code is an index among the parent's children, and frozen codebooks give the same codes back
    assert codes[:, 1].max() < 6 and np.array_equal(sids.quantize(x, books), codes)
    # clusters spread along different axes: one shared second-level codebook cannot fit them all, per-parent ones do
    rng = np.random.default_rng(0)
    spread = np.concatenate([20.0 * i * np.eye(16)[0] + np.outer(rng.standard_normal(50), np.eye(16)[i]) * 3
                             for i in range(1, 5)]).astype(np.float32)

    def distortion(quantizer) -> float:
        books, codes = quantizer(spread, levels=2, k=4, seed=0)
        approx, node = np.zeros_like(spread), np.zeros(len(spread), dtype=np.int64)
        for (centroids, parent), code in zip(books, codes.T):
            node = np.array([np.flatnonzero(parent == (-1 if (parent < 0).all() else n))[c] for n, c in zip(node, code)])
            approx += centroids[node]
        return float(((spread - approx) ** 2).sum())

    assert distortion(sids.tree_kmeans) < 0.5 * distortion(sids.residual_kmeans)
    # a parent with fewer members than k gets one child per member
    small, _ = sids.tree_kmeans(x[:9], levels=2, k=3, seed=0)
    assert len(small[1][0]) == sum(min(3, int(n)) for n in np.bincount(sids.quantize(x[:9], small)[:, 0]))


def test_quantize_refuses_a_codebook_without_children_for_a_code() -> None:
    x, _ = blobs(n_per=10, centers=3, dim=8)
    (top, top_parent), (leaf, leaf_parent) = sids.tree_kmeans(x, levels=2, k=3, seed=0)[0]
    orphaned = leaf_parent != 0
    with pytest.raises(ValueError, match="level 1 has no centroid under the level-0 code"):
        sids.quantize(x, [(top, top_parent), (leaf[orphaned], leaf_parent[orphaned])])


def test_separate_collisions_numbers_each_bucket_by_priority() -> None:
    prefix = np.array([[0, 1], [0, 1], [2, 2], [0, 1], [2, 2]])
    popularity = np.array([5, 9, 1, 5, 3])
    # bucket (0, 1): row 1 (9) first, then rows 0 and 3 (5 each) in row order; bucket (2, 2): row 4 (3) first.
    assert sids.separate_collisions(prefix, priority=popularity).tolist() == [1, 0, 1, 2, 0]


def test_separate_collisions_numbers_buckets_and_continues_after_taken() -> None:
    prefix = np.array([[0, 0], [0, 0], [1, 0], [0, 0], [1, 1]])
    assert sids.separate_collisions(prefix).tolist() == [0, 1, 0, 2, 0]
    taken = np.column_stack([prefix, sids.separate_collisions(prefix)])
    new = np.array([[0, 0], [2, 2], [1, 0], [2, 2]])
    assert sids.separate_collisions(new, taken).tolist() == [3, 0, 1, 1]


# ------------------------------------------------------------------------------------------------------- behaviour

def test_cooccurrence_embedding_groups_items_consumed_together() -> None:
    rng = np.random.default_rng(0)
    users, items = [], []
    for u in range(200):  # two tastes: items 0-4 and 5-9; item 10 never seen
        group = np.arange(5) + 5 * (u % 2)
        users += [u] * 8
        items += rng.choice(group, 8).tolist()
    emb = sids.cooccurrence_embedding(np.array(users), np.array(items), n_items=11, dim=4, window=3)
    assert emb.shape == (11, 4)
    assert np.allclose(emb[10], 0)
    assert np.allclose(np.linalg.norm(emb[:10], axis=1), 1, atol=1e-5)
    cos = emb @ emb.T
    assert cos[0, 1:5].min() > cos[0, 5:10].max()


def test_behaviour_uses_training_positives_only() -> None:
    ts = pd.Timestamp("2024-01-01", tz="UTC")
    rows = []
    for u in range(20):  # per user: x, y (training), then a (validation) and b (test)
        for i, item in enumerate(["x", "y", "a", "b"]):
            rows.append({"user_id": f"u{u}", "item_id": item, "item_type": "ad", "action": "click",
                         "ts": ts + pd.Timedelta(minutes=i)})
    split = leave_one_out(pd.DataFrame(rows), ["click"])
    vectors = sids.behaviour_vectors(split.train_targets(), pd.Index(["x", "y", "a", "b"]), dim=2, window=5, seed=0)
    has = np.abs(vectors).sum(1) > 0
    assert has.tolist() == [True, True, False, False]


def test_blend_weights_text_and_behaviour() -> None:
    text = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    behaviour = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    x = sids.blend(text, behaviour, 0.36)
    assert x.shape == (2, 5)
    assert np.isclose(np.linalg.norm(x[0]), 1.0) and np.isclose(np.linalg.norm(x[1]), 0.8)
    assert sids.blend(text, behaviour, 0.0).shape == (2, 2)


# ------------------------------------------------------------------------------------------------ embedding cache

def test_embedding_cache_embeds_only_new_texts(tmp_path: Path) -> None:
    encoder = WordsEncoder()
    first, n = embed_texts(["red shoes", "blue hats", "red shoes"], encoder, tmp_path, batch_size=1, progress=False)
    assert n == 2 and sorted(encoder.texts) == ["blue hats", "red shoes"]
    assert np.array_equal(first[0], first[2])
    encoder.texts.clear()
    again, n = embed_texts(["blue hats", "green socks", "red shoes"], encoder, tmp_path, progress=False)
    assert n == 1 and encoder.texts == ["green socks"]
    assert np.array_equal(again[0], first[1]) and np.array_equal(again[2], first[0])
    # a different encoder never reuses these vectors
    other = WordsEncoder()
    other.name = "other"
    assert embed_texts(["red shoes"], other, tmp_path, progress=False)[1] == 1


def test_minilm_embeds_ad_text_offline(tiny_tables, tmp_path: Path) -> None:
    ads = tiny_tables.ads.head(4)
    texts = ad_texts(ads)
    assert texts[0].startswith(ads["title"].iloc[0]) and f"Advertiser: {ads['advertiser'].iloc[0]}" in texts[0]
    encoder = MiniLMEncoder()
    vectors, n = embed_texts(texts + ["cheap flights to Rome"], encoder, tmp_path, progress=False)
    assert n == 5 and vectors.shape == (5, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    warm, n = embed_texts(texts, encoder, tmp_path, progress=False)
    assert n == 0 and np.allclose(warm, vectors[:4])


# --------------------------------------------------------------------------------------------------------- build

def test_build_gives_unique_deterministic_sids(built, tiny_data_dir: Path, tmp_path: Path) -> None:
    out, _ = built
    table = load_sid_table(out)
    ads = read_data_dir(tiny_data_dir).ads
    manifest = json.loads((out / "manifest.json").read_text())
    k = sids.effective_codes(len(ads), 256)
    assert manifest["levels"] == 3 and manifest["codes"] == k
    assert table.level_sizes == tuple(manifest["level_sizes"]) and table.level_sizes[:3] == (k, k, k)
    assert sorted(table.ad_ids) == sorted(ads["ad_id"])
    frame = table.frame()
    assert frame["sid"].is_unique and all(parse(s) == tuple(c) for s, c in zip(frame["sid"], table.codes.tolist()))
    assert table.codes[:, -1].max() + 1 == table.level_sizes[-1]
    assert (table.codes[:, :3] < k).all()

    stats = json.loads((out / "stats.json").read_text())
    assert stats == manifest["stats"]
    prefix = pd.DataFrame(table.codes[:, :3])
    assert stats["collision_rate"] == pytest.approx(prefix.duplicated(keep=False).mean(), abs=1e-4)
    assert stats["largest_bucket"] == prefix.value_counts().max()
    assert [u["level"] for u in stats["code_usage"]] == ["a", "b", "c", "d"]
    assert stats["sanity"]["same_first_code_cosine"] > stats["sanity"]["random_pair_cosine"]

    books, vectors = sids.load_codebooks(out)
    assert len(books) == 3 and vectors["encoder"] == "test-words" and vectors["behaviour_dim"] == 0
    assert manifest["parameters"]["quantizer"] == "residual" and all((parent == -1).all() for _, parent in books)

    sids.build_sids(tiny_data_dir, tmp_path / "again", behaviour_weight=0.0, encoder=WordsEncoder(),
                    cache_dir=tmp_path / "cache", progress=False)
    assert load_sid_table(tmp_path / "again").frame().equals(table.frame())


def test_build_with_behaviour_blend(tiny_data_dir: Path, tmp_path: Path) -> None:
    manifest = sids.build_sids(tiny_data_dir, tmp_path / "sids", levels=2, codes=8, behaviour_weight=0.4,
                               behaviour_dim=8, encoder=WordsEncoder(), cache_dir=tmp_path / "cache", progress=False)
    assert manifest["parameters"]["behaviour_weight"] == 0.4
    assert manifest["vectors"] == {"encoder": "test-words", "text_dim": 64, "behaviour_weight": 0.4, "behaviour_dim": 8}
    assert manifest["counts"]["with_behaviour"] > 0 and manifest["level_sizes"][:2] == [8, 8]
    books, _ = sids.load_codebooks(tmp_path / "sids")
    assert books[0][0].shape == (8, 64 + 8)
    table = load_sid_table(tmp_path / "sids").frame()
    assert table["sid"].is_unique
    sids.build_sids(tiny_data_dir, tmp_path / "again", levels=2, codes=8, behaviour_weight=0.4, behaviour_dim=8,
                    encoder=WordsEncoder(), cache_dir=tmp_path / "cache", progress=False)
    assert load_sid_table(tmp_path / "again").frame().equals(table)


@pytest.mark.parametrize("option, message", [
    ({"levels": 0}, "levels"), ({"codes": 0}, "codes"), ({"behaviour_weight": 1.0}, "behaviour weight"),
    ({"quantizer": "vq-vae"}, "quantizer must be one of residual, tree"),
])
def test_build_rejects_bad_parameters(tiny_data_dir: Path, tmp_path: Path, option: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sids.build_sids(tiny_data_dir, tmp_path / "sids", encoder=WordsEncoder(), cache_dir=tmp_path, **option)
    assert not (tmp_path / "sids").exists()


# -------------------------------------------------------------------------------------------------------- assign

def test_assign_keeps_old_ids_and_gives_new_ads_unique_ones(built, tiny_tables, tmp_path: Path) -> None:
    out, encoder = built
    old = load_sid_table(out)
    ads = tiny_tables.ads
    twin = ads.iloc[[0]].assign(ad_id="twin-of-first")  # same text as an existing ad
    fresh = pd.DataFrame({"ad_id": ["n1", "n2"], "title": ["Hiking boots", "Hiking boots"],
                          "description": ["Waterproof hiking boots.", "Waterproof hiking boots."],
                          "category": ["outdoor", "outdoor"], "advertiser": ["PeakCo", "PeakCo"]})
    new_ads = pd.concat([ads.head(5), twin, fresh], ignore_index=True)
    encoder.texts.clear()
    manifest = sids.assign_sids(out, new_ads, tmp_path / "assigned", encoder=encoder, cache_dir=tmp_path / "cache",
                                progress=False)
    assert manifest["step"] == "sids assign" and manifest["counts"] == {"ads": len(ads) + 3, "new": 3, "kept": 5, "embedded": 1}
    assert encoder.texts == ["Hiking boots | Waterproof hiking boots. | Category: outdoor | Advertiser: PeakCo"]

    table = load_sid_table(tmp_path / "assigned")
    assert len(table) == len(ads) + 3 and table.frame()["sid"].is_unique
    assert all(table.sid_of(a) == old.sid_of(a) for a in ads["ad_id"])
    first = old.codes[old.rows([ads["ad_id"].iloc[0]])[0]]
    got = table.codes[table.rows(["twin-of-first"])[0]]
    assert np.array_equal(got[:-1], first[:-1]) and got[-1] != first[-1]
    n1, n2 = table.codes[table.rows(["n1", "n2"])]
    assert np.array_equal(n1[:-1], n2[:-1]) and n1[-1] != n2[-1]
    assert table.level_sizes[-1] == table.codes[:, -1].max() + 1

    # an assign artifact is a valid input to the next assign
    more = fresh.assign(ad_id=["n3", "n4"])
    sids.assign_sids(tmp_path / "assigned", more, tmp_path / "again", encoder=encoder, cache_dir=tmp_path / "cache",
                     progress=False)
    assert load_sid_table(tmp_path / "again").frame()["sid"].is_unique


def test_tree_sids_build_and_assign(tiny_data_dir: Path, tiny_tables, tmp_path: Path) -> None:
    manifest = sids.build_sids(tiny_data_dir, tmp_path / "sids", levels=2, codes=4, behaviour_weight=0.3,
                               behaviour_dim=8, quantizer="tree", encoder=WordsEncoder(), cache_dir=tmp_path / "cache",
                               progress=False)
    assert manifest["parameters"]["quantizer"] == "tree" and manifest["level_sizes"][:2] == [4, 4]
    books, _ = sids.load_codebooks(tmp_path / "sids")
    assert (books[0][1] == -1).all() and (books[1][1] >= 0).all()
    table = load_sid_table(tmp_path / "sids")
    assert table.frame()["sid"].is_unique
    # a second-level code exists only among its parent's children
    children = np.bincount(books[1][1], minlength=4)
    assert (table.codes[:, 1] < children[table.codes[:, 0]]).all()

    fresh = tiny_tables.ads.head(4).assign(ad_id=["t1", "t2", "t3", "t4"])
    sids.assign_sids(tmp_path / "sids", fresh, tmp_path / "assigned", encoder=WordsEncoder(),
                     cache_dir=tmp_path / "cache", progress=False)
    union = load_sid_table(tmp_path / "assigned")
    assert union.frame()["sid"].is_unique
    new = union.codes[union.rows(["t1", "t2", "t3", "t4"])]
    assert (new[:, 1] < children[new[:, 0]]).all()
    # the same text as an existing ad gets the same prefix under the frozen tree
    old = table.codes[table.rows(list(tiny_tables.ads["ad_id"].head(4)))]
    assert np.array_equal(new[:, :2], old[:, :2])


def test_codebooks_written_before_tree_kmeans_still_load(built) -> None:
    out, _ = built
    books, vectors = sids.load_codebooks(out)
    save_file({f"level_{i}": c for i, (c, _) in enumerate(books)}, str(out / sids.CODEBOOKS),
              metadata={"vectors": json.dumps(vectors)})
    legacy, _ = sids.load_codebooks(out)
    assert len(legacy) == 3 and all((parent == -1).all() for _, parent in legacy)
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(books, legacy))


@pytest.mark.parametrize("change, message", [
    (lambda a: a.drop(columns="title"), "ads.title: missing column"),
    (lambda a: pd.concat([a, a.tail(1)]), "ads.ad_id, row 3: duplicate id"),
    (lambda a: a.head(0), "ads: no rows"),
    (lambda a: a.assign(ad_id=[None, "b", "c"]), "ads.ad_id, row 0: null id"),
])
def test_assign_rejects_bad_ads(built, tmp_path: Path, change, message: str) -> None:
    out, encoder = built
    ads = pd.DataFrame({"ad_id": ["a", "b", "c"], "title": ["t"] * 3, "description": ["d"] * 3,
                        "category": ["c"] * 3, "advertiser": ["x"] * 3})
    with pytest.raises(DataError, match=re.escape(message)):
        sids.assign_sids(out, change(ads), tmp_path / "assigned", encoder=encoder, cache_dir=tmp_path)
    assert not (tmp_path / "assigned").exists()


def test_assign_rejects_other_encoder_and_file_types(built, tmp_path: Path) -> None:
    out, _ = built
    ads = pd.DataFrame({"ad_id": ["a"], "title": ["t"], "description": ["d"], "category": ["c"], "advertiser": ["x"]})
    other = WordsEncoder()
    other.name = "other"
    with pytest.raises(ValueError, match="built on 'test-words' vectors"):
        sids.assign_sids(out, ads, tmp_path / "assigned", encoder=other, cache_dir=tmp_path)
    (tmp_path / "ads.xlsx").write_text("x")
    with pytest.raises(ValueError, match="unknown file type"):
        sids.read_ads_file(tmp_path / "ads.xlsx")
    with pytest.raises(FileNotFoundError, match="must hold ads.parquet"):
        sids.read_ads_file(tmp_path)
    assert not (tmp_path / "assigned").exists()


# ----------------------------------------------------------------------------------------------------------- CLI

def test_cli_build_and_assign(tiny_data_dir: Path, tiny_tables, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sids, "MiniLMEncoder", WordsEncoder)
    cache = str(tmp_path / "cache")
    assert main(["sids", "build", "--data", str(tiny_data_dir), "--out", str(tmp_path / "s"), "--levels", "2",
                 "--codes", "6", "--behaviour-weight", "0.3", "--cache", cache]) == 0
    assert "wrote" in capsys.readouterr().out
    assert load_sid_table(tmp_path / "s").level_sizes[:2] == (6, 6)
    assert main(["sids", "build", "--data", str(tiny_data_dir), "--out", str(tmp_path / "tree"), "--levels", "2",
                 "--codes", "6", "--quantizer", "tree", "--cache", cache]) == 0
    assert json.loads((tmp_path / "tree" / "manifest.json").read_text())["parameters"]["quantizer"] == "tree"

    new = tiny_tables.ads.head(3).assign(ad_id=["x1", "x2", "x3"])
    new.to_csv(tmp_path / "new.csv", index=False)
    assert main(["sids", "assign", "--sids", str(tmp_path / "s"), "--ads", str(tmp_path / "new.csv"),
                 "--out", str(tmp_path / "a"), "--cache", cache]) == 0
    assert "3 new ads" in capsys.readouterr().out
    assert len(load_sid_table(tmp_path / "a")) == len(tiny_tables.ads) + 3

    new.drop(columns="advertiser").to_csv(tmp_path / "bad.csv", index=False)
    assert main(["sids", "assign", "--sids", str(tmp_path / "s"), "--ads", str(tmp_path / "bad.csv"),
                 "--out", str(tmp_path / "b"), "--cache", cache]) == 2
    assert "error: ads.advertiser: missing column" in capsys.readouterr().err
    assert main(["sids", "assign", "--sids", str(tmp_path / "nowhere"), "--ads", str(tmp_path / "new.csv"),
                 "--out", str(tmp_path / "b")]) == 2
    assert "no such artifact directory" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------------------- slow

@pytest.mark.slow
def test_movielens_1m_sids(tmp_path: Path) -> None:
    from leadre.loaders import load_movielens
    from leadre.schema import write_data_dir

    tables, derived = load_movielens(shared_dataset("movielens-1m"))
    write_data_dir(tables, tmp_path / "data", "data movielens", {}, ["rating"], derived)
    manifest = sids.build_sids(tmp_path / "data", tmp_path / "sids", behaviour_weight=0.3,
                               cache_dir=tmp_path / "cache", progress=False)
    table = load_sid_table(tmp_path / "sids")
    stats = manifest["stats"]
    assert len(table) == len(tables.ads) and table.frame()["sid"].is_unique
    assert manifest["level_sizes"][:3] == [63, 63, 63]
    assert stats["collision_rate"] < 0.5 and stats["largest_bucket"] <= 20
    assert all(u["usage"] == 1.0 for u in stats["code_usage"])
    assert stats["sanity"]["gap"] > 0.05
    assert stats["next_ad_first_code"]["lift"] > 3
