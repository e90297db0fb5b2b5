"""One Hydra entry point for sinktrace's commands: a config packaged with the code, an exit status."""

from __future__ import annotations

import sys
from collections.abc import Callable

from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException


def no_such_key(key: str) -> str:
    return f"{key}: no such setting"


def command(
    config_module: str,
    config_name: str,
    run: Callable[[DictConfig], int],
    rewrite: Callable[[str], str] = lambda arg: arg,
    unknown_key: Callable[[str], str] = no_such_key,
) -> Callable[[], None]:
    """A console-script `main` that composes `config_name` from the package `config_module` (installed with the
    code, so the command works from a wheel as from a clone), runs `run` and exits with the worst status any of
    its jobs returned (a multirun must not stop at its first failing job). `rewrite` maps each command-line
    argument first (old spellings of keys); `unknown_key` says, in one line, that a key does not exist.

    A plain run (overrides only, none of Hydra's own settings) composes the config once and calls `run` itself,
    with Hydra's job logging and `HydraConfig` set as Hydra would set them: `hydra.main` composes it three more
    times, a second or more of a small run. Flags (--help, -m, --cfg, ...) and `hydra.*` overrides go to Hydra."""
    import hydra

    status = 0

    @hydra.main(version_base="1.3", config_path=f"pkg://{config_module}", config_name=config_name)
    def _main(cfg: DictConfig) -> None:
        nonlocal status
        status = max(status, run(cfg))

    def main() -> None:
        sys.argv = [sys.argv[0], *map(rewrite, sys.argv[1:])]
        overrides = sys.argv[1:]
        if any(a.startswith(("-", "hydra.", "hydra/", "+hydra", "~hydra")) for a in overrides):
            _main()
            sys.exit(status)
        try:
            cfg = compose(config_module, config_name, overrides, hydra_config=True)
        except COMPOSITION_ERRORS as e:
            print(f"{sys.argv[0].rsplit('/', 1)[-1]}: error: {composition_message(e, unknown_key)}", file=sys.stderr)
            sys.exit(2)
        sys.exit(run(as_job(cfg)))

    return main


def as_job(cfg: DictConfig) -> DictConfig:
    """What `hydra.main` hands its task: the config without its `hydra` node, once that node is the current
    `HydraConfig` and its job logging is configured."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import configure_log
    from omegaconf import open_dict

    HydraConfig.instance().set_config(cfg)
    configure_log(cfg.hydra.job_logging, cfg.hydra.verbose)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


# what composing a config raises for a bad override or config (Hydra's own errors, OmegaConf's type checks)
COMPOSITION_ERRORS = (HydraException, OmegaConfBaseException, ValueError)


def composition_message(e: BaseException, unknown_key: Callable[[str], str] = no_such_key) -> str:
    """A composition error in one line."""
    lines = [str(e).splitlines()[0]]
    if e.__cause__ is not None and str(e.__cause__):
        lines.append(str(e.__cause__).splitlines()[0])
    message = ": ".join(line.strip().rstrip(".") for line in lines if line.strip())
    if "To append to your config use" in str(e):
        key = str(e).split("'")[1] if "'" in str(e) else ""
        message = unknown_key(key)
    return message


def composition_problem(
    config_module: str,
    config_name: str,
    overrides: list[str],
    unknown_key: Callable[[str], str] = no_such_key,
) -> str | None:
    """Why these overrides do not make a config, in one line (None: they do)."""
    try:
        compose(config_module, config_name, overrides)
    except COMPOSITION_ERRORS as e:
        return composition_message(e, unknown_key)
    return None


def compose(
    config_module: str,
    config_name: str,
    overrides: list[str] | None = None,
    rewrite: Callable[[str], str] = lambda arg: arg,
    hydra_config: bool = False,
) -> DictConfig:
    """The config the command line would build, for Python callers (notebooks, tests); `hydra_config`: with its
    `hydra` node."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module=config_module, version_base="1.3"):
        return hydra_compose(
            config_name=config_name,
            overrides=[rewrite(a) for a in overrides or []],
            return_hydra_config=hydra_config,
        )
