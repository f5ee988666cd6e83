"""Training progress when stderr is not a terminal: a plain line every ``interval`` seconds (issue 17).

In a log file, CI or under nohup, rich's live bars cannot redraw: stderr showed nothing for minutes,
then the bars dumped at the end, cut to 80 columns. Off a terminal the trainer's progress events
(``lifelong_peer.train``: run_start, phase_start, step, grow, freeze, resume, phase_end) become plain
lines instead, each naming the run it belongs to:

    demo-naive-s0 | phase 0: 1790-1839 | step 120/300 | loss 1.189 | 8,278 tok/s | ETA 0:01:05

A phase's first and last steps are always printed; the steps between at most once per interval.
The lines both displays print (growth, freezing, resuming, a phase's end) are written here once, and
every expert count says what it counts: a layer's experts or all layers' together (issue 25).
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: seconds between two progress lines of a phase (tests set the ``interval`` of ``PlainProgress``)
INTERVAL_S = 10.0


class PlainProgress:
    """A trainer progress callback writing plain lines through ``write`` (one call per line).

    ``run`` names the run until an event says otherwise (the demo emits ``run_start`` per run);
    ``clock`` is injectable so that tests step time instead of sleeping.
    """

    def __init__(
        self,
        write: Callable[[str], None],
        run: str | None = None,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.write, self.run, self.clock = write, run, clock
        self.interval = INTERVAL_S if interval is None else interval
        self.label, self.total, self.first, self.done = "", 0, 0, 0
        self.loss: float | None = None
        self.tok_s: float | None = None
        self.experts: int | None = None
        self.layers: int | None = None
        self.frozen = 0.0
        self.started = self.last = 0.0

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "run_start":
            self.run = event["run"]
        elif kind == "phase_start":
            self.label = "base" if event["phase"] < 0 else f"phase {event['phase']}: {event['slice']}"
            self.total, self.first = event["steps"], event["start"]
            self.done, self.loss, self.tok_s = event["start"], None, None
            self.started = self.last = self.clock()
            self._line(f"{self.label} | {self.total:,} steps" + (f", from step {self.first:,}" if self.first else ""))
        elif kind == "step":
            self.done, self.loss, self.tok_s = event["step"] + 1, event["loss"], event.get("tok_s")
            self.experts, self.frozen = event.get("experts"), event.get("frozen_fraction", 0.0)
            self.layers = event.get("peer_layers")
            now = self.clock()
            if now - self.last >= self.interval or self.done in (self.first + 1, self.total):
                self.last = now
                self._line(self._status(now))
        elif kind in ("phase_end", "grow", "freeze", "resume"):
            for line in event_lines(event):
                self._line(line)

    def _status(self, now: float) -> str:
        parts = [self.label, f"step {self.done:,}/{self.total:,}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        if self.tok_s:
            parts.append(f"{self.tok_s:,.0f} tok/s")
        if self.experts is not None:
            parts.append(experts_text(self.experts, self.layers, self.frozen))
        steps = self.done - self.first
        if steps > 0 and self.done < self.total:
            parts.append(f"ETA {_clock_time((now - self.started) / steps * (self.total - self.done))}")
        elif self.done >= self.total:
            parts.append(f"took {_clock_time(now - self.started)}")
        return " | ".join(parts)

    def _line(self, text: str) -> None:
        self.write(f"{self.run} | {text}" if self.run else text)


def experts_text(experts: int, layers: int | None, frozen: float) -> str:
    """A step's expert count, all PEER layers together: ``9,216 experts in all 9 layers, 12% frozen``."""
    where = "in all layers" if layers is None else f"in all {layers} layers" if layers > 1 else "in 1 layer"
    return f"{experts:,} experts {where}, {100 * frozen:.0f}% frozen"


def event_lines(event: dict) -> list[str]:
    """The lines of a trainer event that both displays print as text: growth and freezing (a line per
    layer), resuming, and a phase's end."""
    kind = event["event"]
    if kind == "phase_end":
        bpb = ", ".join("—" if b != b else f"{b:.3f}" for b in event["rows"]["validation"].bpb)
        return [f"after phase {event['phase']} ({event['slice']}): validation bits/byte {bpb}"]
    if kind == "grow":
        return [
            f"grow layer {r['layer']}: +{r['k']} sub-keys per half, {r['experts_before']:,} → "
            f"{r['experts_after']:,} experts in this layer"
            + (f", old tokens re-routed {100 * r['changed_old']:.1f}%" if r.get("changed_old") is not None else "")
            + (f" ({r['reason']})" if r.get("reason") else "")
            for r in event["layers"]
        ]
    if kind == "freeze":
        return [
            f"freeze layer {r['layer']} ({r['policy']}): {r['frozen_pct']:.1f}% of its experts frozen"
            + (
                f"; the slice retrieves {r['retrieved']:,}, claims {r['claimed']:,}; {r['unused']:,} unused"
                if r.get("claimed") is not None
                else ""
            )
            for r in event["layers"]
        ]
    if kind == "resume":
        if event["step"] is None:  # from the end of a phase (a kill left no checkpoint inside the next one)
            return [f"resuming after phase {event['phase']} ({event['slice']})"]
        where = "base training" if event["phase"] < 0 else f"phase {event['phase']}"
        return [f"resuming {where} at step {event['step']}"]
    return []


def _clock_time(seconds: float) -> str:
    """Seconds → ``H:MM:SS``."""
    s = max(0, round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


_INGEST_WORDS = {"scan": ("reading", "records"), "pack": ("tokenising", "documents")}


class PlainIngestProgress:
    """``lpeer ingest``'s two passes (``streams.store.Progress``: pass, done, total) as a plain line
    per interval, from the first interval on."""

    def __init__(
        self,
        write: Callable[[str], None],
        stream: str,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.write, self.stream, self.clock = write, stream, clock
        self.interval = INTERVAL_S if interval is None else interval
        self.phase, self.started, self.last = "", 0.0, 0.0

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        now = self.clock()
        verb, unit = _INGEST_WORDS.get(phase, (phase, "items"))
        if phase != self.phase:  # nothing yet: a quick ingest prints no progress at all
            self.phase, self.started, self.last = phase, now, now
        elif now - self.last >= self.interval:
            self.last = now
            count = f"{done:,}/{total:,}" if total else f"{done:,}"
            eta = ""
            if total and 0 < done < total:
                eta = f" | ETA {_clock_time((now - self.started) / done * (total - done))}"
            self.write(f"{self.stream} | {verb} | {count} {unit}{eta}")
