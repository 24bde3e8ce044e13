"""`lmlab chat` at its edges: bytes that are not UTF-8 in a UTF-8 locale, a conversation that outgrows the
context (said so), a --system message too long to leave room, --max-new-tokens 0, and Ctrl-C during a reply
(it stops that reply, not the chat)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_server_support import BOOK

from lmlab.cli import main
from lmlab.models import ModelConfig, Transformer
from lmlab.models.io import save_pretrained
from lmlab.tokenizers import Tokenizer
from lmlab.tune import chat

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chatty(tmp_path_factory):
    """An untrained gpt2-tiny with lmlab's chat tokens and template, a 64-token context."""
    path = tmp_path_factory.mktemp("chat") / "m"
    tok = Tokenizer.train([BOOK], kind="bpe", vocab_size=300)
    torch.manual_seed(0)
    model, tok, _ = chat.add_chat_tokens(Transformer(ModelConfig.preset("gpt2-tiny", vocab_size=300,
                                                                        block_size=64)), tok)
    save_pretrained(path, model, tok)
    chat.write_template(path)
    return path


def test_bytes_that_are_not_utf8_are_asked_again_in_a_utf8_locale(chatty):
    """With stdin read as strict UTF-8 (PYTHONIOENCODING=utf-8, or an en_US.UTF-8 locale) input() raised
    UnicodeDecodeError: a traceback, exit 1, the conversation lost."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "lmlab.cli", "chat", str(chatty), "--greedy", "--max-new-tokens", "3"],
                       input=b"Hello \xff\xfe there\nWhat\n", capture_output=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stderr.decode() == "lmlab: that line is not UTF-8 text; type it again\n"
    assert r.stdout.count(b"\n") == 1  # one reply, to "What"


def test_dropped_rounds_are_said_and_the_history_is_fit_historys(chatty, capsys, monkeypatch):
    import io
    seen = []

    def fake_reply(model, tok, messages, cfg):
        seen.append(list(messages))
        yield "ok"
    monkeypatch.setattr("lmlab.tune.chat.reply", fake_reply)
    lines = ["one two three four five six seven eight"] * 4
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(x + "\n" for x in lines)))
    assert main(["chat", str(chatty), "--max-new-tokens", "8"]) == 0
    tok = Tokenizer.load(chatty / "tokenizer.json")
    history, notes = [], []
    for line in lines:  # what the chat must have sent, by tune.chat.fit_history
        before = sum(m["role"] == "user" for m in history) + 1
        history = chat.fit_history([*history, {"role": "user", "content": line}], tok, 64 - 8)
        dropped = before - sum(m["role"] == "user" for m in history)
        if dropped:
            notes.append(f"lmlab: the oldest {dropped} round{'s' * (dropped > 1)} of the conversation no longer "
                         f"fit the model's context and {'are' if dropped > 1 else 'is'} left out")
        assert seen.pop(0) == history
        history.append({"role": "assistant", "content": "ok"})
    assert notes and capsys.readouterr().err.splitlines() == notes  # silent before


def test_ctrl_c_stops_the_reply_not_the_chat(chatty, capsys, monkeypatch):
    import io
    seen = []

    def fake_reply(model, tok, messages, cfg):
        seen.append(list(messages))
        yield "half"
        if len(seen) == 1:
            raise KeyboardInterrupt
        yield " done"
    monkeypatch.setattr("lmlab.tune.chat.reply", fake_reply)
    monkeypatch.setattr("sys.stdin", io.StringIO("first\nsecond\n"))
    assert main(["chat", str(chatty), "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == "half [stopped]\nhalf done\n"
    assert seen[1][-2:] == [{"role": "assistant", "content": "half"}, {"role": "user", "content": "second"}]


@pytest.mark.parametrize("argv, message", [
    (["--system", "Hello there " * 40], "--system is too long: it leaves no room for a message in the model's "
                                        "context (56 tokens with room for a reply)"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1 for a chat, not 0"),
    # taken and not used before
    (["--num-beams", "4"], "a chat reply is sampled token by token and ends with its turn: leave out --num-beams, "
                           "--length-penalty and --ignore-eos"),
    (["--ignore-eos"], "a chat reply is sampled token by token and ends with its turn: leave out --num-beams, "
                       "--length-penalty and --ignore-eos"),
])
def test_settings_that_leave_no_chat_are_refused_at_the_start(chatty, capsys, monkeypatch, argv, message):
    import io
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))
    assert main(["chat", str(chatty), "--max-new-tokens", "8", *argv]) == 2
    assert capsys.readouterr().err.strip() == f"lmlab: error: {message}"


def test_a_stop_string_ends_the_reply_before_it(chatty, capsys, monkeypatch):
    """--stop was taken and not applied (`--stop /` printed `//////////`): the reply now ends before the stop
    string, as generate's text does, and the history holds what was shown."""
    import io

    from lmlab.models import GenerationConfig
    model, tok = chat.load_chat_model(chatty)
    whole = chat.generate_reply(model, tok, [{"role": "user", "content": "Hello there"}], do_sample=False,
                                max_new_tokens=12)
    stop = whole[-2:]  # the untrained model says "////////////"
    cut = whole[:whole.index(stop)]
    assert len(whole) > 6 and cut != whole
    assert chat.generate_reply(model, tok, [{"role": "user", "content": "Hello there"}],
                               GenerationConfig(do_sample=False, max_new_tokens=12, stop_strings=[stop])) == cut
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n"))
    assert main(["chat", str(chatty), "--greedy", "--max-new-tokens", "12", "--stop", stop]) == 0
    assert capsys.readouterr().out == cut + "\n"


def test_control_characters_reach_a_terminal_written_out(monkeypatch):
    """A model's text went to the terminal raw: an escape sequence in it could move the cursor or retitle the
    window. On a terminal, control characters are written as \\xNN (newlines and tabs stay)."""
    from lmlab.cli import _for_terminal
    assert _for_terminal("a\x1b[2Jb\tc\nd\x07\x9b") == "a\\x1b[2Jb\tc\nd\\x07\\x9b"


def test_output_into_a_closed_pipe_ends_quietly(chatty):
    """`lmlab chat ... | head -1` printed a BrokenPipeError traceback and "internal error ... a bug in lmlab"."""
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", f"printf 'q1\\nq2\\nq3\\nq4\\n' | {sys.executable} -m "
                           f"lmlab.cli chat {chatty} --greedy --max-new-tokens 40 | head -c 1"], capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=300)
    assert proc.returncode == 141 and len(proc.stdout) == 1, proc.stderr  # lmlab's exit: 128 + SIGPIPE
    assert b"Traceback" not in proc.stderr and b"error" not in proc.stderr, proc.stderr  # (rounds left out: said)
