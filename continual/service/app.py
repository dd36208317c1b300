"""The composition root: builds the store, registry, live model, jobs and HTTP app, and runs them.

``continual serve`` calls :func:`serve`. Nothing imports this package but the
command line; every other room gets what it needs passed in.
"""

from __future__ import annotations

import logging

from continual.api import AppContext, create_app
from continual.config import ConfigError, Settings
from continual.metrics import Metrics
from continual.registry import Registry
from continual.service import jobs, runtime
from continual.service.context import ServiceContext, State
from continual.service.recovery import recover
from continual.service.sdnotify import Notifier, NotifySocketError
from continual.serving import Serving
from continual.store import Store

log = logging.getLogger("continual")


def build(settings: Settings, config_path: str | None = None) -> ServiceContext:
    """Open the store (refusing a schema that is not current), the registry, and the live model."""
    store = Store.from_settings(settings)
    store.check_schema()
    metrics = Metrics()
    registry = Registry(settings.models_dir, store, on_refused=metrics.model_refused)
    registry.discard_unfinished()
    serving = None
    if settings.service.role != "trainer":
        serving = Serving(settings, events=metrics)
        serving.sync(registry)
    return ServiceContext(
        settings=settings,
        store=store,
        registry=registry,
        metrics=metrics,
        state=State(metrics),
        serving=serving,
        config_path=config_path,
    )


def serve(settings: Settings, config_path: str | None = None) -> int:
    logging.basicConfig(
        level=settings.service.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        # Unset so training workers never inherit the main process's notify socket.
        notifier = Notifier.from_env(unset=True)
    except NotifySocketError as e:
        raise ConfigError(f"systemd environment: {e}") from None
    notifier.status("starting: opening the store and loading the champion")
    ctx = build(settings, config_path)
    if settings.service.role != "api":
        recovered = recover(ctx)
        if recovered:
            log.warning("restart recovery: %s", recovered)
    scheduler = jobs.start(ctx)
    settings.service.data_dir.mkdir(parents=True, exist_ok=True)
    _warn_about_auth(settings)
    serving = ctx.serving
    app = create_app(
        AppContext(
            settings=settings,
            store=ctx.store,
            metrics=ctx.metrics,
            registry=ctx.registry,
            serving=serving,
            state=lambda: ctx.state.current,
        )
    )
    ctx.state.set("idle")
    log.info(
        "continual serving on http://%s:%d (store %s)",
        settings.service.host,
        settings.service.port,
        ctx.store.engine.url.render_as_string(hide_password=True),
    )
    rt = runtime.Runtime(
        settings=settings,
        metrics=ctx.metrics,
        ping=ctx.store.ping,
        state=lambda: ctx.state.current,
        version=serving.version if serving is not None else lambda: None,
        health_checks=[lambda: None if scheduler.running else "the scheduler is not running"],
        on_stop=[lambda: jobs.stop(ctx, scheduler)],
    )
    # READY=1 after the port is bound; WATCHDOG=1 while healthy; SIGTERM → STOPPING=1, drain, exit 0.
    try:
        return runtime.run(app, rt, notifier)
    finally:
        ctx.store.dispose()
        notifier.close()


def _warn_about_auth(settings: Settings) -> None:
    # Token files are read here too, so a missing secret stops the start with a clear message.
    if not settings.auth.enabled:
        log.warning(
            "auth is DISABLED ([auth] enabled = false): anyone who can reach %s:%d can send feedback and "
            "manage models; enable it outside local demos",
            settings.service.host,
            settings.service.port,
        )
    elif not settings.tokens("ingest") and not settings.tokens("admin"):
        log.warning("auth is enabled but no tokens are configured: every /v1 request will get 401")
