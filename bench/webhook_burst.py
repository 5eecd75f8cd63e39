"""Benchmark: a burst of signed CRM webhooks into the receiver and its inbox.

One command: `.venv/bin/python -m bench.webhook_burst --events 10000 [--state postgres]`. Starts
the receiver on a free port (inbox in a throwaway SQLite file, or a throwaway PostgreSQL
database), sends the events as the sandbox makes them (`--per-delivery` a request, signed in turn
with HubSpot v3 and Standard Webhooks) from `--clients` threads, plus `--duplicates` of them
again: half as exact resends (acknowledged, not stored), half as retries under a new delivery
(not stored).
Prints deliveries/s, events stored/s, what was refused, and peak RSS.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import secrets
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import psycopg
import requests

from bench.contacts_sync import peak_rss_mb
from integrations.crm.webhooks import Change, events_of
from integrations.webhooks.inbox import WebhookInbox
from integrations.webhooks.server import WebhookServer
from integrations.webhooks.signatures import hubspot_headers, standard_headers

POSTGRES_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


@contextmanager
def throwaway_state(kind: str) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{Path(tempfile.mkdtemp(prefix='handoff-bench-hooks-')) / 'state.sqlite'}"
        return
    name = f"handoff_bench_hooks_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--per-delivery", type=int, default=1, help="events per request (≤100)")
    parser.add_argument("--duplicates", type=float, default=0.1, help="share sent again")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--state", choices=["sqlite", "postgres"], default="sqlite")
    args = parser.parse_args()
    with throwaway_state(args.state) as url:
        burst(args, url)


def burst(args: argparse.Namespace, state_url: str) -> None:
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    inbox = WebhookInbox(state_url)
    server = WebhookServer(inbox, [secret])
    server.start_in_thread()
    url, chooser = server.url, random.Random(1)

    def sign(body: bytes, scheme: str) -> dict[str, str]:
        if scheme == "hubspot":
            headers = hubspot_headers(secret, "POST", url, body)
        else:
            headers = standard_headers([secret], f"msg_{uuid.uuid4().hex}", body)
        return {"Content-Type": "application/json", **headers}

    changes = [Change("contacts", n, "creation", {}) for n in range(1, args.events + 1)]
    events = events_of(changes, int(time.time() * 1000))
    bodies = [
        json.dumps(events[start : start + args.per_delivery]).encode()
        for start in range(0, len(events), args.per_delivery)
    ]
    deliveries = [
        (body, sign(body, ("standard", "hubspot")[n % 2])) for n, body in enumerate(bodies)
    ]
    again = chooser.sample(range(len(deliveries)), int(len(deliveries) * args.duplicates))
    half = len(again) // 2
    burst = deliveries + [deliveries[n] for n in again[:half]]
    burst += [(bodies[n], sign(bodies[n], "standard")) for n in again[half:]]
    chooser.shuffle(burst)

    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=args.clients))

    def send(delivery):
        body, headers = delivery
        return session.post(url, data=body, headers=headers, timeout=60)

    started = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        answers = list(pool.map(send, burst))
    seconds = time.perf_counter() - started
    server.shutdown()
    server.server_close()
    counts = inbox.counts()
    inbox.dispose()
    statuses = [answer.status_code for answer in answers]
    print(
        f"{args.state} inbox: {len(burst)} deliveries ({len(events)} events, "
        f"{args.per_delivery}/delivery, {len(again)} sent again) in {seconds:.2f} s: "
        f"{len(burst) / seconds:.0f} deliveries/s, {counts['events'] / seconds:.0f} events "
        f"stored/s; stored {counts['events']}, "
        f"duplicates not stored {server.tally.get('duplicates', 0)}, other answers "
        f"{len(statuses) - statuses.count(200)}; "
        f"peak RSS {peak_rss_mb():.0f} MB"
    )


if __name__ == "__main__":
    main()
