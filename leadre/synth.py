"""The synthetic ad marketplace: LEADRE's embedded default dataset, deterministic by seed.

Generative story (what a recall model can learn, and popularity cannot):
- Categories split into subtopics; ads and contents belong to one (category, subtopic) and their text names it,
  so text embeddings cluster the way users' interests do.
- A user's profile (age, gender, region, occupation) shifts their prior over categories; each user holds a few
  weighted categories and a favourite subtopic in each. About half of the users swap one interest part-way
  through their timeline (interest drift), so recent behaviour beats the long-term summary for them.
- Each ad has a follow-up ad in its subtopic (the next product of a series); after a click the next ad
  impression is often the follow-up, which gives sequential structure.
- Impressions come mostly from the user's interests and partly from global popularity; clicks follow the ad's
  pCTR and whether it matches the user's interest; some clicks convert. eCPM = bid × pCTR × 1000.
- Content (articles, videos) follows the same interests and is viewed more often than ads are shown.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from tqdm import tqdm

from leadre.schema import Tables

log = logging.getLogger(__name__)

# category -> subtopic -> product nouns. Subtopics are what users really like; ad text names them.
CATALOGUE: dict[str, dict[str, list[str]]] = {
    "travel": {
        "flights": ["flight deals", "round-trip airfare", "last-minute flights", "airline miles card"],
        "hotels": ["boutique hotel stays", "beach resort packages", "city hotel rooms", "spa hotel weekends"],
        "cruises": ["Caribbean cruises", "river cruises", "Alaska cruise tours", "family cruise deals"],
        "adventure": ["hiking tours", "safari trips", "ski holidays", "diving trips"],
    },
    "finance": {
        "banking": ["high-yield savings accounts", "checking accounts", "mobile banking app", "cashback debit card"],
        "investing": ["index fund portfolios", "stock trading app", "robo-advisor", "retirement plans"],
        "credit": ["travel credit cards", "personal loans", "credit score monitoring", "balance transfer cards"],
        "insurance": ["car insurance quotes", "home insurance", "life insurance plans", "pet insurance"],
    },
    "gaming": {
        "mobile_games": ["puzzle game", "strategy game for phones", "idle RPG", "match-three game"],
        "console": ["console bundles", "wireless controllers", "racing game", "open-world adventure game"],
        "pc_gaming": ["gaming laptops", "mechanical keyboards", "gaming mice", "graphics cards"],
        "esports": ["esports tournament passes", "streaming headsets", "gaming chairs", "team jerseys"],
    },
    "beauty": {
        "skincare": ["vitamin C serum", "daily moisturizer", "sunscreen SPF 50", "night repair cream"],
        "makeup": ["long-wear lipstick", "liquid foundation", "waterproof mascara", "eyeshadow palette"],
        "haircare": ["repair shampoo", "hair dryer", "curl cream", "scalp treatment"],
        "fragrance": ["eau de parfum", "citrus cologne", "perfume gift set", "travel-size fragrance"],
    },
    "food": {
        "delivery": ["meal delivery app", "grocery delivery", "pizza delivery deals", "sushi delivery"],
        "meal_kits": ["vegan meal kits", "family meal kits", "keto meal boxes", "15-minute meal kits"],
        "coffee": ["espresso beans", "coffee subscription", "cold brew maker", "pour-over kettle"],
        "snacks": ["protein bars", "healthy snack boxes", "dark chocolate", "roasted nuts"],
    },
    "fitness": {
        "gym": ["gym memberships", "personal training sessions", "boxing classes", "climbing gym pass"],
        "running": ["running shoes", "GPS running watch", "marathon training plan", "running jackets"],
        "yoga": ["yoga mats", "online yoga classes", "meditation app", "yoga retreats"],
        "home_workout": ["adjustable dumbbells", "smart exercise bike", "resistance bands", "rowing machine"],
    },
    "fashion": {
        "womenswear": ["summer dresses", "linen blouses", "wool coats", "ankle boots"],
        "menswear": ["slim-fit suits", "oxford shirts", "leather belts", "chelsea boots"],
        "sneakers": ["retro sneakers", "limited-edition sneakers", "running-inspired trainers", "canvas sneakers"],
        "accessories": ["leather handbags", "minimalist watches", "sunglasses", "silk scarves"],
    },
    "electronics": {
        "phones": ["flagship smartphones", "budget phones", "phone cases", "fast chargers"],
        "audio": ["noise-cancelling headphones", "wireless earbuds", "bluetooth speakers", "soundbars"],
        "computers": ["ultrabook laptops", "4K monitors", "tablets", "external SSDs"],
        "smart_home": ["smart speakers", "video doorbells", "smart thermostats", "robot vacuums"],
    },
    "home": {
        "furniture": ["sofa beds", "standing desks", "dining tables", "bookshelves"],
        "kitchen": ["non-stick pans", "air fryers", "chef knives", "stand mixers"],
        "garden": ["patio furniture", "garden tools", "seed kits", "outdoor lighting"],
        "decor": ["wall art prints", "scented candles", "area rugs", "indoor plants"],
    },
    "automotive": {
        "new_cars": ["compact SUVs", "electric sedans", "hybrid hatchbacks", "pickup trucks"],
        "ev_charging": ["home EV chargers", "charging network plans", "portable EV chargers", "solar carports"],
        "car_care": ["ceramic coating", "car wash subscriptions", "all-season tyres", "dash cams"],
        "motorbikes": ["electric scooters", "motorcycle helmets", "touring motorbikes", "riding jackets"],
    },
    "education": {
        "languages": ["Spanish lessons", "language learning app", "Japanese courses", "English tutoring"],
        "coding": ["Python bootcamp", "web development course", "data science certificate", "coding for kids"],
        "test_prep": ["SAT prep course", "GMAT practice tests", "bar exam prep", "medical exam review"],
        "degrees": ["online MBA", "nursing degrees", "part-time masters", "university open days"],
    },
    "pets": {
        "dog": ["grain-free dog food", "dog training classes", "chew toys", "dog beds"],
        "cat": ["cat litter", "cat trees", "wet cat food", "cat toys"],
        "aquarium": ["aquarium kits", "tropical fish food", "aquarium filters", "aquascaping plants"],
        "pet_health": ["flea treatment", "pet vitamins", "vet telehealth", "pet dental care"],
    },
    "entertainment": {
        "streaming": ["movie streaming plans", "anime streaming", "documentary channels", "sports streaming"],
        "music": ["music streaming", "concert tickets", "vinyl records", "festival passes"],
        "books": ["audiobook subscriptions", "e-readers", "bestselling thrillers", "book club boxes"],
        "events": ["comedy show tickets", "theatre tickets", "escape rooms", "theme park passes"],
    },
    "health": {
        "nutrition": ["multivitamins", "plant protein powder", "omega-3 capsules", "meal planning app"],
        "sleep": ["memory foam mattresses", "sleep trackers", "weighted blankets", "blackout curtains"],
        "mental_health": ["online therapy", "mindfulness courses", "stress relief journals", "sleep sounds app"],
        "eyecare": ["prescription glasses", "contact lenses", "blue-light glasses", "eye exams"],
    },
    "parenting": {
        "baby": ["baby strollers", "organic diapers", "baby monitors", "car seats"],
        "toys": ["building blocks", "educational toys", "plush toys", "wooden train sets"],
        "kids_clothing": ["school uniforms", "kids rain boots", "pyjama sets", "kids sneakers"],
        "family_activities": ["family board games", "kids summer camps", "zoo memberships", "craft kits"],
    },
    "real_estate": {
        "rentals": ["city apartments for rent", "furnished studios", "student housing", "short-term rentals"],
        "buying": ["mortgage pre-approval", "new-build homes", "home valuation", "first-home buyer guides"],
        "moving": ["moving companies", "storage units", "packing boxes", "van rentals"],
        "renovation": ["kitchen remodelling", "bathroom renovation", "solar panels", "interior designers"],
    },
}

ADJECTIVES = ["premium", "affordable", "award-winning", "eco-friendly", "bestselling", "new", "smart", "classic",
              "lightweight", "professional", "handmade", "limited-time", "top-rated", "compact", "luxury", "everyday"]
BENEFITS = ["Free shipping on your first order", "Save 20% this week", "Trusted by thousands of customers",
            "Try it free for 30 days", "Cancel anytime", "Rated 4.8 out of 5", "Exclusive online offer",
            "Made to last", "Easy returns", "Members get early access"]
AUDIENCES = ["students", "young professionals", "busy parents", "families", "retirees", "beginners", "experts",
             "city dwellers", "outdoor lovers", "home owners"]
CONTENT_FORMATS = ["{n} tips for choosing {x}", "Review: are {x} worth it?", "Beginner's guide to {x}",
                   "Video: {x} tested for a month", "The best {x} of the year", "How to save money on {x}",
                   "Ask an expert: {x}", "{x}: what nobody tells you"]
NAME_HEADS = ["Nova", "Blue", "Peak", "Urban", "Green", "Swift", "True", "Prime", "Lumen", "Atlas", "Ever",
              "Bright", "Silver", "North", "Sun", "Maple", "Iron", "Cedar", "Vivid", "Hello", "Orbit", "Pine"]
NAME_TAILS = ["Labs", "Co", "Works", "Hub", "Go", "Mart", "Line", "Nest", "Box", "Point", "Craft", "Wave", "Field"]

AGE_BUCKETS = ["18-24", "25-34", "35-44", "45-54", "55+"]
GENDERS = ["female", "male", "unspecified"]
REGIONS = ["north", "south", "east", "west", "central", "coastal", "mountain", "capital"]
OCCUPATIONS = ["student", "engineer", "teacher", "sales", "healthcare", "artist", "manager", "retired",
               "self-employed", "service", "researcher", "homemaker"]
POSITIVE_ACTIONS = ("click", "conversion")


@dataclass(frozen=True)
class SynthConfig:
    users: int = 2000
    seed: int = 0
    ads: int | None = None  # default: users // 10, clipped to [128, 10000]
    contents: int | None = None  # default: as many as ads
    events_per_user: float = 40.0  # mean impressions + content views per user (log-normal, heavy tail)
    ad_share: float = 0.45  # fraction of events that are ad impressions
    interests_per_user: int = 3
    favourite_subtopic: float = 0.75  # probability an interest-driven event hits the user's favourite subtopic
    drift_share: float = 0.5  # users who swap one interest part-way through
    follow_up: float = 0.35  # probability the impression after a click is the clicked ad's follow-up
    noise: float = 0.15  # impressions drawn from global popularity instead of interests
    inactive_share: float = 0.02  # ads paused at the end of the log
    days: int = 60

    def n_ads(self) -> int:
        return self.ads if self.ads is not None else int(np.clip(self.users // 10, 128, 10000))

    def n_contents(self) -> int:
        return self.contents if self.contents is not None else self.n_ads()


def _names(rng: np.random.Generator, n: int) -> list[str]:
    heads = rng.choice(NAME_HEADS, size=n)
    tails = rng.choice(NAME_TAILS, size=n)
    return [f"{h}{t}" if i < len(NAME_HEADS) * len(NAME_TAILS) else f"{h}{t} {i}" for i, (h, t) in enumerate(zip(heads, tails))]


def _groups() -> tuple[list[str], list[str], list[list[str]]]:
    """Flat (category, subtopic, nouns) per group index."""
    cats, subs, nouns = [], [], []
    for cat, topics in CATALOGUE.items():
        for sub, words in topics.items():
            cats.append(cat)
            subs.append(sub)
            nouns.append(words)
    return cats, subs, nouns


def _item_groups(rng: np.random.Generator, n: int, n_groups: int) -> np.ndarray:
    """Assign n items to groups, every group non-empty when n >= n_groups, sizes uneven like real catalogues."""
    weights = rng.gamma(2.0, 1.0, n_groups)
    groups = rng.choice(n_groups, size=n, p=weights / weights.sum())
    groups[: min(n, n_groups)] = np.arange(min(n, n_groups))
    return rng.permutation(groups)


def _popularity(rng: np.random.Generator, groups: np.ndarray, n_groups: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Zipf-like popularity per item within its group; returns (weights, members per group)."""
    weights = np.zeros(len(groups))
    members = []
    for g in range(n_groups):
        idx = np.flatnonzero(groups == g)
        ranks = rng.permutation(len(idx))
        weights[idx] = 1.0 / (ranks + 2.0) ** 1.1
        members.append(idx)
    return weights, members


class _GroupSampler:
    """Draw an item from a group by its popularity, vectorised over many draws."""

    def __init__(self, weights: np.ndarray, members: list[np.ndarray]):
        self.order = np.concatenate(members)
        w = weights[self.order]
        self.starts = np.cumsum([0] + [len(m) for m in members])
        group_tot = np.add.reduceat(w, self.starts[:-1]) if len(w) else np.zeros(0)
        self.cum = np.cumsum(w)
        self.base = np.concatenate([[0.0], self.cum])[self.starts[:-1]]
        self.tot = group_tot

    def sample(self, rng: np.random.Generator, groups: np.ndarray) -> np.ndarray:
        u = self.base[groups] + rng.random(len(groups)) * self.tot[groups]
        pos = np.searchsorted(self.cum, u, side="right")
        pos = np.clip(pos, self.starts[groups], self.starts[groups + 1] - 1)
        return self.order[pos]


def _ads(rng: np.random.Generator, cfg: SynthConfig, cats, subs, nouns) -> tuple[pd.DataFrame, np.ndarray]:
    n, n_groups = cfg.n_ads(), len(cats)
    groups = _item_groups(rng, n, n_groups)
    cat_names = sorted(CATALOGUE)
    # A handful of advertisers per category; each ad's advertiser comes from its category.
    per_cat = max(2, n // (len(cat_names) * 12))
    names = _names(rng, per_cat * len(cat_names))
    advertiser_of = {c: names[i * per_cat:(i + 1) * per_cat] for i, c in enumerate(cat_names)}
    bid = np.round(rng.lognormal(0.3, 0.5, n), 2)
    pctr = np.round(rng.beta(2.0, 50.0, n), 4)
    rows = []
    for i, g in enumerate(groups):
        cat, sub, words = cats[g], subs[g], nouns[g]
        advertiser = advertiser_of[cat][rng.integers(per_cat)]
        noun, adj = words[rng.integers(len(words))], ADJECTIVES[rng.integers(len(ADJECTIVES))]
        audience, benefit = AUDIENCES[rng.integers(len(AUDIENCES))], BENEFITS[rng.integers(len(BENEFITS))]
        rows.append({
            "title": f"{advertiser}: {adj} {noun}",
            "description": f"{adj.capitalize()} {noun} from {advertiser}, made for {audience}. {benefit}.",
            "category": cat,
            "subtopic": sub,
            "advertiser": advertiser,
        })
    ads = pd.DataFrame(rows)
    width = len(str(n))
    ads.insert(0, "ad_id", [f"ad{i:0{width}d}" for i in range(n)])
    ads["bid"] = bid
    ads["pctr"] = pctr
    ads["ecpm"] = np.round(bid * pctr * 1000.0, 4)
    ads["active"] = rng.random(n) >= cfg.inactive_share
    return ads, groups


def _contents(rng: np.random.Generator, cfg: SynthConfig, cats, subs, nouns) -> tuple[pd.DataFrame, np.ndarray]:
    n, n_groups = cfg.n_contents(), len(cats)
    groups = _item_groups(rng, n, n_groups)
    titles = []
    for g in groups:
        fmt = CONTENT_FORMATS[rng.integers(len(CONTENT_FORMATS))]
        titles.append(fmt.format(n=rng.integers(3, 11), x=nouns[g][rng.integers(len(nouns[g]))]))
    width = len(str(n))
    contents = pd.DataFrame({
        "content_id": [f"c{i:0{width}d}" for i in range(n)],
        "title": titles,
        "category": [cats[g] for g in groups],
        "subtopic": [subs[g] for g in groups],
        "format": rng.choice(["article", "video", "short"], size=n),
    })
    return contents, groups


def _users(rng: np.random.Generator, cfg: SynthConfig, n_cats: int) -> tuple[pd.DataFrame, np.ndarray]:
    n = cfg.users
    profile = {
        "age_bucket": rng.integers(len(AGE_BUCKETS), size=n),
        "gender": rng.choice(len(GENDERS), size=n, p=[0.48, 0.48, 0.04]),
        "region": rng.integers(len(REGIONS), size=n),
        "occupation": rng.integers(len(OCCUPATIONS), size=n),
    }
    # The profile shifts the prior over categories: age and occupation matter most.
    logits = (rng.normal(0, 1.2, (len(AGE_BUCKETS), n_cats))[profile["age_bucket"]]
              + rng.normal(0, 0.8, (len(GENDERS), n_cats))[profile["gender"]]
              + rng.normal(0, 1.0, (len(OCCUPATIONS), n_cats))[profile["occupation"]]
              + rng.normal(0, 0.3, (len(REGIONS), n_cats))[profile["region"]])
    width = len(str(n))
    users = pd.DataFrame({
        "user_id": [f"u{i:0{width}d}" for i in range(n)],
        "age_bucket": np.array(AGE_BUCKETS)[profile["age_bucket"]],
        "gender": np.array(GENDERS)[profile["gender"]],
        "region": np.array(REGIONS)[profile["region"]],
        "occupation": np.array(OCCUPATIONS)[profile["occupation"]],
    })
    return users, logits


def _sample_without_replacement(rng: np.random.Generator, logits: np.ndarray, k: int) -> np.ndarray:
    """k distinct indices per row with probability ∝ softmax(logits) (Gumbel top-k)."""
    gumbel = logits - np.log(-np.log(rng.random(logits.shape)))
    return np.argsort(-gumbel, axis=1)[:, :k]


def generate(cfg: SynthConfig) -> Tables:
    """Generate the marketplace. Same config, same tables."""
    rng = np.random.default_rng(cfg.seed)
    cats, subs, nouns = _groups()
    cat_names = sorted(CATALOGUE)
    cat_index = np.array([cat_names.index(c) for c in cats])
    n_cats, n_subs = len(cat_names), len(CATALOGUE[cat_names[0]])
    ads, ad_group = _ads(rng, cfg, cats, subs, nouns)
    contents, content_group = _contents(rng, cfg, cats, subs, nouns)
    users, cat_logits = _users(rng, cfg, n_cats)

    ad_pop, ad_members = _popularity(rng, ad_group, len(cats))
    content_pop, content_members = _popularity(rng, content_group, len(cats))
    ad_sampler, content_sampler = _GroupSampler(ad_pop, ad_members), _GroupSampler(content_pop, content_members)
    # Follow-up: the next ad of a "series" within the same subtopic (a cycle over the group's members).
    follow = np.arange(len(ads))
    for m in ad_members:
        if len(m) > 1:
            order = rng.permutation(m)
            follow[order] = np.roll(order, -1)
    ad_global = ad_pop / ad_pop.sum()

    n_users, k = cfg.users, cfg.interests_per_user
    interests = _sample_without_replacement(rng, cat_logits, k)  # (U, k) category indices
    interest_w = rng.dirichlet(np.ones(k), size=n_users)
    favourite = rng.integers(n_subs, size=(n_users, n_cats))
    drifted = rng.random(n_users) < cfg.drift_share
    new_interest = _sample_without_replacement(rng, cat_logits + np.where(
        np.eye(n_cats, dtype=bool)[interests].any(1), -1e9, 0.0), 1)[:, 0]
    swapped_slot = rng.integers(k, size=n_users)
    n_events = np.maximum(8, rng.lognormal(np.log(cfg.events_per_user) - 0.18, 0.6, n_users)).astype(int)
    change_at = np.where(drifted, (rng.uniform(0.3, 0.8, n_users) * n_events).astype(int), n_events + 1)
    start = rng.uniform(0, cfg.days * 86400 * 0.5, n_users)
    clock = start.copy()
    last_click = np.full(n_users, -1)
    group_of = np.full((n_cats, n_subs), -1)
    for g, (c, s) in enumerate(zip(cats, subs)):
        group_of[cat_names.index(c), list(CATALOGUE[c]).index(s)] = g
    rate = n_events / (cfg.days * 86400 * 0.5)  # events per second; spreads a timeline over ~half the window

    out_user, out_item, out_ad, out_action, out_ts = [], [], [], [], []
    for t in tqdm(range(int(n_events.max())), desc="synth timeline", unit="step", leave=False, disable=None):
        u = np.flatnonzero(n_events > t)
        m = len(u)
        clock[u] += rng.exponential(1.0 / rate[u])
        slot = (interest_w[u].cumsum(1) < rng.random(m)[:, None]).sum(1).clip(max=k - 1)
        cat = interests[u, slot]
        cat = np.where((t >= change_at[u]) & (slot == swapped_slot[u]), new_interest[u], cat)
        sub = np.where(rng.random(m) < cfg.favourite_subtopic, favourite[u, cat], rng.integers(n_subs, size=m))
        group = group_of[cat, sub]
        is_ad = rng.random(m) < cfg.ad_share

        # Ad impressions: interest-driven, follow-ups after clicks, or popularity noise.
        ua, ga = u[is_ad], group[is_ad]
        ad = ad_sampler.sample(rng, ga)
        take_follow = (last_click[ua] >= 0) & (rng.random(len(ua)) < cfg.follow_up)
        ad = np.where(take_follow, follow[np.maximum(last_click[ua], 0)], ad)
        noisy = rng.random(len(ua)) < cfg.noise
        ad = np.where(noisy, rng.choice(len(ads), size=len(ua), p=ad_global), ad)
        current = interests[ua].copy()
        now_drifted = t >= change_at[ua]
        current[now_drifted, swapped_slot[ua][now_drifted]] = new_interest[ua][now_drifted]
        in_interest = (current == cat_index[ad_group[ad]][:, None]).any(1) & ~noisy
        p_click = np.where(in_interest, np.clip(0.45 + 4.0 * ads["pctr"].to_numpy()[ad], 0, 0.95), 0.03)
        clicked = rng.random(len(ua)) < p_click
        converted = clicked & (rng.random(len(ua)) < 0.2)
        last_click[ua[clicked]] = ad[clicked]

        uc, gc = u[~is_ad], group[~is_ad]
        content = content_sampler.sample(rng, gc)
        liked = rng.random(len(uc)) < 0.3

        ts = clock[u]
        out_user += [ua, uc, ua[converted]]
        out_item += [ad, content, ad[converted]]
        out_ad += [np.ones(len(ua), bool), np.zeros(len(uc), bool), np.ones(int(converted.sum()), bool)]
        out_action += [np.where(clicked, "click", "view"), np.where(liked, "like", "view"), np.full(int(converted.sum()), "conversion")]
        out_ts += [ts[is_ad], ts[~is_ad], ts[is_ad][converted] + rng.uniform(30, 900, int(converted.sum()))]

    user_idx, item_idx, is_ad = np.concatenate(out_user), np.concatenate(out_item), np.concatenate(out_ad)
    ts = np.floor(np.concatenate(out_ts))  # whole seconds, as logs usually have; ties keep generation order
    order = np.argsort(ts, kind="stable")
    base = pd.Timestamp("2026-01-01", tz="UTC")
    events = pd.DataFrame({
        "user_id": users["user_id"].to_numpy()[user_idx[order]],
        "item_id": np.where(is_ad, ads["ad_id"].to_numpy()[np.where(is_ad, item_idx, 0)],
                            contents["content_id"].to_numpy()[np.where(is_ad, 0, item_idx)])[order],
        "item_type": np.where(is_ad, "ad", "content")[order],
        "action": np.concatenate(out_action)[order],
        "ts": base + pd.to_timedelta(ts[order], unit="s"),
    })
    log.info("synth: %d users, %d ads, %d contents, %d events", len(users), len(ads), len(contents), len(events))
    return Tables(ads=ads, contents=contents, users=users, events=events)


def synth_parameters(cfg: SynthConfig) -> dict:
    return asdict(cfg) | {"ads": cfg.n_ads(), "contents": cfg.n_contents()}
