"""scripts/chat.py: streamed replies with the KV cache, whole conversations with a chat template, /reset, /quit."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys

import pytest

from conftest import ROOT, add_sentencepiece_tokenizer, save_random_checkpoint, script_main, tiny_config
from lit_gpt.checkpoint import load_model
from lit_gpt.generate import generate_tokens
from lit_gpt.tokenizer import Tokenizer

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def chat():
    spec = importlib.util.spec_from_file_location("chat_script", ROOT / "scripts" / "chat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = save_random_checkpoint(add_sentencepiece_tokenizer(tmp_path_factory.mktemp("chat") / "tiny"),
                                    tiny_config(block_size=64))
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    return folder


class Chunks(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[str] = []

    def write(self, text: str) -> int:
        self.chunks.append(text)
        return super().write(text)


def test_replies_stream_and_reset_forgets_the_conversation(chat, model_dir, monkeypatch):
    model, tokenizer = load_model(model_dir).eval(), Tokenizer(model_dir)
    prompts = []
    render = chat.render
    monkeypatch.setattr(chat, "render", lambda t, m, u: prompts.append(render(t, m, u)) or prompts[-1])
    out = Chunks()
    lines = ["hello", "", "hello", "/reset", "hello", "/quit", "never read"]
    replies = chat.chat_loop(model, tokenizer, lines, out, style="auto", max_new_tokens=6, temperature=0)
    assert len(replies) == 3  # the empty line is skipped, nothing after /quit is answered
    assert prompts[0] == "user: hello\nassistant:"
    assert prompts[1] == f"user: hello\nassistant: {replies[0]}\nuser: hello\nassistant:"  # the whole conversation
    assert prompts[2] == prompts[0] and replies[2] == replies[0]  # /reset started over
    assert len(out.chunks) > len(replies) * 2  # token by token, not one write per reply
    # The reply is what greedy decoding with the KV cache gives for the rendered prompt.
    ids = list(generate_tokens(model, tokenizer.encode(prompts[0]), 6, 0.0, None, tokenizer.stop_ids))
    assert replies[0] == tokenizer.decode([i for i in ids if i not in tokenizer.stop_ids])


def test_long_conversations_drop_their_oldest_turns(chat, model_dir):
    model, tokenizer = load_model(model_dir).eval(), Tokenizer(model_dir)
    lines = ["tell me about the weather in the mountains"] * 4
    replies = chat.chat_loop(model, tokenizer, lines, io.StringIO(), style="auto", max_new_tokens=8,
                             temperature=0)
    assert len(replies) == 4  # block_size 64 holds about one exchange: older ones were dropped, no error


def test_piped_stdin_chats_and_quits(model_dir):
    command = [sys.executable, str(ROOT / "scripts" / "chat.py"), "--checkpoint_dir", str(model_dir),
               "--max_new_tokens", "4", "--temperature", "0"]
    result = subprocess.run(command, input="hi there\n/reset\nhi there\n/quit\n", capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "(new conversation)" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout.strip(), result.stdout


# ---------------------------------------------------------------------- the chat template: default and --chat_template
ALPACA_HEAD = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
               "request.\n\n### Instruction:\n")


@pytest.fixture(scope="module")
def instruct_dir(tmp_path_factory):
    """An instruct model (the name says so) whose tokenizer has a chat template."""
    folder = save_random_checkpoint(add_sentencepiece_tokenizer(tmp_path_factory.mktemp("chat") / "tiny-Instruct"),
                                    tiny_config(name="tiny-Instruct", block_size=64))
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    return folder


def prompts_of(monkeypatch, script: str, *args: str, stdin: str = "") -> list[str]:
    """Run `scripts/<script>.py ARGS` in this process; the texts it tokenized as prompts, in order."""
    from lit_gpt.utils import run_cli

    texts = []
    encode = Tokenizer.encode

    def recording_encode(self, text, *rest, **kwargs):
        texts.append(text)
        return encode(self, text, *rest, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Tokenizer, "encode", recording_encode)
        patch.setattr(sys, "stdin", io.StringIO(stdin))
        run_cli(script_main(script).setup, args=[*args, "--max_new_tokens", "3", "--temperature", "0"])
    return texts


def test_generate_applies_the_chat_template_to_instruct_models_unless_told_not_to(instruct_dir, model_dir,
                                                                                  monkeypatch):
    def prompt(folder, *flags):
        return prompts_of(monkeypatch, "generate", "--checkpoint_dir", str(folder), "--prompt", "hello", *flags)

    assert prompt(instruct_dir) == ["user: hello\nassistant:"]  # the default for an instruct model with a template
    assert prompt(instruct_dir, "--chat_template", "false") == ["hello"]  # the prompt as it is
    assert prompt(model_dir) == ["hello"]  # a base model: not by default, even with a template
    assert prompt(model_dir, "--chat_template", "true") == ["user: hello\nassistant:"]  # forced


def test_chat_sends_whole_conversations_with_the_template_and_single_alpaca_prompts_without(model_dir, monkeypatch):
    chat_flags = ["--checkpoint_dir", str(model_dir)]
    first, second = prompts_of(monkeypatch, "chat", *chat_flags, stdin="hello\nagain\n/quit\n")
    assert first == "user: hello\nassistant:"  # the default when the tokenizer has a template
    assert second.startswith("user: hello\nassistant:") and second.endswith("\nuser: again\nassistant:")
    first, second = prompts_of(monkeypatch, "chat", *chat_flags, "--chat_template", "false",
                               stdin="hello\nagain\n/quit\n")
    assert first == ALPACA_HEAD + "hello\n\n### Response:\n"
    assert second == ALPACA_HEAD + "again\n\n### Response:\n"  # answered alone: nothing of the first exchange
