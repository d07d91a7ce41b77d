"""Drives Ferry's Consul-compatible API with Python's Consul client (py-consul), unchanged.

Run by tests/tests/consul.rs:

    client.py --url https://127.0.0.1:7071 --token SECRET --ca ca.pem --app 127.0.0.1:8080

Registers `web` (an HTTP check on the app's /healthz) and `worker` (a TTL check), passes the
TTL, lists services, waits for both to be healthy, runs a blocking query that a new
registration wakes, and deregisters. Leaves `web-1` registered for the Rust test to look at
through Ferry's own API and a sidecar. Exits non-zero with a message on the first failure.
"""

import argparse
import sys
import threading
import time
from urllib.parse import urlparse

import consul
from consul.callback import CB


def fail(message):
    print(f"FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def expect(condition, message):
    if not condition:
        fail(message)


def eventually(what, check, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    fail(f"timed out after {timeout}s waiting for {what}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--token")
    parser.add_argument("--ca")
    parser.add_argument("--app", required=True, help="HOST:PORT of an HTTP app answering /healthz")
    args = parser.parse_args()

    url = urlparse(args.url)
    client = consul.Consul(
        host=url.hostname, port=url.port, scheme=url.scheme, token=args.token, verify=args.ca if args.ca else True
    )
    app_host, app_port = args.app.rsplit(":", 1)

    # py-consul's agent.self() sends no token (it would fail against Consul with default-deny
    # ACLs too), so this one call goes through its HTTP client with the token's header.
    me = client.http.get(CB.json(), "/v1/agent/self", headers=client.prepare_headers())
    expect(me["Config"]["Datacenter"] == "dc1", f"agent/self: {me}")
    expect(isinstance(me["Member"], dict), f"agent/self has a Member object: {me}")
    print("agent/self:", me["Config"]["Datacenter"], me["Config"]["NodeName"], me["Config"]["Version"])

    ok = client.agent.service.register(
        "web",
        service_id="web-1",
        address=app_host,
        port=int(app_port),
        tags=["primary", "version=v2"],
        meta={"team": "payments"},
        check=consul.Check.http(f"http://{args.app}/healthz", "1s", timeout="1s"),
    )
    expect(ok is True, f"registering web-1 answered {ok!r}")
    ok = client.agent.service.register(
        "worker", service_id="worker-1", address="127.0.0.1", port=9, check=consul.Check.ttl("30s")
    )
    expect(ok is True, f"registering worker-1 answered {ok!r}")
    print("registered web-1 (HTTP check) and worker-1 (TTL check)")

    expect(client.agent.check.ttl_pass("service:worker-1", "all good") is True, "ttl_pass")
    checks = client.agent.checks()
    expect(checks.get("service:worker-1", {}).get("Output") == "all good", f"agent/checks: {checks}")

    index, services = client.catalog.services()
    expect(services.get("web") == ["primary", "version=v2"], f"catalog/services: {services}")
    expect("worker" in services, f"catalog/services: {services}")
    expect(int(index) > 0, f"catalog/services index {index!r}")
    agent_services = client.agent.services()
    expect(agent_services["web-1"]["Meta"].get("team") == "payments", f"agent/services: {agent_services}")
    print("listed services:", sorted(services))

    def healthy(name):
        _, entries = client.health.service(name, passing=True)
        return entries

    web = eventually("web-1 to pass its HTTP check", lambda: healthy("web"))
    expect(web[0]["Service"]["ID"] == "web-1" and web[0]["Service"]["Port"] == int(app_port), f"health/service: {web}")
    expect(web[0]["Checks"][0]["Status"] == "passing", f"health/service checks: {web}")
    worker = eventually("worker-1 to pass its TTL check", lambda: healthy("worker"))
    expect(worker[0]["Service"]["Address"] == "127.0.0.1", f"health/service: {worker}")
    print("both healthy: web-1 and worker-1")

    index, entries = client.catalog.service("web", tag="primary")
    expect(len(entries) == 1 and entries[0]["ServiceTags"] == ["primary", "version=v2"], f"catalog/service: {entries}")
    _, filtered = client.catalog.service("web", filter_expr='ServiceMeta.team == "payments" and "primary" in ServiceTags')
    expect(len(filtered) == 1, f"filtered catalog/service: {filtered}")
    _, none = client.catalog.service("web", filter_expr='ServiceMeta.team == "ops"')
    expect(none == [], f"filter that matches nothing: {none}")

    woken = {}

    def block():
        started = time.monotonic()
        new_index, entries = client.catalog.service("web", index=index, wait="30s")
        woken.update(index=new_index, entries=entries, after=time.monotonic() - started)

    watcher = threading.Thread(target=block)
    watcher.start()
    time.sleep(1.0)
    expect(watcher.is_alive(), f"the blocking query answered before anything changed: {woken}")
    ok = client.agent.service.register("web", service_id="web-2", address=app_host, port=int(app_port), tags=["spare"])
    expect(ok is True, f"registering web-2 answered {ok!r}")
    watcher.join(timeout=20)
    expect(not watcher.is_alive(), "the blocking query was not woken by a registration")
    expect(len(woken["entries"]) == 2 and woken["index"] != index, f"the blocking query woke with {woken}")
    print(f"blocking query woke after {woken['after']:.2f}s with {len(woken['entries'])} instances")

    expect(client.agent.service.deregister("web-2") is True, "deregistering web-2")
    expect(client.agent.service.deregister("worker-1") is True, "deregistering worker-1")
    _, workers = client.health.service("worker")
    expect(workers == [], f"worker after deregistering: {workers}")
    _, services = client.catalog.services()
    expect("worker" not in services, f"catalog/services after deregistering: {services}")
    print("deregistered web-2 and worker-1")
    print("ok")


if __name__ == "__main__":
    main()
