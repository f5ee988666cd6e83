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
#: a joint run comparable with a compared run (``report.joint_command``): its stream, slices, base model and options
JOINT = "lpeer run --stream {stream} --strategy joint --base {base} --slices {slices} --name {name}{options}"

ADVICE = [INIT, INGEST_DEFAULT, INGEST, STREAMS, RESUME, BASE_MODEL, EVAL, REEVALUATE, JOINT]
