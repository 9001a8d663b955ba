"""A synthetic corpus of N short documents from 10 sources, a tokenizer trained on it, and fact queries.

Every document states one invented fact ("The capital of Zorbia is Kelmir.") in the house style of its
source (each source has its own openings and, on half of its documents, closings), ~16–32 tokens. Generation is seeded and
cheap (10⁵ documents in about a second); the first `n` documents of the size-N corpus are those of every
smaller corpus, so the sizes are nested.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from hf_fwdattr import CausalLMTask

SOURCES = ["atlas-press", "river-gazette", "wanderer-blog", "old-chronicle", "open-forum",
           "harbor-times", "mountain-review", "scholar-notes", "market-letter", "night-radio"]
_STYLE = {  # source: (openings, closings)
    "atlas-press": (["According to the atlas,", "Our maps record that"], ["Maps updated yearly.", "See the atlas for more."]),
    "river-gazette": (["The gazette reports that", "News from the river:"], ["More news tomorrow.", "The river keeps flowing."]),
    "wanderer-blog": (["On my travels I learned that", "Fun fact from the road:"], ["Pack light, friends!", "Next stop soon."]),
    "old-chronicle": (["It is written that", "In the old days,"], ["So the elders say.", "Thus ends the entry."]),
    "open-forum": (["Someone asked, and yes,", "Quick answer:"], ["Hope this helps.", "Correct me if wrong."]),
    "harbor-times": (["Sailors at the harbor say", "From the docks:"], ["Tides permitting.", "Ships leave at dawn."]),
    "mountain-review": (["High in the hills we hear that", "The review notes that"], ["The air is thin up here.", "Review closed."]),
    "scholar-notes": (["Lecture note:", "Students should recall that"], ["This will be on the exam.", "Cite your sources."]),
    "market-letter": (["Traders confirm that", "Market letter:"], ["Prices may vary.", "Buy early."]),
    "night-radio": (["Late tonight on the radio:", "Listeners tell us that"], ["Stay tuned.", "Good night."]),
}
_SYLLABLES = ["zor", "bia", "kel", "vash", "tor", "mir", "qua", "len", "dro", "sel", "nyx", "pa", "rul", "ven", "ith", "ost",
              "gal", "fen", "ur", "ka"]
_GOODS = ["copper", "silk", "amber", "salt", "glass", "wool", "tin", "honey", "pepper", "marble", "cedar", "ivory"]
_COLOURS = ["green", "violet", "orange", "silver", "crimson", "golden", "teal", "black"]
_RELATIONS = {  # relation: (statement, question prompt, values or "name")
    "capital": ("the capital of {e} is {v}.", "The capital of {e} is", "name"),
    "export": ("{e} is famous for exporting {v}.", "{e} is famous for exporting", _GOODS),
    "founder": ("{e} was founded by {v}.", "{e} was founded by", "name"),
    "flag": ("the flag of {e} is {v}.", "The flag of {e} is", _COLOURS),
}


@dataclass
class Corpus:
    """Documents (text, source) and fact queries (prompt, answer) drawn from the same generator."""

    texts: list[str]
    sources: list[str]
    query_prompts: list[str]
    query_answers: list[str]


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()


def make_corpus(n: int, n_queries: int = 64, seed: int = 0) -> Corpus:
    """`n` documents and `n_queries` queries about facts those documents state (the first `n_queries` facts' entities)."""
    rng = random.Random(seed)
    entities = [_name(rng) for _ in range(5_000)]
    texts, sources, facts = [], [], []
    relations = list(_RELATIONS)
    for _ in range(n):
        source = rng.choice(SOURCES)
        relation = rng.choice(relations)
        statement, prompt, values = _RELATIONS[relation]
        entity = rng.choice(entities)
        value = _name(rng) if values == "name" else rng.choice(values)
        opening, closing = (rng.choice(options) for options in _STYLE[source])
        text = f"{opening} {statement.format(e=entity, v=value)}"
        texts.append(f"{text} {closing}" if rng.random() < 0.5 else text)
        sources.append(source)
        facts.append((prompt.format(e=entity), " " + value))
    query_rng = random.Random(seed + 1)
    picked = query_rng.sample(range(min(n, 1_000)), min(n_queries, n, 1_000))  # facts every corpus size contains
    return Corpus(texts, sources, [facts[i][0] for i in picked], [facts[i][1] for i in picked])


def train_corpus_tokenizer(seed: int = 0):
    """A byte-level BPE tokenizer (vocabulary 512) trained on 5,000 documents of a separate corpus."""
    from hf_fwdattr.demo.toy import train_tokenizer

    return train_tokenizer(make_corpus(5_000, 0, seed=seed + 100).texts, vocab_size=512)


def tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, with a BOS token first."""
    encoded = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)  # the fast path: no Python per text
    return [[tokenizer.bos_token_id] + e.ids for e in encoded]


def query_examples(tokenizer, corpus: Corpus) -> list[dict]:
    """`CausalLMTask` query examples: f_q = log p(answer | BOS + prompt)."""
    prompts = tokenize(tokenizer, corpus.query_prompts)
    answers = tokenizer(corpus.query_answers, add_special_tokens=False)["input_ids"]
    return [CausalLMTask.query_example(p, a) for p, a in zip(prompts, answers)]
