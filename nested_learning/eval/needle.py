"""Needle-in-a-haystack and passkey prompts at exact token lengths, and their scoring.

A prompt of length L has exactly L tokens of the model's tokenizer: it is built from token
ids, never from text that is tokenised afterwards. The haystack is real prose split into
sentences, each sentence tokenised on its own (with its leading space), taken in order from
a seeded starting sentence and cut to fit; needles go in at sentence boundaries, the question
(and the answer's opening words) closes the prompt. RULER's variants (Hsieh et al., 2024):

    single      one needle, its key queried
    multikey    the needle among distractor needles with other keys; one key queried
    multivalue  several needles with one key; every value must be returned
    multiquery  several needles with different keys; all keys queried, all values returned

Scores of an item: `exact` (the greedy generation contains every expected value as a whole
number: all or nothing), `found` (the fraction of expected values it contains: RULER's
`string_match_all` partial credit) and, per expected value, the rank of its log-likelihood as
the prompt's continuation among the distractor values: K seeded random values, plus in
multikey the other keys' needle values (so copying any number from the context does not
score). Rank 1 = above every distractor (a tie is not a win; a non-finite score is the worst
rank); chance of rank 1: 1/(distractors + 1). The haystack text of a (length, seed) cell is
the same at every depth. Depth is a percentage of the haystack's tokens (needles excluded),
snapped to the nearest sentence start; the haystack's end (depth 100) is cut mid-sentence.
The prompt streams through the fast state in segments; attention layers keep at most
`window` keys (their KV cache), and a result says when that windowed the prompt."""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

import torch

from ..checks import NonFiniteInputError
from .loglik import consume_context, score_rows

VARIANTS = ("single", "multikey", "multivalue", "multiquery")
ADJECTIVES = ("amber quiet golden hidden silver northern bitter gentle crimson hollow frozen ancient "
              "distant narrow restless velvet iron scarlet wandering silent bright lonely").split()
NOUNS = ("river harbor lantern meadow falcon orchard compass tower garden anchor glacier canyon "
         "violin beacon thistle marble raven willow summit ember").split()
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def parse_series(spec: str, geometric: bool) -> list[float]:
    """'2k,4k,...,512k' (geometric: doubling) or '0,10,...,100' (arithmetic): the first two
    terms give the ratio or step, the term after '...' the last one; 'k' is 1024."""
    def num(x: str) -> float:
        x = x.strip().lower()
        return float(x[:-1]) * 1024 if x.endswith("k") else float(x)

    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"{spec!r}: give at least one value")
    if "..." not in parts:
        return [num(p) for p in parts]
    i = parts.index("...")
    if i < 2 or i != len(parts) - 2:
        raise ValueError(f"{spec!r}: write a series as a,b,...,z (two terms, '...', the last term)")
    head, a, b, end = [num(p) for p in parts[:i]], num(parts[i - 2]), num(parts[i - 1]), num(parts[-1])
    if end < b:
        raise ValueError(f"{spec!r}: the last term must not be below the second")
    out = head
    if geometric:
        if not (a > 0 and b > a):
            raise ValueError(f"{spec!r}: a growing series needs 0 < a < b")
        while out[-1] * (b / a) <= end * (1 + 1e-9):
            out.append(out[-1] * (b / a))
    else:
        if not b > a:
            raise ValueError(f"{spec!r}: an arithmetic series needs a < b")
        while out[-1] + (b - a) <= end + 1e-9:
            out.append(out[-1] + (b - a))
    return out


def parse_lengths(spec: str) -> list[int]:
    out = [int(round(x)) for x in parse_series(spec, geometric=True)]
    if any(n < 1 for n in out):
        raise ValueError(f"--lengths {spec!r}: every length must be a positive number of tokens")
    return out


def parse_depths(spec: str) -> list[float]:
    out = parse_series(spec, geometric=False)
    if any(not 0 <= d <= 100 for d in out):
        raise ValueError(f"--depths {spec!r}: depths are percentages in [0, 100]")
    return out


def length_name(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


# ---------------------------------------------------------------------------- haystack
@dataclass
class Haystack:
    """Prose as tokenised sentences; `name` says where it came from."""

    sentences: list[list[int]]
    name: str
    tokens: int = 0

    def __post_init__(self):
        self.sentences = [s for s in self.sentences if s]
        self.tokens = sum(len(s) for s in self.sentences)
        if not self.sentences:
            raise ValueError(f"haystack {self.name!r} has no text")

    @classmethod
    def from_texts(cls, tok, texts: list[str], name: str) -> Haystack:
        sents = [s for t in texts for s in re.split(r"(?<=[.!?])\s+", " ".join(t.split())) if s]
        return cls([e.ids for e in tok.encode_batch([" " + s for s in sents])], name)

    def take(self, n: int, rng: random.Random) -> tuple[list[int], list[int], int]:
        """n tokens of consecutive sentences from a seeded start (wrapping around): (ids, the
        token offsets where a sentence starts, how many times the text was wrapped)."""
        i, ids, starts, wraps = rng.randrange(len(self.sentences)), [], [], 0
        while len(ids) < n:
            starts.append(len(ids))
            ids += self.sentences[i]
            i += 1
            if i == len(self.sentences):
                i, wraps = 0, wraps + 1
        return ids[:n], [s for s in starts if s < n] + [n], wraps


# ---------------------------------------------------------------------------- items
@dataclass
class Item:
    """One prompt: ids (exactly `length` tokens), the expected values, and where the needles are."""

    variant: str
    length: int
    depth: float
    ids: list[int]
    expected: list[str]
    distractor_values: list[str]  # the other keys' needle values first (multikey), then seeded random ones
    needles: list[dict] = field(default_factory=list)  # {key, value, position (token), tokens, queried}
    haystack_wraps: int = 0


class NeedleTask:
    """Builds items of one task: `kind` 'niah' (magic numbers for keys) or 'passkey'."""

    def __init__(self, tok, haystack: Haystack, kind: str = "niah", digits: int = 7, distractors: int = 9,
                 n_needles: int = 3):
        if kind not in ("niah", "passkey"):
            raise ValueError(f"kind must be 'niah' or 'passkey', got {kind!r}")
        if digits < 1 or distractors < 1 or n_needles < 2:
            raise ValueError("digits >= 1, distractors >= 1 and n_needles >= 2 are required")
        self.tok, self.haystack, self.kind = tok, haystack, kind
        self.digits, self.k, self.n = digits, distractors, n_needles

    def _enc(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def _value(self, rng, taken: set) -> str:
        while True:
            v = str(rng.randrange(10 ** (self.digits - 1), 10 ** self.digits))
            if v not in taken:
                taken.add(v)
                return v

    def _keys(self, rng, n: int) -> list[str]:
        return [f"{a}-{b}" for a, b in rng.sample([(a, b) for a in ADJECTIVES for b in NOUNS], n)]

    def _plan(self, variant: str, rng) -> tuple[list[tuple[str, str, bool]], str, list[str]]:
        """(needles (key, value, queried), question text, expected values)."""
        taken: set = set()
        if self.kind == "passkey":
            if variant != "single":
                raise ValueError("passkey has one variant: single")
            v = self._value(rng, taken)
            return [("", v, True)], " What is the pass key? The pass key is", [v]
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
        keys = self._keys(rng, self.n if variant in ("multikey", "multiquery") else 1)
        if variant == "single":
            needles = [(keys[0], self._value(rng, taken), True)]
        elif variant == "multikey":
            needles = [(k, self._value(rng, taken), i == 0) for i, k in enumerate(keys)]
        elif variant == "multivalue":
            needles = [(keys[0], self._value(rng, taken), True) for _ in range(self.n)]
        else:
            needles = [(k, self._value(rng, taken), True) for k in keys]
        queried = list(dict.fromkeys(k for k, _, q in needles if q))
        about = " and ".join(queried)
        if variant in ("single", "multikey"):
            q = (f" What is the special magic number for {about} mentioned in the provided text? "
                 f"The special magic number for {about} mentioned in the provided text is")
        else:
            q = (f" What are all the special magic numbers for {about} mentioned in the provided text? "
                 f"The special magic numbers for {about} mentioned in the provided text are")
        return needles, q, [v for _, v, qd in needles if qd]

    def needle_text(self, key: str, value: str) -> str:
        if self.kind == "passkey":
            return f" The pass key is {value}. Remember it. {value} is the pass key."
        return f" One of the special magic numbers for {key} is: {value}."

    def item(self, variant: str, length: int, depth: float, seed: int) -> Item:
        """The item of (variant, length, depth, seed): exactly `length` tokens. The (first)
        queried needle starts at the sentence boundary nearest to `depth` percent of the
        haystack; the other needles at seeded random boundaries."""
        rng = random.Random(f"{self.kind}|{variant}|{length}|{depth}|{seed}")
        needles, question, expected = self._plan(variant, rng)
        n_ids = [self._enc(self.needle_text(k, v)) for k, v, _ in needles]
        q_ids = self._enc(question)
        room = length - len(q_ids) - sum(len(x) for x in n_ids)
        if room < 1:
            raise ValueError(f"{length} tokens cannot hold the needles and question "
                             f"({length - room + 1} tokens with one haystack token)")
        # the haystack text depends on (kind, length, seed) only: every depth of a cell reads the same prose
        hay, starts, wraps = self.haystack.take(room, random.Random(f"{self.kind}|{length}|{seed}"))
        first = min(starts, key=lambda s: abs(s - depth / 100 * room))
        cuts = [first] + [rng.choice(starts) for _ in needles[1:]]
        order = sorted(range(len(needles)), key=lambda i: (cuts[i], i))
        ids, placed, prev = [], [None] * len(needles), 0
        for i in order:
            ids += hay[prev:cuts[i]]
            prev = cuts[i]
            placed[i] = len(ids)
            ids += n_ids[i]
        ids += hay[prev:] + q_ids
        taken = {v for _, v, _ in needles}
        hard = [v for _, v, q in needles if not q]  # values of the other keys' needles (multikey)
        return Item(variant, length, depth, ids, expected, hard + [self._value(rng, taken) for _ in range(self.k)],
                    [{"key": k, "value": v, "queried": qd, "position": placed[i], "tokens": len(n_ids[i])}
                     for i, (k, v, qd) in enumerate(needles)], wraps)


# ---------------------------------------------------------------------------- scoring
def stream_prompt(model, ids: list[int], segment: int, memorize=None, reports=None):
    """The state after every prompt token but the last (streamed or memorised in segments;
    memorisation sees only the prompt's own next tokens)."""
    with torch.no_grad():
        return consume_context(model, torch.tensor([ids], device=model.embed.weight.device), memorize,
                               reports, segment)


def score_item(task: NeedleTask, model, item: Item, segment: int, max_new_tokens: int | None = None,
               memorize=None, reports=None) -> dict:
    """The record of one item: exact match of the greedy generation, the log-likelihood rank of
    each expected value among the distractors, and the prompt's measured token count. A prompt
    on which the model's state goes non-finite (a NaN gate) is a failed item, scored as wrong
    (worst rank) and marked `non_finite` with the error."""
    record = {"variant": item.variant, "length": item.length, "depth": item.depth, "prompt_tokens": len(item.ids),
              "needles": item.needles, "expected": item.expected, "haystack_wraps": item.haystack_wraps}
    try:
        return {**record, **_answer(task, model, item, segment, max_new_tokens, memorize, reports)}
    except NonFiniteInputError as err:  # the model's state diverged on this prompt: it cannot answer
        worst = 1 + len(item.distractor_values)
        return {**record, "generated": "", "exact": False, "found": 0.0, "ranks": [worst] * len(item.expected), "rank1": 0.0,
                "non_finite": str(err)}


def _answer(task, model, item, segment, max_new_tokens, memorize, reports) -> dict:
    state = stream_prompt(model, item.ids, segment, memorize, reports)
    cands = item.expected + item.distractor_values
    scored = score_rows(model, state, [item.ids[-1]], [(0, task._enc(" " + v)) for v in cands])
    ll = [s.loglik for s in scored]
    distract = ll[len(item.expected):]
    # 1 + the distractors scoring at least as high (a tie is not a win); a non-finite score is the worst rank
    ranks = [1 + sum(not (d < ll[i]) for d in distract) if math.isfinite(ll[i]) else 1 + len(distract)
             for i in range(len(item.expected))]
    per_value = max(len(task._enc(" " + v)) for v in item.expected) + 2
    new = max_new_tokens or per_value * len(item.expected)
    dev = model.embed.weight.device
    gen, _ = model.generate(torch.tensor([[item.ids[-1]]], device=dev), new, state=state)
    text = task.tok.decode(gen[0].tolist())
    found = set(re.findall(r"\d+", text))
    return {"generated": text, "exact": all(v in found for v in item.expected),
            "found": sum(v in found for v in item.expected) / len(item.expected),
            "ranks": ranks, "rank1": sum(r == 1 for r in ranks) / len(ranks),
            "loglik_true": ll[: len(item.expected)], "loglik_distractors_max": max(distract)}
