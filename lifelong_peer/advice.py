"""Every command the tool prints as advice, in one place, so a test can run each one (issue 17, item 12).

Templates take ``str.format`` fields; ``ADVICE`` lists them all for ``tests/test_advice.py``.
"""

from __future__ import annotations

INIT = "lpeer init DIR"
INGEST_DEFAULT = "lpeer ingest --default"
INGEST = "lpeer ingest SOURCE --name NAME"
STREAMS = "lpeer streams"
RESUME = "lpeer run --resume {run}"
BASE_MODEL = "lpeer run --base-model NAME_OR_PATH"
EVAL = "lpeer eval {run} -w {workspace}"
REEVALUATE = "lpeer eval {run} --reevaluate"
KEEP_ALL = "lpeer run --stream STREAM --keep-checkpoints all"

ADVICE = [INIT, INGEST_DEFAULT, INGEST, STREAMS, RESUME, BASE_MODEL, EVAL, REEVALUATE, KEEP_ALL]
