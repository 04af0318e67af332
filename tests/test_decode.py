from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from leadre.decode import HFStepModel, exclusion_keys, left_pad, search, search_batch
from leadre.recall import LLMRecaller
from leadre.trie import Trie, trie_from_table
from tests.test_trie import LEVEL_SIZES, NO_CUDA, ORDINARY_TOKENS, random_table, sid_ids_after_ordinary

N_ADS = 24


@pytest.fixture(scope="module")
def model() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=ORDINARY_TOKENS + sum(LEVEL_SIZES),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        # wide weights give peaked, well-separated scores, so rankings do not hinge on float noise
        initializer_range=0.3,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def trie() -> Trie:
    return trie_from_table(random_table(N_ADS, LEVEL_SIZES, seed=3), sid_ids_after_ordinary(LEVEL_SIZES))


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(4)
    lengths = [5, 9, 3, 7, 9, 4]
    return [torch.randint(1, ORDINARY_TOKENS, (n,), generator=generator).tolist() for n in lengths]


@torch.inference_mode()
def brute_force(model: Qwen2ForCausalLM, trie: Trie, prompt: list[int]) -> list[tuple[str, float]]:
    """Every active ad scored by teacher forcing its S-ID after the prompt (full-vocabulary log-softmax), best first."""
    rows = torch.nonzero(trie.active).flatten()
    codes = torch.as_tensor(trie.codes[rows.numpy()])
    sid_tokens = torch.stack([trie.token_ids[level][codes[:, level]] for level in range(trie.levels)], 1)
    input_ids = torch.cat([torch.tensor(prompt).expand(len(rows), -1), sid_tokens], dim=1)
    log_probs = torch.log_softmax(model(input_ids=input_ids).logits.float(), dim=-1)
    predicted = log_probs[:, len(prompt) - 1 : -1].gather(2, sid_tokens[:, :, None])
    scores = predicted.sum(dim=(1, 2))
    return sorted(zip(trie.ad_ids[rows.numpy()].tolist(), scores.tolist()), key=lambda pair: -pair[1])


@torch.inference_mode()
def brute_force_renormalized(model: Qwen2ForCausalLM, trie: Trie, prompt: list[int]) -> list[tuple[str, float]]:
    """Every active ad scored by teacher forcing, each code's log-probability normalised over the codes the trie
    allows after that ad's prefix, best first."""
    rows = torch.nonzero(trie.active).flatten()
    codes = torch.as_tensor(trie.codes[rows.numpy()])
    sid_tokens = torch.stack([trie.token_ids[level][codes[:, level]] for level in range(trie.levels)], 1)
    logits = model(input_ids=torch.cat([torch.tensor(prompt).expand(len(rows), -1), sid_tokens], dim=1)).logits.float()
    scores = torch.zeros(len(rows))
    for level in range(trie.levels):
        nodes = trie.node_of(codes[:, :level]) if level else torch.zeros(len(rows), dtype=torch.long)
        allowed, _ = trie.allowed(level, nodes)
        level_logits = logits[:, len(prompt) - 1 + level][:, trie.token_ids[level]].masked_fill(~allowed, -torch.inf)
        scores += level_logits.log_softmax(-1).gather(1, codes[:, level : level + 1]).squeeze(1)
    return sorted(zip(trie.ad_ids[rows.numpy()].tolist(), scores.tolist()), key=lambda pair: -pair[1])


def assert_same_ranking(got: list[tuple[str, float]], expected: list[tuple[str, float]]) -> None:
    assert [ad for ad, _ in got] == [ad for ad, _ in expected]
    assert [s for _, s in got] == pytest.approx([s for _, s in expected], abs=1e-4)


def test_exhaustive_beam_matches_brute_force(model, trie, prompts):
    results = search(HFStepModel(model), trie, prompts, top_n=10, beam_width=N_ADS, progress=False)
    for prompt, got in zip(prompts, results):
        assert_same_ranking(got, brute_force(model, trie, prompt)[:10])


def test_renormalized_search_matches_renormalized_brute_force(model, trie, prompts):
    paused = trie.with_active(trie.ad_ids[:N_ADS // 2].tolist(), False)  # pausing changes what each prefix allows
    results = search(HFStepModel(model), paused, prompts, top_n=10, beam_width=N_ADS, progress=False, renormalize=True)
    for prompt, got in zip(prompts, results):
        expected = brute_force_renormalized(model, paused, prompt)
        assert_same_ranking(got, expected[:10])
        assert expected != brute_force(model, paused, prompt)  # the two scorings really differ


def test_batched_prompts_of_different_lengths_match_one_by_one(model, trie, prompts):
    step_model = HFStepModel(model)
    batched = search(step_model, trie, prompts, top_n=5, beam_width=8, batch_size=4, progress=False)
    alone = search(step_model, trie, prompts, top_n=5, beam_width=8, batch_size=1, progress=False)
    for got, expected in zip(batched, alone):
        assert_same_ranking(got, expected)


def test_matches_hugging_face_constrained_beam_search(model, trie, prompts):
    beams, levels = 6, trie.levels
    prompt = prompts[1]
    generated = model.generate(
        input_ids=torch.tensor([prompt]),
        num_beams=beams,
        num_return_sequences=beams,
        max_new_tokens=levels,
        do_sample=False,
        prefix_allowed_tokens_fn=lambda _, ids: trie.allowed_tokens_after(ids[len(prompt) :].tolist()),
    )
    leaves = trie.node_of(trie.codes_of_tokens(generated[:, len(prompt) :]))
    assert (leaves >= 0).all()
    hf_ads = trie.ads_at(leaves).tolist()
    ours = search(HFStepModel(model), trie, [prompt], top_n=beams, beam_width=beams, progress=False)[0]
    assert [ad for ad, _ in ours] == hf_ads


def test_exclusion_drops_ads_and_still_returns_top_n(model, trie, prompts):
    expected = brute_force(model, trie, prompts[0])
    seen = {expected[0][0], expected[3][0]}
    got = search(HFStepModel(model), trie, prompts[:1], top_n=5, beam_width=N_ADS, exclude=[seen], progress=False)[0]
    assert_same_ranking(got, [pair for pair in expected if pair[0] not in seen][:5])


def test_exclusion_is_per_user(model, trie, prompts):
    first = brute_force(model, trie, prompts[0])[0][0]
    exclude = [{first}, set(), set(), set()]
    got = search(HFStepModel(model), trie, prompts[:2] * 2, N_ADS, beam_width=N_ADS, exclude=exclude, progress=False)
    assert first not in dict(got[0])
    assert first in dict(got[2])


def test_pausing_an_ad_removes_it_from_later_answers(model, trie, prompts):
    step_model = HFStepModel(model)
    top = search(step_model, trie, prompts[:1], top_n=3, progress=False)[0][0][0]
    paused = trie.with_active([top], False)
    got = search(step_model, paused, prompts[:1], top_n=5, beam_width=N_ADS, progress=False)[0]
    assert top not in dict(got)
    assert_same_ranking(got, brute_force(model, paused, prompts[0])[:5])


def test_fewer_valid_ads_than_beams_gives_short_valid_lists(model, trie, prompts):
    few = trie.with_active(trie.ad_ids[3:].tolist(), False)
    results = search(HFStepModel(model), few, prompts, top_n=10, beam_width=20, progress=False)
    for prompt, got in zip(prompts, results):
        assert_same_ranking(got, brute_force(model, few, prompt))
        assert {ad for ad, _ in got} == set(trie.ad_ids[:3])


@pytest.mark.parametrize("renormalize", [False, True])
def test_exclusion_prunes_prefixes_so_narrow_beams_return_full_lists(model, trie, prompts, renormalize):
    """Exclude every ad below each user's best first-level code (plus a paused ad and one more): a search that
    masked seen ads only at the last level would spend its narrow beams on those prefixes and come back short."""
    paused = trie.with_active(["ad0", "ad1"], False)
    step_model = HFStepModel(model)
    exclude = []
    for prompt in prompts:
        ranking = brute_force(model, paused, prompt)
        first = paused.codes[paused.row_of[ranking[0][0]], 0]
        exclude.append({ad for ad, codes in zip(paused.ad_ids, paused.codes) if codes[0] == first}
                       | {"ad0", ranking[-1][0]})
    got = search(step_model, paused, prompts, top_n=5, beam_width=5, exclude=exclude, progress=False,
                 renormalize=renormalize)
    for prompt, seen, ads in zip(prompts, exclude, got):
        allowed = [ad for ad, _ in brute_force(model, paused, prompt) if ad not in seen]
        assert len(ads) == 5 <= len(allowed)  # full, with no excluded, paused or repeated ad
        assert len(dict(ads)) == 5 and set(dict(ads)) <= set(allowed)
        # excluding is pausing those ads for this user alone: the same search over a trie without them
        alone = search(step_model, paused.with_active(seen, False), [prompt], top_n=5, beam_width=5, progress=False,
                       renormalize=renormalize)[0]
        assert_same_ranking(ads, alone)
    if not renormalize:  # an exhaustive beam is exact: the brute-force ranking without the excluded ads
        exhaustive = search(step_model, paused, prompts, top_n=5, beam_width=N_ADS, exclude=exclude, progress=False)
        for prompt, seen, ads in zip(prompts, exclude, exhaustive):
            assert_same_ranking(ads, [pair for pair in brute_force(model, paused, prompt) if pair[0] not in seen][:5])


def test_exclusion_leaves_short_lists_only_where_too_few_ads_are_left(model, trie, prompts):
    keep = set(trie.ad_ids[:4])
    exclude = [set(trie.ad_ids) - keep, set(trie.ad_ids[2:])]  # 4 ads left for the first user, 2 for the second
    got = search(HFStepModel(model), trie, prompts[:2], top_n=5, beam_width=5, exclude=exclude, progress=False)
    assert {ad for ad, _ in got[0]} == keep and {ad for ad, _ in got[1]} == set(trie.ad_ids[:2])
    assert_same_ranking(got[0], [pair for pair in brute_force(model, trie, prompts[0]) if pair[0] in keep])


class TableStep:
    """A `StepModel` whose logits are a fixed random function of the last token plus the row's earlier logits, on
    any device. A unit-test stand-in for the real models above: on "meta" (no data) any host copy or mix with a
    host tensor is an error, which shows where the search's work runs."""

    def __init__(self, device: str, seed: int = 0):
        vocab = ORDINARY_TOKENS + sum(LEVEL_SIZES)
        self.device = torch.device(device)
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)).to(self.device)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.table[input_ids.to(self.device)[:, -1]]
        return logits, logits

    def step(self, tokens: torch.Tensor, rows: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = state[rows] + self.table[tokens]
        return logits, logits


@pytest.mark.parametrize("renormalize", [False, True])
def test_search_batch_runs_on_the_logits_device(trie, prompts, renormalize):
    """Logits on "meta": every level's masks (seen ads' included), top-k and gathers must run there; a `.cpu()` or a
    mask built on the host would raise. A trie still on the host is moved for the call."""
    input_ids, attention_mask = left_pad(prompts)
    for placed in (trie, trie.to("meta")):
        excluded = exclusion_keys(placed, [set(trie.ad_ids[:3])] * len(prompts))
        leaves, scores = search_batch(TableStep("meta"), placed, input_ids, attention_mask, top_n=5, beam_width=8,
                                      excluded=excluded, renormalize=renormalize)
        assert leaves.device.type == scores.device.type == "meta"
        assert leaves.shape == scores.shape == (len(prompts), 5)


def test_recaller_places_its_trie_on_the_step_device(model, trie):
    on_meta = LLMRecaller(TableStep("meta"), None, trie)
    assert on_meta.trie.device.type == "meta" and trie.device.type == "cpu"
    paused = trie.with_active(["ad0"], False)
    assert on_meta.with_trie(paused).trie.device.type == "meta" and paused.device.type == "cpu"
    assert LLMRecaller(HFStepModel(model), None, trie).trie is trie  # already where the model is: no copy


@NO_CUDA
@pytest.mark.parametrize("renormalize", [False, True])
def test_search_on_cuda_matches_the_host(model, trie, prompts, renormalize):
    paused = trie.with_active(["ad0", "ad1"], False)
    exclude = [set(trie.ad_ids[i : i + 4]) for i in range(len(prompts))]
    on_cpu = search(HFStepModel(model), paused, prompts, top_n=5, beam_width=6, exclude=exclude, progress=False,
                    renormalize=renormalize)
    on_cuda = HFStepModel(copy.deepcopy(model).to("cuda"))
    for placed in (paused.to("cuda"), paused):  # placed once, or moved by the search
        got = search(on_cuda, placed, prompts, top_n=5, beam_width=6, exclude=exclude, progress=False,
                     renormalize=renormalize)
        for ours, expected in zip(got, on_cpu):
            assert [ad for ad, _ in ours] == [ad for ad, _ in expected]
            assert [s for _, s in ours] == pytest.approx([s for _, s in expected], abs=1e-3)


@NO_CUDA
def test_search_batch_on_cuda_never_waits_for_the_host(trie, prompts):
    """Once the prompts and the excluded ads are on the GPU, the search never synchronises with the host."""
    step, placed = TableStep("cuda"), trie.to("cuda")
    input_ids, attention_mask = (t.to("cuda") for t in left_pad(prompts))
    excluded = exclusion_keys(placed, [set(trie.ad_ids[:3])] * len(prompts))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        leaves, scores = search_batch(step, placed, input_ids, attention_mask, top_n=5, beam_width=8, excluded=excluded)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert leaves.device.type == "cuda" and torch.isfinite(scores).all()
    assert not set(placed.ads_at(leaves).ravel()) & set(trie.ad_ids[:3])
