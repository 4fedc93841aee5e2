"""Command line: parse arguments, load config, run. Nothing else lives here.

dashscope-proxy --config PATH [--host H] [--port N]   serve the gateway
    (with server.workers > 1: a supervisor of N worker processes, proxy.ops.supervisor)
dashscope-proxy demo [--port N]                       simulator + gateway, no account
dashscope-proxy check-config [--probe] PATH           validate, list every problem
                                                      (--probe: test each upstream's key)
dashscope-proxy hash-key                              stdin key -> key_sha256
dashscope-proxy usage [--since D] [--until D] [--by key,model,day] [--format F] [FILE ...]
                                                      images and cost from the usage log
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from proxy.config.model import ConfigError, UpstreamConfig, sha256_hex
from proxy.config.parse import file_signature, load_config

COMMANDS = ("demo", "check-config", "hash-key", "usage", "serve")


def _serve(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="dashscope-proxy",
        description="DashScope image-generation gateway.",
        epilog="Other commands: demo, check-config PATH, hash-key, usage.",
    )
    parser.add_argument(
        "--config",
        "-c",
        default=os.environ.get("DASHSCOPE_PROXY_CONFIG"),
        help="YAML config file (env DASHSCOPE_PROXY_CONFIG)",
    )
    parser.add_argument("--host", help="override server.host")
    parser.add_argument("--port", type=int, help="override server.port")
    parser.add_argument(
        "--config-poll-seconds",
        type=float,
        default=1.0,
        metavar="S",
        help="check the config file for changes every S seconds and reload "
        "(default 1; 0: reload on SIGHUP only)",
    )
    # Set by the supervisor on the processes it starts (server.workers > 1).
    parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.config:
        parser.error("--config PATH is required (or try: dashscope-proxy demo)")
    # Until the server installs its own handlers, SIGTERM finds nothing in
    # flight: exit 0 at once instead of dying by the signal.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    # Taken before the read: a change landing while we start is then reloaded.
    signature = file_signature(args.config)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"{args.config}: invalid config:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    poll = max(args.config_poll_seconds, 0.0)
    if config.server.workers > 1 and args.worker_index is None:
        from proxy.ops.supervisor import Supervisor

        return Supervisor(
            config,
            args.config,
            host=args.host or config.server.host,
            port=config.server.port if args.port is None else args.port,
            environ=os.environ,
            worker_args=["--config-poll-seconds", str(poll)],
        ).run()
    metrics_dir = None
    if args.worker_index is not None:
        _tag_log_lines(f"worker-{args.worker_index}")
        # Set by the supervisor; prometheus_client reads it at import too.
        metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    from proxy.app import create_app
    from proxy.ops.server import install_fast_loop, serve

    install_fast_loop()
    app = create_app(config, metrics_dir=metrics_dir)
    return asyncio.run(
        serve(
            config,
            host=args.host,
            port=args.port,
            config_path=args.config,
            app=app,
            config_poll_seconds=poll,
            config_signature=signature,
        )
    )


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _tag_log_lines(tag: str) -> None:
    for handler in logging.getLogger().handlers:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {tag} %(name)s: %(message)s")
        )


def _check_config(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="dashscope-proxy check-config")
    parser.add_argument("path")
    parser.add_argument(
        "--probe",
        action="store_true",
        help="also check every upstream's DashScope key with a call that generates and "
        "costs nothing; exit 1 naming each upstream that fails",
    )
    args = parser.parse_args(argv)
    try:
        config = load_config(args.path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{args.path}: {problem}", file=sys.stderr)
        print(f"{len(exc.problems)} problem(s)", file=sys.stderr)
        return 1
    usage_log = config.server.usage_log or "off"
    print(
        f"{args.path}: OK ({len(config.upstreams)} upstream(s), {len(config.keys)} key(s), "
        f"{len(config.models)} model override(s), state backend {config.state.backend}, "
        f"{len(config.pricing.models)} price(s) in {config.pricing.currency}, "
        f"usage log {usage_log})"
    )
    if args.probe:
        return asyncio.run(_probe(config.upstreams))
    return 0


async def _probe(upstreams: Sequence[UpstreamConfig]) -> int:
    from proxy.upstream.call import make_session
    from proxy.upstream.probe import probe_all

    session = make_session(upstreams)
    try:
        results = await probe_all(session, upstreams)
    finally:
        await session.close()
    for r in results:
        print(f"upstream {r.upstream}: {'OK' if r.ok else 'FAILED'}: {r.detail}")
    failed = [r.upstream for r in results if not r.ok]
    if failed:
        print(f"{len(failed)} upstream(s) failed the probe: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _hash_key(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="dashscope-proxy hash-key", description="Read a key on stdin, print its key_sha256."
    )
    parser.parse_args(argv)
    secret = sys.stdin.readline().rstrip("\r\n")
    if not secret:
        print("no key on stdin", file=sys.stderr)
        return 1
    print(sha256_hex(secret))
    return 0


def _demo(argv: Sequence[str]) -> int:
    from proxy.ops.demo import run_demo

    parser = argparse.ArgumentParser(prog="dashscope-proxy demo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--sim-port", type=int, default=8089)
    args = parser.parse_args(argv)
    return run_demo(args.host, args.port, args.sim_port)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=os.environ.get("DASHSCOPE_PROXY_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args and args[0] in COMMANDS:
        cmd, rest = args[0], args[1:]
        if cmd == "demo":
            return _demo(rest)
        if cmd == "check-config":
            return _check_config(rest)
        if cmd == "hash-key":
            return _hash_key(rest)
        if cmd == "usage":
            from proxy.ops.usage_report import main as usage_report

            return usage_report(rest, os.environ)
        return _serve(rest)
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
