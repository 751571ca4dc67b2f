"""The terminal chat: multi-turn through the chat template (a later turn's reply is the model's reply to the whole
conversation), /reset, /quit, a summary per reply; and as a user runs it, with piped stdin, EOF and Ctrl-C."""
import io
import signal
import subprocess
import sys
import time

from medusa_core.chat import run_chat
from medusa_core.config import REPO_ROOT
from medusa_core.request import Request

TEMPLATE = Request(max_tokens=12)


def test_turns_reset_and_quit(embedded_generator):
    stdin = io.StringIO("What is 2+2?\nAnd 3+3?\n/reset\nWhat is 2+2?\n/quit\nnever read\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    run_chat(embedded_generator, TEMPLATE, stdin, stdout, stderr)

    def reply(*turns: str) -> str:
        messages = tuple({"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns))
        return embedded_generator.generate([Request(messages=messages, max_tokens=12)])[0].text

    first = reply("What is 2+2?")
    second = reply("What is 2+2?", first, "And 3+3?")  # the first exchange is in its context
    assert second != reply("And 3+3?"), "pick turns whose reply depends on the conversation"
    assert stdout.getvalue() == f"{first}\n{second}\n{first}\n"  # after /reset, a fresh conversation
    summaries = [line for line in stderr.getvalue().splitlines() if "tokens/step]" in line]
    assert len(summaries) == 3 and "(new conversation)" in stderr.getvalue()


def test_context_overflow_is_refused_and_the_chat_goes_on(embedded_generator):
    stdin = io.StringIO("word " * 3000 + "\nHi\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    run_chat(embedded_generator, TEMPLATE, stdin, stdout, stderr)
    assert "context window" in stderr.getvalue() and stdout.getvalue().strip()


def chat_process(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "medusa_core", "chat", "--config",
                             str(REPO_ROOT / "configs" / "smollm2-135m-llamacpp.yaml"), "--max-tokens", "8", *args],
                            cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_piped_stdin_ends_at_eof():
    proc = chat_process()
    out, err = proc.communicate("Name a colour.\n", timeout=300)
    assert proc.returncode == 0, err
    assert out.strip() and "tokens/s" in err and "Traceback" not in err


def test_ctrl_c_at_the_prompt_leaves_cleanly():
    proc = chat_process()
    deadline = time.monotonic() + 300
    seen = ""
    while "> " not in seen and time.monotonic() < deadline:  # the model is loaded and the prompt shown
        seen += proc.stderr.read(1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in seen + err, seen + err
