"""Command line: ``apm fit|validate|test|predict`` (LightningCLI), the same as ``lightning ...``
and ``python -m apm ...``; plus the project's own tools registered in ``TOOLS``."""

from __future__ import annotations

import importlib
import netrc
import os
import sys
from pathlib import Path

# Extra subcommands: name -> "module:function" taking argv (list[str]); lazily imported.
TOOLS: dict[str, str] = {
    "islands": "apm.commands.islands:main",
    "eval": "apm.commands.eval:main",
    "interpolate": "apm.commands.interpolate:main",
    "perceive": "apm.commands.perceive:main",
    "classify": "apm.commands.classify:main",
    "segment": "apm.commands.segment:main",
    "explore": "apm.commands.explore:main",
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


def build_cli(args: list[str] | None = None, run: bool = True):
    """The LightningCLI over APMModule and APMDataModule (``data.image_size`` feeds the model)."""
    from lightning.pytorch.cli import LightningCLI

    from apm.data import APMDataModule
    from apm.module import APMModule

    class APMCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments("data.image_size", "model.image_size")

        def parse_arguments(self, parser, args) -> None:
            # A mistake is one paragraph with the closest valid flags, not an 85-line usage dump.
            from jsonargparse import ArgumentError

            from apm.flag_errors import flag_error, flag_names

            argv = sys.argv[1:] if args is None else list(args)
            subs = getattr(self, "_subcommand_parsers", {})
            sub = next((a for a in argv if a in subs), None)
            for p in [parser, *subs.values()]:
                p.exit_on_error = False
            try:
                super().parse_arguments(parser, args)
            except ArgumentError as e:
                raise flag_error(str(e), flag_names(subs.get(sub, parser)), f"apm {sub or ''}".strip()) from None

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
            # LightningCLI reads the hyperparameters of a given checkpoint file here: read it first
            # ourselves, so that an unsafe or broken file is one clear error, not a traceback.
            from apm.checkpoints import read_checkpoint

            sub = self.config.get("subcommand")
            path = self.config[sub].get("ckpt_path") if sub else None
            if path and Path(path).is_file():
                read_checkpoint(path, "ckpt_path")
            super()._parse_ckpt_path()

        def after_fit(self) -> None:
            cbs = self.trainer.checkpoint_callbacks
            if cbs and self.trainer.is_global_zero:
                for kind in ("last", "best"):
                    path = next((p for cb in cbs if (p := getattr(cb, f"{kind}_model_path", ""))), "")
                    if path:
                        print(f"checkpoint ({kind}): {Path(path).resolve()}")

    # LightningCLI reads sys.argv when given no args, and warns when given both: hand it the
    # arguments as the command line they are.
    saved_argv = sys.argv
    if args is not None:
        sys.argv = [saved_argv[0] if saved_argv else "apm", *args]
    try:
        return APMCLI(APMModule, APMDataModule, run=run, save_config_kwargs={"overwrite": True},
                      parser_kwargs={"description": "Distill a frozen teacher into an APM student."})
    finally:
        sys.argv = saved_argv


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
