"""What one daemon process counts in memory: submit decisions, request latency, refused
connections, the fast path's lost holds.

Only what the database cannot tell lives here. A refused reserve writes nothing and a
request's latency is nowhere but in the process that answered it, so these are counted
where they happen, per process, and exposed with a ``process`` label
(``privileged``/``users``/``main``): each series then only ever grows while its process
lives, and drops to zero when it restarts, which Prometheus' ``rate()`` reads as a counter
reset. Summing the two processes into one series would make that series go down whenever
the users' process restarts, which ``rate()`` would misread. Everything money says —
settlements, charges, escrow, the journal head — is read from the database at scrape time
(:mod:`.dbmetrics`), the one truth however many processes (or daemons) write it.

A snapshot (:meth:`Instruments.snapshot`) is plain JSON, so the process that serves the
HTTP endpoint can fetch the other process's over the privileged socket (op ``metrics``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import Metric

from ..errors import Reason

# Latency buckets (s): the submit path answers in tens of microseconds from memory and in
# milliseconds from the database; a user's ``jobs`` may take a second.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
           0.5, 1.0, 2.5, 5.0)
# Every label value comes from a closed set: an op or reason the daemon does not know is
# counted as "other", so a client cannot grow the series.
OPS = frozenset({"hello", "ping", "reserve", "resize", "void", "quote", "balance", "jobs",
                 "bind", "finish", "charge", "metrics"})
REASONS = frozenset({r.value for r in Reason} | {
    "accepted", "bad_request", "forbidden", "invalid", "not_found", "state", "conflict",
    "unavailable", "error", "internal", "busy", "timeout", "too_long"})


def op_label(op: object) -> str:
    return op if isinstance(op, str) and op in OPS else "other"


def reason_label(response: dict) -> str:
    if str(response.get("ok")) == "1":
        return "accepted"
    reason = response.get("reason")
    return reason if isinstance(reason, str) and reason in REASONS else "other"


class Instruments:
    """One process's counters and histograms, in a registry of their own."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=False)
        self.decisions = Counter(
            "gpuledger_submit_decisions", "Reserve requests (job_submit) answered, by reason: "
            "accepted or why not.", ["reason"], registry=self.registry)
        self.latency = Histogram(
            "gpuledger_request_duration_seconds", "Time from a request's whole line to its "
            "reply, by op.", ["op"], buckets=BUCKETS, registry=self.registry)
        self.refused = Counter(
            "gpuledger_connections_refused", "Connections turned away (limits, no thread).",
            registry=self.registry)
        self.fast = None  # the process's FastReserve, when it answers reserves from memory
        self._latency: dict[str, object] = {}  # op -> its histogram child
        self._decisions: dict[str, object] = {}  # reason -> its counter child

    def request(self, request: dict, response: dict, seconds: float) -> None:
        """One answered request (called after its reply is sent, off the reply's time;
        the labelled children are looked up once and kept: a few microseconds a call)."""
        op = op_label(request.get("op"))
        child = self._latency.get(op)
        if child is None:
            child = self._latency.setdefault(op, self.latency.labels(op))
        child.observe(seconds)
        if op == "reserve":
            reason = reason_label(response)
            counter = self._decisions.get(reason)
            if counter is None:
                counter = self._decisions.setdefault(reason, self.decisions.labels(reason))
            counter.inc()

    def snapshot(self) -> list[dict]:
        """The registry as JSON-able families: name, type, help and samples (name, labels,
        value); ``_created`` samples left out (a restart is a reset either way)."""
        out = []
        for family in self.registry.collect():
            out.append({"name": family.name, "type": family.type,
                        "help": family.documentation,
                        "samples": [[s.name, dict(s.labels), s.value] for s in family.samples
                                    if not s.name.endswith("_created")]})
        fast = self.fast
        if fast is not None:
            for what, value, text in (
                    ("answered", fast.answered, "Reserves answered from memory."),
                    ("written", fast.written, "Holds answered from memory and written."),
                    ("lost", fast.lost, ("Holds answered from memory that could not be written "
                     "(their jobs reserve again or are cancelled when they start)."))):
                name = f"gpuledger_fast_reserve_{what}_holds"
                out.append({"name": name, "type": "counter", "help": text,
                            "samples": [[f"{name}_total", {}, value]]})
        return out


def families(snapshot: list[dict], process: str) -> list[Metric]:
    """A snapshot as metric families, each sample labelled with its process."""
    out = []
    for fam in snapshot:
        metric = Metric(fam["name"], fam["help"], fam["type"])
        for name, labels, value in fam["samples"]:
            metric.add_sample(name, {**labels, "process": process}, float(value))
        out.append(metric)
    return out


def merge(parts: list[list[Metric]]) -> list[Metric]:
    """Families of the same name from several processes as one family each."""
    by_name: dict[str, Metric] = {}
    for fams in parts:
        for fam in fams:
            have = by_name.get(fam.name)
            if have is None:
                by_name[fam.name] = fam
            else:
                have.samples.extend(fam.samples)
    return list(by_name.values())
