"""Prometheus metrics, on the daemon's own registry (served by the internal site).

The names and label values here are a contract (docs/metrics.md).  Labels come from small fixed
sets only: never a PID, a token, an amount, a txid or a client's address.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from anonticket import __version__

ONION_STATES = ("disabled", "starting", "bootstrapping", "publishing", "published", "failed")

REDEEM_OUTCOMES = (
    "success",
    "already_claimed",
    "pending",
    "below_minimum",
    "not_found",
    "invalid",
    "overloaded",
    "error",
)
LOOKUP_OUTCOMES = (
    "active",
    "revoked",
    "suspended",
    "not_found",
    "invalid",
    "overloaded",
    "error",
)
REVOKE_OUTCOMES = ("revoked", "already_revoked", "not_found", "invalid", "error")
UNREVOKE_OUTCOMES = ("unrevoked", "not_revoked", "not_found", "invalid", "error")
PASS_ISSUANCE_OUTCOMES = (
    "issued",
    "replayed",
    "insufficient_balance",
    "token_revoked",
    "token_suspended",
    "not_found",
    "invalid",
    "error",
)
PASS_VERIFICATION_OUTCOMES = ("valid", "already_used", "invalid", "error")
SPEND_OUTCOMES = (
    "spent",
    "replayed",
    "insufficient_balance",
    "token_revoked",
    "token_suspended",
    "version_mismatch",
    "idempotency_key_reused",
    "idempotency_key_in_use",
    "not_found",
    "invalid",
    "error",
)


class Outcomes:
    """A counter's children for a fixed set of outcomes, made once: every series exists from
    the start (at 0), and counting costs no ``labels()`` lookup (a lock and a key) per request."""

    def __init__(self, counter: Counter, outcomes: tuple[str, ...]) -> None:
        self._children = {o: counter.labels(o) for o in outcomes}

    def count(self, outcome: str) -> None:
        self._children[outcome].inc()


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class UnsetGauge(Collector):
    """A gauge with no sample until it is first set, and again after ``clear()``.

    prometheus_client's Gauge starts at 0, which for a chain height or a bootstrap percentage
    is a wrong answer rather than none: an alert on "height is low" or a graph would take it
    for a value.  Without a sample, ``absent()`` says what is true: not known yet.
    """

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._value: float | None = None
        registry.register(self)

    def set(self, value: float) -> None:
        self._value = value

    def clear(self) -> None:
        self._value = None

    def collect(self) -> Any:
        family = GaugeMetricFamily(self._name, self._documentation)
        if self._value is not None:
            family.add_metric([], self._value)
        yield family

    def describe(self) -> Any:
        yield GaugeMetricFamily(self._name, self._documentation)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # The *_created series double the output and say nothing an operator needs.
        disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.build_info = Info("anonticket_build", "Version of the running daemon.", registry=r)
        self.build_info.info({"version": __version__})
        self.redeems = Counter(
            "anonticket_redeem_requests",
            "Redeem requests by outcome: success, already_claimed, pending, below_minimum, "
            "not_found, invalid, overloaded, error.",
            ["outcome"],
            registry=r,
        )
        self.redeem_outcomes = Outcomes(self.redeems, REDEEM_OUTCOMES)
        self.negative_cache_hits = Counter(
            "anonticket_redeem_negative_cache_hits",
            "Redeems of recently unknown PIDs answered 404 without asking the store.",
            registry=r,
        )
        self.token_lookups = Counter(
            "anonticket_token_lookups",
            "Token status lookups by outcome: active, revoked, suspended, not_found, invalid, "
            "overloaded, error.",
            ["outcome"],
            registry=r,
        )
        self.revocations = Counter(
            "anonticket_token_revocations",
            "Revoke requests by outcome: revoked, already_revoked, not_found, invalid, error.",
            ["outcome"],
            registry=r,
        )
        self.spends = Counter(
            "anonticket_spend_requests",
            "Spend requests by outcome: spent, replayed, insufficient_balance, token_revoked, "
            "token_suspended, version_mismatch, idempotency_key_reused, idempotency_key_in_use, "
            "not_found, invalid, error.",
            ["outcome"],
            registry=r,
        )
        self.spend_outcomes = Outcomes(self.spends, SPEND_OUTCOMES)
        self.pass_issuances = Counter(
            "anonticket_pass_issuance_requests",
            "Pass token requests on the public site by outcome: issued, replayed, "
            "insufficient_balance, token_revoked, token_suspended, not_found, invalid, error.",
            ["outcome"],
            registry=r,
        )
        self.pass_issuance_outcomes = Outcomes(self.pass_issuances, PASS_ISSUANCE_OUTCOMES)
        self.passes_issued = Counter(
            "anonticket_passes_issued", "Passes evaluated (replays included).", registry=r
        )
        self.pass_verifications = Counter(
            "anonticket_pass_verifications",
            "Pass verifications on the internal site by outcome: valid, already_used, invalid, "
            "error.",
            ["outcome"],
            registry=r,
        )
        self.pass_verification_outcomes = Outcomes(
            self.pass_verifications, PASS_VERIFICATION_OUTCOMES
        )
        self.webhook_deliveries = Counter(
            "anonticket_webhook_deliveries",
            "Webhook delivery attempts by outcome: delivered, retry (to be tried again), "
            "failed (retries used up).",
            ["outcome"],
            registry=r,
        )
        for outcome in ("delivered", "retry", "failed"):
            self.webhook_deliveries.labels(outcome)
        self.webhook_backlog = Gauge(
            "anonticket_webhook_backlog_events",
            "Events waiting for delivery (all nodes; refreshed every few seconds).",
            registry=r,
        )
        self.webhook_failed = Gauge(
            "anonticket_webhook_failed_events",
            "Events whose retries are used up, kept until retried from the internal site.",
            registry=r,
        )
        self.webhook_oldest_age = Gauge(
            "anonticket_webhook_oldest_waiting_seconds",
            "Age of the oldest event waiting for delivery (0: none waiting).",
            registry=r,
        )
        self.lookup_outcomes = Outcomes(self.token_lookups, LOOKUP_OUTCOMES)
        self.revoke_outcomes = Outcomes(self.revocations, REVOKE_OUTCOMES)
        self.unrevocations = Counter(
            "anonticket_token_unrevocations",
            "Un-revoke requests by outcome: unrevoked, not_revoked, not_found, invalid, error.",
            ["outcome"],
            registry=r,
        )
        self.unrevoke_outcomes = Outcomes(self.unrevocations, UNREVOKE_OUTCOMES)
        self.http_duration = Histogram(
            "anonticket_http_request_duration_seconds",
            "Time to answer an HTTP request, by site and route.",
            ["site", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.http_responses = Counter(
            "anonticket_http_responses",
            "HTTP responses by site, route and status code.",
            ["site", "route", "code"],
            registry=r,
        )
        self.store_errors = Counter(
            "anonticket_store_errors",
            "Store operations that failed, by operation.",
            ["operation"],
            registry=r,
        )
        self.wallet_height = UnsetGauge(
            "anonticket_wallet_height",
            "The wallet's chain height (block count) at the last successful poll; no sample "
            "before the first.",
            registry=r,
        )
        self.monitor_cursor = Gauge(
            "anonticket_monitor_cursor_height",
            "Last block height whose transfers are recorded as final.",
            registry=r,
        )
        self.monitor_lag = Gauge(
            "anonticket_monitor_lag_blocks",
            "Confirmed blocks not yet processed (0 when caught up).",
            registry=r,
        )
        self.monitor_last_success = Gauge(
            "anonticket_monitor_last_success_timestamp_seconds",
            "Unix time of the last successful wallet poll.",
            registry=r,
        )
        self.monitor_polls = Counter(
            "anonticket_monitor_polls",
            "Wallet polls by outcome: ok, unreachable, timeout, http_error, bad_response, "
            "rpc_error, auth, too_large, error, cancelled.",
            ["outcome"],
            registry=r,
        )
        self.monitor_poll_duration = Histogram(
            "anonticket_monitor_poll_duration_seconds",
            "Duration of successful wallet polls.",
            buckets=(*LATENCY_BUCKETS, 10.0, 30.0, 60.0),
            registry=r,
        )
        self.wallet_rpc_duration = Histogram(
            "anonticket_wallet_rpc_duration_seconds",
            "Duration of wallet JSON-RPC calls by method (failures included).",
            ["method"],
            buckets=(*LATENCY_BUCKETS, 10.0, 30.0, 60.0),
            registry=r,
        )
        self.monitor_transfers = Counter(
            "anonticket_monitor_transfers",
            "Incoming transfers by outcome, counted once each: credited (confirmed and "
            "redeemable), pending, dust, legacy, skipped.",
            ["outcome"],
            registry=r,
        )
        self.monitor_skipped = Counter(
            "anonticket_monitor_skipped_transfers",
            "Skipped transfers by reason: coinbase, locked, double_spend, no_payment_id, "
            "other_type, malformed.",
            ["reason"],
            registry=r,
        )
        self.monitor_reversals = Counter(
            "anonticket_monitor_reversals",
            "Credited transfers the chain took back (reorganised out, double-spent, back in "
            "the pool), by state: claimed (the amount left its token) or unclaimed.",
            ["state"],
            registry=r,
        )
        self.monitor_restorations = Counter(
            "anonticket_monitor_restorations",
            "Reversed transfers confirmed again, by state: claimed (the amount is back on its "
            "token) or unclaimed (redeemable again).",
            ["state"],
            registry=r,
        )
        self.monitor_height_refusals = Counter(
            "anonticket_monitor_height_refusals",
            "Polls where the wallet's height was not trusted as reported, by reason: jump (a "
            "rise not yet confirmed by the next poll), backwards (below the last trusted one).",
            ["reason"],
            registry=r,
        )
        for state in ("claimed", "unclaimed"):
            self.monitor_reversals.labels(state)
            self.monitor_restorations.labels(state)
        for reason in ("jump", "backwards"):
            self.monitor_height_refusals.labels(reason)
        self.onion_state = Enum(
            "anonticket_onion_state",
            "State of the public site's onion service: disabled (not published as an onion), "
            "starting (connecting to or launching tor), publishing (waiting for the descriptor "
            "upload), published, failed (retrying).",
            states=list(ONION_STATES),
            registry=r,
        )
        self.onion_state.state("disabled")
        self.tor_bootstrap_percent = UnsetGauge(
            "anonticket_tor_bootstrap_percent",
            "Tor's bootstrap progress (0-100) as tor last reported it; no sample while no tor "
            "is connected or the public site is not an onion.",
            registry=r,
        )
        # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds,
        # process_max_fds, process_start_time_seconds...: read from /proc when scraped.
        ProcessCollector(registry=r)
        self.answer_cache_entries = Gauge(
            "anonticket_answer_cache_entries",
            "Answers kept in memory (--answer-cache), by kind: token (token checks), redeem "
            "(redeems of fully claimed PIDs).",
            ["kind"],
            registry=r,
        )
        self.requests_in_flight = Gauge(
            "anonticket_http_requests_in_flight",
            "Requests being answered now, by site.",
            ["site"],
            registry=r,
        )
        self._sites: list[Any] = []
        r.register(_ConnectionsDropped(self._sites))

    def watch_site(self, site: Any) -> None:
        """Export a site's dropped-connection totals (read when scraped: no per-connection
        cost).  ``site`` has ``name``, ``refused``, ``evicted`` and ``timed_out``."""
        self._sites.append(site)


class _ConnectionsDropped(Collector):
    """anonticket_http_connections_dropped_total{site, reason}, read from the sites."""

    REASONS = ("refused", "evicted", "timed_out")

    def __init__(self, sites: list[Any]) -> None:
        self._sites = sites

    def collect(self) -> Any:
        family = CounterMetricFamily(
            "anonticket_http_connections_dropped",
            "Connections a site dropped, by reason: refused (every connection busy at the "
            "cap), evicted (the longest idle one, to make room at the cap), timed_out (the "
            "request's head and body not complete within the request deadline).",
            labels=["site", "reason"],
        )
        for site in self._sites:
            for reason in self.REASONS:
                family.add_metric([site.name, reason], getattr(site, reason))
        yield family
