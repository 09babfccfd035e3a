"""``loratune serve``: many adapters on one base over HTTP (vLLM's routes), until SIGTERM or Ctrl-C.

cli/main.py's ``build_parser`` calls :func:`register`; importing this module does nothing (no torch).
"""

from __future__ import annotations

import argparse
from typing import Any

from loratune.cli.common import add_option
from loratune.cli.progress import Renderer
from loratune.training.options import DEFAULTS


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("serve", parents=[common],
                       help="serve adapters on one base over HTTP (vLLM's and OpenAI's routes)",
                       description="Serve many adapters on one frozen base: each request names its "
                                   "adapter ('model'), and concurrent requests for different adapters run in one "
                                   "forward pass (classification adapters) or decode together (causal-LM adapters). "
                                   "Routes: GET /v1/models, POST /v1/classify (and /classify) or POST "
                                   "/v1/completions and /v1/chat/completions (OpenAI's, streaming too), POST "
                                   "/v1/load_lora_adapter, POST /v1/unload_lora_adapter, GET /health, GET /metrics. "
                                   "With LORATUNE_API_KEY set, every route but /health needs 'Authorization: Bearer "
                                   "KEY' (the key is read from the environment: a flag would show in `ps`). SIGTERM "
                                   "answers every request already received, then exits 0.")
    s.add_argument("--base", metavar="MODEL",
                   help="base model (default: the one the first adapter was trained on)")
    s.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="an adapter to serve as NAME (repeat for more)")
    s.add_argument("--adapters-dir", metavar="DIR",
                   help="the only folder /v1/load_lora_adapter may load from (paths relative to it; links out of it "
                        "refused); a search directory is served at start as its trials (by trial id) and 'best'")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (0: any free one) (default: %(default)s)")
    s.add_argument("--merge", action="store_true",
                   help="fold the one --adapter into the base's weights: no added latency, no other adapters")
    s.add_argument("--max-batch", type=int, default=32, metavar="N",
                   help="most texts in one forward pass, all adapters together (default: %(default)s)")
    s.add_argument("--max-wait-ms", type=float, default=5.0, metavar="T",
                   help="longest a text waits for others to fill its batch (default: %(default)s)")
    s.add_argument("--max-inputs", type=int, default=256, metavar="N",
                   help="most texts in one request (default: %(default)s)")
    s.add_argument("--max-chars", type=int, default=20_000, metavar="N",
                   help="longest text in characters (longer: 413; texts are cut to the adapter's max length in "
                        "tokens anyway) (default: %(default)s)")
    s.add_argument("--max-tokens", type=int, default=512, metavar="N",
                   help="causal-LM adapters: most tokens one completion may write, and a chat's default "
                        "max_tokens (default: %(default)s)")
    add_option(s, "precision", default=DEFAULTS["precision"])
    s.add_argument("--threads", type=int, metavar="N",
                   help="torch threads (default: the CPUs this process may use; with --ray, per replica: the CPUs "
                        "split evenly among the replicas)")
    s.add_argument("--ray", action="store_true",
                   help="serve on Ray Serve: --replicas copies of the base and every adapter behind Serve's proxy on "
                        "--host/--port (a local Ray on 127.0.0.1, stopped with the server, or --address's cluster); "
                        "run-time loading and unloading are off (needs pip install 'loratune[serve-ray]')")
    s.add_argument("--replicas", type=int, metavar="N",
                   help="with --ray: replicas, each holding every adapter (default: 2)")
    s.add_argument("--address", metavar="HOST:PORT",
                   help="with --ray: join this Ray cluster (its head's GCS address, 'auto' or ray://HOST:PORT) and "
                        "deploy there; on exit only this application is deleted (default: a local Ray)")
    s.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace, ui: Renderer) -> int:
    import importlib.util

    from loratune.errors import InputError

    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"serve: needs {' and '.join(missing)}, not installed here: pip install 'loratune[serve]'")
    from loratune.serve.app import Limits
    from loratune.serve.server import serve

    for flag, value in (("--max-inputs", args.max_inputs), ("--max-chars", args.max_chars),
                        ("--max-tokens", args.max_tokens)):
        if value < 1:
            raise InputError(f"{flag}: must be at least 1, got {value}")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads: must be at least 1, got {args.threads}")
    given = [flag for flag, value in (("--replicas", args.replicas), ("--address", args.address)) if value is not None]
    if given and not args.ray:
        raise InputError(f"{given[0]}: only with --ray")

    def show(event: dict[str, Any]) -> None:
        if event["kind"] == "ready":
            what = "merged adapter" if event["merged"] else "adapters"
            replicas = event.get("replicas")
            ui.err(f"serving {event['base']} with {len(event['adapters'])} {what} "
                   f"({', '.join(event['adapters']) or 'none'}) on {event['url']}"
                   + (f" ({replicas} Ray Serve replica{'s' if replicas > 1 else ''})" if replicas else "")
                   + (" (API key required)" if event["api_key"] else "") + "; SIGTERM or Ctrl-C to stop")
        else:
            ui.err(event["text"])

    options = dict(host=args.host, port=args.port, emit=show, base=args.base, adapters=args.adapter,
                   adapters_dir=args.adapters_dir, merge=args.merge, max_batch=args.max_batch,
                   max_wait_ms=args.max_wait_ms, precision=args.precision, threads=args.threads,
                   limits=Limits(max_inputs=args.max_inputs, max_chars=args.max_chars, max_tokens=args.max_tokens))
    if args.ray:                                    # loratune.serve.ray_serve imports Ray only when it starts
        from loratune.serve.ray_serve import serve_ray

        return serve_ray(replicas=2 if args.replicas is None else args.replicas, address=args.address, **options)
    return serve(**options)
