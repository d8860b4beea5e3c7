"""The one-machine stack's broker: why Apache Kafka cannot start is said in the stack's own error."""

from __future__ import annotations

from pathlib import Path

import pytest

from core import apache_kafka
from core.embedded import EmbeddedUnavailable, kafka_command


def test_apache_kafka_without_a_jdk_raises_the_stacks_own_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(apache_kafka, "java_binary", lambda: None)
    with pytest.raises(EmbeddedUnavailable, match="needs a JDK"):
        kafka_command("apache", 9092, tmp_path)
