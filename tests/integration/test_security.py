"""Security against a real nats-server configured for it: authentication, TLS, subject permissions.

Every server is started per test from a config written into tmp_path. For each method the daemon
(in-process) must serve with the right credentials (status answers and counts a packet) and must
not connect with wrong ones: it keeps retrying, stays un-READY, the broker logs why, and a stop
request ends it promptly without leaking a task. Certificates (openssl) and nkeys/JWTs (the
`nkeys` package) are generated in the test. The permissions test runs the nats-server config block
of docs/security.md as written.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nkeys
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from esperd.client import HostClient
from esperd.config import Config
from esperd.ops.natsserver import NatsServer
from esperd.service import Service
from esperd_contracts import (
    AckStatus,
    AdaptationCommand,
    Codec,
    CommandAck,
    HealthSignal,
    Op,
    SystemStatePacket,
    TopologyNode,
    TopologyPacket,
)
from tests.integration.helpers import daemon_config, running_daemon, wait_for_status
from tests.support.timing import until

REPO = Path(__file__).resolve().parents[2]
CODEC = Codec()
HEALTH = b'{"kind":"health","layer_id":1,"health_score":0.4}'


# --------------------------------------------------------------------------- brokers


@dataclass
class Broker:
    server: NatsServer
    work: Path

    @property
    def log(self) -> str:
        path = self.work / "nats-server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def url(self, scheme: str = "nats") -> str:
        return f"{scheme}://127.0.0.1:{self.server.port}"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Callable[[str], Broker]]:
    """Start a nats-server from a config text; stopped after the test."""
    started: list[NatsServer] = []

    def start(config_text: str) -> Broker:
        work = tmp_path / f"nats-{len(started)}"
        server = NatsServer(config_text=config_text, work_dir=work)
        started.append(server)
        server.start()
        return Broker(server, work)

    yield start
    for server in started:
        server.stop()


async def client(url: str, **kwargs: Any) -> Client:
    """A test-side connection that fails fast instead of retrying a refusal forever."""
    return await nats.connect(url, allow_reconnect=False, connect_timeout=3, **kwargs)


async def assert_serves(config: Config, url: str, **client_kwargs: Any) -> dict[str, Any]:
    """The daemon comes up, counts a health packet published by another client, and says so."""
    async with running_daemon(config) as service:
        nc = await client(url, **client_kwargs)
        try:
            await nc.publish("esper.sec.health", HEALTH)
            st = await wait_for_status(nc, lambda s: s.get("accepted_total", 0) >= 1)
        finally:
            await nc.close()
        assert service.bus.connected
    assert st["accepted_by_kind"] == {"health": 1}, st
    assert st["rejected_total"] == 0
    assert st["nats"]["connected"] is True and st["nats"]["errors"] == 0
    return st


async def assert_refused(config: Config, broker: Broker, log_marker: str, error_marker: str) -> None:
    """The daemon cannot connect: it retries, stays un-READY, both sides say why; a stop ends it cleanly.

    `log_marker` is what the broker logs about the refusal, `error_marker` what esperd was told.
    """
    before = asyncio.all_tasks()
    service = Service(config, env={})
    errors: list[str] = []
    report = service.bus._on_error

    async def record(exc: Exception) -> None:
        errors.append(str(exc) or type(exc).__name__)
        await report(exc)

    service.bus._on_error = record  # type: ignore[method-assign]
    task = asyncio.create_task(service.run())
    try:
        # At least two refused tries: it keeps retrying rather than giving up or crashing.
        def refused_twice() -> bool:
            return sum(error_marker in e for e in errors) >= 2 and log_marker in broker.log

        try:
            await until(lambda: task.done() or refused_twice())
        except AssertionError:
            raise AssertionError(
                f"esperd was told {errors}; the broker logged:\n{broker.log[-1500:]}"
            ) from None
        assert not task.done(), "the daemon gave up (or crashed) instead of retrying"
        assert not service.ready.is_set()
        assert not service.bus.connected and service.bus.nc is None
    finally:
        service.request_stop()
        await asyncio.wait_for(task, 5)  # promptly, and cleanly: a refused connect must not block a stop
        assert not service.ready.is_set()
    leaked = {t for t in asyncio.all_tasks() - before if not t.done()}
    assert not leaked, f"tasks left behind: {leaked}"


# --------------------------------------------------------------------------- nkeys and JWTs


def new_nkey(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def public(kp: nkeys.KeyPair) -> str:
    return kp.public_key.decode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def nats_jwt(issuer: nkeys.KeyPair, subject: str, name: str, claims: dict[str, Any]) -> str:
    """A NATS v2 JWT (ed25519-nkey), signed by `issuer`: what nsc would write."""
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body: dict[str, Any] = {"iat": int(time.time()), "iss": public(issuer), "name": name, "sub": subject}
    digest = hashlib.new("sha512_256", json.dumps(body, separators=(",", ":")).encode()).digest()
    body["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    body["nats"] = {**claims, "version": 2}
    signing_input = f"{header}.{_b64(json.dumps(body, separators=(',', ':')).encode())}"
    return f"{signing_input}.{_b64(issuer.sign(signing_input.encode()))}"


UNLIMITED = {"subs": -1, "data": -1, "payload": -1}


def account_jwt(operator: nkeys.KeyPair, account: nkeys.KeyPair, name: str) -> str:
    limits = {**UNLIMITED, "imports": -1, "exports": -1, "wildcards": True, "conn": -1, "leaf": -1}
    return nats_jwt(operator, public(account), name, {"type": "account", "limits": limits})


def write_creds(path: Path, account: nkeys.KeyPair, name: str) -> Path:
    """A user key signed by `account`, written as a .creds file (JWT + seed)."""
    user = new_nkey(nkeys.PREFIX_BYTE_USER)
    token = nats_jwt(account, public(user), name, {"type": "user", "pub": {}, "sub": {}, **UNLIMITED})
    path.write_text(
        f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user.seed.decode()}\n------END USER NKEY SEED------\n"
    )
    return path


def write_seed(path: Path, kp: nkeys.KeyPair) -> Path:
    path.write_text(kp.seed.decode() + "\n")
    return path


# --------------------------------------------------------------------------- authentication


@dataclass
class AuthCase:
    server_conf: str
    daemon: dict[str, Any]  # esperd's [nats] keys
    client: dict[str, Any]  # nats.connect kwargs of the test's own (operator) connection
    # variant -> ([nats] keys that must be refused, what the broker logs about it)
    refused: dict[str, tuple[dict[str, Any], str]] = field(default_factory=dict)


def user_password_case(tmp: Path) -> AuthCase:
    return AuthCase(
        "authorization { users = [ "
        '{user: esperd, password: "esperd-pw"}, {user: ops, password: "ops-pw"} ] }\n',
        daemon={"user": "esperd", "password": "esperd-pw"},
        client={"user": "ops", "password": "ops-pw"},
        refused={
            "wrong password": (
                {"user": "esperd", "password": "not-it"},
                'authentication error - User "esperd"',
            ),
            "no credentials": ({}, "authentication error"),
        },
    )


def token_case(tmp: Path) -> AuthCase:
    return AuthCase(
        'authorization { token: "s3cr3t-t0ken" }\n',
        daemon={"token": "s3cr3t-t0ken"},
        client={"token": "s3cr3t-t0ken"},
        refused={"wrong token": ({"token": "guessed"}, 'authentication error - Token "[REDACTED]"')},
    )


def nkey_case(tmp: Path) -> AuthCase:
    esperd, ops, stranger = (new_nkey(nkeys.PREFIX_BYTE_USER) for _ in range(3))
    return AuthCase(
        f"authorization {{ users = [ {{nkey: {public(esperd)}}}, {{nkey: {public(ops)}}} ] }}\n",
        daemon={"nkey_seed_file": str(write_seed(tmp / "esperd.nk", esperd))},
        client={"nkeys_seed": str(write_seed(tmp / "ops.nk", ops))},
        refused={
            "unknown nkey": (
                {"nkey_seed_file": str(write_seed(tmp / "stranger.nk", stranger))},
                f'authentication error - Nkey "{public(stranger)}"',
            )
        },
    )


def creds_case(tmp: Path) -> AuthCase:
    operator = new_nkey(nkeys.PREFIX_BYTE_OPERATOR)
    account, untrusted = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT), new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    conf = (
        f'operator: "{nats_jwt(operator, public(operator), "esper-op", {"type": "operator"})}"\n'
        "resolver: MEMORY\n"
        f'resolver_preload: {{\n  {public(account)}: "{account_jwt(operator, account, "esper")}"\n}}\n'
    )
    return AuthCase(
        conf,
        daemon={"credentials_file": str(write_creds(tmp / "esperd.creds", account, "esperd"))},
        client={"user_credentials": str(write_creds(tmp / "ops.creds", account, "ops"))},
        # A well-formed .creds whose account the operator never signed.
        refused={
            "untrusted account": (
                {"credentials_file": str(write_creds(tmp / "rogue.creds", untrusted, "x"))},
                "authentication error",
            )
        },
    )


AUTH_CASES = {
    "user_password": user_password_case,
    "token": token_case,
    "nkey": nkey_case,
    "creds_jwt": creds_case,
}
REFUSALS = [
    ("user_password", "wrong password"),
    ("user_password", "no credentials"),
    ("token", "wrong token"),
    ("nkey", "unknown nkey"),
    ("creds_jwt", "untrusted account"),
]


@pytest.mark.parametrize("method", list(AUTH_CASES))
async def test_daemon_serves_with_the_right_credentials(
    method: str, broker: Callable[[str], Broker], tmp_path: Path
) -> None:
    case = AUTH_CASES[method](tmp_path)
    nats_server = broker(case.server_conf)
    # The broker really requires authentication: an anonymous client is turned away.
    with pytest.raises(nats.errors.Error):
        await client(nats_server.url())
    config = daemon_config(nats_server.url(), tmp_path / "state", nats=case.daemon)
    await assert_serves(config, nats_server.url(), **case.client)


@pytest.mark.parametrize(
    ("method", "variant"), REFUSALS, ids=[f"{m}-{v.replace(' ', '_')}" for m, v in REFUSALS]
)
async def test_daemon_is_refused_with_wrong_credentials(
    method: str, variant: str, broker: Callable[[str], Broker], tmp_path: Path
) -> None:
    case = AUTH_CASES[method](tmp_path)
    nats_server = broker(case.server_conf)
    keys, log_marker = case.refused[variant]
    config = daemon_config(nats_server.url(), tmp_path / "state", nats=keys)
    await assert_refused(config, nats_server, log_marker, "Authorization Violation")


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class Pki:
    dir: Path

    def __getitem__(self, name: str) -> str:
        return str(self.dir / name)


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _ca(cwd: Path, name: str) -> None:
    _openssl(
        cwd,
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )


def _leaf(cwd: Path, ca: str, name: str, extensions: str) -> None:
    (cwd / f"{name}.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n" + extensions
    )
    _openssl(
        cwd,
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        f"/CN={name}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
    )
    _openssl(
        cwd,
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.pem",
        "-CAkey",
        f"{ca}.key",
        "-set_serial",
        str(int.from_bytes(os.urandom(8), "big")),
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        "-out",
        f"{name}.pem",
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA with a server certificate (127.0.0.1, localhost) and a client one; a rogue CA with a
    client one."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    cwd = tmp_path_factory.mktemp("pki")
    _ca(cwd, "ca")
    _ca(cwd, "rogue-ca")
    _leaf(cwd, "ca", "server", "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _leaf(cwd, "ca", "client", "extendedKeyUsage=clientAuth\nsubjectAltName=DNS:esperd\n")
    _leaf(cwd, "rogue-ca", "rogue-client", "extendedKeyUsage=clientAuth\nsubjectAltName=DNS:esperd\n")
    return Pki(cwd)


def tls_server_conf(pki: Pki, verify: bool) -> str:
    return (
        f'tls {{\n  cert_file: "{pki["server.pem"]}"\n  key_file: "{pki["server.key"]}"\n'
        f'  ca_file: "{pki["ca.pem"]}"\n  verify: {"true" if verify else "false"}\n  timeout: 2\n}}\n'
    )


def client_tls(pki: Pki, with_cert: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki["ca.pem"])
    if with_cert:
        context.load_cert_chain(pki["client.pem"], pki["client.key"])
    return context


async def test_mutual_tls_end_to_end(pki: Pki, broker: Callable[[str], Broker], tmp_path: Path) -> None:
    tls_broker = broker(tls_server_conf(pki, verify=True))
    # The broker really insists on a client certificate: a verified client without one is turned away.
    with pytest.raises((OSError, nats.errors.Error)):
        await client(tls_broker.url("tls"), tls=client_tls(pki, with_cert=False))
    tls = {"ca_file": pki["ca.pem"], "cert_file": pki["client.pem"], "key_file": pki["client.key"]}
    config = daemon_config(tls_broker.url("tls"), tmp_path / "state", nats={"tls": tls})
    await assert_serves(config, tls_broker.url("tls"), tls=client_tls(pki))


async def test_tls_client_certificate_is_optional_without_verify(
    pki: Pki, broker: Callable[[str], Broker], tmp_path: Path
) -> None:
    tls_broker = broker(tls_server_conf(pki, verify=False))
    config = daemon_config(
        tls_broker.url("tls"),
        tmp_path / "state",
        nats={"tls": {"ca_file": pki["ca.pem"], "hostname": "localhost"}},
    )
    await assert_serves(config, tls_broker.url("tls"), tls=client_tls(pki, with_cert=False))


async def test_tls_with_the_system_trust_store(
    pki: Pki, broker: Callable[[str], Broker], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No ca_file: a tls:// URL is verified against the default CAs (here SSL_CERT_FILE)."""
    monkeypatch.setenv("SSL_CERT_FILE", pki["ca.pem"])
    tls_broker = broker(tls_server_conf(pki, verify=False))
    await assert_serves(
        daemon_config(tls_broker.url("tls"), tmp_path / "state"),
        tls_broker.url("tls"),
        tls=client_tls(pki, with_cert=False),
    )
    # tls.hostname counts here too: the certificate does not name this host, so it is refused.
    config = daemon_config(
        tls_broker.url("tls"),
        tmp_path / "state2",
        nats={"tls": {"hostname": "not-the-broker.example"}, **FAST_TLS_RETRY},
    )
    await assert_refused(config, tls_broker, "TLS handshake error: EOF", "Hostname mismatch")


# After a failed handshake nats-py can stall; esperd abandons a connect that makes no progress for
# 4 x connect_timeout_s + reconnect_wait_s and starts over. Keep that short here (loopback is fast).
FAST_TLS_RETRY = {"connect_timeout_s": 0.3}

TLS_REFUSALS: dict[str, tuple[bool, dict[str, str], str, str]] = {
    # case: (server verifies clients, esperd's [nats.tls] by pki file name, what the broker logs,
    #        what esperd is told)
    "no client certificate": (
        True,
        {"ca_file": "ca.pem"},
        "client didn't provide a certificate",
        "alert certificate required",
    ),
    "client certificate from another CA": (
        True,
        {"ca_file": "ca.pem", "cert_file": "rogue-client.pem", "key_file": "rogue-client.key"},
        "certificate signed by unknown authority",
        "alert unknown ca",
    ),
    "server certificate not trusted": (
        True,
        {"ca_file": "rogue-ca.pem", "cert_file": "client.pem", "key_file": "client.key"},
        "TLS handshake error: EOF",
        "unable to get local issuer certificate",
    ),
    "server certificate names another host": (
        False,
        {"ca_file": "ca.pem", "hostname": "not-the-broker.example"},
        "TLS handshake error: EOF",
        "Hostname mismatch",
    ),
}


@pytest.mark.parametrize("case", list(TLS_REFUSALS), ids=[c.replace(" ", "_") for c in TLS_REFUSALS])
async def test_tls_refusals(case: str, pki: Pki, broker: Callable[[str], Broker], tmp_path: Path) -> None:
    verify, files, log_marker, error_marker = TLS_REFUSALS[case]
    tls_broker = broker(tls_server_conf(pki, verify=verify))
    tls = {key: (value if key == "hostname" else pki[value]) for key, value in files.items()}
    config = daemon_config(tls_broker.url("tls"), tmp_path / "state", nats={"tls": tls, **FAST_TLS_RETRY})
    await assert_refused(config, tls_broker, log_marker, error_marker)


# --------------------------------------------------------------------------- subject permissions

PASSWORDS = {
    "ESPERD_NATS_PASSWORD": "pw-esperd",
    "OPS_NATS_PASSWORD": "pw-ops",
    "RUN_R1_NATS_PASSWORD": "pw-r1",
    "RUN_R2_NATS_PASSWORD": "pw-r2",
}
SCHEDULER = {"min_interval_s": 0.05, "cooldown_s": 60.0, "max_wait_ms": 2.0}
POLICY = {"name": "heuristic", "heuristic": {"min_epoch": 3, "train_dwell_epochs": 3, "probation_epochs": 1}}


def documented_server_config() -> str:
    """The nats-server config block of docs/security.md, exactly as an operator would copy it."""
    text = (REPO / "docs" / "security.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```conf\n(.*?)```", text, flags=re.DOTALL) if "authorization {" in b]
    assert len(blocks) == 1, "docs/security.md must hold exactly one nats-server config with users"
    return blocks[0]


class Recorder:
    """Async callbacks that keep what they were given."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.msgs: list[Msg] = []

    async def error(self, exc: Exception) -> None:
        self.errors.append(str(exc))

    async def msg(self, msg: Msg) -> None:
        self.msgs.append(msg)

    def violated(self, kind: str, subject: str) -> bool:
        return any(f'permissions violation for {kind} to "{subject}"' in e.lower() for e in self.errors)


async def host(url: str, run_id: str) -> tuple[HostClient, Recorder]:
    """A training run's HostClient, logged in as that run's user."""
    seen = Recorder()
    nc = await client(
        url,
        user=f"run-{run_id}",
        password=PASSWORDS[f"RUN_{run_id.upper()}_NATS_PASSWORD"],
        error_cb=seen.error,
    )
    host_client = HostClient(nc, run_id)
    await host_client.start()
    return host_client, seen


def telemetry(host_client: HostClient) -> None:
    """Enough for the heuristic to germinate layer 1: it is unhealthy and declining at epoch 5."""
    nodes = [
        TopologyNode(layer_id=0, name="stem", layer_type="conv"),
        TopologyNode(layer_id=1, name="block1", layer_type="conv"),
        TopologyNode(layer_id=2, name="head", layer_type="linear"),
    ]
    host_client.send_topology(TopologyPacket(nodes=nodes, edges=[(0, 1), (1, 2), (0, 2)]))
    for signals in ([(1, 0.5)], [(0, 0.9), (1, 0.4)], [(1, 0.3)], [(2, 0.95), (1, 0.2)]):
        host_client.send_health(
            [HealthSignal(layer_id=layer, health_score=score) for layer, score in signals]
        )
    host_client.send_state(SystemStatePacket(epoch=5, val_accuracy=0.61, val_loss=1.2))


async def test_documented_permissions_hold_end_to_end(
    broker: Callable[[str], Broker], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in PASSWORDS.items():  # the documented config reads them from the broker's environment
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("NATS_JETSTREAM_DIR", str(tmp_path / "jetstream"))
    url = broker(documented_server_config()).url()
    config = daemon_config(
        url,
        tmp_path / "state",
        nats={"user": "esperd", "password": PASSWORDS["ESPERD_NATS_PASSWORD"]},
        scheduler=SCHEDULER,
        policy=POLICY,
        cluster={"enabled": True, "heartbeat_s": 0.1, "settle_s": 0.05},
    )
    async with running_daemon(config) as service:
        ops = Recorder()
        ops_nc = await client(url, user="ops", password=PASSWORDS["OPS_NATS_PASSWORD"], error_cb=ops.error)
        wire = Recorder()
        await ops_nc.subscribe("esper.>", cb=wire.msg)  # operators may watch all traffic, read-only
        rejected = Recorder()
        await ops_nc.subscribe("esperd.rejected", cb=rejected.msg)
        await ops_nc.flush()
        (h1, seen1), (h2, seen2) = await host(url, "r1"), await host(url, "r2")
        try:
            # r1 may not read r2's commands ...
            snooped = Recorder()
            await h1.nc.subscribe("esper.r2.command", cb=snooped.msg)
            # ... nor speak for a run that is not its own, nor forge a command, even for itself.
            forged = AdaptationCommand(command_id="forged", run_id="r2", layer_id=1, op=Op.PRUNE)
            await h1.nc.publish("esper.r3.topology", b'{"kind":"topology","nodes":[{"layer_id":0}]}')
            await h1.nc.publish("esper.r2.state", b'{"kind":"state","epoch":9,"done":true}')
            await h1.nc.publish("esper.r2.command", CODEC.encode(forged))
            await h1.nc.publish("esper.r1.command", CODEC.encode(forged))
            await h1.nc.flush()
            await until(
                lambda: (
                    seen1.violated("subscription", "esper.r2.command")
                    and all(
                        seen1.violated("publish", f"esper.{s}")
                        for s in ("r3.topology", "r2.state", "r2.command", "r1.command")
                    )
                ),
                timeout=5,
            )

            # Each host gets its own command from esperd, under these permissions, and acks it.
            telemetry(h1)
            telemetry(h2)
            got = {h.run_id: await asyncio.wait_for(h.commands.get(), 5) for h in (h1, h2)}
            # r1 claims r2's command was rejected: dropped by the broker, never counted.
            fake_ack = CommandAck(command_id=got["r2"].command_id, status=AckStatus.REJECTED, reason="forged")
            await h1.nc.publish("esper.r2.ack", CODEC.encode(fake_ack))
            for h in (h1, h2):
                h.ack(got[h.run_id], applied=True)
                await h.flush()
            await h1.nc.publish("esper.r1.health", b"\x00 not a packet")  # reported on esperd.rejected
            await h1.nc.flush()
            st = await wait_for_status(
                ops_nc, lambda s: s["acks_by_status"].get("applied", 0) >= 2 and s["rejected_total"] >= 1
            )
            ping = json.loads((await ops_nc.request("$SRV.PING.esperd", b"", timeout=2)).data)
            own = json.loads((await ops_nc.request(f"esperd.status.{service.instance}", b"", timeout=2)).data)
            await until(lambda: bool(rejected.msgs) and seen1.violated("publish", "esper.r2.ack"), timeout=5)
            assert service.bus.errors == 0, "esperd itself hit a permissions violation"
        finally:
            for h in (h1, h2):
                await h.close()
            await ops_nc.close()

    assert {run: command.run_id for run, command in got.items()} == {"r1": "r1", "r2": "r2"}
    assert all(command.command_id != "forged" for command in got.values())
    assert st["runs"] == 2, "a packet for a run the host does not own got through"  # r1 and r2, never r3
    assert st["acks_by_status"] == {"applied": 2}, "a forged ack was counted"
    assert st["scheduler"]["unknown_acks"] == 0
    assert st["rejected_by_reason"] == {"malformed": 1}
    assert st["nats"]["errors"] == 0
    assert st["cluster"]["members"] == [st["cluster"]["instance"]]  # its lease calls were allowed
    assert len(st["cluster"]["partitions"]) == len(st["cluster"]["view"]["members"][0]["partitions"]) > 0
    assert own["instance"] == st["cluster"]["instance"]  # the per-instance status subject is allowed
    assert ping["name"] == "esperd"  # the micro service answers under these permissions
    assert json.loads(rejected.msgs[0].data)["subject"] == "esper.r1.health"
    assert snooped.msgs == []
    assert seen2.errors == [] and ops.errors == []
    # What the broker let through, as an operator sees it: nothing forged.
    subjects = {m.subject for m in wire.msgs}
    assert not any(s.startswith("esper.r3.") for s in subjects)
    assert all(b"forged" not in m.data for m in wire.msgs)
    assert "esper.r1.command" in subjects and "esper.r2.command" in subjects


async def test_a_narrower_esperd_grant_silences_it(
    broker: Callable[[str], Broker], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Why the docs grant esperd `esper.*.*`: with only the four channels its one subscription is refused."""
    for name, value in PASSWORDS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("NATS_JETSTREAM_DIR", str(tmp_path / "jetstream"))
    documented = documented_server_config()
    assert documented.count('"esper.*.*"') == 1
    narrower = documented.replace(
        '"esper.*.*"', '"esper.*.topology", "esper.*.health", "esper.*.state", "esper.*.ack"'
    )
    url = broker(narrower).url()
    config = daemon_config(
        url, tmp_path / "state", nats={"user": "esperd", "password": PASSWORDS["ESPERD_NATS_PASSWORD"]}
    )
    async with running_daemon(config) as service:
        ops_nc = await client(url, user="ops", password=PASSWORDS["OPS_NATS_PASSWORD"])
        h1, seen1 = await host(url, "r1")
        try:
            await until(lambda: service.bus.errors >= 1, timeout=5)
            h1.send_health([HealthSignal(layer_id=1, health_score=0.5)])
            await h1.flush()
            st = await wait_for_status(ops_nc, lambda s: s["accepted_total"] >= 1, timeout=1.0)
        finally:
            await h1.close()
            await ops_nc.close()
    assert st["accepted_total"] == 0 and st["nats"]["errors"] >= 1
    assert seen1.errors == []  # the host did nothing wrong
