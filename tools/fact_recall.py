# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Fact-recall benchmark: a deterministic knowledge corpus and an exact-match evaluator.

    # facts.jsonl (training documents, optionally mixed into another jsonl) + questions.jsonl
    python -m megatron_memory.tools.fact_recall generate --out data/facts --entities 20000 \\
        [--per-fact 3] [--qa-share 0.5] [--mix-with data/doctext/text.jsonl] [--seed 0]
    # exact-match recall of an exported checkpoint (megatron_memory.export.standalone)
    python -m megatron_memory.tools.fact_recall evaluate --checkpoint exported/ \\
        --questions data/facts/questions.jsonl [--limit 2000] [--device cuda]

Entities are made-up names with random attributes (birth city, birth year, profession, employer);
each entity's facts are stated in several training templates, in varied order. The questions
use a held-out template per attribute that never occurs in the training text, so recall needs the
fact, not the sentence. A question counts as recalled when the greedy continuation of its prompt
starts with the answer's tokens (exact match).

``--qa-share F`` also puts the answered questions of a share F of the entities into the training
text: a model never shown the question format cannot be asked anything, however well it stored
the facts (Allen-Zhu & Li 2023, "Physics of Language Models 3.1": extraction of held-out people's
facts works once some people's QA pairs are in pre-training). questions.jsonl then lists only the
other entities, whose facts the training text states but never asks. cloze.jsonl probes every
fact format-free: a training statement cut before its value ("Kari Tozelan was born in" ->
" Kalanvi"), i.e. plain memorisation.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Callable, Iterable, Optional

from megatron_memory.errors import InputError, command
from megatron_memory.training.jsonl_input import text_lines

_SYL = ("ka ri to ze lan vi mo su der ba ne gol fa tir un es ho qui ma ren sa lo pe dra "
        "cor mil tan ve bo ri ul am").split()
JOBS = ("baker weaver pilot doctor painter farmer sailor teacher miner judge poet architect "
        "chemist glassblower cartographer").split()
# attribute: (training templates, held-out question template); {v} is the value.
ATTRIBUTES = {
    "city": (["{n} was born in {v}.", "The birthplace of {n} is {v}.",
              "{n} grew up in {v}, the city of their birth."],
             "Question: In which city was {n} born? Answer:"),
    "year": (["{n} was born in the year {v}.", "The year of birth of {n} is {v}.",
              "In {v}, {n} was born."],
             "Question: In what year was {n} born? Answer:"),
    "job": (["{n} worked as a {v}.", "By profession, {n} was a {v}.",
             "{n} earned a living as a {v}."],
            "Question: What was the profession of {n}? Answer: a"),
    "employer": (["{n} was employed by {v}.", "For many years {n} worked for {v}.",
                  "The employer of {n} was {v}."],
                 "Question: Which company employed {n}? Answer:"),
}


def _word(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_SYL) for _ in range(parts)).capitalize()


def make_entities(n: int, seed: int) -> list[dict]:
    """``n`` entities with unique names and random attribute values (deterministic)."""
    rng = random.Random(seed)
    cities = sorted({_word(rng, 3) for _ in range(200)})
    companies = sorted({f"{_word(rng, 2)} {rng.choice(['Works', 'Mills', 'Company', 'Guild'])}"
                        for _ in range(200)})
    seen, out = set(), []
    while len(out) < n:
        name = f"{_word(rng, 2)} {_word(rng, 3)}"
        if name in seen:
            continue
        seen.add(name)
        out.append({"n": name, "city": rng.choice(cities), "year": str(rng.randint(1600, 1999)),
                    "job": rng.choice(JOBS), "employer": rng.choice(companies)})
    return out


def statements(entities: list[dict], per_fact: int, seed: int) -> list[str]:
    """Training documents: per entity, each fact stated ``per_fact`` times in varied templates,
    grouped into a few short documents of shuffled sentences."""
    rng = random.Random(seed + 1)
    docs = []
    for e in entities:
        sentences = [rng.choice(train).format(n=e["n"], v=e[attr])
                     for attr, (train, _) in ATTRIBUTES.items() for _ in range(per_fact)]
        rng.shuffle(sentences)
        for i in range(0, len(sentences), 4):
            docs.append(" ".join(sentences[i:i + 4]))
    rng.shuffle(docs)
    return docs




def _cloze_templates() -> dict[str, list[str]]:
    """Training templates that end in their value and whose text before "{v}" is no other
    template's beginning ("{n} was born in" could go on "the year ..."): unambiguous prompts."""
    every = [t for train, _ in ATTRIBUTES.values() for t in train]
    out = {}
    for attr, (train, _) in ATTRIBUTES.items():
        out[attr] = [t for t in train if t.endswith(" {v}.") and not any(
            o != t and o.startswith(t[:-len(" {v}.")]) for o in every)]
    return out


CLOZE = _cloze_templates()


def qa_split(entities: list[dict], share: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(entities whose QA pairs are trained on, held-out entities), a random ``share`` of them
    in the first list (deterministic)."""
    order = list(range(len(entities)))
    random.Random(seed + 3).shuffle(order)
    trained = set(order[:round(share * len(entities))])
    return ([e for i, e in enumerate(entities) if i in trained],
            [e for i, e in enumerate(entities) if i not in trained])


def qa_documents(entities: list[dict], seed: int) -> list[str]:
    """Training documents of answered questions, one entity's four per document (shuffled)."""
    pairs = [f"{q['prompt']}{q['answer']}." for q in questions(entities)]
    per = len(ATTRIBUTES)
    docs = [" ".join(pairs[i:i + per]) for i in range(0, len(pairs), per)]
    random.Random(seed + 4).shuffle(docs)
    return docs


def cloze(entities: list[dict], seed: int) -> list[dict]:
    """Format-free memorisation probes: one per fact, a training template cut before its value
    (same keys as ``questions``)."""
    rng = random.Random(seed + 5)
    return [{"prompt": rng.choice(CLOZE[attr])[:-len(" {v}.")].format(n=e["n"]),
             "answer": " " + e[attr], "attribute": attr, "entity": e["n"]}
            for e in entities for attr in ATTRIBUTES]


def questions(entities: list[dict]) -> list[dict]:
    """Held-out prompts: {"prompt", "answer" (with its leading space), "attribute", "entity"}."""
    return [{"prompt": q.format(n=e["n"]), "answer": " " + e[attr], "attribute": attr,
             "entity": e["n"]} for e in entities for attr, (_, q) in ATTRIBUTES.items()]


def mix(facts: list[str], other: Iterable[str], seed: int) -> list[str]:
    """Interleave the fact documents into another document stream at random positions."""
    docs = list(other) + list(facts)
    random.Random(seed + 2).shuffle(docs)
    return docs


def recall(items: list[dict], complete: Callable[[list[str], list[int]], list[list[int]]],
           tokenize: Callable[[str], list[int]], batch: int = 32) -> dict:
    """Exact-match recall: ``complete(prompts, lengths)`` returns, per prompt, at least
    ``length`` greedy token ids. Returns {"recall", "n", "by_attribute": {attr: recall},
    "n_by_attribute": {attr: questions scored}}."""
    hits: dict[str, list[int]] = {}
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        answers = [tokenize(it["answer"]) for it in chunk]
        outs = complete([it["prompt"] for it in chunk], [len(a) for a in answers])
        for it, ans, out in zip(chunk, answers, outs):
            hits.setdefault(it["attribute"], []).append(int(list(out[:len(ans)]) == ans))
    total = [h for v in hits.values() for h in v]
    return {"recall": sum(total) / max(len(total), 1), "n": len(total),
            "by_attribute": {a: sum(v) / len(v) for a, v in sorted(hits.items())},
            "n_by_attribute": {a: len(v) for a, v in sorted(hits.items())}}


def _read_jsonl(path: Path) -> list[dict]:
    """Every line's JSON object (compressed files and a byte-order mark are read too)."""
    return [json.loads(line) for _, line in text_lines(path) if line.strip()]


def cmd_generate(args) -> int:
    ents = make_entities(args.entities, args.seed)
    docs = statements(ents, args.per_fact, args.seed)
    qa_ents, held_out = qa_split(ents, args.qa_share, args.seed)
    docs += qa_documents(qa_ents, args.seed)
    if args.mix_with:
        docs = mix(docs, (d["text"] for d in _read_jsonl(args.mix_with)), args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "facts.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    for name, items in (("questions", questions(held_out)), ("cloze", cloze(ents, args.seed))):
        with open(args.out / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(q) + "\n" for q in items)
    print(f"wrote {args.out}/facts.jsonl ({len(docs):,} documents; answered questions of "
          f"{len(qa_ents):,} entities), questions.jsonl ({len(held_out) * len(ATTRIBUTES):,} "
          f"questions of the other entities) and cloze.jsonl ({len(ents) * len(ATTRIBUTES):,})")
    return 0


def cmd_evaluate(args) -> int:
    # Function-local: torch and the model load only to evaluate, not to generate data.
    import torch

    from megatron_memory.training.data import Tokenizer
    from megatron_memory.export.standalone import MemoryGPT, generate

    model = MemoryGPT.from_pretrained(args.checkpoint, device=args.device)
    tok = Tokenizer(args.checkpoint)
    items = _read_jsonl(args.questions)[:args.limit]

    def complete(prompts, lengths):
        with torch.no_grad():
            return generate(model, [tok.tokenize(p) for p in prompts], max(lengths),
                            pad_token_id=tok.pad, vocab_limit=tok.vocab_size)

    res = recall(items, complete, tok.tokenize, batch=args.batch)
    print(json.dumps(res))
    return 0


@command
def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_memory.tools.fact_recall",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write facts.jsonl and questions.jsonl")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--entities", type=int, default=20000)
    g.add_argument("--per-fact", type=int, default=3, help="training statements per fact")
    g.add_argument("--qa-share", type=float, default=0.0,
                   help="share of entities whose answered questions are training text (teaches the "
                        "question format; questions.jsonl keeps the others)")
    g.add_argument("--mix-with", type=Path, help="jsonl of other documents to mix the facts into")
    g.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("evaluate", help="exact-match recall of an exported checkpoint")
    e.add_argument("--checkpoint", required=True, help="exported folder (config.json, weights, tokenizer)")
    e.add_argument("--questions", type=Path, required=True)
    e.add_argument("--limit", type=int, default=None, help="first N questions only")
    e.add_argument("--batch", type=int, default=32)
    e.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.cmd == "generate":
        if args.entities < 1 or args.per_fact < 1:
            raise InputError("--entities and --per-fact must be >= 1")
        if not 0 <= args.qa_share < 1:
            raise InputError("--qa-share must be in [0, 1) (some entities must stay held out)")
        if args.mix_with and not args.mix_with.is_file():
            raise InputError(f"--mix-with {args.mix_with} not found")
        return cmd_generate(args)
    if not args.questions.is_file():
        raise InputError(f"--questions {args.questions} not found")
    try:
        return cmd_evaluate(args)
    except (FileNotFoundError, ValueError) as err:
        raise InputError(str(err)) from err


if __name__ == "__main__":
    sys.exit(main())
