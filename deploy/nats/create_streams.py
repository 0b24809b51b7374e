"""Create ledgermesh's streams with N replicas on a JetStream cluster, before the coordinator.

The coordinator creates missing streams at startup with NATS' default of one replica. On a
3-node cluster each stream then lives on a single node, and losing that node stops
ledgermesh. Run this once first (docker-compose and the k8s manifests do):

    python deploy/nats/create_streams.py --nats nats://nats:4222 --replicas 3 \
        --config ledgermesh.toml [--prefix lm] [--nkey coordinator.nk]

The coordinator then finds the streams and leaves them as they are. An existing stream
with another replica count is scaled in place (NATS supports changing num_replicas).
With generated accounts (`ledgermesh auth generate`) pass the coordinator's seed file:
streams belong to an account, and these must be in the coordinator's.
Stream settings come from ledgermesh's own topology; the StreamConfig fields mirror
bus.client.Bus.ensure_streams and must be kept in step with it (only num_replicas differs).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
from nats.js import api

from bus.topology import DEDUP_WINDOW_S, streams
from coordinator.policy import load_policy
from schemas import Subjects


async def create(url: str, prefix: str, max_payload_bytes: int, replicas: int,
                 wait_s: float, credentials: dict[str, str]) -> None:
    deadline = time.monotonic() + wait_s

    async def quiet(exc: Exception) -> None:  # nats-py prints a traceback per retry otherwise
        print(f"nats: {exc!r}", file=sys.stderr)

    # With max_reconnect_attempts=-1 nats-py retries even the first connect forever:
    # bound it, so a wrong URL fails the job instead of hanging it.
    try:
        nc = await asyncio.wait_for(
            nats.connect(url, name="ledgermesh-create-streams", connect_timeout=5,
                         max_reconnect_attempts=-1, reconnect_time_wait=2, error_cb=quiet,
                         **credentials),
            timeout=wait_s)
    except TimeoutError:
        raise SystemExit(f"cannot connect to NATS at {url} within {wait_s:.0f} s") from None
    js = nc.jetstream(timeout=10)
    try:
        for spec in streams(Subjects(prefix), max_payload_bytes):
            wanted = api.StreamConfig(
                name=spec.name, subjects=list(spec.subjects),
                retention=api.RetentionPolicy(spec.retention), storage=api.StorageType.FILE,
                duplicate_window=DEDUP_WINDOW_S, deny_delete=spec.deny_delete,
                deny_purge=spec.deny_delete, max_msg_size=spec.max_msg_size,
                num_replicas=replicas)
            while True:
                # A fresh cluster answers "no suitable peers" / times out until all nodes
                # have joined and elected a meta leader: retry until the deadline.
                try:
                    try:
                        info = await js.stream_info(spec.name)
                    except nats.js.errors.NotFoundError:
                        await js.add_stream(wanted)
                        print(f"{spec.name}: created, replicas={replicas}")
                    else:
                        have = info.config.num_replicas or 1
                        if have == replicas:
                            print(f"{spec.name}: exists, replicas={have}")
                        else:
                            await js.update_stream(replace(info.config, num_replicas=replicas))
                            print(f"{spec.name}: scaled from {have} to {replicas} replicas")
                    break
                except (nats.js.errors.APIError, nats.errors.TimeoutError, TimeoutError) as exc:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"{spec.name}: gave up: {exc!r}") from exc
                    print(f"{spec.name}: not yet ({exc!r}); retrying", file=sys.stderr)
                    await asyncio.sleep(2)
    finally:
        await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="Create ledgermesh streams with N replicas.")
    parser.add_argument("--nats", default="nats://127.0.0.1:4222", metavar="URL")
    parser.add_argument("--prefix", default="lm", help="subject prefix (default lm)")
    parser.add_argument("--config", type=Path, default=Path("ledgermesh.toml"),
                        help="policy file: its max_payload_bytes sets LM_INTAKE's limit")
    parser.add_argument("--replicas", type=int, default=3, choices=(1, 3, 5))
    parser.add_argument("--wait", type=float, default=120.0, metavar="SECONDS",
                        help="how long to retry while the cluster forms (default 120)")
    parser.add_argument("--nkey", type=Path, default=os.environ.get("LEDGERMESH_NKEY") or None,
                        metavar="FILE", help="the coordinator's nkey seed file "
                        "(default $LEDGERMESH_NKEY; none: connect without credentials)")
    args = parser.parse_args()
    credentials: dict[str, str] = {}
    if args.nkey is not None:  # <principal>.nk as written by `ledgermesh auth generate`
        credentials = {"nkeys_seed_str": args.nkey.read_text(encoding="ascii").strip(),
                       # the only inbox a principal may subscribe to
                       "inbox_prefix": "_INBOX." + args.nkey.name.removesuffix(".nk")}
    max_payload_bytes = load_policy(args.config).max_payload_bytes
    asyncio.run(create(args.nats, args.prefix, max_payload_bytes, args.replicas, args.wait,
                       credentials))


if __name__ == "__main__":
    main()
