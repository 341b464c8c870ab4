# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The standalone model: Megatron's logits from an exported folder, KV-cache generation equal to
full recomputation, padding-blind batches, sampling controls, and the file working alone."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_memory.export import standalone
from megatron_memory.export.standalone import MemoryGPT, generate
from tests.export.helpers import VOCAB, export, megatron_logits, tiny_megatron_model

TOKENS = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def folder(tmp_path_factory, megatron_world):
    cfg, model = tiny_megatron_model()
    out = export(model, cfg, tmp_path_factory.mktemp("sa") / "tiny")
    return out, megatron_logits(model, TOKENS)


@pytest.mark.parametrize("groups,memory", [
    (4, {}), (2, {}), (1, dict(plus=False, qk_norm=False)),
    (4, dict(query_norm="batchnorm")), (2, dict(query_norm="center", qk_norm=False))])
def test_logits_match_megatron(tmp_path, megatron_world, groups, memory):
    cfg, model = tiny_megatron_model(groups=groups, seed=groups, **memory)
    out = export(model, cfg, tmp_path / "m", groups=groups)
    ref = megatron_logits(model, TOKENS)
    got = MemoryGPT.from_pretrained(out)(TOKENS)
    assert ref.shape == got.shape == (3, 12, VOCAB)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_kv_cache_greedy_equals_full_recompute(folder):
    model = MemoryGPT.from_pretrained(folder[0])
    prompts = [[5, 9, 2, 7, 1], [3], [8, 8, 4]]  # ragged: left padding
    cached = generate(model, prompts, max_new_tokens=10, pad_token_id=1)
    full = generate(model, prompts, max_new_tokens=10, pad_token_id=1, use_cache=False)
    assert cached == full and all(len(c) == 10 for c in cached)
    # ... and each prompt alone gives the same continuation: padding is invisible.
    assert [generate(model, [p], max_new_tokens=10)[0] for p in prompts] == cached


def test_padded_batch_logits_equal_unpadded(folder):
    model = MemoryGPT.from_pretrained(folder[0])
    ids = torch.tensor([[0, 0, 0, 4, 7, 9], [1, 2, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    batch = model(ids, attention_mask=mask)
    torch.testing.assert_close(batch[0, 3:], model(ids[:1, 3:])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch[1], model(ids[1:])[0], rtol=1e-5, atol=1e-5)


def test_stops_at_eos_and_samples(folder):
    model = MemoryGPT.from_pretrained(folder[0])
    greedy = generate(model, [[5, 9]], max_new_tokens=8)[0]
    eos = greedy[2]
    stopped = generate(model, [[5, 9]], max_new_tokens=8, eos_token_id=eos)[0]
    assert stopped == greedy[:greedy.index(eos) + 1]
    assert generate(model, [[5, 9]], 8, temperature=1.0, top_k=1)[0] == greedy
    draws = [generate(model, [[5, 9]], 8, temperature=1.5, top_p=0.9,
                      generator=torch.Generator().manual_seed(s))[0] for s in (0, 0, 1)]
    assert draws[0] == draws[1] and draws[0] != draws[2]
    limited = generate(model, [[5, 9]], 8, temperature=5.0, vocab_limit=10,
                       generator=torch.Generator().manual_seed(0))[0]
    assert max(limited) < 10
    with pytest.raises(ValueError, match="prompt token ids"):
        generate(model, [[5, VOCAB]], 2)
    for bad in (dict(temperature=-1.0), dict(top_k=0), dict(top_p=1.5), dict(max_new_tokens=-1)):
        with pytest.raises(ValueError):
            generate(model, [[5]], **{"max_new_tokens": 2, **bad})


def test_top_p_keeps_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {int(standalone.sample_next(logits, 1.0, top_p=0.7, generator=torch.Generator().manual_seed(s)))
            for s in range(200)}
    assert seen == {0, 1}


def test_from_pretrained_errors(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        MemoryGPT.from_pretrained(tmp_path)
    bf16 = MemoryGPT.from_pretrained(folder[0], dtype=torch.bfloat16)
    assert bf16.model.memory_values.weight.dtype == torch.bfloat16


def test_file_works_alone_without_megatron_memory(folder, tmp_path):
    """The copy in the exported folder, imported with megatron_memory blocked, gives the same
    logits through its own reference ops."""
    out, ref = folder
    torch.save(TOKENS, tmp_path / "tokens.pt")
    code = textwrap.dedent(f"""
        import importlib.util, sys, torch
        sys.modules["megatron_memory"] = None  # any import of the package fails
        spec = importlib.util.spec_from_file_location("sa", r"{out}/megatron_memory_standalone.py")
        sa = sys.modules["sa"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sa)
        assert sa.embedding_bag is sa.embedding_bag_reference
        model = sa.MemoryGPT.from_pretrained(r"{out}")
        torch.save(model(torch.load(r"{tmp_path}/tokens.pt")), r"{tmp_path}/logits.pt")
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), ref, rtol=1e-5, atol=1e-5)
