from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from leadre.metrics import (Catalogue, Recalled, bootstrap_gain, confidence_interval, evaluate_recaller,
                            invalid_id_rate, rank_intervals, rank_lists, recall_metrics, target_ranks, user_histories,
                            user_metric, user_values)
from leadre.split import leave_one_out


@pytest.fixture
def catalogue() -> Catalogue:
    ads = pd.DataFrame({"ad_id": ["a", "b", "c", "d", "e"], "ecpm": [10.0, 20.0, 30.0, 40.0, 50.0],
                        "active": [True, True, True, True, False]})
    return Catalogue.from_ads(ads)


def test_metrics_match_hand_computed_values(catalogue: Catalogue) -> None:
    ranked = [["a", "b", "c"], ["c", "a", "d", "b"], ["d", "c"]]
    targets = ["b", "d", "a"]  # ranks 1, 2 and a miss
    m = recall_metrics(ranked, targets, catalogue, ks=(1, 2, 3))
    assert m["recall@1"] == 0.0
    assert m["recall@2"] == pytest.approx(1 / 3)
    assert m["recall@3"] == pytest.approx(2 / 3)
    assert m["ndcg@1"] == 0.0
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3)) / 3)
    assert m["ndcg@3"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 3)
    # eCPM@K: mean eCPM of each user's top K, averaged over users
    assert m["ecpm@1"] == pytest.approx((10 + 30 + 40) / 3)
    assert m["ecpm@2"] == pytest.approx((15 + 20 + 35) / 3)
    assert m["ecpm@3"] == pytest.approx((20 + 80 / 3 + 35) / 3)
    # coverage@K: distinct ads in the top K over the 4 active ads
    assert m["coverage@1"] == pytest.approx(3 / 4)
    assert m["coverage@2"] == 1.0
    assert m["invalid_id_rate"] == 0.0
    assert m["list_length"] == pytest.approx(9 / 3)
    assert m["users"] == 3


def test_invalid_ids_are_counted_then_dropped_from_the_ranking(catalogue: Catalogue) -> None:
    generated = [["a", None, "e", "zz", "b"], ["c"]]  # None, inactive "e" and unknown "zz" are invalid
    assert invalid_id_rate(generated, catalogue) == pytest.approx(3 / 6)
    m = recall_metrics(generated, ["b", "a"], catalogue, ks=(1, 2))
    assert m["invalid_id_rate"] == pytest.approx(3 / 6)
    assert m["recall@1"] == 0.0
    assert m["recall@2"] == pytest.approx(1 / 2)  # "b" moved up to rank 1 for the first user
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3)) / 2)
    assert m["ecpm@2"] == pytest.approx((15 + 30) / 2)


def test_seen_ads_are_removed_and_a_seen_target_is_unreachable(catalogue: Catalogue) -> None:
    ranked = [["a", "b", "c"], ["a", "b"], ["d", "c"]]
    seen = [{"a"}, {"b", "zz"}, set()]
    m = recall_metrics(ranked, ["b", "b", "c"], catalogue, ks=(1, 2), seen=seen)
    assert m["recall@1"] == pytest.approx(1 / 3)  # the first user's "b" moves to rank 0
    assert m["recall@2"] == pytest.approx(2 / 3)  # the second user's target was seen: a miss
    assert m["ecpm@1"] == pytest.approx((20 + 10 + 40) / 3)
    assert m["invalid_id_rate"] == 0.0


def test_empty_and_short_lists(catalogue: Catalogue) -> None:
    m = recall_metrics([[], ["a"]], ["a", "a"], catalogue, ks=(1, 5))
    assert m["recall@5"] == 0.5
    assert m["ecpm@5"] == 10.0  # users with nothing recalled have no mean eCPM
    assert m["coverage@5"] == 0.25
    assert recall_metrics([], [], catalogue, ks=(1,))["recall@1"] == 0.0


def test_target_ranks_ignore_padding() -> None:
    ranked = np.array([[3, 1, -1], [2, -1, -1], [-1, -1, -1]])
    assert target_ranks(ranked, np.array([1, 0, -1])).tolist() == [1, -1, -1]


def test_target_ranks_with_duplicate_ads() -> None:
    """A repeated ad takes a slot each time; the target counts at its first place, never at a later copy."""
    ranked = np.array([[2, 2, 1, 1], [1, 3, 1, -1], [3, 3, 3, 3], [0, 2, 0, 2]])
    assert target_ranks(ranked, np.array([1, 1, 1, 2])).tolist() == [2, 0, -1, 1]


def test_duplicates_in_recalled_lists(catalogue: Catalogue) -> None:
    m = recall_metrics([["a", "a", "b"], ["b", "b", "a"]], ["b", "a"], catalogue, ks=(1, 2, 3))
    assert (m["recall@1"], m["recall@2"], m["recall@3"]) == (0.0, 0.0, 1.0)
    assert m["ndcg@3"] == pytest.approx(1 / math.log2(4))
    assert m["ecpm@2"] == pytest.approx((10 + 20) / 2) and m["coverage@3"] == pytest.approx(2 / 4)


def test_per_user_values_give_back_the_means(catalogue: Catalogue) -> None:
    ranked = [["a", "b", "c"], ["c", "a", "d", "b"], ["d", "zz"], []]
    r = rank_lists(ranked, ["b", "d", "a", "a"], catalogue, seen=[set(), {"a"}, set(), set()])
    values = user_values(r, catalogue, ks=(1, 2))
    assert values["rank"].tolist() == [1, 1, -1, -1] and values["length"].tolist() == [3, 3, 1, 0]
    assert user_metric(values, "recall@2").tolist() == [1.0, 1.0, 0.0, 0.0]
    assert user_metric(values, "ndcg@2") == pytest.approx([1 / math.log2(3), 1 / math.log2(3), 0, 0])
    assert user_metric(values, "ecpm@2")[:3] == pytest.approx([15.0, 35.0, 40.0]) and np.isnan(values["ecpm@2"][3])
    m = recall_metrics(ranked, ["b", "d", "a", "a"], catalogue, ks=(1, 2), seen=[set(), {"a"}, set(), set()])
    assert m["ecpm@2"] == pytest.approx(np.nanmean(values["ecpm@2"])) and m["list_length"] == 7 / 4
    with pytest.raises(ValueError, match="recall@K, ndcg@K and ecpm@K"):
        user_metric(values, "coverage@2")


def test_rank_intervals_are_the_bootstrap_over_users() -> None:
    ranks = np.random.default_rng(1).choice([-1, 0, 3, 12], size=4000, p=[0.6, 0.1, 0.1, 0.2])
    intervals = rank_intervals(ranks, ks=(1, 10))
    # the multinomial draw over ranks against resampling users directly
    users = np.random.default_rng(2).integers(len(ranks), size=(2000, len(ranks)))
    direct = confidence_interval(((ranks[users] >= 0) & (ranks[users] < 10)).mean(axis=1), 0.95)
    assert intervals["recall@10"] == pytest.approx(direct, abs=0.004)
    p = ((ranks >= 0) & (ranks < 10)).mean()  # about 0.2 (ranks 0 and 3); the normal approximation
    assert intervals["recall@10"] == pytest.approx([p - 1.96 * (p * (1 - p) / 4000) ** 0.5,
                                                    p + 1.96 * (p * (1 - p) / 4000) ** 0.5], abs=0.003)
    low, high = intervals["ndcg@10"]
    assert low < np.where((ranks >= 0) & (ranks < 10), 1 / np.log2(np.maximum(ranks, 0) + 2), 0).mean() < high
    assert rank_intervals(np.zeros(50, dtype=int), ks=(1,))["recall@1"] == [1.0, 1.0]
    assert rank_intervals(np.array([], dtype=int)) == {}


def test_paired_bootstrap_of_a_gain() -> None:
    rng = np.random.default_rng(3)
    current = (rng.random(3000) < 0.2).astype(float)
    same, samples = bootstrap_gain(current, current.copy())
    assert same == 0.0 and confidence_interval(samples, 0.95) == [0.0, 0.0]  # paired: no noise without a change
    better = current.copy()
    better[np.flatnonzero(current == 0)[:30]] = 1.0  # 30 more hits out of 3,000: +0.01
    gain, samples = bootstrap_gain(better, current)
    low, high = confidence_interval(samples, 0.95)
    assert gain == pytest.approx(0.01) and 0.005 < low < 0.01 < high < 0.015
    noisy = rng.permutation(better)  # the same mean gain, but unpaired users: a much wider interval
    low_noisy, _ = confidence_interval(bootstrap_gain(noisy, current)[1], 0.95)
    assert low_noisy < 0.0 < low
    ecpm, ecpm_old = np.array([10.0, np.nan, 30.0]), np.array([10.0, 5.0, 20.0])
    relative, _ = bootstrap_gain(ecpm, ecpm_old, relative=True)
    assert relative == pytest.approx(20.0 / (35.0 / 3) - 1)  # NaN: the user has no value on that side
    with pytest.raises(ValueError, match="two equal non-empty vectors"):
        bootstrap_gain(np.ones(3), np.ones(4))


@pytest.fixture
def toy_split():
    rows = []
    for user, ads in {"x": "abcd", "y": "badc", "z": "abca", "w": "ab"}.items():  # w: too few positives to evaluate
        rows += [(user, ad, "ad", "click", pd.Timestamp("2024-01-01", tz="UTC") + pd.Timedelta(minutes=i))
                 for i, ad in enumerate(ads)]
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "item_type", "action", "ts"])
    return leave_one_out(events, ["click"])


def test_user_histories_align_with_targets(toy_split) -> None:
    targets, histories = user_histories(toy_split, "test")
    assert targets["user_id"].tolist() == ["x", "y", "z"]
    assert targets["ad_id"].tolist() == ["d", "c", "a"]
    assert histories == [["a", "b", "c"], ["b", "a", "d"], ["a", "b", "c"]]
    targets, histories = user_histories(toy_split, "validation")
    assert targets["user_id"].tolist() == ["x", "y", "z"]
    assert histories == [["a", "b"], ["b", "a"], ["a", "b"]]


def test_evaluate_recaller_in_both_variants(toy_split, catalogue: Catalogue) -> None:
    calls = []

    def fixed(histories, n, exclude=None) -> Recalled:  # ignores `exclude`: the evaluator must enforce it
        calls.append((list(histories), n, exclude))
        return Recalled(ad_ids=[["a", "b", "c", "d"]] * len(histories), scores=[[4.0, 3.0, 2.0, 1.0]] * len(histories))

    targets, histories = user_histories(toy_split, "test")
    results = evaluate_recaller(fixed, histories, targets["ad_id"].tolist(), catalogue, ks=(1, 3, 5), batch_size=2)
    assert list(results) == ["seen_excluded", "seen_kept"]  # the headline variant first
    kept, excluded = results["seen_kept"], results["seen_excluded"]
    # seen kept: ranks 3 (x: d), 2 (y: c), 0 (z: a)
    assert (kept["recall@1"], kept["recall@3"], kept["recall@5"]) == pytest.approx((1 / 3, 2 / 3, 1.0))
    # seen excluded: x and y are left with their target alone; z's target "a" is in its history
    assert (excluded["recall@1"], excluded["recall@5"]) == pytest.approx((2 / 3, 2 / 3))
    assert excluded["ndcg@5"] == pytest.approx(2 / 3)
    assert [len(h) for h, _, _ in calls] == [2, 1, 2, 1]
    assert calls[0][1] == 5 and calls[0][2] == [{"a", "b", "c"}, {"a", "b", "d"}]
    assert calls[2][2] is None
    with pytest.raises(ValueError, match="3 histories, 2 targets and 3 inputs"):
        evaluate_recaller(fixed, histories, ["d", "c"], catalogue)


def test_evaluate_recaller_on_other_inputs(toy_split, catalogue: Catalogue) -> None:
    def by_prompt(prompts, n, exclude=None) -> Recalled:
        return Recalled(ad_ids=[list(p) for p in prompts], scores=[[0.0] * len(p) for p in prompts])

    targets, histories = user_histories(toy_split, "test")
    results = evaluate_recaller(by_prompt, histories, targets["ad_id"].tolist(), catalogue, ks=(1,),
                                inputs=["d", "ac", "c"])
    assert results["seen_kept"]["recall@1"] == pytest.approx(1 / 3)
    assert results["seen_excluded"]["recall@1"] == pytest.approx(2 / 3)  # y's "a" was seen: "c" moves up
