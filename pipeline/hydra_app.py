"""One Hydra entry point for sinktrace's commands: a config packaged with the code, an exit status."""

from __future__ import annotations

import sys
from collections.abc import Callable

from omegaconf import DictConfig


def command(config_module: str, config_name: str, run: Callable[[DictConfig], int],
            rewrite: Callable[[str], str] = lambda arg: arg) -> Callable[[], None]:
    """A console-script `main` that composes `config_name` from the package `config_module` (installed with the
    code, so the command works from a wheel as from a clone), runs `run` and exits with the worst status any of
    its jobs returned (a multirun must not stop at its first failing job). `rewrite` maps each command-line
    argument first (old spellings of keys)."""
    import hydra

    status = 0

    @hydra.main(version_base="1.3", config_path=f"pkg://{config_module}", config_name=config_name)
    def _main(cfg: DictConfig) -> None:
        nonlocal status
        status = max(status, run(cfg))

    def main() -> None:
        sys.argv = [sys.argv[0], *map(rewrite, sys.argv[1:])]
        _main()
        sys.exit(status)

    return main


def compose(config_module: str, config_name: str, overrides: list[str] | None = None,
            rewrite: Callable[[str], str] = lambda arg: arg) -> DictConfig:
    """The config the command line would build, for Python callers (notebooks, tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module=config_module, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=[rewrite(a) for a in overrides or []])
