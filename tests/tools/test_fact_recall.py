# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Fact-recall benchmark: deterministic corpus, held-out question templates, exact-match scoring."""
from __future__ import annotations

import json

from megatron_memory.tools import fact_recall as fr


def test_corpus_is_deterministic_and_questions_are_held_out(tmp_path):
    a, b = fr.make_entities(50, seed=3), fr.make_entities(50, seed=3)
    assert a == b and len({e["n"] for e in a}) == 50
    docs = fr.statements(a, per_fact=3, seed=3)
    assert docs == fr.statements(a, per_fact=3, seed=3)
    text = " ".join(docs)
    qs = fr.questions(a)
    assert len(qs) == 50 * len(fr.ATTRIBUTES)
    for q in qs:
        assert q["prompt"] not in text and "Question:" not in text   # template never trained on
        e = next(x for x in a if x["n"] == q["entity"])
        assert text.count(e[q["attribute"]]) >= 1 and q["answer"] == " " + e[q["attribute"]]
    # every fact stated per_fact times (names are unique, so count the entity's sentences)
    assert sum(d.count(a[0]["n"]) for d in docs) == 3 * len(fr.ATTRIBUTES)
    other = [json.dumps({"text": f"other {i}"}) for i in range(5)]
    (tmp_path / "other.jsonl").write_text("\n".join(other) + "\n")
    assert fr.main(["generate", "--out", str(tmp_path / "f"), "--entities", "10",
                    "--mix-with", str(tmp_path / "other.jsonl")]) == 0
    lines = (tmp_path / "f" / "facts.jsonl").read_text().splitlines()
    assert sum("other" in line for line in lines) == 5 and len(lines) > 5
    assert fr.main(["generate", "--out", str(tmp_path / "g"), "--entities", "0"]) == 2


def test_exact_match_recall():
    ents = fr.make_entities(6, seed=1)
    items = fr.questions(ents)
    vocab: dict[str, int] = {}

    def tokenize(s):  # a toy word-level tokenizer
        return [vocab.setdefault(w, len(vocab)) for w in s.split(" ")]

    answers = {it["prompt"]: tokenize(it["answer"]) for it in items}

    def oracle(prompts, lengths):
        return [answers[p] + [0, 0] for p in prompts]

    def wrong_city(prompts, lengths):
        return [[999] * n if "city" in p else answers[p] for p, n in zip(prompts, lengths)]

    assert fr.recall(items, oracle, tokenize, batch=5)["recall"] == 1.0
    res = fr.recall(items, wrong_city, tokenize, batch=7)
    assert res["n"] == 24 and res["by_attribute"]["city"] == 0.0 and res["by_attribute"]["year"] == 1.0
    assert res["recall"] == 0.75


def test_qa_share_trains_the_question_format_on_some_entities_and_holds_out_the_rest(tmp_path):
    assert fr.main(["generate", "--out", str(tmp_path), "--entities", "40", "--qa-share", "0.5"]) == 0
    text = " ".join(json.loads(line)["text"] for line in (tmp_path / "facts.jsonl").read_text().splitlines())
    held = [json.loads(line) for line in (tmp_path / "questions.jsonl").read_text().splitlines()]
    assert len(held) == 20 * len(fr.ATTRIBUTES)
    for q in held:  # held-out entities: facts stated, never asked
        assert q["prompt"] not in text and q["entity"] in text
    trained = {e["n"] for e in fr.make_entities(40, seed=0)} - {q["entity"] for q in held}
    assert len(trained) == 20
    for q in fr.questions([e for e in fr.make_entities(40, seed=0) if e["n"] in trained]):
        assert q["prompt"] + q["answer"] + "." in text  # answered questions are training text
    probes = [json.loads(line) for line in (tmp_path / "cloze.jsonl").read_text().splitlines()]
    assert len(probes) == 40 * len(fr.ATTRIBUTES)
    for p in probes:  # a training template cut before its value (unambiguous), of a stated fact
        cut = [t[:-len(" {v}.")].format(n=p["entity"]) for t in fr.CLOZE[p["attribute"]]]
        assert p["prompt"] in cut and not p["prompt"].endswith("born in")
        assert f"{p['entity']} " in text and p["answer"] in text
    assert fr.main(["generate", "--out", str(tmp_path / "x"), "--qa-share", "1"]) == 2
