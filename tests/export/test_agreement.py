# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Megatron at TP=2 (2 gloo ranks), the standalone model and transformers' AutoModelForCausalLM
on the exported folder give the same logits; transformers' generate() with its KV cache gives the
standalone continuation; AutoTokenizer reads the folder's tokenizer."""
from __future__ import annotations

import json

import pytest
import torch

from megatron_memory.export.standalone import MemoryGPT, generate

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_model(trained_export):
    return transformers.AutoModelForCausalLM.from_pretrained(trained_export[0], trust_remote_code=True)


def test_logits_agree_megatron_tp2_standalone_transformers(trained_export, hf_model):
    folder, tokens, megatron = trained_export
    assert megatron.shape == (*tokens.shape, 1024)
    standalone = MemoryGPT.from_pretrained(folder)
    with torch.no_grad():
        ours = standalone(tokens)
        theirs = hf_model(tokens).logits
    torch.testing.assert_close(ours, megatron, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(theirs, megatron, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_transformers_generate_equals_standalone(trained_export, hf_model):
    folder, tokens, _ = trained_export
    config = json.loads((folder / "config.json").read_text())
    pad, eos = config["pad_token_id"], config["eos_token_id"]
    prompts = [tokens[0, :9].tolist(), tokens[1, :4].tolist()]
    ours = generate(MemoryGPT.from_pretrained(folder), prompts, max_new_tokens=8,
                    eos_token_id=eos, pad_token_id=pad)
    ids = torch.full((2, 9), pad)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, 9 - len(p):], mask[row, 9 - len(p):] = torch.tensor(p), 1
    out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)[:, 9:]
    for row, seq in enumerate(ours):
        assert out[row, :len(seq)].tolist() == seq
        assert (out[row, len(seq):] == pad).all()


def test_auto_tokenizer_reads_the_folder(trained_export, hf_model):
    from tokenizers import Tokenizer

    folder = trained_export[0]
    tok = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    text = "Karito Zelanvi was born in Dorel in 1812."
    assert tok(text).input_ids == Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<pad>"
    out = hf_model.generate(**tok([text], return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > len(tok(text).input_ids)  # the README's usage, end to end
