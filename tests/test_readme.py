"""The README's commands are the ones CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_test_command() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Run the tests", 1)[1]
    return section.split("```bash", 1)[1].split("```", 1)[0].strip()


def test_ci_runs_exactly_the_readme_test_command() -> None:
    command = _readme_test_command()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines


def test_the_kinds_page_example_runs() -> None:
    text = (ROOT / "docs" / "kinds.md").read_text()
    example = text.split("```python", 1)[1].split("```", 1)[0]
    exec(compile(example, "<docs/kinds.md example>", "exec"), {"__name__": "docs_example"})


def test_every_docs_page_the_readme_links_exists() -> None:
    import re

    links = re.findall(r"\]\((docs/[^)#]+)", (ROOT / "README.md").read_text())
    assert links and all((ROOT / link).is_file() for link in links)
