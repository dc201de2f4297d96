"""fedcam shared code: config, data, models, training, evaluation, snapshot format."""

from shared.env import setup_offline

# Every entry point imports `shared` first, so the offline variables are set before any library reads them.
setup_offline()
