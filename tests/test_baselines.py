from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from leadre.baselines import CoOccurrence, Popularity, cooccurrence_matrix, top_n
from leadre.metrics import KS, Catalogue, evaluate_recaller, user_histories
from leadre.schema import Tables
from leadre.split import leave_one_out
from leadre.synth import POSITIVE_ACTIONS


def catalogue_of(ad_ids: str, inactive: str = "") -> Catalogue:
    return Catalogue.from_ads(pd.DataFrame({"ad_id": list(ad_ids), "ecpm": 1.0,
                                            "active": [ad not in inactive for ad in ad_ids]}))


def split_of(timelines: dict[str, str]):
    """One click per character, in order, for each user."""
    start = pd.Timestamp("2024-01-01", tz="UTC")
    rows = [(user, ad, "ad", "click", start + pd.Timedelta(minutes=i))
            for user, ads in timelines.items() for i, ad in enumerate(ads)]
    return leave_one_out(pd.DataFrame(rows, columns=["user_id", "item_id", "item_type", "action", "ts"]), ["click"])


def test_popularity_counts_training_positives_only() -> None:
    # validation (b) and test (d) targets would tie b and d with a; w is training-only
    split = split_of({"u1": "abd", "u2": "abd", "u3": "abd", "w": "c"})
    popularity = Popularity.fit(split, catalogue_of("abcd"))
    assert popularity.counts.tolist() == [3, 0, 1, 0]
    recalled = popularity([[], ["a"]], 2)
    assert [list(ids) for ids in recalled.ad_ids] == [["a", "c"], ["a", "c"]]
    assert list(recalled.scores[0]) == [3.0, 1.0]


def test_popularity_respects_exclude_and_inactive_ads() -> None:
    split = split_of({"u1": "abd", "u2": "abd", "u3": "abd", "w": "cc"})
    popularity = Popularity.fit(split, catalogue_of("abcd", inactive="c"))
    recalled = popularity([[], []], 4, exclude=[{"a"}, {"zz"}])
    assert [list(ids)[:1] for ids in recalled.ad_ids] == [["b"], ["a"]]
    assert all("c" not in ids for ids in recalled.ad_ids)
    assert [len(ids) for ids in recalled.ad_ids] == [2, 3]  # fewer eligible ads than asked for
    recalled = popularity([[], [], []], 1, exclude=[{"d"}, {"a", "b"}, {"a", "d"}])
    assert [list(ids) for ids in recalled.ad_ids] == [["a"], ["d"], ["b"]]


def test_cooccurrence_matrix_counts_followers_within_the_window() -> None:
    users, ads = np.array([0, 0, 0, 1, 1]), np.array([0, 1, 2, 1, 2])
    c = cooccurrence_matrix(users, ads, n_ads=3, window=1).toarray()
    assert c.tolist() == [[0, 1, 0], [0, 0, 2], [0, 0, 0]]
    c = cooccurrence_matrix(users, ads, n_ads=3, window=2).toarray()
    assert c.tolist() == [[0, 1, 1], [0, 0, 2], [0, 0, 0]]


def test_cooccurrence_recalls_the_obvious_follower() -> None:
    # training positives x -> y (three users); validation z and test w must not create x -> z or x -> w
    split = split_of({"u1": "xyzw", "u2": "xyzw", "u3": "xyzw", "v": "qrs", "t": "x"})
    cooc = CoOccurrence.fit(split, catalogue_of("qrswxyz"), window=5, last=1)
    recalled = cooc([["x"], ["q", "x"], ["unknown"]], 3)
    assert list(recalled.ad_ids[0])[0] == "y"
    assert recalled.scores[0][0] == pytest.approx(3 + 3 / 5)  # three followers plus popularity 3 / (4 + 1)
    assert list(recalled.ad_ids[1])[0] == "y"  # only the last history ad counts with last=1
    assert all(score < 1 for score in recalled.scores[0][1:])  # z and w: popularity only
    assert list(recalled.ad_ids[2]) == ["x", "y", "q"]  # no known history: popularity
    assert list(cooc([["x"]], 1, exclude=[{"y"}]).ad_ids[0]) == ["x"]


def test_top_n_orders_best_first() -> None:
    catalogue = catalogue_of("abcd", inactive="d")
    scores = np.array([[1.0, 3.0, 2.0, 9.0], [5.0, 4.0, 6.0, 0.0]])
    recalled = top_n(scores, 2, [set(), {"c"}], catalogue)
    assert [list(ids) for ids in recalled.ad_ids] == [["b", "c"], ["a", "b"]]
    assert [list(s) for s in recalled.scores] == [[3.0, 2.0], [5.0, 4.0]]


@pytest.mark.parametrize("which", ["validation", "test"])
def test_baselines_on_the_tiny_marketplace(tiny_tables: Tables, which: str) -> None:
    split = leave_one_out(tiny_tables.events, POSITIVE_ACTIONS)
    catalogue = Catalogue.from_ads(tiny_tables.ads)
    targets, histories = user_histories(split, which)
    n_users = len(targets)
    results = {type(r).__name__: evaluate_recaller(r, histories, targets["ad_id"].tolist(), catalogue)
               for r in (Popularity.fit(split, catalogue), CoOccurrence.fit(split, catalogue))}
    for variants in results.values():
        for m in variants.values():
            recall = [m[f"recall@{k}"] for k in KS]
            assert recall == sorted(recall) and 0 <= recall[0] and recall[-1] <= 1
            assert all(0 <= m[f"ndcg@{k}"] <= m[f"recall@{k}"] for k in KS)
            assert all(0 < m[f"coverage@{k}"] <= 1 for k in KS)
            assert all(m[f"ecpm@{k}"] > 0 for k in KS)
            assert m["invalid_id_rate"] == 0.0 and m["users"] == n_users
    assert results["Popularity"]["seen_kept"]["coverage@10"] == pytest.approx(10 / tiny_tables.ads["active"].sum())
    assert results["CoOccurrence"]["seen_kept"]["recall@10"] > results["Popularity"]["seen_kept"]["recall@10"]
