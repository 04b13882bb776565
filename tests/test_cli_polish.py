"""The command line and docs as a new user meets them (issue 13): help, --version, one-line
errors (tracebacks with --debug), an unreachable endpoint failing at once without retries,
progress bars in the summary's units, INFO logs of saves and loads, and the README's S3
example run as written against a real S3 server (moto, over HTTP, through s3fs).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import socket
import struct
import subprocess
import sys
import termios
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import torch_ucp
from tests.support.console import TORCH_UCP
from torch_ucp.cli.common import LogFormatter
from torch_ucp.storage.retry import is_transient, is_unreachable, retry
from torch_ucp.storage.store import open_store

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.timeout(300)]

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([TORCH_UCP, *args], capture_output=True, text=True, env=env or ENV, timeout=240)


def closed_port() -> int:
    """A local TCP port nothing listens on (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unreachable_options(port: int) -> list[str]:
    """s3fs options for a refused endpoint; botocore's own retries off, so that only
    torch_ucp's retrying (there must be none) is left to see."""
    return [
        "-o", f"endpoint_url=http://127.0.0.1:{port}", "-o", "key=k", "-o", "secret=s",
        "-o", 'config_kwargs={"retries": {"total_max_attempts": 1}, "proxies": {}}',
    ]


def test_bare_command_prints_help_and_version(capsys):
    from torch_ucp.cli.main import main

    version = cli("--version")  # the console script once
    assert version.returncode == 0
    assert version.stdout.strip() == f"torch-ucp {torch_ucp.__version__} (torch {torch.__version__})"
    assert main([]) == 0
    bare = capsys.readouterr().out
    assert bare.startswith("usage: torch-ucp")
    for command in ("demo", "inspect", "export", "convert", "verify", "ls", "prune"):
        assert re.search(rf"^\s+{command}\s", bare, re.M), command


def test_every_command_fails_in_one_line_on_an_unreachable_endpoint(tmp_path, capsys):
    """In this process (``main(argv)``: no start-up cost per command), then once through the
    console script."""
    from torch_ucp.cli.main import main

    opts = unreachable_options(closed_port())
    url = "s3://bucket/run/step-1"
    commands = {
        "inspect": ["inspect", url],
        "verify": ["verify", url],
        "export": ["export", url, str(tmp_path / "out")],
        "convert": ["convert", url, str(tmp_path / "converted")],
        "ls": ["ls", "s3://bucket/run"],
        "prune": ["prune", "s3://bucket/run", "--keep", "1"],
    }
    with ThreadPoolExecutor(1) as pool:  # the console script meanwhile
        script = pool.submit(cli, "verify", url, *opts)
        for name, argv in commands.items():
            assert main([*argv, *opts]) == 1, name
            lines = capsys.readouterr().err.splitlines()
            assert len(lines) == 1, (name, lines)  # no traceback, no retry warnings
            assert lines[0].startswith(f"torch-ucp {name}: error: "), lines
            assert "Could not connect to the endpoint URL" in lines[0], lines
        for argv in (["--debug", "verify", url, *opts], ["verify", url, "--debug", *opts]):
            with pytest.raises(Exception, match="Could not connect to the endpoint URL"):
                main(argv)
        r = script.result()
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith("torch-ucp verify: error: EndpointConnectionError: Could not connect")
    assert r.stderr.rstrip().endswith("(--debug shows the traceback)")


def test_refused_connection_is_not_retried(caplog):
    store = open_store(
        "s3://bucket/x",
        {
            "endpoint_url": f"http://127.0.0.1:{closed_port()}",
            "key": "k",
            "secret": "s",
            "config_kwargs": {"retries": {"total_max_attempts": 1}, "proxies": {}},
            "skip_instance_cache": True,
        },
    )
    with caplog.at_level(logging.WARNING, logger="torch_ucp"), pytest.raises(Exception) as e:
        store.exists(".metadata")
    assert is_unreachable(e.value) and not is_transient(e.value)
    assert not [r for r in caplog.records if "retry" in r.getMessage()]
    assert not any("failed after" in n for n in getattr(e.value, "__notes__", []))


def test_unknown_host_is_permanent_but_a_temporary_dns_failure_is_not():
    import aiohttp
    from botocore.exceptions import EndpointConnectionError

    def raised(errno_: int, text: str) -> BaseException:
        # the chain s3fs hands over: botocore wraps aiohttp's, which wraps the resolver's
        try:
            try:
                try:
                    raise socket.gaierror(errno_, text)
                except socket.gaierror as dns:
                    raise aiohttp.ClientConnectorDNSError(None, dns) from dns
            except aiohttp.ClientConnectorError as client:
                raise EndpointConnectionError(endpoint_url="http://no-such-host.invalid") from client
        except EndpointConnectionError as e:
            return e

    unknown = raised(socket.EAI_NONAME, "Name or service not known")
    assert is_unreachable(unknown) and not is_transient(unknown)
    temporary = raised(socket.EAI_AGAIN, "Temporary failure in name resolution")
    assert not is_unreachable(temporary) and is_transient(temporary)


def test_retry_warning_has_one_prefix_on_the_command_line(caplog):
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise TimeoutError("read timed out")
        return "done"

    with caplog.at_level(logging.WARNING, logger="torch_ucp"):
        assert retry(flaky, "reading s3://b/x/.metadata", attempts=2) == "done"
    [record] = [r for r in caplog.records if "retry" in r.getMessage()]
    line = LogFormatter("%(message)s").format(record)
    assert line.startswith("torch-ucp: reading s3://b/x/.metadata failed (TimeoutError: read timed out); retry 1/1")
    assert "torch_ucp:" not in line


def test_progress_bar_uses_the_summary_units(tmp_path):
    url = str(tmp_path / "ckpt")
    torch_ucp.save({"w": torch.zeros(3 << 18)}, url)  # 3.00 MiB
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))  # a sized terminal
    proc = subprocess.Popen(
        [TORCH_UCP, "verify", url], stdout=subprocess.PIPE, stderr=slave, text=True, env=ENV
    )
    os.close(slave)
    bar = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the terminal's last writer is gone
            break
        if not chunk:
            break
        bar += chunk
    os.close(master)
    stdout, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, bar
    assert "3.00 MiB checked" in stdout
    assert b"3.00/3.00 MiB" in bar, bar


def test_info_logs_of_save_and_load(tmp_path, caplog):
    url = str(tmp_path / "ckpt")
    with caplog.at_level(logging.INFO, logger="torch_ucp"):
        torch_ucp.save({"w": torch.ones(64, 64), "step": 1}, url)
        state = {"w": torch.zeros(64, 64), "step": 0}
        torch_ucp.load(state, url)
    save_id = torch_ucp.open_checkpoint(url).metadata.save_id
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("torch_ucp")]
    saved = [m for m in messages if " saved " in m]
    loaded = [m for m in messages if " loaded " in m]
    assert len(saved) == 1 and len(loaded) == 1, messages
    assert re.fullmatch(
        rf"torch_ucp: saved 16\.00 KiB to {re.escape(url)} in \d+\.\d\d s \(\d+\.\d\d GB/s\) "
        rf"from 1 rank, save id {save_id}",
        saved[0],
    ), saved
    assert re.fullmatch(
        rf"torch_ucp: loaded 16\.00 KiB from {re.escape(url)} in \d+\.\d\d s \(\d+\.\d\d GB/s\), "
        rf"save id {save_id}",
        loaded[0],
    ), loaded


def _readme_block(heading: str, lang: str) -> str:
    with open(README) as f:
        text = f.read()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)[0]


def test_readme_s3_example_runs_as_written(s3_server, tmp_path):
    """The README's S3 snippets, with only the endpoint replaced by the test server's, run in
    a fresh process with nothing from the environment: options, then environment variables."""
    endpoint = "http://127.0.0.1:9000"
    python = _readme_block("S3", "python") + _readme_block("Checkpoints of a run", "python")
    shell = _readme_block("S3", "bash")
    assert endpoint in python and endpoint in shell
    env = {
        k: v for k, v in ENV.items()
        if not k.startswith("AWS_") and not k.lower().endswith("_proxy")
    }
    env["NO_PROXY"] = "127.0.0.1"
    try:
        script = tmp_path / "s3_example.py"
        script.write_text(python.replace(endpoint, s3_server.endpoint_url))
        run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=240)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "100 True 64 " in run.stdout  # list_checkpoints: step, committed, bytes, ...
        run = subprocess.run(
            ["bash", "-e", "-c", shell.replace(endpoint, s3_server.endpoint_url)],
            capture_output=True, text=True, env=env, timeout=240,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "StepCheckpoint(step=100, name='step-100', url='s3://ckpt/run/step-100', committed=True" in run.stdout
        assert re.search(r"^ 100  committed  64 B ", run.stdout, re.M), run.stdout
        assert "model.w  float32  [4, 4]" in run.stdout
    finally:
        s3_server.delete_bucket("ckpt")


def test_a_failed_rank_is_one_line_too():
    from torch_ucp.cli.common import one_line
    from torch_ucp.demo.launch import RankFailedError

    e = RankFailedError(
        "--- rank 0 ---\nTraceback (most recent call last):\n  File \"x.py\", line 1\nValueError: bad\n\n"
        "--- rank 1 ---\nTraceback (most recent call last):\nKeyError: 'k'\n"
    )
    assert one_line(e) == "RankFailedError: rank 0: ValueError: bad; rank 1: KeyError: 'k'"
