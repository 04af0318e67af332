"""The prefix trie of active ads' S-IDs that constrains decoding, shared by offline evaluation and serving.

A node at depth d is a distinct S-ID prefix of d codes. Each level keeps a dense child table (nodes at depth d ×
codes of level d → child node, or -1), so "which codes may follow these beams" is one row gather over a whole batch:
on a GPU the trie costs a couple of kernel launches per level, not a search. A table has at most
min(ads, product of the earlier level sizes) rows of one level's codes, and the trie holds two sets of them (all
children, and the children with an active ad below): a million ads over 256 × 256 × 256 codes and an 8-way collision
level take about 400 MB of int64; 12,000 ads at most 50 MB. They grow with the ads, not with the whole code space.

Each node keeps the number of active ads below it; a prefix whose ads are all paused is not allowed. A `Trie` is
never changed in place: `with_active` and `with_ads` return a new one, so serving can swap tries while a search
keeps using the one it started with.

Its tensors live on one device (the CPU unless `to` moved them), the device of the model's logits, so masking a
level is a few device operations with no host round trip; the S-IDs, ad ids and their rows stay on the host.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from leadre.sid import SidTable


@dataclass(frozen=True, eq=False)
class Trie:
    level_sizes: tuple[int, ...]
    token_ids: tuple[torch.Tensor, ...]  # per level (K_l,): the vocabulary id of each code's token
    children: tuple[torch.Tensor, ...]  # per level (n_nodes at depth l + 1, K_l): child node index or -1; the
    # extra last row is all -1, so node -1 (no such prefix) has no children
    active_counts: tuple[torch.Tensor, ...]  # per level (n_nodes at depth l+1,): active ads below each node
    paths: torch.Tensor  # (N, L): ad row i's node at depth l+1
    leaf_row: torch.Tensor  # (N,): leaf node → ad row
    codes: np.ndarray  # (N, L) the S-IDs, kept so that `with_ads` can rebuild
    ad_ids: np.ndarray  # (N,) str
    active: torch.Tensor  # (N,) bool
    row_of: dict[str, int]
    # per level, like children but -1 where no active ad lies below the child, so "the child exists and is active"
    # is one comparison (derived, so no copy can disagree with active_counts)
    live_children: tuple[torch.Tensor, ...] = field(init=False)

    def __post_init__(self) -> None:
        live = tuple(torch.where(c[t.clamp(min=0)] > 0, t, -1) for t, c in zip(self.children, self.active_counts))
        object.__setattr__(self, "live_children", live)

    @property
    def levels(self) -> int:
        return len(self.level_sizes)

    @property
    def device(self) -> torch.device:
        return self.paths.device

    def to(self, device: torch.device | str) -> Trie:
        """The same trie with its tensors on `device` (itself where they are there already)."""
        device = torch.empty(0, device=device).device  # as tensors name it: "cuda" is "cuda:0"
        if device == self.device:
            return self
        per_level = {name: tuple(t.to(device) for t in getattr(self, name))
                     for name in ("token_ids", "children", "active_counts")}
        return replace(self, **per_level, paths=self.paths.to(device), leaf_row=self.leaf_row.to(device),
                       active=self.active.to(device))

    def __len__(self) -> int:
        return len(self.ad_ids)

    def allowed(self, level: int, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For beams at `nodes` (n,) of depth `level`: the codes that lead to an active ad, (n, K_level) bool, and the
        child node of every code, (n, K_level), -1 where not allowed. Node -1 (no such prefix) allows nothing.
        The codes' tokens are `token_ids[level]`."""
        children = self.live_children[level][nodes]
        return children >= 0, children

    def exclusion_index(self, excluded: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per level, sorted keys `user * n_nodes + node` of the nodes above each user's excluded active ads, one key
        per (user, ad): a node above two of them appears twice. `excluded` holds keys `user * len(trie) + leaf`."""
        keys = torch.sort(excluded.to(self.device)).values
        users, rows = keys // len(self), self.leaf_row[keys % len(self)]
        # an ad excluded twice counts once, and paused ads are not in the active counts to begin with: both get key
        # -1, which no lookup asks for (dropping them would make the host wait to learn how many are left)
        counted = self.active[rows]  # a new tensor: indexing copies
        counted[1:] &= keys[1:] != keys[:-1]
        return tuple(torch.sort(torch.where(counted, users * len(k) + self.paths[rows, level], -1)).values
                     for level, k in enumerate(self.active_counts))

    def excluded_below(self, level: int, children: torch.Tensor, users: torch.Tensor,
                       index: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """How many of `users`' excluded active ads lie below each node `children` of depth `level + 1`
        (`index` from `exclusion_index`; `users` broadcasts against `children`)."""
        wanted = users * len(self.active_counts[level]) + children
        return torch.searchsorted(index[level], wanted, right=True) - torch.searchsorted(index[level], wanted)

    def node_of(self, prefixes: torch.Tensor) -> torch.Tensor:
        """The node of each code prefix (n, d), or -1 where no active ad has that prefix."""
        prefixes = prefixes.to(self.device)
        nodes = torch.zeros(len(prefixes), dtype=torch.long, device=self.device)
        for level in range(prefixes.shape[1]):
            codes = prefixes[:, level]
            # an out-of-range code would alias a sibling subtree's key
            in_range = (codes >= 0) & (codes < self.level_sizes[level])
            child = self.live_children[level][nodes, codes.clamp(0, self.level_sizes[level] - 1)]
            nodes = torch.where(in_range, child, -1)
        return nodes

    def codes_of_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids of partial or complete S-IDs (n, d) → their codes, -1 where a token is not one of its level's."""
        tokens = tokens.to(self.device)
        codes = torch.full(tokens.shape, -1, dtype=torch.long, device=self.device)
        for level in range(tokens.shape[1]):
            match = tokens[:, level, None] == self.token_ids[level]
            codes[:, level] = torch.where(match.any(1), match.int().argmax(1), -1)
        return codes

    def allowed_tokens_after(self, tokens: Sequence[int]) -> list[int]:
        """The token ids that may follow a partial S-ID given as token ids (the shape Hugging Face's
        `prefix_allowed_tokens_fn` wants: one beam at a time, so only for references and tests)."""
        codes = self.codes_of_tokens(torch.tensor(tokens, dtype=torch.long).view(1, -1))
        ok, _ = self.allowed(codes.shape[1], self.node_of(codes))
        return self.token_ids[codes.shape[1]][ok[0]].tolist()

    def ads_at(self, leaves: torch.Tensor) -> np.ndarray:
        """The ad ids of leaf nodes (complete S-IDs), an array shaped like `leaves`."""
        return self.ad_ids[self.leaf_row[leaves.to(self.device)].cpu().numpy()]

    def leaves_of(self, ad_ids: Iterable[str]) -> torch.Tensor:
        """The leaf nodes of the given ads; ads the trie does not hold are skipped (they cannot be generated)."""
        rows = [self.row_of[a] for a in ad_ids if a in self.row_of]
        return self.paths[torch.tensor(rows, dtype=torch.long, device=self.device), -1]

    def with_active(self, ad_ids: Iterable[str], active: bool) -> Trie:
        """A trie with the given ads paused (`active=False`) or re-activated; only the counts on their paths change."""
        ad_ids = set(ad_ids)
        unknown = ad_ids - self.row_of.keys()
        if unknown:
            raise KeyError(f"ads not in the trie: {sorted(unknown)[:5]}")
        rows = torch.tensor(sorted(self.row_of[a] for a in ad_ids), dtype=torch.long, device=self.device)
        rows = rows[self.active[rows] != active]
        delta = torch.full((len(rows),), 1 if active else -1, dtype=torch.long, device=self.device)
        counts = tuple(c.index_add(0, self.paths[rows, level], delta) for level, c in enumerate(self.active_counts))
        flags = self.active.clone()
        flags[rows] = active
        return replace(self, active_counts=counts, active=flags)

    def with_ads(self, ad_ids: Sequence[str], codes: np.ndarray, active: bool = True) -> Trie:
        """A trie that also holds new ads (e.g. from `sids assign`), rebuilt from its own S-IDs plus theirs: their
        tokens already exist, so nothing outside the trie changes. Built on the host, then moved to this trie's
        device."""
        known = [a for a in ad_ids if a in self.row_of]
        if known:
            raise ValueError(f"ads already in the trie: {known[:5]}")
        return build_trie(
            np.concatenate([self.codes, np.asarray(codes, dtype=np.int64).reshape(-1, self.levels)]),
            np.concatenate([self.ad_ids, np.asarray(ad_ids, dtype=object)]),
            np.concatenate([self.active.cpu().numpy(), np.full(len(ad_ids), active)]),
            self.level_sizes,
            self.token_ids,
        ).to(self.device)


def build_trie(
    codes: np.ndarray,
    ad_ids: np.ndarray,
    active: np.ndarray,
    level_sizes: Sequence[int],
    token_ids: Sequence[np.ndarray | torch.Tensor],
) -> Trie:
    """A trie over every ad's S-ID (`codes` (N, L)), on the CPU; inactive ads are held but not allowed until
    re-activated."""
    # copies throughout: a caller changing its arrays later must not change a trie a search may be using
    codes = np.array(codes, dtype=np.int64)
    level_sizes = tuple(int(k) for k in level_sizes)
    if len(codes) == 0:
        raise ValueError("a trie needs at least one ad")
    if codes.ndim != 2 or codes.shape[1] != len(level_sizes):
        raise ValueError(f"codes must be (N, {len(level_sizes)}), got {codes.shape}")
    if ((codes < 0) | (codes >= np.array(level_sizes))).any():
        raise ValueError(f"codes outside the level sizes {level_sizes}")
    if [len(t) for t in token_ids] != list(level_sizes):
        raise ValueError(f"token_ids must have {level_sizes} entries per level")
    flags = torch.tensor(np.asarray(active, dtype=bool))
    parents, n_nodes = np.zeros(len(codes), dtype=np.int64), [1]  # nodes per depth: the root, then each level's
    tables, nodes = [], []
    for level, size in enumerate(level_sizes):
        keys, parents = np.unique(parents * size + codes[:, level], return_inverse=True)
        table = np.full((n_nodes[-1] + 1, size), -1, dtype=np.int64)  # + the row of node -1
        table[keys // size, keys % size] = np.arange(len(keys))
        tables.append(torch.from_numpy(table))
        nodes.append(torch.from_numpy(parents.reshape(-1)))
        n_nodes.append(len(keys))
    if n_nodes[-1] != len(codes):
        raise ValueError("two ads share an S-ID: the last level must separate colliding ads")
    paths = torch.stack(nodes, dim=1)
    counts = tuple(torch.bincount(paths[flags, level], minlength=n_nodes[level + 1]) for level in range(len(tables)))
    leaf_row = torch.empty(len(codes), dtype=torch.long)
    leaf_row[paths[:, -1]] = torch.arange(len(codes))
    ad_ids = np.array(ad_ids, dtype=object)
    return Trie(
        level_sizes=level_sizes,
        token_ids=tuple(torch.as_tensor(t, dtype=torch.long, device="cpu").clone() for t in token_ids),
        children=tuple(tables),
        active_counts=counts,
        paths=paths,
        leaf_row=leaf_row,
        codes=codes,
        ad_ids=ad_ids,
        active=flags,
        row_of={a: i for i, a in enumerate(ad_ids)},
    )


def trie_from_table(
    table: SidTable, token_ids: Sequence[np.ndarray | torch.Tensor], active_ads: Iterable[str] | None = None
) -> Trie:
    """The trie of an S-ID table; `token_ids[level][code]` is the vocabulary id of that S-ID token (see
    `leadre.tokenizer.sid_token_ids`); `active_ads` (default: all) are the ads decoding may produce."""
    if active_ads is None:
        active = np.ones(len(table), dtype=bool)
    else:
        wanted = set(active_ads)
        active = np.array([a in wanted for a in table.ad_ids], dtype=bool)
    return build_trie(table.codes, table.ad_ids, active, table.level_sizes, token_ids)

