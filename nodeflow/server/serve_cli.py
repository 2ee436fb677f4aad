"""The server's command line: its options, and ``main``, which builds the app and serves it.

    python server.py [--listen HOST] [--port PORT] [--base-dir DIR] [--auth-token TOKEN] ...
    nodeflow serve   (the same options)
"""

from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from nodeflow.cli import speed_options
from nodeflow.queue import QueueLocked, default_db_path
from nodeflow.registry import build_registry
from nodeflow.server import frontend
from nodeflow.server.app import StartupError, create_app
from nodeflow.server.common import FOLDERS, ServerConfig
from nodeflow.server.security import AccessLogger, is_loopback_host

log = logging.getLogger("nodeflow.server")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nodeflow serve", description="Serve ComfyUI's HTTP + WebSocket API.")
    net = p.add_argument_group("network")
    net.add_argument("--listen", metavar="HOST[,HOST]", nargs="?", const="0.0.0.0", default="127.0.0.1",
                     help="addresses to listen on (default 127.0.0.1; --listen alone: 0.0.0.0)")
    net.add_argument("--port", type=int, default=8188, help="port (default 8188)")
    folders = p.add_argument_group("folders")
    folders.add_argument("--base-dir", metavar="DIR", help="holds models/, input/, output/, temp/ "
                         "(default: $NODEFLOW_HOME or the current directory)")
    folders.add_argument("--input-dir", metavar="DIR")
    folders.add_argument("--output-dir", metavar="DIR")
    folders.add_argument("--temp-dir", metavar="DIR")
    queue = p.add_argument_group("queue and history")
    queue.add_argument("--db", metavar="PATH", default=os.environ.get("NODEFLOW_DB"),
                       help="SQLite file of the queue and history (default BASE/nodeflow.sqlite3, or $NODEFLOW_DB; "
                       "':memory:' keeps nothing)")
    queue.add_argument("--requeue-interrupted", action="store_true",
                       help="after a crash, run the prompt that was running again (default: mark it failed)")
    queue.add_argument("--max-history", type=int, default=10_000, metavar="N", help="history entries kept")
    queue.add_argument("--cache-size", type=int, default=4096, metavar="N", help="node outputs cached between runs")
    sec = p.add_argument_group("security")
    sec.add_argument("--auth-token", default=os.environ.get("NODEFLOW_AUTH_TOKEN"), metavar="TOKEN",
                     help="require 'Authorization: Bearer TOKEN' (or ?token=) on every request "
                     "(default $NODEFLOW_AUTH_TOKEN)")
    sec.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                     help="a browser origin (http://host:port, or *) allowed to POST and open the WebSocket; "
                     "repeatable or comma-separated")
    sec.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                     help="a Host name accepted while listening on loopback only; repeatable")
    sec.add_argument("--max-upload-size", type=float, default=100.0, metavar="MB", help="upload limit (default 100)")
    sec.add_argument("--max-pixels", type=int, default=4096 * 4096, metavar="N",
                     help="pixels a node may make or take: width × height × batch_size, LATENT and IMAGE sizes "
                     "(default 4096×4096; 0: none)")
    sec.add_argument("--max-steps", type=int, default=1000, metavar="N",
                     help="limit on 'steps' inputs, literal or linked (default 1000; 0: none)")
    sec.add_argument("--max-literal-size", type=int, default=1_000_000, metavar="N",
                     help="characters in one literal input of a prompt: a text, or a list as JSON "
                     "(default 1,000,000; 0: none)")
    run = p.add_argument_group("nodes and events")
    run.add_argument("--extra-nodes", action="append", default=[], metavar="MODULE|FILE.py",
                     help="register the nodes of a module or file (repeatable; also $NODEFLOW_EXTRA_NODES, "
                     "comma-separated)")
    run.add_argument("--no-builtin-nodes", action="store_true",
                     help="do not load the built-in nodes and installed node packages")
    run.add_argument("--device", metavar="DEVICE", type=_device,
                     help="cuda, cuda:1, mps or cpu for the models (default: the best available)")
    run.add_argument("--precision", choices=["fp32", "fp16", "bf16"],
                     help="model precision (default: fp16 on GPUs, fp32 on the CPU)")
    speed_options(run)
    workers = p.add_argument_group("workers")
    workers.add_argument("--backend", choices=["local", "ray"], default="local",
                         help="where prompts run: local (in this process; default) or ray (Ray actors, one per GPU, "
                         "on this machine or a cluster; pip install \"nodeflow[ray]\")")
    workers.add_argument("--workers", type=_positive, metavar="N",
                         help="workers to run (default: 1 locally; with ray, one per GPU in the cluster, or 1 "
                         "without GPUs)")
    workers.add_argument("--ray-address", metavar="HOST:PORT|auto",
                         help="join a running Ray cluster (default: start one on this machine, loopback only)")
    workers.add_argument("--worker-threads", type=_positive, metavar="N",
                         help="torch threads per Ray worker (default: the cluster's CPUs shared among the workers)")
    workers.add_argument("--max-tries", type=_positive, default=3, metavar="N",
                         help="runs a prompt may lose with a worker that dies before it fails (default 3)")
    run.add_argument("--preview", action="store_true", help="send live previews as binary WebSocket frames")
    run.add_argument("--preview-size", type=int, default=512, metavar="PX")
    run.add_argument("--web-root", metavar="DIR", help="serve this web frontend build at / (default: the graph editor "
                     "of pip install \"nodeflow[web]\", ComfyUI's frontend package, when installed)")
    run.add_argument("--access-log", action="store_true", help="log every request")
    run.add_argument("--verbose", "-v", action="store_true")
    return p


def _device(text: str) -> str:
    kind, _, index = text.strip().lower().partition(":")
    if kind not in ("cuda", "mps", "cpu") or (index and (kind != "cuda" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: cuda, cuda:N, mps or cpu")
    return text.strip().lower()


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _split(values: Sequence[str]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _path(arg: str | None) -> str | None:
    """A path given on the command line, absolute against the current directory (as a user
    expects), not against the base directory."""
    return str(Path(arg).expanduser().resolve()) if arg else arg


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        hosts=_split([args.listen]) or ["127.0.0.1"], port=args.port, base_dir=_path(args.base_dir),
        input_dir=_path(args.input_dir), output_dir=_path(args.output_dir), temp_dir=_path(args.temp_dir),
        db_path=args.db if args.db == ":memory:" else _path(args.db),      # SQLite's name, not a file here
        requeue_interrupted=args.requeue_interrupted, max_history=args.max_history, auth_token=args.auth_token or None,
        allow_origins=_split(args.allow_origin), allow_hosts=_split(args.allow_host),
        max_upload_mb=args.max_upload_size, max_pixels=args.max_pixels, max_steps=args.max_steps,
        max_literal=args.max_literal_size,
        previews=args.preview, preview_size=args.preview_size, cache_size=args.cache_size, web_root=args.web_root,
        device=args.device, precision=args.precision, compile=args.compile_backend if args.compile else None,
        cuda_graphs=args.cuda_graphs, backend=args.backend, workers=args.workers,
        ray_address=args.ray_address, worker_threads=args.worker_threads, max_tries=args.max_tries,
        extra_nodes=_split(args.extra_nodes) + _split([os.environ.get("NODEFLOW_EXTRA_NODES", "")]),
        builtin_nodes=not args.no_builtin_nodes)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    # The event loop shares the GIL with the worker thread: hand it over sooner than the
    # default 5 ms, or every socket write of the loop may wait that long behind a busy run.
    sys.setswitchinterval(0.0005)
    if config.backend != "ray" and (config.ray_address or config.worker_threads):
        print("error: --ray-address and --worker-threads need --backend ray", file=sys.stderr)
        return 2
    try:
        registry = build_registry(config.extra_nodes, builtin=config.builtin_nodes)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not all(is_loopback_host(h) for h in config.hosts) and not config.auth_token:
        log.warning("listening on %s without --auth-token: anyone who can reach this port can run prompts "
                    "and read your images", ", ".join(config.hosts))
    try:
        app = create_app(config, registry)
    except ValueError as exc:  # e.g. an unreadable nodeflow.json
        print(f"error: {exc}", file=sys.stderr)
        return 2
    urls = ", ".join(f"http://{'[' + h + ']' if ':' in h else h}:{config.port}" for h in config.hosts)
    editor = app[frontend.EDITOR]
    urls += f" (graph editor: {editor.source})" if editor else " (no graph editor: pip install \"nodeflow[web]\")"
    try:
        web.run_app(app, host=config.hosts, port=config.port, print=lambda _: log.info("serving on %s", urls),
                    access_log=logging.getLogger("nodeflow.access") if args.access_log else None,
                    access_log_class=AccessLogger)
    except (QueueLocked, StartupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:
        path = config.db_path or default_db_path(app[FOLDERS].base)
        print(f"error: cannot use the queue database {path}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot listen on {urls}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
