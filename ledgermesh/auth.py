"""``ledgermesh auth``: NATS accounts, users and nkey seeds generated from ``ledgermesh.toml``.

Subject permissions alone leave holes: a principal that may publish only to
its own intake subject can still name *another* intake subject (or ``lm.ledger.…``) as the
reply subject of a JetStream request, and JetStream stores its answer there. So the layout
is one account per principal, not one user list (``<P>`` is the upper-cased prefix):

- ``<P>_CORE``: the streams (JetStream on) and the coordinator user: ``$JS.API.>``, acks of
  its intake consumer, ``<p>.ledger.>``, ``<p>.deliver.>``, ``<p>.receipt.*``, ``$SRV.>``
  (pinging), the tool gateway ``<p>.toolcall.*`` (subscribe) and ``<p>.tool.<tool>``
  (calls to tool hosts).
- ``<P>_AGENT_<name>``, one per agent, imports from the core exactly its intake subject,
  the ``MSG.NEXT`` and ``$JS.ACK`` subjects of its own delivery consumer (services;
  ``MSG.NEXT`` with ``response_type: stream``), its gateway subject
  ``<p>.toolcall.<name>`` and its receipts ``<p>.receipt.<name>`` (a stream); it exports
  its NATS micro subjects (``$SRV.*.<p>_<name>``, ``$SRV.*.<p>_<name>.*``,
  ``<p>_<name>.status``) to the core (the coordinator pings agents by name) and to the
  observer. A reply subject an agent chooses is mapped by the server and its answer lands
  back in the agent's own account, where no stream listens.
- ``<P>_CLIENT_<name>``, one per ``submitters`` / ``operators`` principal that is not an
  agent: its intake subject, and reading the ledger (below).
- ``<P>_OBSERVER``: reads the ledger; pings and asks the status of every service.
- ``<P>_TOOLS`` (if the policy declares tools): every tool host process; it may only
  answer ``<p>.tool.<tool>`` requests, exported to the core alone.

Every principal connects with its own seed file ``<name>.nk`` and the inbox prefix
``_INBOX.<name>`` (the only subjects it may subscribe to, besides its service subjects).

What a client (and the observer) may read: the relayed ledger, through an ordered push
consumer on ``<P>_LEDGER``. It may publish ``$JS.<P>_CORE.API.CONSUMER.CREATE.<P>_LEDGER``
(the 5-token ephemeral form only, so no durable consumers; the API is imported under that
name because an account without JetStream has the server itself answer ``$JS.API.…``,
racing an import) and ``$JS.FC.<P>_LEDGER.>`` (flow control), and receives deliveries on
its ``_INBOX.<name>.>``, exported by the core as a stream to that account only. The filter
is the reader's choice (nats-py's create subject does not carry it, so permissions cannot
restrict it): a client can read every relayed event of every task and principal — never
write one, nor read intake, deliveries or another stream. The remaining hole (the reader
picks the consumer's deliver subject, in the core account): verified against nats-server
2.15.1, deliveries pointed at a stream subject or a ``$JS.API`` subject are not stored or
acted upon, and at the ledger's own subjects are refused as a cycle; a subscriber in the
core account whose exact subject the reader knew could still be fed ledger copies. Give
untrusted readers a mirror of the ledger stream in their own account instead (not
generated).

Production note: the coordinator creates streams and consumers at start, hence
``$JS.API.>``. Creating them with a separate, short-lived admin user would let the
long-running coordinator drop to its own consumer's API subjects and the stream reads of
the relay, so a compromised coordinator could not delete streams.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys

from bus.client import BusError, Credentials, check_nkey_seed
from coordinator.policy import RESERVED, Policy, load_policy
from schemas import LedgermeshError, Subjects, is_token

COORDINATOR, OBSERVER, TOOLS = RESERVED  # tool hosts (``ToolHost``) connect as ``tools``
CONFIG_NAME = "auth.conf"
SEED_SUFFIX = ".nk"
NKEY_ENV = "LEDGERMESH_NKEY"


class AuthConfigError(LedgermeshError):
    """Credentials or the generated server configuration are wrong; the message says how."""


# -- layout -----------------------------------------------------------------------------
def core_account(subjects: Subjects) -> str:
    """The account of the streams and the coordinator."""
    return f"{subjects.prefix.upper()}_CORE"


def reader_api_prefix(subjects: Subjects) -> str:
    """Where the other accounts see the (imported) part of the core's JetStream API.

    Imported under its own name: in an account without JetStream the server itself answers
    ``$JS.API.…`` requests ("JetStream not enabled for account"), racing the import.
    """
    return f"$JS.{core_account(subjects)}.API"


def js_api_prefix(principal: str, subjects: Subjects) -> str | None:
    """The JetStream API prefix a principal's connection uses (None: the native one)."""
    return None if principal == COORDINATOR else reader_api_prefix(subjects)


@dataclass(frozen=True)
class AuthLayout:
    """Every account, user, import and export, as data (rendered by ``render``)."""

    subjects: Subjects
    agents: tuple[str, ...]
    clients: tuple[str, ...]  # submitters and operators that are not agents
    tools: tuple[str, ...] = ()  # tool names, served by tool hosts (principal ``tools``)

    @classmethod
    def from_policy(cls, policy: Policy, subjects: Subjects) -> AuthLayout:
        agents = tuple(policy.agents)
        # Agents may submit too: a name that is also an agent is that agent's account.
        others = (*policy.submitters, *getattr(policy, "operators", ()))
        clients = tuple(name for name in dict.fromkeys(others) if name not in policy.agents)
        tools = tuple(getattr(policy, "tools", {}))
        problems = []
        for name in (*agents, *clients):
            if not is_token(name):
                problems.append(f"{name!r} is not a valid principal name")
            if name in RESERVED:
                problems.append(f"{name!r} is reserved for the {name} user; rename it")
        for tool in tools:
            if not all(is_token(part) for part in tool.split(".")):
                problems.append(f"tool {tool!r}: use dot-separated letters, digits, '-', '_'")
        if problems:
            raise AuthConfigError("cannot generate auth: " + "; ".join(problems))
        return cls(subjects, agents, clients, tools)

    @property
    def principals(self) -> tuple[str, ...]:
        return (COORDINATOR, OBSERVER, *self.agents, *self.clients,
                *((TOOLS,) if self.tools else ()))

    # account names
    @property
    def core(self) -> str:
        return core_account(self.subjects)

    @property
    def observer_account(self) -> str:
        return f"{self.subjects.prefix.upper()}_OBSERVER"

    def agent_account(self, agent: str) -> str:
        return f"{self.subjects.prefix.upper()}_AGENT_{agent}"

    def client_account(self, client: str) -> str:
        return f"{self.subjects.prefix.upper()}_CLIENT_{client}"

    @property
    def tools_account(self) -> str:
        return f"{self.subjects.prefix.upper()}_TOOLS"

    def account_of(self, principal: str) -> str:
        if principal == COORDINATOR:
            return self.core
        if principal == OBSERVER:
            return self.observer_account
        if principal in self.agents:
            return self.agent_account(principal)
        if principal in self.clients:
            return self.client_account(principal)
        if principal == TOOLS and self.tools:
            return self.tools_account
        raise KeyError(principal)

    # subject groups
    @staticmethod
    def inbox(principal: str) -> str:
        return f"_INBOX.{principal}"

    def _service_subjects(self, name: str) -> list[str]:
        """What a NATS micro service answers by name (PING/INFO/STATS, status endpoint)."""
        service = self.subjects.service(name)
        return [f"$SRV.*.{service}", f"$SRV.*.{service}.*", f"{service}.status"]

    @staticmethod
    def _acks(stream: str, consumer: str) -> list[str]:
        # Today's ack subject and the announced future form with domain and account hash.
        return [f"$JS.ACK.{stream}.{consumer}.>", f"$JS.ACK.*.*.{stream}.{consumer}.>"]

    def _pull(self, agent: str) -> str:
        s = self.subjects
        return f"$JS.API.CONSUMER.MSG.NEXT.{s.deliver_stream}.{s.agent_consumer(agent)}"

    @property
    def reader_api_prefix(self) -> str:
        return reader_api_prefix(self.subjects)

    def _create_ledger_consumer(self) -> str:
        return f"CONSUMER.CREATE.{self.subjects.ledger_stream}"

    def _flow_control(self) -> str:
        return f"$JS.FC.{self.subjects.ledger_stream}.>"

    def _reader_publish(self) -> list[str]:
        return [f"{self.reader_api_prefix}.{self._create_ledger_consumer()}",
                self._flow_control()]

    def _reader_imports(self) -> list[dict[str, Any]]:
        create = self._create_ledger_consumer()
        return [{"service": {"account": self.core, "subject": f"$JS.API.{create}"},
                 "to": f"{self.reader_api_prefix}.{create}"},
                {"service": {"account": self.core, "subject": self._flow_control()}}]


    # accounts
    def accounts(self, keys: Mapping[str, str]) -> dict[str, Any]:
        """The ``accounts`` block; ``keys`` maps each principal to its public nkey."""
        out: dict[str, Any] = {self.core: self._core(keys[COORDINATOR])}
        for agent in self.agents:
            out[self.agent_account(agent)] = self._agent(agent, keys[agent])
        for client in self.clients:
            out[self.client_account(client)] = self._client(client, keys[client])
        if self.tools:
            out[self.tools_account] = self._tools(keys[TOOLS])
        out[self.observer_account] = self._observer(keys[OBSERVER])
        return out

    def _core(self, coordinator_key: str) -> dict[str, Any]:
        s = self.subjects
        own = self._service_subjects(COORDINATOR)
        publish = ["$JS.API.>", *self._acks(s.intake_stream, s.coordinator_consumer),
                   s.ledger_all, s.deliver_all, s.receipt_all, "$SRV.>"]
        publish += [sub for agent in self.agents for sub in self._service_subjects(agent)
                    if not sub.startswith("$SRV.")]
        publish += [s.tool(tool) for tool in self.tools]  # asking tool hosts to run a call
        user = _user(coordinator_key, publish=publish,
                     subscribe=[f"{self.inbox(COORDINATOR)}.>", "$SRV.PING", "$SRV.INFO",
                                "$SRV.STATS", *own, s.tool_gateway_all],
                     responses=True)
        readers = [self.observer_account, *(self.client_account(c) for c in self.clients)]
        exports: list[dict[str, Any]] = []
        for agent in self.agents:
            to = [self.agent_account(agent)]
            exports.append({"service": s.intake(agent), "accounts": to})
            exports.append({"service": self._pull(agent), "accounts": to,
                            "response_type": "stream"})
            exports += [{"service": ack, "accounts": to}
                        for ack in self._acks(s.deliver_stream, s.agent_consumer(agent))]
            exports.append({"service": s.tool_gateway(agent), "accounts": to})
            exports.append({"stream": s.receipt(agent), "accounts": to})
        for client in self.clients:
            to = [self.client_account(client)]
            exports.append({"service": s.intake(client), "accounts": to})
            exports.append({"stream": f"{self.inbox(client)}.>", "accounts": to})
        exports.append({"service": f"$JS.API.{self._create_ledger_consumer()}",
                        "accounts": readers})
        exports.append({"service": self._flow_control(), "accounts": readers})
        exports.append({"stream": f"{self.inbox(OBSERVER)}.>",
                        "accounts": [self.observer_account]})
        exports += _service_exports(own, [self.observer_account])
        imports = [{"service": {"account": self.agent_account(agent), "subject": sub}}
                   for agent in self.agents for sub in self._service_subjects(agent)]
        imports += [{"service": {"account": self.tools_account, "subject": s.tool(tool)}}
                    for tool in self.tools]
        return {"jetstream": "enabled", "users": [user], "exports": exports,
                "imports": imports}

    def _agent(self, agent: str, key: str) -> dict[str, Any]:
        s = self.subjects
        acks = self._acks(s.deliver_stream, s.agent_consumer(agent))
        own = self._service_subjects(agent)
        own_subjects = [s.intake(agent), self._pull(agent), *acks, s.tool_gateway(agent)]
        user = _user(key, publish=own_subjects,
                     subscribe=[f"{self.inbox(agent)}.>", s.receipt(agent), "$SRV.PING",
                                "$SRV.INFO", "$SRV.STATS", *own],
                     responses=True)  # micro replies go to the requester's reply subject
        imports = [{"service": {"account": self.core, "subject": sub}} for sub in own_subjects]
        imports.append({"stream": {"account": self.core, "subject": s.receipt(agent)}})
        exports = _service_exports(own, [self.core, self.observer_account])
        return {"users": [user], "imports": imports, "exports": exports}

    def _client(self, client: str, key: str) -> dict[str, Any]:
        s = self.subjects
        readers = self._reader_publish()
        user = _user(key, publish=[s.intake(client), *readers],
                     subscribe=[f"{self.inbox(client)}.>"])
        imports: list[dict[str, Any]] = [
            {"service": {"account": self.core, "subject": s.intake(client)}},
            *self._reader_imports()]
        imports.append({"stream": {"account": self.core, "subject": f"{self.inbox(client)}.>"}})
        return {"users": [user], "imports": imports}

    def _tools(self, key: str) -> dict[str, Any]:
        """Tool hosts answer the coordinator's calls and nothing else: they publish nothing
        but replies (to the coordinator's reply subject, mapped by the server)."""
        subjects = [self.subjects.tool(tool) for tool in self.tools]
        own = self._service_subjects(TOOLS)  # every host registers as "<p>_tools"
        user = _user(key, publish=[],
                     subscribe=[*subjects, f"{self.inbox(TOOLS)}.>", "$SRV.PING", "$SRV.INFO",
                                "$SRV.STATS", *own],
                     responses=True)
        exports = [{"service": subject, "accounts": [self.core]} for subject in subjects]
        exports += _service_exports(own, [self.observer_account])
        return {"users": [user], "exports": exports}

    def _observer(self, key: str) -> dict[str, Any]:
        readers = self._reader_publish()
        services = [(self.core, sub) for sub in self._service_subjects(COORDINATOR)]
        services += [(self.agent_account(agent), sub) for agent in self.agents
                     for sub in self._service_subjects(agent)]
        if self.tools:
            services += [(self.tools_account, sub) for sub in self._service_subjects(TOOLS)]
        user = _user(key, publish=[*readers, *(sub for _, sub in services)],
                     subscribe=[f"{self.inbox(OBSERVER)}.>"])
        imports = self._reader_imports()
        imports.append({"stream": {"account": self.core,
                                   "subject": f"{self.inbox(OBSERVER)}.>"}})
        imports += [{"service": {"account": account, "subject": sub}}
                    for account, sub in services]
        return {"users": [user], "imports": imports}


def _service_exports(subjects: list[str], accounts: list[str]) -> list[dict[str, Any]]:
    """A service's NATS micro subjects, exported to ``accounts``. Every instance answers a
    ``$SRV`` verb (PING, INFO, STATS) and a ``status`` request, so they stream their
    responses: with the default (one response) only the first instance would be heard."""
    return [{"service": sub, "accounts": accounts, "response_type": "stream"}
            for sub in subjects]


def _user(key: str, *, publish: list[str], subscribe: list[str],
          responses: bool = False) -> dict[str, Any]:
    # An empty allow list would allow everything: say "nothing" with a deny.
    permissions: dict[str, Any] = {
        "publish": {"allow": publish} if publish else {"deny": [">"]},
        "subscribe": {"allow": subscribe}}
    if responses:
        permissions["allow_responses"] = True
    return {"nkey": key, "permissions": permissions}


# -- rendering ----------------------------------------------------------------------------
def render(layout: AuthLayout, keys: Mapping[str, str], source: str) -> str:
    """The nats-server config include: ``accounts { … }`` with a header saying what it is."""
    who = ", ".join(f"{p} → {layout.account_of(p)}" for p in layout.principals)
    header = [
        "# ledgermesh: NATS accounts and nkey users, generated by `ledgermesh auth generate`",
        f"# from {source} (prefix {layout.subjects.prefix!r}). Do not edit: regenerate.",
        "# Include it from the server config (`include \"auth.conf\"`); JetStream must be",
        "# enabled there (jetstream {…} or -js). Layout and its reasons: ledgermesh/auth.py",
        "# and docs/protocol.md. Each principal connects with its own seed file (<name>.nk)",
        "# and inbox prefix _INBOX.<name>.",
        f"# principals: {who}",
        "",
    ]
    return "\n".join(header) + "accounts " + _conf(layout.accounts(keys), 0) + "\n"


def _conf(value: Any, depth: int) -> str:
    pad = "  " * (depth + 1)
    end = "  " * depth
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        one = "{" + ", ".join(f"{_key(k)}: {_conf(v, 0)}" for k, v in value.items()) + "}"
        if "\n" not in one and len(pad) + len(one) <= 110:
            return one
        lines = [f"{pad}{_key(k)}: {_conf(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + "\n".join(lines) + f"\n{end}}}"
    if isinstance(value, list | tuple):
        if all(isinstance(v, str) for v in value):
            return "[" + ", ".join(json.dumps(v) for v in value) + "]"
        return "[\n" + "\n".join(f"{pad}{_conf(v, depth + 1)}" for v in value) + f"\n{end}]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # quoted: "$SRV…" unquoted would be a variable reference
    raise TypeError(f"cannot render {type(value).__name__}")


def _key(key: str) -> str:
    return key if key.isidentifier() and key.islower() else json.dumps(key)


# -- generating files -----------------------------------------------------------------------
@dataclass(frozen=True)
class GeneratedAuth:
    layout: AuthLayout
    config: Path  # the include
    seeds: dict[str, Path]  # principal -> its seed file
    public_keys: dict[str, str]
    reused: tuple[str, ...]  # principals whose existing seed was kept

    def seed_file(self, principal: str) -> Path:
        return self.seeds[principal]


def new_seed() -> str:
    return str(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode())


def generate(policy: Policy, subjects: Subjects, out: Path, *, source: str = "ledgermesh.toml",
             rotate: bool = False) -> GeneratedAuth:
    """Write ``out/auth.conf`` and one ``out/<principal>.nk`` (mode 0600) per principal.

    An existing valid seed file is kept unless ``rotate``: adding an agent and regenerating
    does not change everyone else's key.
    """
    layout = AuthLayout.from_policy(policy, subjects)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    seeds: dict[str, Path] = {}
    keys: dict[str, str] = {}
    reused: list[str] = []
    for principal in layout.principals:
        path = out / f"{principal}{SEED_SUFFIX}"
        seed = None
        if path.exists() and not rotate:
            try:
                seed = read_seed(path)
                reused.append(principal)
            except AuthConfigError:
                seed = None  # unreadable or not a seed: replace it
        if seed is None:
            seed = new_seed()
            _write_private(path, seed + "\n")
        seeds[principal] = path
        keys[principal] = check_nkey_seed(seed)
    config = out / CONFIG_NAME
    tmp = config.with_name(config.name + ".tmp")
    tmp.write_text(render(layout, keys, source), encoding="utf-8")
    tmp.replace(config)
    return GeneratedAuth(layout, config, seeds, keys, tuple(reused))


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def write_server_config(path: Path, auth: GeneratedAuth, extra: Iterable[str] = ()) -> Path:
    """A minimal server config that includes the generated accounts (the demo's)."""
    include = os.path.relpath(auth.config, path.parent)
    lines = ["# ledgermesh demo server config; JetStream comes from -js -sd on the command line",
             *extra, f"include {json.dumps(include)}", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# -- reading credentials ---------------------------------------------------------------------
def read_seed(path: Path) -> str:
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise AuthConfigError(f"no nkey seed file at {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthConfigError(f"cannot read nkey seed file {path}: {exc}") from None
    try:
        check_nkey_seed(text)
    except BusError as exc:
        raise AuthConfigError(f"{path}: {exc}") from None
    return text


def load_credentials(nkey: Path | None, subjects: Subjects,
                     principal: str | None = None) -> Credentials | None:
    """Credentials from ``--nkey FILE`` or else ``$LEDGERMESH_NKEY``; None when neither is set.

    The inbox prefix is ``_INBOX.<principal>``; without a principal it is the seed file's
    name without ``.nk`` (as ``ledgermesh auth generate`` names them).
    """
    if nkey is None:
        env = os.environ.get(NKEY_ENV, "").strip()
        if not env:
            return None
        nkey = Path(env)
    seed = read_seed(nkey)
    named = nkey.name.removesuffix(SEED_SUFFIX)
    if principal is not None and named != principal and (nkey.parent / f"{principal}"
                                                         f"{SEED_SUFFIX}").is_file():
        # Another principal's seed from the same directory: a mix-up that would connect,
        # then be refused every subject this process needs, without end.
        raise AuthConfigError(f"{nkey} is {named}'s seed, and this process is {principal}: "
                              f"give --nkey {nkey.parent / (principal + SEED_SUFFIX)}")
    who = principal or named
    if not is_token(who):
        raise AuthConfigError(f"cannot tell the principal from the seed file name {nkey.name!r}: "
                              f"name it <principal>{SEED_SUFFIX}")
    return Credentials.for_principal(seed, who, js_api_prefix(who, subjects))


# -- command ---------------------------------------------------------------------------------
def auth_generate_command(config: Path, out: Path, prefix: str, *, rotate: bool) -> int:
    """``ledgermesh auth generate``: write the files, say what was written and how to use it."""
    generated = generate(load_policy(config), Subjects(prefix), out, source=str(config),
                         rotate=rotate)
    layout = generated.layout
    print(f"wrote {generated.config} and {len(generated.seeds)} seed files (mode 0600) in {out}"
          + (f"; kept {len(generated.reused)} existing seeds" if generated.reused else ""))
    for principal in layout.principals:
        print(f"  {principal:<14} account {layout.account_of(principal):<24} "
              f"{generated.seeds[principal].name}")
    print(f'add to the nats-server config:  include "{generated.config.resolve()}"  '
          "(JetStream on)")
    print(f"then run each process with its own seed:  --nkey {out / '<principal>.nk'}")
    return 0
