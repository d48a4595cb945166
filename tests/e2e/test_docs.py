"""The README's first session and docs/api.md's examples, run as a reader runs them: parsed
from the docs, sent to a real `giftstream serve` (its own embedded Redis and generated
secrets, as under `make run`), and held to the replies the docs show. Editing a doc wrongly
fails this test; so does a change to the server that makes a doc untrue."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import io
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from giftstream.protocol.signing import sign_request
from tests.processes import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
API_DOC = ROOT / "docs" / "api.md"
PROTOCOL_DOC = ROOT / "docs" / "protocol.md"
DOC_WS_URL = "ws://127.0.0.1:8765/ws"  # the addresses `make run` uses, as the docs write them
DOC_ADMIN_URL = "http://127.0.0.1:8766"
DOC_VENV_BIN = ".venv/bin/"
WILDCARD = "\u2026"  # `…` in a doc: any value (ids, times)
DEADLINE_S = 15.0  # generous: the machine may be busy; a passing run never waits this long
DEMO_TOKEN_LINE = re.compile(r"^\s+(?:viewer|creator|ops)\s+(\w+)\s+(\S+)\s*$")

Frame = dict[str, Any]


# ---- reading the docs -------------------------------------------------------------------


@dataclass
class Block:
    lang: str
    lines: list[str]
    line_no: int  # of the opening fence, for messages


def code_blocks(path: Path) -> list[Block]:
    """Every fenced code block of a Markdown file, in order."""
    blocks: list[Block] = []
    current: Block | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            if current is None:
                current = Block(line[3:].strip(), [], number)
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.lines.append(line)
    assert current is None, f"{path.name}: the block at line {current.line_no} never closes"
    return blocks


def is_ws_session(block: Block) -> bool:
    return any(line.startswith(("> ", "< ")) for line in block.lines)


def parse_expected(text: str) -> Any:
    """A frame or reply as a doc shows it; `…` (quoted or not) stands for any value."""
    loose = re.sub(f'"{WILDCARD}"|{WILDCARD}', lambda _: json.dumps(WILDCARD), text)
    return json.loads(loose)


def mismatch(expected: Any, actual: Any, where: str = "") -> str | None:
    """Why `actual` is not what the doc shows: every field it shows, no other field."""
    if expected == WILDCARD:
        return None
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return f"{where or 'value'}: {actual!r} is not an object"
        if set(expected) != set(actual):
            return f"{where or 'object'}: fields {sorted(actual)}, the doc shows {sorted(expected)}"
        for key, value in expected.items():
            why = mismatch(value, actual[key], f"{where}.{key}" if where else key)
            if why:
                return why
        return None
    if expected != actual or type(expected) is not type(actual):
        return f"{where or 'value'}: {actual!r}, the doc shows {expected!r}"
    return None


def line_matches(expected: str, actual: str) -> bool:
    """One line of output against the doc's: JSON compared as JSON, text exactly (`…` any)."""
    if expected.startswith("{"):
        try:
            return mismatch(parse_expected(expected), json.loads(actual)) is None
        except json.JSONDecodeError:
            return False
    pattern = ".*".join(re.escape(part) for part in expected.split(WILDCARD))
    return re.fullmatch(pattern, actual) is not None


def shell_expectations(block: Block) -> list[str]:
    """The output a shell block shows: the `# ` lines right after a command (a blank line
    ends them; comments before a block's first command describe it)."""
    expected: list[str] = []
    after_command = False
    for line in block.lines:
        stripped = line.strip()
        if not stripped:
            after_command = False
        elif stripped.startswith("#"):
            if after_command:
                expected.append(stripped[1:].strip())
        else:
            after_command = True
    return expected


def python_expectations(block: Block) -> list[str]:
    """The replies a Python block shows: its comments that hold a JSON object."""
    found = (re.search(r"#\s*(\{.*\})\s*$", line) for line in block.lines)
    return [match.group(1) for match in found if match]


def to_local(text: str, server: ServerProcess) -> str:
    """A doc's command with `make run`'s addresses and `.venv/bin/` made this test's."""
    venv_bin = str(Path(sys.executable).parent) + "/"
    return (
        text.replace(DOC_WS_URL, server.ws_url)
        .replace(DOC_ADMIN_URL, server.admin_url)
        .replace(DOC_VENV_BIN, venv_bin)
    )


def check_output(block: Block, output: list[str], doc: str) -> None:
    """Every line the doc shows appears in the output, in the doc's order."""
    position = 0
    for expected in shell_expectations(block) if block.lang == "sh" else python_expectations(block):
        while position < len(output) and not line_matches(expected, output[position]):
            position += 1
        assert position < len(output), (
            f"{doc} line {block.line_no}: the doc shows\n  {expected}\nbut the output was\n  "
            + "\n  ".join(output)
        )
        position += 1


# ---- the reader's tools: a server, a shell, WebSocket terminals ----------------------------


def tools_for_shell() -> str | None:
    """Why the shell examples cannot run here, or None."""
    missing = [tool for tool in ("bash", "curl", "openssl") if shutil.which(tool) is None]
    return f"no {', '.join(missing)} on PATH to run the doc's shell examples" if missing else None


@contextlib.contextmanager
def doc_server(workdir: Path, *extra: str) -> Iterator[ServerProcess]:
    """`giftstream serve` as `make run` runs it: its embedded Redis and secrets generated
    into `workdir/data`, only the ports its own."""
    server = ServerProcess(workdir / "data", *extra)
    for flag in ("--jwt-secret", "--webhook-secret"):  # generated, as a reader's are
        at = server.args.index(flag)
        del server.args[at : at + 2]
    server.start(timeout=60)
    try:
        yield server
    finally:
        if server.running:
            server.stop()  # SIGTERM: it stops its embedded Redis too


class Shell:
    """One bash kept across a doc's blocks, as a reader's terminal is: what one block
    defines (SECRET, sig) the next one uses."""

    def __init__(self, cwd: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIFTSTREAM_")}
        self.proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def run(self, script: str) -> list[str]:
        """Run a block; its non-empty output lines once it is done."""
        assert self.proc.stdin is not None
        marker = f"__block_done_{uuid.uuid4().hex}__"
        self.proc.stdin.write(f"{script}\nprintf '\\n%s\\n' {marker}\n")
        self.proc.stdin.flush()
        output: list[str] = []
        deadline = time.monotonic() + 60
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"shell block not done in 60 s; so far: {output}") from None
            if line is None:
                raise AssertionError(f"bash exited during a block; output: {output}")
            if line == marker:
                return output
            if line:
                output.append(line)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


@dataclass
class Terminal:
    """`python -m websockets URL` as one user: what arrives is kept until the doc's `<`
    line that shows it (batches unpacked, since a room may batch what a reader sees apart)."""

    conn: ClientConnection
    frames: list[Frame] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None

    async def read_all(self) -> None:
        try:
            async for raw in self.conn:
                frame: Frame = orjson.loads(raw)
                self.frames.extend(frame["events"] if frame.get("type") == "batch" else [frame])
                self.arrived.set()
        except ConnectionClosed:
            pass
        finally:
            self.arrived.set()

    async def expect(self, shown: str, where: str) -> None:
        expected = parse_expected(shown)
        deadline = asyncio.get_running_loop().time() + DEADLINE_S
        while True:
            for i, frame in enumerate(self.frames):
                if frame.get("type") == expected.get("type") and mismatch(expected, frame) is None:
                    del self.frames[i]
                    return
            self.arrived.clear()
            assert self.reader is not None and not self.reader.done(), (
                f"{where}: connection closed before {shown}; unread: {self.frames}"
            )
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                near = [f for f in self.frames if f.get("type") == expected.get("type")]
                whys = [mismatch(expected, f) for f in near]
                raise AssertionError(
                    f"{where}: no frame as the doc shows\n  {shown}\nwithin {DEADLINE_S} s; "
                    f"unread: {self.frames}; why the nearest differ: {whys}"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), left)


# ---- the README's and protocol.md's sessions -------------------------------------------------


def test_the_readme_starts_with_make_run_and_make_test() -> None:
    lines = [line.strip() for line in README.read_text(encoding="utf-8").splitlines()]
    commands = [line.split("#")[0].strip() for line in lines if line.startswith("make ")]
    assert commands[:2] == ["make run", "make test"]
    first_text = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert lines[first_text].startswith("make run") and lines[first_text + 1].startswith(
        "make test"
    )


@pytest.mark.parametrize("doc", [README, PROTOCOL_DOC], ids=lambda doc: doc.name)
async def test_the_first_session_runs_as_written(doc: Path, tmp_path: Path) -> None:
    """Every request of the doc's session, over real WebSockets, as the users it names,
    with the tokens `make run` prints; every reply and event it shows arrives as shown; its
    shell steps (the README's purchase, payout and audit) print what it shows."""
    name = doc.relative_to(ROOT).as_posix()
    blocks = [b for b in code_blocks(doc) if is_ws_session(b) or b.lang == "sh"]
    assert blocks, f"{name} shows no session"
    with doc_server(tmp_path, "--demo") as server:
        tokens = await wait_for_demo_tokens(server)
        terminals: dict[str, Terminal] = {}
        shell: Shell | None = None
        try:
            for block in blocks:
                if is_ws_session(block):
                    await run_ws_block(block, name, server, tokens, terminals)
                    continue
                skip = tools_for_shell()
                if skip:
                    pytest.skip(f"{name} line {block.line_no}: {skip}")
                shell = shell or Shell(tmp_path)
                script = to_local("\n".join(block.lines), server)
                output = await asyncio.to_thread(shell.run, script)
                check_output(block, output, name)
            for user, terminal in terminals.items():
                errors = [f for f in terminal.frames if f.get("type") == "error"]
                assert not errors, f"{user} got errors {name} does not show: {errors}"
        finally:
            for terminal in terminals.values():
                await terminal.conn.close()
                if terminal.reader is not None:
                    await terminal.reader
            if shell is not None:
                shell.close()


async def wait_for_demo_tokens(server: ServerProcess) -> dict[str, str]:
    """The tokens `--demo` prints, by user, read from the server's output as a reader would."""
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    while True:
        found = (DEMO_TOKEN_LINE.match(line) for line in list(server.log))
        tokens = {m.group(1): m.group(2) for m in found if m}
        if {"ann", "cara"} <= set(tokens):
            return tokens
        assert asyncio.get_running_loop().time() < deadline, "".join(server.log)
        await asyncio.sleep(0.05)  # polling the output a thread collects


async def run_ws_block(
    block: Block,
    doc: str,
    server: ServerProcess,
    tokens: dict[str, str],
    terminals: dict[str, Terminal],
) -> None:
    user: str | None = None
    for offset, line in enumerate(block.lines, 1):
        where = f"{doc} line {block.line_no + offset}"
        named = re.match(r"#.*?\bas (\w+)", line)
        if named:
            user = named.group(1)
        elif line.startswith("$ "):
            command = line[2:].split()
            assert command[:3] == [f"{DOC_VENV_BIN}python", "-m", "websockets"], where
            assert user is not None, f"{where}: a terminal that names no user"
            conn = await connect(to_local(command[3], server))
            terminal = terminals[user] = Terminal(conn)
            terminal.reader = asyncio.get_running_loop().create_task(terminal.read_all())
        elif line.startswith(("> ", "< ")):
            assert user in terminals, f"{where}: {user}'s terminal was never opened"
            if line.startswith("> "):
                request = re.sub(r"<(\w+)'s token>", lambda m: tokens[m.group(1)], line[2:])
                await terminals[user].conn.send(request)
            else:
                await terminals[user].expect(line[2:], where)


# ---- docs/api.md --------------------------------------------------------------------------


WORKED_EXAMPLE = re.compile(
    r"^ +secret: +(\S+)\n +t: +(\d+)\n +method: +([A-Z]+)\n +path: +(\S+)\n +body:(?: +(\S+))?\n"
    r" +-> +(t=\d+,v1=[0-9a-f]{64})$",
    re.M,
)


def test_api_worked_example_signatures_are_right() -> None:
    """The test vectors in Signing: each header is the signature of the request above it,
    by the project's `sign_request`, by the standard library and, where it is installed, by
    `openssl` as the doc's by-hand command runs it."""
    examples = WORKED_EXAMPLE.findall(API_DOC.read_text(encoding="utf-8"))
    assert {example[2] for example in examples} == {"GET", "POST"}, "the worked example changed"
    for secret, t, method, path, body, header in examples:
        text = f"{t}\n{method}\n{path}\n{body}".encode()
        assert sign_request(secret, method, path, body.encode(), int(t)) == header, path
        digest = hmac.new(secret.encode(), text, hashlib.sha256).hexdigest()
        assert header == f"t={t},v1={digest}", path
        if shutil.which("openssl"):
            openssl = subprocess.run(
                ["openssl", "dgst", "-sha256", "-hmac", secret, "-r"],
                input=text,
                capture_output=True,
                check=True,
                timeout=30,
            )
            assert openssl.stdout.split()[0].decode() == digest, path


def test_api_examples_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """api.md's shell blocks in one shell and its Python with exec, in the doc's order,
    against a real server whose secret is only in its data dir's file."""
    blocks = [b for b in code_blocks(API_DOC) if b.lang in ("sh", "python")]
    assert [b.lang for b in blocks].count("python") >= 1 and len(blocks) >= 3
    skip = tools_for_shell()
    monkeypatch.chdir(tmp_path)  # the examples read data/webhook_secret, as from the repo
    with doc_server(tmp_path) as server:
        secret_file = (tmp_path / "data" / "webhook_secret").read_text(encoding="utf-8")
        assert secret_file.endswith("\n"), "the doc warns of a trailing newline"
        shell = None if skip else Shell(tmp_path)
        ran = 0
        try:
            for block in blocks:
                code = to_local("\n".join(block.lines), server)
                if block.lang == "python":
                    printed = io.StringIO()
                    with contextlib.redirect_stdout(printed):
                        exec(compile(code, f"api.md line {block.line_no}", "exec"), {})
                    check_output(block, printed.getvalue().splitlines(), "api.md")
                elif shell is not None:
                    check_output(block, shell.run(code), "api.md")
                ran += 1
        finally:
            if shell is not None:
                shell.close()
    if skip:
        pytest.skip(f"ran the Python example only: {skip}")
    assert ran == len(blocks)
