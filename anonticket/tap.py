"""``twistd anonticket``: Options and makeService (assembly only; logic lives elsewhere).

Services start in dependency order and stop in reverse: store → purge (old keys, events and
used passes) → webhook delivery (with --webhook-url) → wallet client → monitor → public site
(published as an onion, or on a tcp/unix endpoint) → internal site.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Mapping
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from twisted.python.logfile import LogFile

from anonticket import logs
from anonticket.config import Config, ConfigError, Options, from_options, onion_port
from anonticket.keys import DataDirError, prepare_data_dir
from anonticket.limits import raise_fd_limit
from anonticket.metrics import Metrics
from anonticket.monitor import Monitor, MonitorService, WalletService
from anonticket.onion import OnionService
from anonticket.passes.issuer import load_keys
from anonticket.store import DatabaseError, Store, StoreService
from anonticket.store.housekeeping import PurgeService
from anonticket.wallet import WalletClient
from anonticket.web.internal import InternalAPI
from anonticket.web.jsonio import MAX_BODY, PASS_BATCH_BODY
from anonticket.web.passes import Passes
from anonticket.web.public import PublicAPI
from anonticket.web.service import SiteService, StartupError
from anonticket.web.site import PrivacySite
from anonticket.webhook.delivery import WebhookService, load_node_id
from anonticket.webhook.signing import Signer, load_signer

__all__ = ["AnonticketService", "Options", "makeService"]

log = Logger()


class AnonticketService(MultiService):
    """The root service: a start-up failure ends the process with one line, not a traceback."""

    # --log-format json/journal: given to twistd as the application's log observer.
    log_observer: ILogObserver | None = None

    def setServiceParent(self, parent: Any) -> None:
        # twistd (and a .tac file) uses the application's ILogObserver component, if it has
        # one, instead of making its own: the only hook a plugin has into twistd's logging.
        if self.log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        # twistd's first call: the sites bind here (see SiteService).  Nothing has started yet,
        # and the ports bound so far close as the process exits.
        try:
            super().privilegedStartService()
        except StartupError as e:
            raise SystemExit(f"anonticket: {e}") from None

    def startService(self) -> None:
        try:
            super().startService()
        except (StartupError, DatabaseError, DataDirError) as e:
            # Undo what did start (the store's pool threads), then exit non-zero.
            for service in reversed(list(self)):
                if service.running:
                    service.stopService()
            raise SystemExit(f"anonticket: {e}") from None

    def stopService(self) -> Deferred[None]:
        """Stop children one at a time, last started first.

        MultiService stops them all at once; the store must close only after the sites have
        answered their requests in flight, so each child is awaited before the next.
        """
        self.running = False
        return Deferred.fromCoroutine(self._stop_children())

    async def _stop_children(self) -> None:
        for service in reversed(list(self)):
            if service.running:
                await maybeDeferred(service.stopService)


def build(config: Config, reactor: Any, metrics: Metrics | None = None) -> AnonticketService:
    """Assemble the daemon from a Config (used by makeService, the .tac file and tests)."""
    metrics = metrics if metrics is not None else Metrics()
    root = AnonticketService()
    store = Store(
        reactor,
        config.database,
        config.data_dir,
        config.answer_cache,
        config.admission_limit,
        negative_hit=metrics.negative_cache_hits.inc,
        events=config.webhook_url is not None,
    )
    StoreService(
        store, reactor, failed=lambda operation: metrics.store_errors.labels(operation).inc()
    ).setServiceParent(root)
    pass_issuer = passes(config, store, metrics, reactor)
    PurgeService(
        store,
        reactor,
        config.idempotency_retention,
        failed=metrics.store_errors.labels("purge").inc,
        oldest_pass_period=None if pass_issuer is None else pass_issuer.oldest_period,
    ).setServiceParent(root)
    if config.webhook_url is not None:
        WebhookService(
            store,
            reactor,
            config.webhook_url,
            lambda: announce(load_signer(config.data_dir, config.webhook_signing)),
            metrics,
            config.webhook_retry_schedule,
            node=lambda: load_node_id(config.data_dir),
        ).setServiceParent(root)
    # Read when scraped: sizes, not per-request counts (a counter per hit would cost every hit).
    metrics.answer_cache_entries.labels("token").set_function(lambda: len(store.token_answers))
    metrics.answer_cache_entries.labels("redeem").set_function(lambda: len(store.redeem_answers))

    monitor: MonitorService | None = None
    if config.monitor:
        wallet = WalletClient(reactor, config.wallet_rpc, login=config.wallet_rpc_login)
        WalletService(wallet).setServiceParent(root)
        monitor = MonitorService(
            Monitor(
                store,
                wallet,
                metrics,
                reactor,
                min_confirmations=config.min_confirmations,
                min_amount=config.min_amount,
                start_height=config.start_height,
                poll_interval=config.poll_interval,
            ),
            reactor,
        )
        monitor.setServiceParent(root)

    public = PublicAPI(store, metrics, reactor, config.min_confirmations, passes=pass_issuer)
    public_site = PrivacySite(
        public.app.resource(),
        name="public",
        metrics=metrics,
        clock=reactor,
        max_body=MAX_BODY if pass_issuer is None else PASS_BATCH_BODY,
    )
    virtual_port = onion_port(config.public)
    onion: OnionService | None = None
    if virtual_port is not None:
        # Listens on a socket only tor reaches, then publishes it; never delays the rest.
        onion = OnionService(
            reactor,
            data_dir=config.data_dir,
            site=public_site,
            metrics=metrics,
            virtual_port=virtual_port,
            tor_control=config.tor_control,
            tor_options=config.tor_config,
            tor_cookie_files=None if config.tor_cookie_file is None else [config.tor_cookie_file],
        )
        onion.setServiceParent(root)
    else:
        SiteService(reactor, "public", config.public, public_site).setServiceParent(root)

    internal = InternalAPI(
        store,
        metrics,
        reactor,
        config.min_confirmations,
        monitor=monitor,
        passes=pass_issuer,
        onion=onion,
    )
    internal_site = PrivacySite(
        internal.app.resource(), name="internal", metrics=metrics, clock=reactor
    )
    SiteService(reactor, "internal", config.internal, internal_site).setServiceParent(root)
    return root


def passes(config: Config, store: Store, metrics: Metrics, reactor: Any) -> Passes | None:
    """The pass issuer (its public and internal sides), with --pass-price."""
    if config.pass_price is None:
        return None
    prepare_data_dir(config.data_dir)
    try:
        keys = load_keys(config.data_dir, config.pass_key_file, config.pass_key_lifetime)
    except DataDirError as e:
        raise SystemExit(f"anonticket: {e}") from None

    def threads(fn: Any, *args: Any) -> Any:
        return deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args)

    return Passes(keys, config.pass_price, config.pass_batch_max, store, metrics, reactor, threads)


def announce(loaded: tuple[Signer, str | None]) -> Signer:
    """Log the Ed25519 public key a receiver verifies with (it is public: a log line is fine)."""
    signer, public_key = loaded
    if public_key is not None:
        log.info("webhook: events are signed with Ed25519 (v1a); public key {key}", key=public_key)
    return signer


def makeService(
    options: Mapping[str, object], reactor: Any = None, environ: Mapping[str, str] | None = None
) -> IService:
    """Called by twistd with the parsed Options.  Bad configuration exits with one line."""
    # Everything the daemon and its tor create (the data directory and its parents, the
    # database and its journal, keys, sockets) is owner-only, whatever umask it inherits.
    os.umask(0o077)
    if reactor is None:
        from twisted.internet import reactor as global_reactor  # noqa: TID251 - entry point

        reactor = global_reactor
    try:
        config = from_options(options, os.environ if environ is None else environ)
    except ConfigError as e:
        raise SystemExit(f"anonticket: {e}") from None
    raise_fd_limit()  # each site's connection cap is fitted to it when the site listens
    service = build(config, reactor)
    service.log_observer = log_observer(config.log_format, getattr(options, "parent", None))
    reactor.callWhenRunning(freeze_startup_heap)
    return service


def log_observer(fmt: str, twistd: Mapping[str, object] | None) -> ILogObserver | None:
    """The observer for --log-format, writing where twistd would have: standard output with
    --nodaemon or --logfile=-, else the --logfile (twistd.log by default)."""
    if fmt == "text":
        return None
    options = twistd or {"nodaemon": True}
    if options.get("syslog"):
        raise SystemExit(f"anonticket: --log-format {fmt}: not with twistd's --syslog")
    logfile = options.get("logfile")
    out: Any
    if logfile == "-" or (options.get("nodaemon") and not logfile):
        out = sys.stdout
    else:
        out = LogFile.fromFullPath(str(logfile or "twistd.log"))
    return logs.observer(fmt, out)


def freeze_startup_heap() -> None:
    """Hide what start-up made (modules, routes, the PID filter) from the cyclic garbage
    collector for good.  Every request leaves cyclic garbage (about 40 objects in twisted.web
    and Klein), so collections run all the time, and a full one would walk the whole start-up
    heap each time (what that cost: docs/performance.md).  Only in the daemon's own process,
    once it runs: a test process building many daemons keeps its GC."""
    gc.collect()
    gc.freeze()
