from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from leadre.decode import HFStepModel, search
from leadre.trie import Trie, trie_from_table
from tests.test_trie import LEVEL_SIZES, ORDINARY_TOKENS, random_table, sid_ids_after_ordinary

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
