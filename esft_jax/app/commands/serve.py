"""`esft serve`'s process: listen on the configured address (before the model loads: a busy port is
one line and exit 2 at once), load the model, its adapters and the engine, say where they are
served (the real port where --config.port=0), and serve them with uvicorn until SIGINT or SIGTERM
(the requests in flight finish first).
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import ml_collections

from esft_jax.app import runtime
from esft_jax.app.checks import (
    input_path,
    number,
    required,
    template,
    whole,
    writable_file,
)
from esft_jax.app.config_files import ConfigFileError
from esft_jax.app.runtime import RANDOM_WEIGHTS
from esft_jax.serve import names as served_names
from esft_jax.serve.engine import Engine
from esft_jax.serve.http import Server, app
from esft_jax.serve.monitor import Monitor
from esft_jax.serve.worker import Worker


def base_name(checkpoint: str) -> str:
    """The name the base model is served under: its checkpoint directory's (random weights: "random")."""
    return Path(checkpoint).resolve().name if checkpoint != RANDOM_WEIGHTS else checkpoint


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket listening on host:port (port 0: a free one), or a one-line ConfigFileError
    (a port in use, an address not of this machine): checked before the model loads."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        sock.bind((host, port))
        sock.listen()
    except OSError as e:  # socket.gaierror too: a host name not known
        sock.close()
        hint = "; --config.port=0 picks a free port" if e.errno == errno.EADDRINUSE else ""
        raise ConfigFileError(
            f"--config.host={host} --config.port={port}: cannot listen there "
            f"({e.strerror or e}){hint}"
        ) from None
    return sock


def url(sock: socket.socket) -> str:
    """The http:// address a listening socket is reached at (its real port)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"http://{host}:{port}"


def load(c: ml_collections.ConfigDict) -> Server:
    """c's model, adapters, routing monitor and engine thread, as a Server."""
    mesh = runtime.mesh(c)
    tokenizer = runtime.tokenizer(c)
    template = runtime.chat_template(c, "template", tokenizer, runtime.model_config(c))
    cfg, params = runtime.load_model(c, mesh)
    engine = Engine(
        cfg, params, dict(c.adapters), mesh=mesh, rows=c.rows, max_len=c.max_len or None
    )
    name = base_name(c.checkpoint)
    m = c.monitor
    monitor = Monitor(engine.bank, ood_ratio=m.ood_ratio, base_name=name, layers=cfg.moe_layer_ids)
    return Server(
        Worker(engine),
        tokenizer,
        monitor,
        base_name=name,
        api_key=c.api_key,
        fallback=m.fallback,
        template=template,
        max_body_bytes=c.max_body_bytes,
        audit_log=m.audit_log or None,
        log_prompts=m.log_prompts,
    )


def run(c: ml_collections.ConfigDict) -> None:
    """Check c's adapters against its base (their configs and the base's headers), listen on
    c.host:c.port, load c's model and adapters, say where they are served, and serve them until
    interrupted: whatever is refused is refused before the model loads."""
    import uvicorn

    for adapter_dir in c.adapters.values():
        runtime.check_adapter_base(c, adapter_dir)
    with listen(c.host, c.port) as sock:
        server = load(c)
        try:
            print(f"serving {', '.join(server.names)} on {url(sock)}/v1", flush=True)
            # log_config None: uvicorn's warnings go through the process's logging as it is
            config = uvicorn.Config(app(server), log_config=None, log_level="warning")
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            server.close()


def check(c: ml_collections.ConfigDict) -> None:
    required(c, "checkpoint", "the base model's Hugging Face checkpoint directory")
    base = base_name(c.checkpoint)
    for name in c.adapters:
        if (why := served_names.problem(base, name)) is not None:
            raise ConfigFileError(f"--config.adapters.{name}: {why}")
        input_path(
            c, f"adapters.{name}", f"adapter {name}'s directory (esft train's <workdir>/adapter)"
        )
    required(c, "host", "the address to bind (127.0.0.1: this machine only)")
    whole(c, "port", 0)
    if c.port > 65535:
        raise ConfigFileError(f"--config.port={c.port}: expected a port number <= 65535")
    whole(c, "rows")
    whole(c, "max_len", 0)
    whole(c, "max_body_bytes")
    template(c, "template")
    number(c, "monitor.ood_ratio", 0)
    if c.monitor.audit_log:
        writable_file(c, "monitor.audit_log")
