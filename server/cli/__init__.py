"""The `fedcam` command line: data, training, evaluation, and (from the server) federation and snapshots."""

from server.cli import federate, publish, train  # noqa: F401  (importing a module registers its commands)
from server.cli.common import app

__all__ = ["app"]
