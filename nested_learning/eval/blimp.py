"""BLiMP, the Benchmark of Linguistic Minimal Pairs for English (Warstadt, Parrish, Liu,
Mohananey, Peng, Wang and Bowman, TACL 2020; CC BY 4.0), shipped with the package in
`nested_learning/eval/data/blimp/` (see ATTRIBUTION.md there): 67 paradigms x 1,000 pairs of a
grammatical and a minimally different ungrammatical sentence.

Scored as the authors score it (their "simple LM method"): a pair is right when the model
gives the whole good sentence a higher total log-probability than the whole bad one; chance is
0.5. A tie counts half (the expected score of a coin flip): the archive holds 7 pairs whose two
sentences are the same string (5 in principle_A_case_2, 2 in passive_1), which no model can
order, and these are ties by construction, whatever the arithmetic. Every token of a sentence is scored: the sentence is the continuation
of an empty context, which `loglik.encode_pair` makes the end-of-text token, so a sentence is
read from a fresh state as a document that starts after `<|endoftext|>` (the separator the
model was trained with), and its first token is predicted from that token alone.

Accuracy is reported per paradigm (with the sample standard error over its pairs), per
phenomenon (`linguistics_term`, the authors' 12 phenomena) and per field, and overall; a group's
accuracy is the mean over its paradigms, as the authors report it, with the standard error of
that mean, sqrt(sum se_p^2) / k over its k paradigms. The phenomenon of a paradigm is the one of
the authors' summary, which counts the data's two `s-selection` paradigms under
argument_structure. The authors' rows (5-gram, LSTM, Transformer-XL, GPT-2; all 1,000 pairs of
each paradigm) come from their `models_summary.jsonl`."""

from __future__ import annotations

import functools
import json
import math
import os
import random
import zipfile
from collections import defaultdict
from dataclasses import dataclass

from ..data.tokens import SPECIALS
from .loglik import Scored, encode_pair, score_requests
from .results import mean_stderr

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "blimp")
ARCHIVE = os.path.join(ROOT, "BLiMP.zip")
SUMMARY = os.path.join(ROOT, "models_summary.jsonl")
PARADIGMS, PAIRS_PER_PARADIGM, CHANCE = 67, 1000, 0.5
AUTHORS = {"ngram": "5-gram", "lstm": "LSTM", "txl": "Transformer-XL", "gpt2": "GPT-2"}
SOURCE = ("BLiMP (Warstadt et al., TACL 2020; CC BY 4.0; github.com/alexwarstadt/blimp at 3e56b06), "
          "shipped in nested_learning/eval/data/blimp")
SCORING = ("simple LM method: right when log P(good sentence) > log P(bad sentence), each summed over "
           "all of its tokens from a fresh state after the end-of-text token; a tie (and a pair of identical "
           "sentences) counts half")


@dataclass(frozen=True)
class Pair:
    uid: str  # the paradigm
    pair_id: str
    field: str  # morphology, syntax, semantics, syntax_semantics
    term: str  # the phenomenon
    good: str
    bad: str


def authors_results(path: str = SUMMARY) -> dict:
    """The authors' accuracies: {"paradigms": {uid: {"term": ..., "5-gram": acc, ...}},
    "terms": {term: {"5-gram": acc, ...}}, "overall": {"5-gram": acc, ...}}."""
    out: dict = {"paradigms": {}, "terms": {}, "overall": {}}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            accs = {name: rec[key] for key, name in AUTHORS.items()}
            if rec["UID"] != "overall":
                out["paradigms"][rec["UID"]] = {"term": rec["linguistics_term"], **accs}
            elif rec["linguistics_term"] == "overall":
                out["overall"] = accs
            else:
                out["terms"][rec["linguistics_term"]] = accs
    return out


@functools.lru_cache(maxsize=2)
def _read_archive(path: str) -> tuple[tuple[str, tuple[Pair, ...]], ...]:
    terms = {u: r["term"] for u, r in authors_results()["paradigms"].items()}
    out = []
    with zipfile.ZipFile(path) as z:
        members = sorted(n for n in z.namelist() if n.startswith("data/") and n.endswith(".jsonl")
                         and not os.path.basename(n).startswith("."))
        for name in members:
            recs = [json.loads(line) for line in z.read(name).decode("utf-8").splitlines() if line.strip()]
            if not recs:
                raise ValueError(f"{path}:{name} holds no pairs")
            uid = recs[0]["UID"]
            out.append((uid, tuple(Pair(uid, str(r["pairID"]), r["field"].replace("/", "_"),
                                        terms.get(uid, r["linguistics_term"]), r["sentence_good"], r["sentence_bad"])
                                   for r in recs)))
    if not out:
        raise ValueError(f"{path} holds no data/<paradigm>.jsonl files")
    return tuple(sorted(out))


def load_pairs(path: str = ARCHIVE, pairs_per_paradigm: int | None = None, seed: int = 0) -> dict[str, list[Pair]]:
    """{paradigm: pairs}, paradigms in name order, from the archive (data/<UID>.jsonl; other
    members such as macOS metadata are skipped). With pairs_per_paradigm, a seeded sample of that
    many pairs of each paradigm (in file order; the same pairs of a paradigm whatever else is
    read); None or a count >= the paradigm's size keeps all."""
    if pairs_per_paradigm is not None and pairs_per_paradigm < 1:
        raise ValueError(f"pairs_per_paradigm must be >= 1, got {pairs_per_paradigm}")
    out: dict[str, list[Pair]] = {}
    for uid, pairs in _read_archive(os.path.abspath(path)):
        if pairs_per_paradigm is not None and pairs_per_paradigm < len(pairs):
            rng = random.Random(f"blimp/{seed}/{uid}")
            out[uid] = [pairs[i] for i in sorted(rng.sample(range(len(pairs)), pairs_per_paradigm))]
        else:
            out[uid] = list(pairs)
    return out


def score_sentences(model, tok, sentences: list[str], batch_size: int = 64, progress=None) -> list[Scored]:
    """Scored (total log-probability, greedy, token count) of each whole sentence, read from a
    fresh state after the end-of-text token; sentences of similar token length are batched
    together, batch_size to a forward."""
    if tok.token_to_id(SPECIALS[0]) is None:
        raise ValueError(f"the tokenizer has no {SPECIALS[0]} token to start a sentence from")
    requests = [encode_pair(tok, "", s) for s in sentences]
    order = sorted(range(len(requests)), key=lambda i: len(requests[i][1]))
    out: list[Scored | None] = [None] * len(requests)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        for i, sc in zip(idx, score_requests(model, [requests[i] for i in idx], batch_size=1)):
            out[i] = sc
        if progress is not None:
            progress.update(len(idx))
    return out


def group_metrics(accs: list[tuple[float, float | None, int]]) -> dict:
    """A group of paradigms given their (accuracy, stderr, pairs): the mean over paradigms, the
    standard error of that mean (sqrt(sum se^2) / k; None if a paradigm has none), pairs,
    paradigms, chance."""
    k = len(accs)
    ses = [se for _, se, _ in accs]
    stderr = None if any(se is None for se in ses) else math.sqrt(sum(se * se for se in ses)) / k
    return {"metrics": {"acc": {"value": sum(a for a, _, _ in accs) / k, "stderr": stderr}},
            "n_items": sum(n for _, _, n in accs), "n_paradigms": k, "chance": CHANCE}


def aggregate(pairs: dict[str, list[Pair]], logliks: dict[str, list[tuple[float, float]]],
              tokens: dict[str, list[tuple[int, int]]] | None = None) -> dict:
    """The task block of a result file from each pair's (log P(good), log P(bad)) (a pair scores
    1 when good > bad, 0.5 on a tie or identical sentences, else 0): metrics acc
    (mean over paradigms) with its standard error, n_items (pairs), chance 0.5; extra:
    paradigms, terms and fields, each with its metrics, item count and the authors' accuracies;
    records: one per pair."""
    authors = authors_results()
    per: dict[str, dict] = {}
    records, ties = [], 0
    for uid, ps in pairs.items():
        lls = logliks[uid]
        if len(lls) != len(ps):
            raise ValueError(f"{uid}: {len(ps)} pairs but {len(lls)} scores")
        right = [0.5 if g == b or p.good == p.bad else float(g > b) for p, (g, b) in zip(ps, lls)]
        ties += sum(x == 0.5 for x in right)
        acc, se = mean_stderr(right)
        per[uid] = {"field": ps[0].field, "term": ps[0].term, "metrics": {"acc": {"value": acc, "stderr": se}},
                    "n_items": len(ps), "chance": CHANCE,
                    "authors": {k: v for k, v in authors["paradigms"].get(uid, {}).items() if k != "term"}}
        for i, (p, (g, b)) in enumerate(zip(ps, lls)):
            rec = {"id": f"{uid}/{p.pair_id}", "loglik": [g, b], "score": right[i]}
            if tokens is not None:
                rec["tokens"] = list(tokens[uid][i])
            records.append(rec)

    def groups(key: str) -> dict:
        members = defaultdict(list)
        for uid, e in per.items():
            members[e[key]].append(uid)
        return {name: group_metrics([(per[u]["metrics"]["acc"]["value"], per[u]["metrics"]["acc"]["stderr"],
                                      per[u]["n_items"]) for u in uids]) for name, uids in sorted(members.items())}

    terms, fields = groups("term"), groups("field")
    for name, g in terms.items():
        g["authors"] = authors["terms"].get(name, {})
    overall = group_metrics([(e["metrics"]["acc"]["value"], e["metrics"]["acc"]["stderr"], e["n_items"])
                             for e in per.values()])
    sizes = {len(ps) for ps in pairs.values()}
    extra = {"source": SOURCE, "scoring": SCORING, "aggregation": "mean over paradigms; stderr sqrt(sum se^2)/k",
             "pairs_per_paradigm": sizes.pop() if len(sizes) == 1 else sorted(sizes),
             "n_paradigms": len(per), "ties": ties, "paradigms": per, "terms": terms, "fields": fields,
             "authors": {"models": list(AUTHORS.values()), "overall": authors["overall"],
                         "note": "the authors' accuracies on all 1,000 pairs of each paradigm"}}
    return {"metrics": overall["metrics"], "n_items": overall["n_items"], "chance": CHANCE, "extra": extra,
            "records": records}


def score_blimp(model, tok, pairs: dict[str, list[Pair]], batch_size: int = 64, progress=None) -> dict:
    """The task block of BLiMP (`aggregate`) for `pairs` (see `load_pairs`)."""
    flat = [(uid, p) for uid, ps in pairs.items() for p in ps]
    scored = score_sentences(model, tok, [s for _, p in flat for s in (p.good, p.bad)], batch_size, progress)
    logliks: dict[str, list] = defaultdict(list)
    tokens: dict[str, list] = defaultdict(list)
    for k, (uid, _) in enumerate(flat):
        good, bad = scored[2 * k], scored[2 * k + 1]
        logliks[uid].append((good.loglik, bad.loglik))
        tokens[uid].append((good.tokens, bad.tokens))
    return aggregate(pairs, logliks, tokens)


def table_lines(block: dict, paradigms: bool = False) -> list[str]:
    """Markdown: accuracy per phenomenon and overall beside the authors' models (and per field;
    per paradigm with `paradigms`), each of ours as value ± stderr (pairs)."""
    ex = block["extra"]
    models = ex["authors"]["models"]

    def ours(e):
        m = e["metrics"]["acc"]
        return f"{m['value']:.3f} ± {m['stderr']:.3f}" if m["stderr"] is not None else f"{m['value']:.3f}"

    def theirs(a):
        return " | ".join("-" if a.get(n) is None else f"{a[n]:.3f}" for n in models)

    head = ["| ours ± se | pairs | " + " | ".join(models) + " |", "|---:|---:|" + "---:|" * len(models)]
    out = [f"BLiMP: {ex['n_paradigms']} paradigms x {ex['pairs_per_paradigm']} pairs, chance {block['chance']}; "
           f"{ex['scoring']}; the authors' models on all pairs", "",
           "| phenomenon | paradigms " + head[0], "|---|---:" + head[1]]
    for name, g in ex["terms"].items():
        out.append(f"| {name} | {g['n_paradigms']} | {ours(g)} | {g['n_items']} | {theirs(g['authors'])} |")
    out.append(f"| **overall** | {ex['n_paradigms']} | {ours(block)} | {block['n_items']} | "
               f"{theirs(ex['authors']['overall'])} |")
    out += ["", "| field | paradigms | ours ± se | pairs |", "|---|---:|---:|---:|"]
    out += [f"| {name} | {g['n_paradigms']} | {ours(g)} | {g['n_items']} |" for name, g in ex["fields"].items()]
    if paradigms:
        out += ["", "| paradigm | phenomenon " + head[0], "|---|---" + head[1]]
        out += [f"| {uid} | {e['term']} | {ours(e)} | {e['n_items']} | {theirs(e['authors'])} |"
                for uid, e in ex["paradigms"].items()]
    return out
