"""fedtune: privacy-preserving federated fine-tuning. One import namespace for everything it ships:
`fedtune.common`, `fedtune.client`, `fedtune.server` and `fedtune.simulations` are the checkout's
top-level folders of those names, reached through symlinks in this folder; a wheel holds them as
copies here, so a checkout, an editable install and a wheel import the same names.

A Flower App Bundle (FAB, what `flwr run` ships) packs the folders but not the symlinks (Flower
never follows them): where they are missing here, the folders beside this package serve instead, so
the bundle's own copy of the apps is what runs.
"""

from pathlib import Path as _Path

if not (_Path(__file__).parent / "common").is_dir():  # a FAB: common/, client/, server/ beside fedtune/
    __path__.append(str(_Path(__file__).parent.parent))  # noqa: F821 (a package's own __path__)
