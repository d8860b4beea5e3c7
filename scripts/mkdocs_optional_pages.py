"""mkdocs hook: pages that branches add while they are merged (Kite's rules, egress, exits) join the nav when
their file exists, so the nav never names a missing page (a --strict error) nor leaves a new one out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# file -> title, in the order they follow the fixed pages
OPTIONAL_PAGES = {
    "kite-rules.md": "Kite's rules",
    "egress.md": "Egress: each trader's static IP",
    "exits.md": "Exits: stops, trailing, targets",
}


def on_config(config: Any) -> Any:
    docs = Path(config["docs_dir"])
    nav = config["nav"]
    named = {next(iter(entry.values())) for entry in nav if isinstance(entry, dict)}
    position = next((i for i, entry in enumerate(nav) if "security.md" in entry.values()), len(nav))
    for page, title in OPTIONAL_PAGES.items():
        if (docs / page).exists() and page not in named:
            position += 1
            nav.insert(position, {title: page})
    return config
