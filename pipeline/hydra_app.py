"""One Hydra entry point for sinktrace's commands: a config packaged with the code, an exit status."""

from __future__ import annotations

import sys
from collections.abc import Callable

from omegaconf import DictConfig


def command(
    config_module: str,
    config_name: str,
    run: Callable[[DictConfig], int],
    rewrite: Callable[[str], str] = lambda arg: arg,
) -> Callable[[], None]:
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
        overrides = sys.argv[1:]
        if not any(a.startswith("-") for a in overrides):  # flags (--help, -m, --cfg) go to Hydra as they are
            problem = composition_problem(config_module, config_name, overrides)
            if problem:
                print(f"{sys.argv[0].rsplit('/', 1)[-1]}: error: {problem}", file=sys.stderr)
                sys.exit(2)
        _main()
        sys.exit(status)

    return main


def composition_problem(config_module: str, config_name: str, overrides: list[str]) -> str | None:
    """Why these overrides do not make a config, in one line (None: they do)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        compose(config_module, config_name, overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        lines = [str(e).splitlines()[0]]
        if e.__cause__ is not None and str(e.__cause__):
            lines.append(str(e.__cause__).splitlines()[0])
        message = ": ".join(line.strip().rstrip(".") for line in lines if line.strip())
        if "To append to your config use" in str(e):
            key = str(e).split("'")[1] if "'" in str(e) else ""
            message = f"{key}: no such setting (a misspelt key? `sinktrace --help` lists them)"
        return message
    return None


def compose(
    config_module: str,
    config_name: str,
    overrides: list[str] | None = None,
    rewrite: Callable[[str], str] = lambda arg: arg,
) -> DictConfig:
    """The config the command line would build, for Python callers (notebooks, tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module=config_module, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=[rewrite(a) for a in overrides or []])
