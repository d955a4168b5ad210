"""`esft serve` starting up: it says where it serves only once its socket listens (the real port
for --config.port=0), and a busy port, an adapter it cannot serve under its name or an audit log
it cannot write is one line on stderr and exit 2, before the model loads."""

import threading
import time

import httpx
import pytest
import test_serve_engine as engine_tests
import uvicorn

from esft_jax.app import cli
from esft_jax.app.commands import serve as launch

served = engine_tests.served  # the tiny checkpoint (its directory: "base") and its adapters


def _serve(base, *overrides: str, config: str = "configs/serve.py") -> int:
    return cli.main(["serve", "--config", config, f"--config.checkpoint={base}", *overrides])


def test_port_0_serves_on_the_port_it_prints(served, capsys, monkeypatch):
    servers = []  # the uvicorn server `esft serve` runs, to stop it

    class Kept(uvicorn.Server):
        def __init__(self, config):
            super().__init__(config)
            servers.append(self)

    monkeypatch.setattr(uvicorn, "Server", Kept)
    adapter = served[3]["wide"]
    codes = []
    thread = threading.Thread(
        target=lambda: codes.append(
            _serve(served[2], "--config.port=0", f"--config.adapters.wide={adapter}")
        )
    )
    thread.start()
    deadline = time.monotonic() + 60
    while not (servers and servers[0].started) and thread.is_alive():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        out = capsys.readouterr().out
        head, port = out.removesuffix("/v1\n").rsplit(":", 1)
        assert head == "serving base, wide on http://127.0.0.1" and int(port) > 0
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["base", "wide"]
    finally:
        if servers:
            servers[0].should_exit = True
        thread.join()
    assert codes == [0]


def _one_line(capsys) -> str:
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("esft serve: error: ") and err.count("\n") == 1, err
    return err.removeprefix("esft serve: error: ").strip()


def test_a_busy_port_is_one_line_and_exit_2(served, capsys, monkeypatch):
    monkeypatch.setattr(launch, "load", lambda c: pytest.fail("the model loaded"))
    with launch.listen("127.0.0.1", 0) as busy:
        port = busy.getsockname()[1]
        assert _serve(served[2], f"--config.port={port}") == 2
    assert _one_line(capsys) == (
        f"--config.host=127.0.0.1 --config.port={port}: cannot listen there (Address already in "
        "use); --config.port=0 picks a free port"
    )


@pytest.mark.parametrize(
    "name, why",
    [
        ("base", "--config.adapters.base: is the base model's name (base, its checkpoint "),
        ("my adapter", "--config.adapters.my adapter: an adapter's name is letters, digits"),
        ("x/y", "--config.adapters.x/y: an adapter's name is letters, digits"),
    ],
)
def test_an_adapter_that_cannot_be_served_under_its_name_is_refused_first(
    name, why, served, capsys, monkeypatch
):
    monkeypatch.setattr(launch, "listen", lambda *a: pytest.fail("the server started"))
    config = f"configs/serve.py:{name}={served[3]['wide']}"
    assert _serve(served[2], config=config) == 2
    assert _one_line(capsys).startswith(why)


def test_an_audit_log_that_cannot_be_written_is_refused_first(
    served, capsys, tmp_path, monkeypatch
):
    monkeypatch.setattr(launch, "listen", lambda *a: pytest.fail("the server started"))
    (tmp_path / "file").write_text("")
    log = tmp_path / "file" / "audit.jsonl"
    assert _serve(served[2], f"--config.monitor.audit_log={log}") == 2
    assert _one_line(capsys).startswith(f"--config.monitor.audit_log={log}: ")
