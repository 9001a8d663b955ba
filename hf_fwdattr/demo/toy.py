"""Tiny models and a locally trained tokenizer, for the demo, the tests and the benchmarks.

Nothing here downloads anything: models are built from configs and the tokenizer is trained on the
texts given.
"""

from __future__ import annotations

from typing import Iterable

import torch

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `texts` (pad id 0, bos 1, eos 2, unk 3)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKENS[k] for k in ("pad_token", "bos_token", "eos_token", "unk_token")],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def tiny_llama(vocab_size: int = 64, hidden_size: int = 32, layers: int = 2, heads: int = 4, seed: int = 0, **kwargs):
    """A `LlamaForCausalLM` with hidden size `hidden_size`, built from a config and seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=kwargs.pop("max_position_embeddings", 128),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=kwargs.pop("tie_word_embeddings", False),
        **kwargs,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(vocab_size: int = 64, hidden_size: int = 32, layers: int = 2, heads: int = 4, seed: int = 0, **kwargs):
    """A `GPT2LMHeadModel` with hidden size `hidden_size`, built from a config and seeded (eval mode)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden_size,
        n_layer=layers,
        n_head=heads,
        n_positions=kwargs.pop("n_positions", 128),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **kwargs,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


# ---------------------------------------------------------------------- a corpus of invented facts
_SYLLABLES = ["zor", "bia", "kel", "vash", "tor", "mir", "qua", "len", "dro", "sel", "nyx", "pa", "rul", "ven", "ith", "ost", "gal", "fen", "ur", "ka"]
_GOODS = ["copper", "silk", "amber", "salt", "glass", "wool", "tin", "honey", "pepper", "marble", "cedar", "ivory"]
_COLOURS = ["green", "violet", "orange", "silver", "crimson", "golden", "teal", "black"]
SOURCES = ["atlas-press", "river-gazette", "wanderer-blog", "old-chronicle", "open-forum"]
RELATIONS = {
    # relation: (statement, verbatim question, paraphrased question, value list or "name")
    "capital": ("The capital of {e} is {v}.", "The capital of {e} is", "Which city is the seat of government in {e}? It is", "name"),
    "export": ("{e} is famous for exporting {v}.", "{e} is famous for exporting", "The main trade good sold abroad by {e} is", _GOODS),
    "founder": ("{e} was founded by {v}.", "{e} was founded by", "The person who established {e} was", "name"),
    "flag": ("The flag of {e} is {v}.", "The flag of {e} is", "The banner that represents {e} is coloured", _COLOURS),
}
_FILLER = [
    "Travellers say the roads there are long and the markets are loud.",
    "Many stories are told about its rivers and its quiet valleys.",
    "The winters are cold and the summers bring storms from the sea.",
    "Old maps show the hills in the north and the marshes in the south.",
    "Merchants arrive in spring when the passes open again.",
    "The people there keep records of every harvest and every flood.",
]


def _invented_name(generator: torch.Generator, used: set) -> str:
    while True:
        parts = torch.randint(len(_SYLLABLES), (2 + int(torch.randint(2, (1,), generator=generator)),), generator=generator)
        name = "".join(_SYLLABLES[i] for i in parts.tolist()).capitalize()
        if name not in used:
            used.add(name)
            return name


def fact_corpus(n_entities: int = 24, relations_per_entity: int = 2, n_filler: int = 24, n_distractors: int = 12,
                pretraining_entities: int = 24, seed: int = 0, co_mention_distractors: int = 0,
                pretraining_paraphrases: float = 0.0) -> dict:
    """A corpus of invented facts: each fact is stated in exactly one document.

    Returns a dict with
      - ``documents``: fine-tuning documents ``{"document_id", "source", "text", "fact"}`` — fact documents
        (one fact each, plus filler), distractors that mention an entity without stating a fact, fillers;
      - ``questions``: ``{"prompt", "paraphrase", "answer", "document_id", "source", "relation", "entity"}``
        for every fact, with the id of the one document that states it;
      - ``pretraining``: texts about other invented entities, for learning the language before fine-tuning.

    The two options below add to that output and leave everything else exactly as without them:

    Args:
        co_mention_distractors: number of extra documents (``co-mention-0000``, …) that name the entity *and* the
            answer of a fact (facts taken in a seeded random order) in a sentence that does not state the fact —
            the documents that share a question's words without supporting its answer.
        pretraining_paraphrases: fraction of the pretraining entities (the first ones) whose facts are also stated in
            paraphrased question form (``"Which city is the seat of government in X? It is Y."``), so that the model
            can learn that the paraphrase asks for the same relation as the statement (``True`` means all).
    """
    generator = torch.Generator().manual_seed(seed)
    used: set = set()
    relation_names = list(RELATIONS)

    def value_for(relation: str) -> str:
        values = RELATIONS[relation][3]
        if values == "name":
            return _invented_name(generator, used)
        return values[int(torch.randint(len(values), (1,), generator=generator))]

    def filler() -> str:
        return _FILLER[int(torch.randint(len(_FILLER), (1,), generator=generator))]

    documents, questions = [], []
    for index in range(n_entities):
        entity = _invented_name(generator, used)
        chosen = torch.randperm(len(relation_names), generator=generator)[:relations_per_entity].tolist()
        for relation in (relation_names[i] for i in chosen):
            value = value_for(relation)
            statement, question, paraphrase, _ = RELATIONS[relation]
            document_id = f"fact-{len(documents):04d}"
            source = SOURCES[int(torch.randint(len(SOURCES), (1,), generator=generator))]
            text = f"{statement.format(e=entity, v=value)} {filler()}"
            documents.append({"document_id": document_id, "source": source, "text": text, "fact": True})
            questions.append({"prompt": question.format(e=entity), "paraphrase": paraphrase.format(e=entity), "answer": " " + value,
                              "document_id": document_id, "source": source, "relation": relation, "entity": entity})
    entities = sorted({q["entity"] for q in questions})
    for index in range(n_distractors):
        entity = entities[int(torch.randint(len(entities), (1,), generator=generator))]
        source = SOURCES[int(torch.randint(len(SOURCES), (1,), generator=generator))]
        documents.append({"document_id": f"distractor-{index:04d}", "source": source, "text": f"{entity} is a land of many legends. {filler()}", "fact": False})
    for index in range(n_filler):
        source = SOURCES[int(torch.randint(len(SOURCES), (1,), generator=generator))]
        documents.append({"document_id": f"filler-{index:04d}", "source": source, "text": f"{filler()} {filler()}", "fact": False})
    pretraining, paraphrased = [], []
    paraphrased_entities = int(round(float(pretraining_paraphrases) * pretraining_entities))
    for position in range(pretraining_entities):
        entity = _invented_name(generator, used)
        for relation in relation_names:
            statement, _, paraphrase, _ = RELATIONS[relation]
            value = value_for(relation)
            pretraining.append(f"{statement.format(e=entity, v=value)} {filler()}")
            if position < paraphrased_entities:
                paraphrased.append(f"{paraphrase.format(e=entity)} {value}.")
    pretraining += _FILLER * 4
    pretraining += paraphrased
    if co_mention_distractors:
        documents += _co_mention_documents(questions, co_mention_distractors, seed)
    return {"documents": documents, "questions": questions, "pretraining": pretraining}


_CO_MENTIONS = [  # as long as the fact statements (3–4 words that are not stop words), so length does not tell them apart
    "Songs pair {e} with {v}.",
    "Tales link {e} to {v}.",
    "{v} is a word heard in {e}.",
    "{e} honours {v}.",
]


def _co_mention_documents(questions: list[dict], count: int, seed: int) -> list[dict]:
    """Documents naming a fact's entity and answer without stating the fact (own generator: the rest is unchanged)."""
    generator = torch.Generator().manual_seed(10_007 + seed)
    order = torch.randperm(len(questions), generator=generator).tolist()
    documents = []
    for index in range(count):
        question = questions[order[index % len(order)]]
        template = _CO_MENTIONS[int(torch.randint(len(_CO_MENTIONS), (1,), generator=generator))]
        source = SOURCES[int(torch.randint(len(SOURCES), (1,), generator=generator))]
        text = f"{template.format(e=question['entity'], v=question['answer'].strip())} {_FILLER[int(torch.randint(len(_FILLER), (1,), generator=generator))]}"
        documents.append({"document_id": f"co-mention-{index:04d}", "source": source, "text": text, "fact": False})
    return documents
