"""``lpeer inspect``, ``lpeer grow``, ``lpeer freeze``: the index manager on a run between phases (issue 5).

Each parses, calls one function of ``lifelong_peer.runops`` (``inspect_run``, ``grow_run``,
``freeze_run``) on the opened run, and renders its dict.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from lifelong_peer.policies import POLICY_HELP

from .options import FormatOpt, WorkspaceOpt
from .output import Format, emit, key_value_table, labelled, message, stdout

RunArg = typer.Argument(..., help="Run id in the workspace, or a run directory.")
LayerOpt = typer.Option(None, "--layer", help="Only this PEER layer (its position among the PEER layers, from 0).")


def _open(workspace: Path | None, run: str):
    from lifelong_peer.run import open_run
    from lifelong_peer.workspace import Workspace

    ws = Workspace.open(workspace)
    return ws, open_run(ws, run)


def _num(value, fmt: str = "{:.2f}") -> str:
    return "—" if value is None else fmt.format(value)


# --- inspect ------------------------------------------------------------------------------------------


def _render_layers(d: dict) -> None:
    for lay in d["layers"]:
        stdout.print(
            Text(f"PEER layer {lay['layer']}", style="bold"),
            f": {lay['num_experts']:,} experts "
            f"({lay['num_subkeys']} sub-keys per half), {lay['frozen']:,} frozen ({lay['frozen_pct']:.1f}%, "
            f"sub-keys {lay['frozen_subkeys_pct']:.1f}%), {lay['dead']:,} dead",
        )
        names = list(lay["slices"])
        when = f"after phase {d['phase']}" if d["phase"] is not None else "of the starting model"
        table = Table(title=f"usage {when}; ∩: Jaccard overlap of the slices' expert sets")
        for col in ("slice", "tokens", "usage %", "KL"):
            table.add_column(col, justify="left" if col == "slice" else "right")
        for name in names:
            table.add_column(f"∩ {name}", justify="right")
        table.add_row(
            "all",
            f"{lay['tokens']:,}",
            _num(lay["usage_pct"]),
            _num(lay["kl_unevenness"], "{:.3f}"),
            *[""] * len(names),
        )
        for name in names:
            s = lay["slices"][name]
            cells = [_num(lay["overlap"][name][other]) for other in names]
            table.add_row(name, f"{s['tokens']:,}", _num(s["usage_pct"]), _num(s["kl_unevenness"], "{:.3f}"), *cells)
        stdout.print(table)
        if lay["top"]:
            top = ", ".join(f"{t['id']} ({100 * t['mass_share']:.1f}%)" for t in lay["top"])
            stdout.print(f"top experts by router mass: {top}")
        else:
            stdout.print("no usage recorded yet: it is recorded on each slice's validation split after its phase")


def _render_experts(d: dict) -> None:
    for e in d["experts"]:
        used = ", ".join(f"{n}: {u['count']:,}× (mass {u['mass']:.2f})" for n, u in e["slices"].items()) or "none"
        nearest = ", ".join(f"{n['id']} ({n['score']:.3f})" for n in e["nearest"]) or "none"
        rows = {
            "sub-key pair (i, j)": f"({e['pair'][0]}, {e['pair'][1]})",
            "frozen": "yes" if e["frozen"] else "no",
            "retrieved by": used,
            "nearest by key (cosine)": nearest,
        }
        stdout.print(key_value_table(rows, title=f"expert {e['id']} of PEER layer {e['layer']}"))


def _render_text(d: dict, shown: int = 3) -> None:
    for lay in d["layers"]:
        heads = len(lay["ids"][0]) if lay["ids"] else 0
        table = Table(title=f"PEER layer {lay['layer']}: experts retrieved per head (gate)")
        table.add_column("#", justify="right")
        table.add_column("token")
        for h in range(heads):
            table.add_column(f"head {h}")
        for t, (piece, ids, gates) in enumerate(zip(d["pieces"], lay["ids"], lay["gates"], strict=True)):
            cells = []
            for hid, hg in zip(ids, gates, strict=True):
                cell = " ".join(f"{i} ({g:.2f})" for i, g in list(zip(hid, hg, strict=True))[:shown])
                cells.append(cell + (f" +{len(hid) - shown}" if len(hid) > shown else ""))
            table.add_row(str(t), repr(piece), *cells)
        stdout.print(table)
    if d["truncated"]:
        message(f"the text was cut to the model's context ({len(d['tokens'])} tokens)")


def _render_inspect(d: dict) -> None:
    {"layers": _render_layers, "expert": _render_experts, "text": _render_text}[d["mode"]](d)


def inspect(
    run: str = RunArg,
    layer: int | None = LayerOpt,
    expert: int | None = typer.Option(None, "--expert", help="Show this expert id: pair, users, nearest experts."),
    text: str | None = typer.Option(None, "--text", help="Show which experts each head retrieves for this text."),
    nearest: int = typer.Option(5, "--nearest", min=1, help="How many nearest experts --expert lists."),
    workspace: Path | None = WorkspaceOpt,
    fmt: Format = FormatOpt,
) -> None:
    """Expert usage per PEER layer and slice (usage %, KL unevenness, dead, overlap), one expert, or a text's lookups.

    Example: lpeer inspect sotu-lifelong-1 --layer 0 --expert 42
    """
    from lifelong_peer.runops import inspect_run

    _, the_run = _open(workspace, run)
    emit(inspect_run(the_run, layer=layer, expert=expert, text=text, nearest=nearest), fmt, _render_inspect)


# --- grow -----------------------------------------------------------------------------------------------


def _render_grow(d: dict) -> None:
    table = Table(title=f"growth of run {d['run']}" + (f" for slice {d['slice']}" if d["slice"] else ""))
    for col in ("layer", "K", "sub-keys", "experts in the layer", "placed", "poor new", "old changed", "new hit"):
        table.add_column(col, justify="left" if col == "placed" else "right")
    for r in d["layers"]:
        table.add_row(
            str(r["layer"]),
            str(r["k"]),
            f"{r['subkeys_before']} → {r['subkeys_after']}",
            f"{r['experts_before']:,} → {r['experts_after']:,}",
            r["placement"],
            _num(r.get("poorly_served_new"), "{:.1%}"),
            _num(r["changed_old"], "{:.1%}"),
            _num(r["new_hit"], "{:.1%}"),
        )
    stdout.print(table)
    message(
        "poor new: the new slice's query halves its sub-keys serve poorly; old changed: old-slice tokens "
        "whose retrieved experts changed; new hit: new-slice tokens retrieving a new expert"
    )
    message(f"saved {d['checkpoint']}" if d["checkpoint"] else "nothing grew; the run is unchanged")


def grow(
    run: str = RunArg,
    subkeys: int | None = typer.Option(None, "--subkeys", help="Sub-keys K to add per half (N = n² grows to (n+K)²)."),
    auto: bool = typer.Option(False, "--auto", help="Decide K from how poorly --slice is served (needs --slice)."),
    slice_: str | None = typer.Option(
        None, "--slice", help="New slice: places the sub-keys at k-means centroids of its poorly served queries."
    ),
    layer: int | None = LayerOpt,
    workspace: Path | None = WorkspaceOpt,
    fmt: Format = FormatOpt,
) -> None:
    """Grow the expert pool of a run's latest model, by K sub-keys per half or as its next slice needs.

    Reports K, N before and after, and the fraction of old-slice tokens whose retrieved experts changed.

    Example: lpeer grow sotu-lifelong-1 --auto --slice 1970-2026
    """
    from lifelong_peer.run import locked_run
    from lifelong_peer.runops import grow_run
    from lifelong_peer.workspace import Workspace

    with locked_run(Workspace.open(workspace), run) as the_run:  # this run only (issue 25)
        result = grow_run(the_run, subkeys=subkeys, auto=auto, slice_name=slice_, layer=layer)
    emit(result, fmt, _render_grow)


# --- freeze ---------------------------------------------------------------------------------------------


def _render_freeze(d: dict) -> None:
    title = {"add": "added to the frozen set", "replace": "replaced the frozen set", "unfreeze": ""}[d["mode"]]
    table = Table(title=f"run {d['run']}: {d['action']}" + (f" ({title})" if title else ""))
    for col in ("layer", "frozen experts before → after", "newly frozen", "unfrozen", "frozen %", "sub-keys frozen %"):
        table.add_column(col, justify="right")
    for r in d["layers"]:
        table.add_row(
            str(r["layer"]),
            f"{r['frozen_before']:,} → {r['frozen']:,}",
            f"{r['newly_frozen']:,}",
            f"{r['unfrozen']:,}",
            f"{r['frozen_pct']:.1f}",
            f"{r['frozen_subkeys_pct']:.1f}",
        )
    stdout.print(table)
    message(f"saved {d['checkpoint']}")


def freeze(
    run: str = RunArg,
    policy: str | None = typer.Option(None, "--policy", help=f"Freezing policy: {POLICY_HELP}."),
    replace: bool = typer.Option(
        False,
        "--replace",
        help="Make the frozen set exactly what --policy selects, unfreezing the rest "
        "(default: add the policy's experts to the frozen set; nothing is unfrozen).",
    ),
    unfreeze: str | None = typer.Option(None, "--unfreeze", help="Unfreeze all, or ids and ranges like 3,7,10-12."),
    slice_: str | None = typer.Option(
        None, "--slice", help="New slice: tfidf:T ranks experts by its usage; left out of the old slices."
    ),
    freeze_subkeys: bool = typer.Option(
        False, "--freeze-subkeys", help="Also freeze (with --unfreeze: unfreeze) the sub-keys of those experts."
    ),
    layer: int | None = typer.Option(None, "--layer", help="With --unfreeze IDS: only this PEER layer."),
    workspace: Path | None = WorkspaceOpt,
    fmt: Format = FormatOpt,
) -> None:
    """Freeze a run's experts by a policy, or unfreeze them; reports the frozen experts per layer, before → after.

    A policy adds to the frozen set unless --replace is given. The edit is saved as a new checkpoint
    (the evaluated one is kept); the run's next phase starts from it. Note: a run whose own freeze
    policy is not none recomputes its frozen set before each phase, so this edit lasts until its next
    phase starts.

    Example: lpeer freeze sotu-lifelong-1 --policy usage:80 --freeze-subkeys
    """
    from lifelong_peer.run import locked_run
    from lifelong_peer.runops import freeze_run
    from lifelong_peer.workspace import Workspace

    with locked_run(Workspace.open(workspace), run) as the_run:  # this run only (issue 25)
        result = freeze_run(
            the_run,
            policy=policy,
            unfreeze=unfreeze,
            slice_name=slice_,
            subkeys=freeze_subkeys,
            layer=layer,
            replace=replace,
        )
    if result["note"]:
        message(labelled("note:", "yellow", result["note"]))
    emit(result, fmt, _render_freeze)


def register(app: typer.Typer) -> None:
    app.command()(inspect)
    app.command()(grow)
    app.command()(freeze)
