#!/usr/bin/env python3
"""Scrapes the mini engine's store metrics over loopback HTTP (urllib: a real client)
and parses them with prometheus_client's text parser (the PyPI referee, installed by
scripts/py-deps.sh): every family attnstore documents is there, typed right, and the
figures moved with the run.

usage: test_scrape.py MINI_ENGINE_BINARY
"""
import socket
import subprocess
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    engine = sys.argv[1]
    port = free_port()
    proc = subprocess.Popen(
        [engine, "--sessions", "2", "--turns", "3", "--first-tokens", "300", "--modes", "store-dram,store-ssd",
         "--dram-mib", "64", "--ssd-mib", "128", "--quiet", "--metrics-port", str(port), "--metrics-hold"],
        stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if "metrics: final on" in line:
                break
        else:
            sys.exit("the engine ended without serving its final metrics")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            assert r.status == 200, r.status
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4"), r.headers["Content-Type"]
            body = r.read().decode()
        rest = proc.stdout.read()
        assert proc.wait(timeout=120) == 0, f"engine failed: {proc.returncode}\n{rest}"
    finally:
        if proc.poll() is None:
            proc.kill()

    families = {f.name: f for f in text_string_to_metric_families(body)}
    # prometheus_client strips _total from counter family names.
    want = {
        "attnstore_lookups": "counter", "attnstore_puts": "counter", "attnstore_gets": "counter",
        "attnstore_ssd_bytes_read": "counter", "attnstore_checksum_failures": "counter",
        "attnstore_dram_used_bytes": "gauge", "attnstore_ssd_capacity_bytes": "gauge", "attnstore_sessions": "gauge",
        "attnstore_lookup_seconds": "histogram", "attnstore_load_seconds": "histogram",
        "attnstore_save_seconds": "histogram", "attnstore_ssd_read_seconds": "histogram",
        "attnstore_ssd_write_seconds": "histogram", "attnstore_prefetch_lead_seconds": "histogram",
    }
    for name, kind in want.items():
        assert name in families, f"{name} missing"
        assert families[name].type == kind, f"{name} is {families[name].type}, want {kind}"

    def sample(name, **labels):
        for f in families.values():
            for s in f.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        raise AssertionError(f"no sample {name} {labels}")

    # The last store served was store-ssd: every warm turn loaded from SSD.
    assert sample("attnstore_puts_total") > 0
    assert sample("attnstore_save_seconds_count") == sample("attnstore_puts_total")
    assert sample("attnstore_load_seconds_count", source="ssd") > 0
    assert sample("attnstore_ssd_read_seconds_count") > 0
    assert sample("attnstore_ssd_write_seconds_count") > 0
    assert sample("attnstore_load_seconds_bucket", source="ssd", le="+Inf") == \
        sample("attnstore_load_seconds_count", source="ssd")
    assert sample("attnstore_checksum_failures_total") == 0
    print(f"scraped {len(body)} bytes, {len(families)} families; "
          f"{int(sample('attnstore_load_seconds_count', source='ssd'))} SSD loads, "
          f"{int(sample('attnstore_puts_total'))} saves")


if __name__ == "__main__":
    main()
