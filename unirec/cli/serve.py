"""`unirec serve`: the HTTP API over published model versions (see `unirec.ops.serving`).

Reads `serving:`, `experiments:`, `registry:`, `features:` and `kafka:` from
pipeline.yaml. The server starts without a published version (requests get 503
until the first publish) and without a reachable broker (exposures are then
dropped and counted, requests still succeed).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="HTTP API: /recommend, /search, /metrics (A/B arms, hot swap)")
    p.add_argument("--bind", default=None, help="host:port (default serving.bind)")
    p.add_argument("--registry", default=None, help="registry directory (default registry.path)")
    p.set_defaults(func=_serve)


def build_app(cfg, *, registry_path: str | None = None):
    """The app for a loaded PipelineConfig (used by the CLI and by bench/serving.py)."""
    from unirec.ops.http_api import create_app
    from unirec.ops.registry import Registry
    from unirec.ops.serving import Service

    rcfg = cfg.registry if registry_path is None else dataclasses.replace(cfg.registry, path=registry_path)

    def store():
        from unirec.features.online import OnlineStore
        return OnlineStore(cfg.features)

    def query_vectors(mc):   # versions trained with the sentence encoder embed each query with it
        from unirec.model import sentence
        return sentence.query_vectors(mc, cfg.data.cache_dir)

    service = Service(cfg.serving, cfg.experiments, Registry.from_config(rcfg), store_factory=store,
                      kafka_cfg=cfg.kafka, query_vectors=query_vectors)
    return create_app(service)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from unirec.config import ConfigError, load
    from unirec.ops.metrics import parse_bind

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load(args.config)
        host, port = parse_bind(args.bind or cfg.serving.bind)
    except (ConfigError, ValueError) as e:
        print(f"unirec serve: {e}", file=sys.stderr)
        return 2
    logging.getLogger("kafka").setLevel(logging.CRITICAL)   # send failures are counted in /metrics instead
    from unirec.streaming.broker import answers_metadata, ensure_topics
    try:
        if not answers_metadata(cfg.kafka, timeout_s=3.0):
            raise ConnectionError(f"no broker answers at {cfg.kafka.bootstrap_servers}")
        ensure_topics(cfg.kafka, [cfg.kafka.topics.exposures])
    except Exception as e:  # noqa: BLE001 - serving does not need the broker to answer
        print(f"unirec serve: exposures topic not ensured ({e}); exposures are dropped (counted) until Kafka "
              "answers", file=sys.stderr)
    app = build_app(cfg, registry_path=args.registry)
    print(f"unirec serve: http://{host}:{port}/recommend?user_id=...  (/search, /healthz, /metrics)", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    return 0
