"""Config field docs are the one source of option help (issue 7)."""

from typer.testing import CliRunner

from lifelong_peer import ModelConfig, PEERConfig
from lifelong_peer.cli.main import app
from lifelong_peer.config import TrainConfig
from lifelong_peer.config_docs import field_docs, reference


def test_every_config_field_is_documented():
    for cls in (TrainConfig, ModelConfig, PEERConfig):
        docs = field_docs(cls)
        missing = [row["name"] for row in reference(cls) if not row["doc"]]
        assert not missing, f"{cls.__name__}: undocumented fields {missing}"
        assert all(doc == " ".join(doc.split()) for doc in docs.values())


def test_run_help_shows_the_field_docs():
    result = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for name in ("steps", "grow", "freeze", "l2sp", "replay"):
        assert field_docs(TrainConfig)[name] in text, name


def test_readme_reference_lists_every_field_with_its_doc():
    from pathlib import Path

    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text().split("<!-- config-reference:start -->")[1].split("<!-- config-reference:end -->")[0]
    for cls in (TrainConfig, ModelConfig, PEERConfig):
        for row in reference(cls):
            assert f"| `{row['name']}` |" in text, (cls.__name__, row["name"])
            assert row["doc"].replace("|", "\\|") in text, (cls.__name__, row["name"])
