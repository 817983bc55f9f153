"""docs/plugins.md quotes the example plugin's real code: every code block
marked `<!-- from: PATH -->` appears verbatim in PATH; docs link to files
that exist."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "plugins.md"
QUOTE = re.compile(r"<!-- from: (\S+) -->\n```\w*\n(.*?)```", re.S)


def quotes():
    return [(m.group(1), m.group(2)) for m in QUOTE.finditer(GUIDE.read_text())]


def test_the_guide_quotes_the_example():
    assert len(quotes()) >= 6
    assert {p for p, _ in quotes()} >= {"examples/virtio_rng/pyproject.toml",
                                        "examples/virtio_rng/kvmkit_example_virtio_rng/rng.py",
                                        "examples/virtio_rng/kvmkit_example_virtio_rng/plugin.py"}


@pytest.mark.parametrize("path, block", quotes(), ids=[f"{p}#{i}" for i, (p, _) in enumerate(quotes())])
def test_quoted_code_is_the_real_code(path, block):
    assert block in (ROOT / path).read_text(), f"docs/plugins.md quotes {path}, which changed"


@pytest.mark.parametrize("doc", ["docs/plugins.md", "docs/hooks.md", "README.md"])
def test_relative_links_resolve(doc):
    text = (ROOT / doc).read_text()
    for target in re.findall(r"\]\(((?!https?:)[^)#]+)\)", text):
        assert ((ROOT / doc).parent / target).exists(), f"{doc} links to {target}, which does not exist"
