from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from leadre.sid import SidTable
from leadre.trie import Trie, build_trie, trie_from_table

LEVEL_SIZES = (3, 4, 3)
ORDINARY_TOKENS = 50
# the host, and a GPU where there is one: a trie moved there must answer exactly as on the host
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=NO_CUDA)]


def random_table(n_ads: int, level_sizes: tuple[int, ...], seed: int) -> SidTable:
    """`n_ads` ads with distinct random S-IDs, ad ids `ad0`, `ad1`, ..."""
    space = np.array(list(itertools.product(*(range(k) for k in level_sizes))), dtype=np.int64)
    codes = space[np.random.default_rng(seed).choice(len(space), n_ads, replace=False)]
    ad_ids = np.array([f"ad{i}" for i in range(n_ads)], dtype=object)
    return SidTable(ad_ids=ad_ids, codes=codes, level_sizes=level_sizes)


def sid_ids_after_ordinary(level_sizes: tuple[int, ...]) -> list[np.ndarray]:
    """Per level, the token ids of a vocabulary of `ORDINARY_TOKENS` ordinary tokens followed by
    `vocabulary(level_sizes)`, shaped like `leadre.tokenizer.sid_token_ids`."""
    offsets = ORDINARY_TOKENS + np.cumsum((0, *level_sizes[:-1]))
    return [np.arange(k) + o for k, o in zip(level_sizes, offsets)]


def allowed_paths(trie: Trie) -> dict[tuple[int, ...], str]:
    """Every complete S-ID the trie allows (walked with the vectorised masks) → the ad it names."""
    paths = torch.zeros((1, 0), dtype=torch.long, device=trie.device)
    nodes = torch.zeros(1, dtype=torch.long, device=trie.device)
    for level in range(trie.levels):
        allowed, children = trie.allowed(level, nodes)
        beam, code = allowed.nonzero(as_tuple=True)
        paths = torch.cat([paths[beam], code[:, None]], dim=1)
        nodes = children[beam, code]
    return dict(zip(map(tuple, paths.tolist()), trie.ads_at(nodes).tolist()))


def naive_allowed(active_codes: dict[str, tuple[int, ...]], prefix: tuple[int, ...], size: int) -> list[bool]:
    return [any(c[: len(prefix) + 1] == (*prefix, code) for c in active_codes.values()) for code in range(size)]


def check_against_reference(trie: Trie, active_codes: dict[str, tuple[int, ...]]) -> None:
    assert allowed_paths(trie) == {c: a for a, c in active_codes.items()}
    for depth in range(trie.levels):
        prefixes = list(itertools.product(*(range(k) for k in trie.level_sizes[:depth])))
        nodes = trie.node_of(torch.tensor(prefixes, dtype=torch.long).view(len(prefixes), depth))
        allowed, _ = trie.allowed(depth, nodes)
        expected = [naive_allowed(active_codes, p, trie.level_sizes[depth]) for p in prefixes]
        assert allowed.tolist() == expected


def test_allowed_paths_are_exactly_the_active_ads():
    table = random_table(20, LEVEL_SIZES, seed=0)
    active = {f"ad{i}" for i in range(0, 20, 3)}
    trie = trie_from_table(table, sid_ids_after_ordinary(LEVEL_SIZES), active_ads=active)
    check_against_reference(trie, {a: tuple(c) for a, c in zip(table.ad_ids, table.codes.tolist()) if a in active})


def test_built_with_any_one_ad_inactive():
    # the ad with the largest S-ID has the last node of every level: nothing active below must still be counted
    table = random_table(12, LEVEL_SIZES, seed=3)
    codes = {a: tuple(c) for a, c in zip(table.ad_ids, table.codes.tolist())}
    for paused in table.ad_ids:
        active = set(table.ad_ids) - {paused}
        trie = trie_from_table(table, sid_ids_after_ordinary(LEVEL_SIZES), active_ads=active)
        assert [len(c) for c in trie.active_counts] == [len(c) for c in trie_from_table(
            table, sid_ids_after_ordinary(LEVEL_SIZES)).active_counts]
        check_against_reference(trie, {a: codes[a] for a in active})


@pytest.mark.parametrize("device", DEVICES)
def test_random_add_pause_activate_sequences_match_reference(device):
    rng = np.random.default_rng(1)
    table = random_table(30, LEVEL_SIZES, seed=1)
    held, spare = table.ad_ids[:20], table.ad_ids[20:]
    codes = {a: tuple(c) for a, c in zip(table.ad_ids, table.codes.tolist())}
    trie = trie_from_table(SidTable(held, table.codes[:20], LEVEL_SIZES), sid_ids_after_ordinary(LEVEL_SIZES))
    trie = trie.to(device)
    active = set(held)
    for _ in range(40):
        op = rng.choice(["pause", "activate", "add"])
        if op == "add" and len(spare):
            new, spare = spare[:2], spare[2:]
            trie = trie.with_ads(new, np.array([codes[a] for a in new]))
            active |= set(new)
        else:
            chosen = rng.choice(np.array(list(trie.row_of)), size=3, replace=False).tolist()
            trie = trie.with_active(chosen, op == "activate")
            active = active | set(chosen) if op == "activate" else active - set(chosen)
        assert trie.device.type == device  # serving's updates keep the trie where the model is
        check_against_reference(trie, {a: codes[a] for a in active})


def test_pausing_the_only_ad_under_a_prefix_removes_the_prefix():
    codes = np.array([[0, 0, 0], [0, 1, 0], [1, 2, 2]])
    token_ids = sid_ids_after_ordinary(LEVEL_SIZES)
    trie = build_trie(codes, np.array(["x", "y", "z"]), np.ones(3, bool), LEVEL_SIZES, token_ids)
    paused = trie.with_active(["z"], False)
    assert paused.allowed(0, torch.tensor([0]))[0].tolist() == [[True, False, False]]
    assert paused.with_active(["z"], True).allowed(0, torch.tensor([0]))[0].tolist() == [[True, True, False]]


def test_updates_leave_the_old_trie_untouched():
    table = random_table(12, LEVEL_SIZES, seed=2)
    trie = trie_from_table(table, sid_ids_after_ordinary(LEVEL_SIZES))
    before = allowed_paths(trie)
    trie.with_active(table.ad_ids[:6], False)
    trie.with_ads(["new"], np.array([c for c in itertools.product(*map(range, LEVEL_SIZES)) if c not in before][:1]))
    assert allowed_paths(trie) == before


def test_node_of_rejects_out_of_range_codes_and_unknown_prefixes():
    codes = np.array([[0, 3, 0], [1, 0, 0]])
    trie = build_trie(codes, np.array(["x", "y"]), np.ones(2, bool), LEVEL_SIZES, sid_ids_after_ordinary(LEVEL_SIZES))
    # (0, 4) would alias (1, 0) if the code were not range-checked
    nodes = trie.node_of(torch.tensor([[0, 4], [1, 0], [2, 0], [0, -1]]))
    assert nodes.tolist() == [-1, trie.paths[1, 1].item(), -1, -1]


def test_allowed_tokens_after_token_prefix():
    codes = np.array([[0, 3, 0], [0, 3, 2], [2, 1, 1]])
    token_ids = sid_ids_after_ordinary(LEVEL_SIZES)
    trie = build_trie(codes, np.array(["x", "y", "z"]), np.ones(3, bool), LEVEL_SIZES, token_ids)
    assert trie.allowed_tokens_after([]) == [token_ids[0][0].item(), token_ids[0][2].item()]
    prefix = [token_ids[0][0].item(), token_ids[1][3].item()]
    assert trie.allowed_tokens_after(prefix) == [token_ids[2][0].item(), token_ids[2][2].item()]
    assert trie.allowed_tokens_after([token_ids[1][0].item()]) == []
    complete = torch.tensor([[token_ids[0][2], token_ids[1][1], token_ids[2][1]], [token_ids[0][2], 0, 0]])
    assert trie.codes_of_tokens(complete).tolist() == [[2, 1, 1], [2, -1, -1]]


def test_colliding_sids_are_rejected():
    codes, token_ids = np.array([[0, 1, 2], [0, 1, 2]]), sid_ids_after_ordinary(LEVEL_SIZES)
    with pytest.raises(ValueError, match="share an S-ID"):
        build_trie(codes, np.array(["x", "y"]), np.ones(2, bool), LEVEL_SIZES, token_ids)


def tensors_of(trie: Trie) -> dict[str, torch.Tensor]:
    """Every tensor the trie holds (per-level tuples included), by name."""
    found = {}
    for f in dataclasses.fields(trie):
        value = getattr(trie, f.name)
        for i, t in enumerate(value if isinstance(value, tuple) else (value,)):
            if isinstance(t, torch.Tensor):
                found[f"{f.name}[{i}]"] = t
    return found


def test_to_moves_every_tensor_and_leaves_the_original():
    trie = trie_from_table(random_table(12, LEVEL_SIZES, seed=2), sid_ids_after_ordinary(LEVEL_SIZES))
    assert trie.to("cpu") is trie and trie.to(torch.device("cpu")) is trie
    # "meta" has no data, but it shows where each tensor went: one left behind would stay on the CPU
    moved = trie.to("meta")
    assert set(tensors_of(moved)) == set(tensors_of(trie)) and {"live_children[0]", "paths[0]"} <= set(tensors_of(moved))
    assert {name: t.device.type for name, t in tensors_of(moved).items()} == dict.fromkeys(tensors_of(trie), "meta")
    assert moved.device.type == "meta" and moved.to("meta") is moved
    assert all(t.device.type == "cpu" for t in tensors_of(trie).values())
    assert moved.row_of is trie.row_of and moved.codes is trie.codes  # host-side lookups are shared, not copied


@pytest.mark.parametrize("device", DEVICES)
def test_a_moved_trie_answers_as_on_the_host(device):
    table = random_table(20, LEVEL_SIZES, seed=5)
    trie = trie_from_table(table, sid_ids_after_ordinary(LEVEL_SIZES)).with_active(table.ad_ids[:5], False)
    moved = trie.to(device)
    assert allowed_paths(moved) == allowed_paths(trie)
    prefixes = torch.tensor(list(itertools.product(*map(range, LEVEL_SIZES[:2]))))
    assert moved.node_of(prefixes).device.type == device
    assert moved.node_of(prefixes).tolist() == trie.node_of(prefixes).tolist()
    assert moved.allowed_tokens_after([ORDINARY_TOKENS]) == trie.allowed_tokens_after([ORDINARY_TOKENS])
    leaves = trie.leaves_of(table.ad_ids[::3])
    assert moved.leaves_of(table.ad_ids[::3]).tolist() == leaves.tolist()
    assert moved.ads_at(leaves).tolist() == trie.ads_at(leaves).tolist() == table.ad_ids[::3].tolist()
    resumed = moved.with_active(table.ad_ids[:5], True)
    assert resumed.device == moved.device
    assert allowed_paths(resumed) == allowed_paths(trie.with_active(table.ad_ids[:5], True))


@pytest.mark.parametrize("device", DEVICES)
def test_excluded_below_counts_each_users_active_excluded_ads_once(device):
    codes = np.array([[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]])
    trie = build_trie(codes, np.array(["w", "x", "y", "z"]), np.ones(4, bool), LEVEL_SIZES,
                      sid_ids_after_ordinary(LEVEL_SIZES)).with_active(["y"], False).to(device)
    leaf = dict(zip("wxyz", trie.leaves_of("wxyz").tolist()))
    # user 0 excludes w twice and the paused y; user 1 excludes x and z
    excluded = torch.tensor([leaf["w"], leaf["y"], leaf["w"], len(trie) + leaf["x"], len(trie) + leaf["z"]])
    index = trie.exclusion_index(excluded)
    first = trie.node_of(torch.tensor([[0], [1]]))
    users = torch.tensor([[0], [1]], device=device)
    assert trie.excluded_below(0, first[None, :], users, index).tolist() == [[1, 0], [1, 1]]
