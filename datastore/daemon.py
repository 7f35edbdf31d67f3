"""What every long-running Tabby process shares (tabby-node, felix, the routing agent):
logging to stderr and a file, the etcd settings from its flags, running until a signal, and
leaving with its parent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.handlers
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datastore.config import EtcdConfig

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(log_file: str, level: str, noisy: Iterable[str] = ()) -> None:
    """Root logging to stderr and, when given, `log_file` (reopened when logrotate moves it);
    the `noisy` libraries' loggers never below WARNING."""
    fmt = logging.Formatter(LOG_FORMAT)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.handlers.WatchedFileHandler(log_file))
    root = logging.getLogger()
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    root.setLevel(level.upper())
    for name in noisy:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))


def daemon_main(name: str, opts: Any, run: Callable[[Any], Coroutine[Any, Any, int]],
                noisy: Iterable[str] = ()) -> None:
    """A daemon's `main`: logging set up from `opts.log_file`/`opts.log_level` (exit with a
    message when the file cannot be opened), then `run(opts)`'s code as the exit status."""
    try:
        setup_logging(opts.log_file, opts.log_level, noisy)
    except OSError as e:
        sys.exit(f"{name}: cannot open the log file {opts.log_file}: {e.strerror or e}")
    sys.exit(asyncio.run(run(opts)))


def etcd_config(endpoints: str | None, config_path: str | None) -> EtcdConfig:
    """`--etcd-endpoints` wins; else the calicoctl-style file or ETCD_* from the environment."""
    from datastore.config import load_config

    if endpoints:
        return load_config(env={**os.environ, "ETCD_ENDPOINTS": endpoints})
    return load_config(config_path)


async def parent_gone(parent: int, log: logging.Logger) -> None:
    """Returns once `parent` is no longer this process's parent (it died: we were reparented)."""
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    log.warning("parent process %d is gone; exiting", parent)


async def run_until_stopped(work: Coroutine[Any, Any, Any], log: logging.Logger,
                            exit_with_parent: bool = False) -> None:
    """Run `work` until SIGTERM/SIGINT, the parent's death (when asked), or `work` ending; a
    crash of `work` is re-raised. Everything is cancelled before it returns."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waits = [asyncio.create_task(stop.wait()), asyncio.create_task(work)]
    if exit_with_parent:
        waits.append(asyncio.create_task(parent_gone(os.getppid(), log)))
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in waits:
            task.cancel()
        for task in waits:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
