"""Options defined once: ``--workspace/-w`` and ``--format`` (every command has both), ``--quiet``,
and the ``TrainConfig`` options of ``lpeer run``, generated from the dataclass (its field docs are their help)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing

import typer
from rich.markup import escape
from typer.core import TyperOption

from lifelong_peer.config import TrainConfig
from lifelong_peer.config_docs import field_docs

from .output import Format

WorkspaceOpt = typer.Option(
    None, "--workspace", "-w", help="Workspace folder (default: $LPEER_WORKSPACE, else the current directory)."
)
FormatOpt = typer.Option(Format.human, "--format", help="human: tables; json: machine-readable on stdout.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress display.")

_display_type_rich = TyperOption.display_type_rich


def _flag_type(self: TyperOption, ctx) -> str | None:
    """On/off flags take no value, so their help shows no type (typer would print ``<bool>``)."""
    return None if self.is_flag else _display_type_rich(self, ctx)


TyperOption.display_type_rich = _flag_type

_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
TRAIN_OPTIONS = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "strategy"]
"""TrainConfig fields that are ``lpeer run`` options (``--strategy`` chooses the preset they override)."""

#: ``lpeer run --help`` shows its ~60 options in these panels, each a table of its own: one table of all
#: of them, sized by the longest names, cut names and left 18 columns for the descriptions at 80 (issue 25)
PANELS = {
    "Training": (
        "steps", "tokens", "batch_size", "lr", "expert_lr", "weight_decay", "expert_moments", "warmup",
        "min_lr_ratio", "grad_clip", "base_steps", "base_lr", "seed", "device", "precision",
    ),
    "Data": ("joint", "replay", "replay_growth", "base_data", "eval_tokens", "usage_tokens"),
    "Growth": ("grow", "max_experts", "grow_mode", "grow_topk", "grow_gate"),
    "Protection: freezing": ("freeze", "freeze_subkeys", "train_shared", "train_subkeys", "tfidf_background"),
    "Protection: distillation and regularisers": (
        "distill", "distill_temperature", "distill_on", "distill_tokens", "l2sp", "ewc", "ewc_batches", "mas", "expert_weight_decay",
    ),
    "Checkpoints": ("keep_checkpoints", "checkpoint_every"),
}  # fmt: skip
_PANEL_OF = {name: panel for panel, names in PANELS.items() for name in names}


def _train_parameter(name: str, doc: str) -> inspect.Parameter:
    """``--field-name`` (a flag pair ``--x/--no-x`` for booleans); None when not given."""
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    kind = _TYPES[str(field.type).split("|")[0].strip()]
    flag = name.replace("_", "-")
    names = f"--{flag}/--no-{flag}" if kind is bool else f"--{flag}"
    option = typer.Option(None, names, help=escape(doc), rich_help_panel=_PANEL_OF[name])
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind | None)


def with_train_options(command):
    """Give ``command`` one option per ``TRAIN_OPTIONS`` field; the ones given reach it as ``train={field: value}``."""
    docs = field_docs(TrainConfig)
    hints = typing.get_type_hints(command)
    own = [p.replace(annotation=hints[p.name]) for p in inspect.signature(command).parameters.values()]
    extra = [_train_parameter(name, docs[name]) for names in PANELS.values() for name in names]  # panel by panel

    @functools.wraps(command)
    def wrapper(**kwargs):
        train = {name: value for name in TRAIN_OPTIONS if (value := kwargs.pop(name)) is not None}
        return command(**kwargs, train=train)

    params = [p for p in own if p.name != "train"] + extra
    wrapper.__signature__ = inspect.Signature(params)
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    del wrapper.__wrapped__  # typer reads the signature above, not the command's
    return wrapper
