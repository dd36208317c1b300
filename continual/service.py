"""The composition root: builds the store, metrics and app, and runs them under uvicorn."""

from __future__ import annotations

import logging

from continual import lifecycle
from continual.api import AppContext, create_app
from continual.config import ConfigError, Settings
from continual.metrics import Metrics
from continual.sdnotify import Notifier, NotifySocketError
from continual.store import Store

log = logging.getLogger("continual")


def build_context(settings: Settings) -> AppContext:
    store = Store.from_settings(settings)
    store.check_schema()
    ctx = AppContext(settings=settings, store=store, metrics=Metrics())
    _attach_models(ctx)
    return ctx


def _attach_models(ctx: AppContext) -> None:
    """The registry, and (except in a trainer-only process) the live model loaded from the champion pointer."""
    from continual.registry import Registry
    from continual.serving import Serving

    ctx.registry = Registry(ctx.settings.models_dir, ctx.store, ctx.metrics)
    ctx.registry.discard_unfinished()
    if ctx.settings.service.role == "trainer":
        return
    ctx.serving = Serving(ctx.settings, ctx.metrics)
    ctx.serving.sync(ctx.registry)
    ctx.extras["model_loaded"] = ctx.serving.loaded


def _start_loop(ctx: AppContext, config_path: str | None) -> None:
    """Restart recovery, then the scheduler: check/train/gate (unless role = "api") and champion sync."""
    from continual import daemon

    loop = daemon.Loop(
        settings=ctx.settings,
        store=ctx.store,
        registry=ctx.registry,
        metrics=ctx.metrics,
        serving=ctx.serving,
        config_path=config_path,
    )
    if ctx.settings.service.role != "api":
        recovered = daemon.recover(loop)
        if recovered["interrupted"] or recovered["discarded"] or recovered["fallback"]:
            log.warning("restart recovery: %s", recovered)
    scheduler = daemon.start(loop)
    ctx.extras["loop"] = loop
    hooks = lifecycle.hooks_of(ctx)
    hooks.on_stop.append(lambda: daemon.stop(loop, scheduler))
    hooks.health_checks.append(lambda: None if scheduler.running else "the scheduler is not running")


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
    ctx = build_context(settings)
    _start_loop(ctx, config_path)
    settings.service.data_dir.mkdir(parents=True, exist_ok=True)
    _warn_about_auth(settings)
    app = create_app(ctx)
    ctx.metrics.set_state("idle")
    log.info(
        "continual serving on http://%s:%d (store %s)",
        settings.service.host,
        settings.service.port,
        ctx.store.engine.url.render_as_string(hide_password=True),
    )
    # READY=1 after the port is bound; WATCHDOG=1 while healthy; SIGTERM → STOPPING=1, drain, exit 0.
    try:
        return lifecycle.run(app, ctx, notifier)
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
