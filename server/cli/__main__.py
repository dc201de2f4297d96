"""`python -m server.cli`: the `fedcam` command."""

from server.cli import app

app()
