"""Client settings, topics, and the embedded broker's start/stop/status, as a user runs them."""
from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from unirec.cli import main
from unirec.config import ConfigError, load
from unirec.streaming import broker
from unirec.streaming.config import EmbeddedBroker, KafkaConfig


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_plaintext_kwargs_have_no_security_settings():
    kw = broker.client_kwargs(KafkaConfig(bootstrap_servers="a:9092, b:9092"))
    assert kw["bootstrap_servers"] == ["a:9092", "b:9092"]
    assert kw["security_protocol"] == "PLAINTEXT"
    assert not [k for k in kw if k.startswith(("sasl", "ssl"))]


def test_sasl_ssl_secrets_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("KAFKA_USER", "svc-unirec")
    monkeypatch.setenv("KAFKA_PASS", "s3cr:et}")
    cfg = load(write_yaml(tmp_path / "p.yaml", """
kafka:
  bootstrap_servers: broker-1.example:9093
  security_protocol: SASL_SSL
  sasl_mechanism: SCRAM-SHA-512
  sasl_username: ${KAFKA_USER}
  sasl_password: ${KAFKA_PASS}
  ssl_cafile: /etc/ssl/ca.pem
""")).kafka  # fmt: skip
    kw = broker.client_kwargs(cfg)
    assert (kw["sasl_mechanism"], kw["sasl_plain_username"], kw["sasl_plain_password"]) == (
        "SCRAM-SHA-512", "svc-unirec", "s3cr:et}")  # fmt: skip
    assert kw["ssl_cafile"] == "/etc/ssl/ca.pem" and "ssl_certfile" not in kw
    # every key is one kafka-python's clients accept
    for client in (KafkaProducer, KafkaConsumer, KafkaAdminClient):
        assert set(kw) <= set(client.DEFAULT_CONFIG), client


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [("kafka:\n  security_protocol: SASL_PLAINTEXT\n  sasl_mechanism: PLAIN\n  sasl_username: u\n", "sasl_password"),
     ("kafka:\n  security_protocol: SSL\n  ssl_certfile: c.pem\n", "ssl_keyfile"),
     ("kafka:\n  security_protocol: TLS\n", "security_protocol"),
     ("kafka:\n  sasl_password: ${UNIREC_TEST_UNSET_VAR}\n", "UNIREC_TEST_UNSET_VAR"),
     ("kafka:\n  limits:\n    max_bytes: -1\n", "max_bytes")],
)  # fmt: skip
def test_bad_security_config_is_rejected_naming_the_key(tmp_path, yaml_text, key):
    with pytest.raises(ConfigError, match=key):
        load(write_yaml(tmp_path / "p.yaml", yaml_text))


def test_the_embedded_broker_refuses_a_remote_address(tmp_path):
    cfg = KafkaConfig(bootstrap_servers="kafka.prod.example:9092", embedded=EmbeddedBroker(run_dir=str(tmp_path)))
    with pytest.raises(broker.BrokerError, match="loopback"):
        broker.start(cfg)
    assert not list(tmp_path.iterdir())  # nothing was started or written


def _cfg(tmp_path: Path, port: int, **embedded) -> KafkaConfig:
    return KafkaConfig(bootstrap_servers=f"127.0.0.1:{port}",
                       embedded=EmbeddedBroker(run_dir=str(tmp_path / "run"), **embedded))  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_start_fails_clearly_when_the_port_is_taken(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg = _cfg(tmp_path, taken.getsockname()[1])
        with pytest.raises(broker.BrokerError, match="already in use"):
            broker.start(cfg)
    assert not broker.status(cfg).running


@pytest.mark.integration
def test_start_times_out_with_a_clear_error_and_leaves_nothing_running(tmp_path):
    cfg = _cfg(tmp_path, _free_port())
    with pytest.raises(broker.BrokerError, match="did not answer Kafka metadata requests"):
        broker.start(cfg, timeout_s=0)
    assert not broker.status(cfg).running
    assert not broker.answers_metadata(cfg, timeout_s=0.3)


@pytest.mark.integration
def test_cli_lifecycle_and_data_survive_a_restart(tmp_path, capsys):
    port = _free_port()
    yaml_path = write_yaml(tmp_path / "p.yaml", f"kafka:\n  bootstrap_servers: 127.0.0.1:{port}\n"
                           f"  partitions: 2\n  embedded:\n    run_dir: {tmp_path / 'run'}\n")  # fmt: skip
    cfg = load(yaml_path).kafka
    cli = ["-c", str(yaml_path), "broker"]
    try:
        assert main([*cli, "status"]) == 3 and "stopped" in capsys.readouterr().out
        assert main([*cli, "start"]) == 0
        out = capsys.readouterr().out
        assert f"running at 127.0.0.1:{port}" in out and f"{len(broker.topic_names(cfg))} created" in out
        pid = broker.status(cfg).pid
        assert (tmp_path / "run" / "broker.pid").read_text().strip() == str(pid)
        assert (tmp_path / "run" / "broker.log").is_file()
        assert main([*cli, "start"]) == 0 and broker.status(cfg).pid == pid  # already running: no-op
        assert "0 created" in capsys.readouterr().out

        topic = cfg.topics.clicks
        producer = KafkaProducer(**broker.client_kwargs(cfg))
        for i in range(10):
            producer.send(topic, key=b"u1", value=b"%d" % i)
        producer.flush()
        producer.close()
        tp = _commit(cfg, topic, "g-restart", 4)

        assert main([*cli, "stop"]) == 0 and "stopped" in capsys.readouterr().out
        assert not broker.answers_metadata(cfg, timeout_s=0.3)
        assert main([*cli, "status"]) == 3
        assert main([*cli, "start", "--no-topics"]) == 0

        consumer = KafkaConsumer(**broker.client_kwargs(cfg), group_id="g-restart", enable_auto_commit=False)
        consumer.assign([tp])
        assert consumer.committed(tp) == 4  # committed offsets survive the restart
        assert consumer.end_offsets([tp])[tp] == 10  # and so do the messages
        consumer.close()
    finally:
        main([*cli, "stop"])
    assert not broker.status(cfg).running and not (tmp_path / "run" / "broker.pid").exists()


def _commit(cfg: KafkaConfig, topic: str, group: str, offset: int) -> TopicPartition:
    """Commit `offset` for the partition holding key u1, with assign() (no group join)."""
    consumer = KafkaConsumer(**broker.client_kwargs(cfg), group_id=group, enable_auto_commit=False)
    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
    consumer.assign(tps)
    tp = next(t for t, end in consumer.end_offsets(tps).items() if end == 10)
    consumer.commit({tp: OffsetAndMetadata(offset, "", -1)})
    consumer.close()
    return tp


@pytest.mark.integration
def test_ensure_topics_is_idempotent_and_uses_the_configured_partitions(kafka_broker):
    cfg = dataclasses.replace(kafka_broker, partitions=4,
                              topics=dataclasses.replace(kafka_broker.topics, clicks="c-parts", queries="q-parts",
                                                         dead_letter="dl-parts", model_updates="mu-parts",
                                                         exposures="ex-parts"))  # fmt: skip
    assert sorted(broker.ensure_topics(cfg)) == ["c-parts", "dl-parts", "ex-parts", "mu-parts", "q-parts"]
    assert broker.ensure_topics(cfg) == []
    consumer = KafkaConsumer(**broker.client_kwargs(cfg))
    assert consumer.partitions_for_topic("c-parts") == {0, 1, 2, 3}
    consumer.close()


@pytest.mark.integration
def test_assign_commit_committed_without_group_join(kafka_cfg):
    """The pipeline's offset protocol on noida-db: assign(), then commit for a group it never joins."""
    topic = kafka_cfg.topics.clicks
    producer = KafkaProducer(**broker.client_kwargs(kafka_cfg))
    for i in range(30):
        producer.send(topic, key=b"u%d" % (i % 5), value=b"v")
    producer.flush()
    producer.close()
    tps = [TopicPartition(topic, p) for p in range(kafka_cfg.partitions)]
    a = KafkaConsumer(**broker.client_kwargs(kafka_cfg), group_id="pipeline", enable_auto_commit=False)
    a.assign(tps)
    assert [a.committed(tp) for tp in tps] == [None] * len(tps)
    ends = a.end_offsets(tps)
    assert sum(ends.values()) == 30
    a.commit({tp: OffsetAndMetadata(end, "", -1) for tp, end in ends.items()})
    a.close()
    b = KafkaConsumer(**broker.client_kwargs(kafka_cfg), group_id="pipeline", enable_auto_commit=False)
    b.assign(tps)
    assert {tp: b.committed(tp) for tp in tps} == ends
    assert {tp: b.position(tp) for tp in tps} == ends  # a new consumer resumes from the committed offsets
    b.close()


def test_pipeline_yaml_documents_the_defaults():
    root = Path(__file__).resolve().parents[2]
    assert load(root / "pipeline.yaml").kafka == KafkaConfig()
