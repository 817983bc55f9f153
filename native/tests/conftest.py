"""What the engine tests share: a fake runtime host per test."""
import pytest

from kvmkit.testing import EngineHost


@pytest.fixture
def make_host():
    """``make_host(intx=False, index=None)``: an EngineHost, closed after the
    test (after the fixtures that use this one, which stop their engines first)."""
    made = []

    def make(**kw):
        made.append(EngineHost(**kw))
        return made[-1]
    yield make
    for host in made:
        host.close()
