# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""``python -m megatron_memory.export.generate`` on an exported folder; one-line errors, exit 2."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from megatron_memory.export import generate as cli


def test_cli_generates(trained_export):
    folder = trained_export[0]
    run = subprocess.run([sys.executable, "-m", "megatron_memory.export.generate", "--checkpoint", str(folder),
                          "--prompt", "Karito Zelanvi was born in", "--prompt", "The favourite colour",
                          "--max-new-tokens", "6"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    # The CLI prints each prompt and the model's greedy continuation. A model trained for two
    # steps may well pick end-of-document first (then the line is just the prompt), so compare
    # with the library's own generate() rather than ask for more text.
    from tokenizers import Tokenizer

    from megatron_memory.export.standalone import MemoryGPT, generate

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    config = json.loads((folder / "config.json").read_text())
    prompts = ["Karito Zelanvi was born in", "The favourite colour"]
    outs = generate(MemoryGPT.from_pretrained(folder), [tok.encode(p).ids for p in prompts], 6,
                    eos_token_id=config["eos_token_id"], pad_token_id=config["pad_token_id"],
                    vocab_limit=tok.get_vocab_size())
    assert all(len(o) >= 1 for o in outs)
    assert lines == [p + tok.decode(o) for p, o in zip(prompts, outs)]


def test_cli_sampling_is_seeded(trained_export, capsys):
    argv = ["--checkpoint", str(trained_export[0]), "--prompt", "In 1800,", "--max-new-tokens", "8",
            "--temperature", "1.0", "--top-k", "20", "--top-p", "0.95", "--seed", "3"]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == first


@pytest.mark.parametrize("change,message", [
    (["--checkpoint", "/nonexistent/model"], "does not exist"),
    (["--max-new-tokens", "-1"], "max_new_tokens must be >= 0"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--temperature", "-0.5"], "temperature must be >= 0"),
    (["--top-k", "0"], "top_k must be >= 1"),
])
def test_cli_bad_input(trained_export, capsys, change, message):
    argv = ["--checkpoint", str(trained_export[0]), "--prompt", "Hello"] + change
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_cli_not_an_exported_folder(trained_export, tmp_path, capsys):
    assert cli.main(["--checkpoint", str(tmp_path), "--prompt", "x"]) == 2
    assert "not an exported model folder" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(trained_export[0], broken)
    (broken / "model.safetensors").unlink()
    assert cli.main(["--checkpoint", str(broken), "--prompt", "x"]) == 2
    assert "no model.safetensors" in capsys.readouterr().err
    small = tmp_path / "small"
    shutil.copytree(trained_export[0], small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": 512}))
    assert cli.main(["--checkpoint", str(small), "--prompt", "x"]) == 2
    assert "do not belong together" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse: bad number
        cli.main(["--checkpoint", str(broken), "--prompt", "x", "--max-new-tokens", "ten"])
    assert exc.value.code == 2
