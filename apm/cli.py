"""Command line: ``apm fit|validate|test|predict`` (LightningCLI), the same as ``lightning ...``
and ``python -m apm ...``; plus the project's own tools registered in ``TOOLS``."""

from __future__ import annotations

import importlib
import json
import netrc
import os
import sys
from pathlib import Path
from typing import Any, Sequence

# Extra subcommands: name -> "module:function" taking argv (list[str]); lazily imported.
TOOLS: dict[str, str] = {
    "islands": "apm.commands.islands:main",
    "eval": "apm.commands.eval:main",
    "interpolate": "apm.commands.interpolate:main",
    "perceive": "apm.commands.perceive:main",
    "classify": "apm.commands.classify:main",
    "segment": "apm.commands.segment:main",
    "explore": "apm.commands.explore:main",
    "solve": "apm.commands.solve:main",
}


def quiet_wandb() -> None:
    """wandb never prompts: offline unless an API key is configured (env or ~/.netrc)."""
    if "WANDB_MODE" in os.environ or os.environ.get("WANDB_API_KEY"):
        return
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    os.environ["WANDB_MODE"] = "offline"


# Loggers and checkpoints that name no folder of their own: (argument, sub-folder of the run).
_RUN_DIRS = {"ModelCheckpoint": ("dirpath", "checkpoints"), "CSVLogger": ("save_dir", ""),
             "WandbLogger": ("save_dir", ""), "TensorBoardLogger": ("save_dir", "")}


def fill_run_dirs(trainer_cfg) -> None:
    """Put every logger and ModelCheckpoint without a folder under ``trainer.default_root_dir``
    (checkpoints in its ``checkpoints/``), so one setting moves a whole run and ``--ckpt_path
    last`` finds the previous run's ``last.ckpt``."""
    root = Path(trainer_cfg.get("default_root_dir") or ".")
    for key in ("logger", "callbacks"):
        items = trainer_cfg.get(key)
        for item in items if isinstance(items, list) else [items]:
            name = str(getattr(item, "class_path", "")).rsplit(".", 1)[-1]
            if name in _RUN_DIRS and item.get("init_args") is not None:
                arg, sub = _RUN_DIRS[name]
                if item.init_args.get(arg) in (None, "."):
                    item.init_args[arg] = str(root / sub)


def _parse_with_flag_errors(cli, parse, parser, args) -> None:
    """LightningCLI's parsing, where a mistake is one paragraph with the closest valid flags, not
    an 85-line usage dump."""
    from jsonargparse import ArgumentError

    from apm.flag_errors import flag_error, flag_names

    argv = sys.argv[1:] if args is None else list(args)
    subs = getattr(cli, "_subcommand_parsers", {})
    sub = next((a for a in argv if a in subs), None)
    for p in [parser, *subs.values()]:
        p.exit_on_error = False
    try:
        parse(parser, args)
    except ArgumentError as e:
        raise flag_error(str(e), flag_names(subs.get(sub, parser)), f"apm {sub or ''}".strip()) from None


def _print_checkpoints(trainer) -> None:
    """After a fit, where its last and best checkpoints are."""
    cbs = trainer.checkpoint_callbacks
    if cbs and trainer.is_global_zero:
        for kind in ("last", "best"):
            path = next((p for cb in cbs if (p := getattr(cb, f"{kind}_model_path", ""))), "")
            if path:
                print(f"checkpoint ({kind}): {Path(path).resolve()}")


def build_cli(args: list[str] | None = None, run: bool = True):
    """The LightningCLI over APMModule and APMDataModule (``data.image_size`` feeds the model)."""
    from lightning.pytorch.cli import LightningCLI

    from apm.data import APMDataModule
    from apm.module import APMModule

    class APMCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments("data.image_size", "model.image_size")

        def parse_arguments(self, parser, args) -> None:
            _parse_with_flag_errors(self, super().parse_arguments, parser, args)

        def before_instantiate_classes(self) -> None:
            sub = self.config.get("subcommand")
            fill_run_dirs((self.config[sub] if sub else self.config).trainer)

        def instantiate_trainer(self, **kwargs):
            # trainer.precision null (the default) = bf16-mixed where bf16 is native, else 32-true.
            from apm.precision import default_precision

            cfg = self._get(self.config_init, "trainer", default={})
            if cfg.get("precision") is None and "precision" not in kwargs:
                acc = cfg.get("accelerator")
                kwargs["precision"] = default_precision(acc if isinstance(acc, str) else None)
            # Atomic checkpoint writes, safe loads, and a checkpoint on SIGTERM, in every run.
            from apm.callbacks import add_defaults

            kwargs["plugins"], kwargs["callbacks"] = add_defaults(
                kwargs.get("plugins", cfg.get("plugins")), kwargs.get("callbacks", cfg.get("callbacks")),
                progress_bar=kwargs.get("enable_progress_bar", cfg.get("enable_progress_bar")) is not False)
            return super().instantiate_trainer(**kwargs)

        def _parse_ckpt_path(self) -> None:
            # LightningCLI reads the settings of a given checkpoint file here; ours reads it safely
            # (a broken file is one clear error, not a traceback) and upgrades earlier versions'.
            from apm.checkpoints import saved_settings

            sub = self.config.get("subcommand")
            path = self.config[sub].get("ckpt_path") if sub else None
            hp = saved_settings(path, "ckpt_path") if path and Path(path).is_file() else {}
            if hp:
                self.config = self.parser.parse_object({sub: {"model": hp}}, self.config)

        def after_fit(self) -> None:
            _print_checkpoints(self.trainer)

    # LightningCLI reads sys.argv when given no args, and warns when given both: hand it the
    # arguments as the command line they are, with the settings of earlier versions upgraded.
    saved_argv = sys.argv
    args = upgrade_argv(sys.argv[1:] if args is None else list(args))
    sys.argv = [saved_argv[0] if saved_argv else "apm", *args]
    try:
        return APMCLI(APMModule, APMDataModule, run=run, save_config_kwargs={"overwrite": True},
                      parser_kwargs={"description": "Distill a frozen teacher into an APM student."})
    finally:
        sys.argv = saved_argv


def upgrade_argv(args: list[str]) -> list[str]:
    """A command line whose config files and ``--model.*`` settings may be written for an earlier
    version, in today's form (``apm.checkpoints.upgrade_settings``): a config file with old model
    settings is handed on as its upgraded text; ``--model.hidden_dims X`` becomes
    ``--model.student.hidden_dims X``, ``--model.student glom`` the settings class."""
    from apm.checkpoints import LEGACY_STUDENT_KEYS

    old = {*LEGACY_STUDENT_KEYS, "student", "glom"}
    out, rest = [], list(args)
    while rest:
        arg = rest.pop(0)
        if rest and (arg in ("-c", "--config") or arg.startswith("--model.") and arg[len("--model."):] in old):
            out += _upgrade_pair(arg, rest.pop(0))
        else:
            out.append(arg)
    return out


def _upgrade_pair(arg: str, value: str) -> list[str]:
    import yaml

    from apm.checkpoints import LEGACY_STUDENT_KEYS, upgrade_settings

    key = arg[len("--model."):]
    if arg in ("-c", "--config"):
        cfg = yaml.safe_load(Path(value).read_text()) if Path(value).is_file() else None
        model = cfg.get("model") if isinstance(cfg, dict) else None
        if isinstance(model, dict) and (set(model) & {*LEGACY_STUDENT_KEYS, "glom"}
                                        or isinstance(model.get("student"), str)):
            value = yaml.safe_dump({**cfg, "model": upgrade_settings(model)}, sort_keys=False)
        return [arg, value]
    if key == "student":
        return [arg, upgrade_settings({"student": value})["student"]["class_path"]
                if value in ("apm", "glom") else value]
    if key == "glom":
        return [a for k, v in (yaml.safe_load(value) or {}).items() for a in (f"--model.student.{k}", json.dumps(v))]
    return [f"--model.student.{key}", value]


def module_from_configs(configs: Sequence[str | Path], overrides: dict[str, Any] | None = None):
    """A fresh APMModule from LightningCLI configs, parsed by LightningCLI itself (later files
    override earlier ones; ``data.image_size`` feeds the model, as in ``apm fit``); ``overrides``
    replace model settings (those of earlier versions upgraded)."""
    from apm.checkpoints import upgrade_settings
    from apm.errors import ConfigError

    args: list[str] = []
    for c in configs:
        if not Path(c).is_file():
            raise ConfigError(f"Setting '--config': {str(c)!r} is not a file; give a config such as "
                              f"configs/apm.yaml.")
        args += ["-c", str(c)]
    settings = upgrade_settings({"compile": False, "feature_cache": None, **(overrides or {})})
    for k, v in settings.items():
        if k == "student" and "class_path" not in v:  # single settings of the configs' student
            args += [a for sk, sv in v.items() for a in (f"--model.student.{sk}", json.dumps(sv))]
        else:
            args += [f"--model.{k}", json.dumps(v)]
    args += ["--trainer.logger", "false", "--trainer.accelerator", "cpu"]
    return build_cli(args, run=False).model


def load_student(ckpt: str | Path | None = None, configs: Sequence[str | Path] | None = None,
                 device: str = "cpu", trained: bool = True, overrides: dict[str, Any] | None = None,
                 setting: str = "--ckpt"):
    """An ``APMModule`` in eval mode on ``device`` for the tools: the student of ``ckpt``
    (``APMModule.from_checkpoint``), checked against ``configs`` when both are given; or, from
    ``configs`` alone, a fresh one. ``trained``: refuse a checkpoint saved before any training step
    (no level statistics). ``overrides`` replace model settings."""
    from apm.checkpoints import check_trained, read_student
    from apm.errors import ConfigError
    from apm.module import APMModule
    from apm.precision import pick_device

    if ckpt is None and not configs:
        raise ConfigError("Give a trained student (--ckpt) or the configs of a fresh one (--config).")
    if not configs:
        return APMModule.from_checkpoint(ckpt, device, setting, trained, **(overrides or {}))
    module = module_from_configs(configs, overrides)
    if ckpt is not None:
        module.restore(read_student(ckpt, setting), ckpt, setting)
        if trained:
            check_trained(module, ckpt, setting)
    return module.to(pick_device(device)).eval()


def show_teacher_log() -> None:
    """The teachers' one-line INFO messages (where the weights came from) on stderr."""
    import logging

    class ToStderr(logging.StreamHandler):
        """Writes to whatever ``sys.stderr`` is at the time (it may be replaced after set-up)."""

        @property
        def stream(self):
            return sys.stderr

        @stream.setter
        def stream(self, value) -> None:
            pass

    log = logging.getLogger("teachers")
    if not any(isinstance(h, logging.StreamHandler) for h in log.handlers):
        handler = ToStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``apm`` and ``python -m apm``."""
    from apm.errors import APMError

    argv = sys.argv[1:] if argv is None else list(argv)
    quiet_wandb()
    show_teacher_log()
    try:
        if argv and argv[0] in TOOLS:
            module, _, fn = TOOLS[argv[0]].partition(":")
            return getattr(importlib.import_module(module), fn)(argv[1:]) or 0
        if argv and argv[0] in ("-h", "--help"):
            print("Tools: " + ", ".join(f"apm {t} --help" for t in TOOLS) + "\n" if TOOLS else "", end="")
        build_cli(argv)
        return 0
    except APMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # Lightning's SIGTERMException (SIGTERM or Ctrl-C): the checkpoint is saved
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(e, SIGTERMException):
            return 128 + getattr(e, "signum", 15)
        raise


def lightning_main() -> int:
    """Entry point of the ``lightning`` command (lightning 2.x installs none)."""
    return main()
