"""fedcam shared code: config, data, models, training, evaluation, and the torch-free snapshot package.

Importing it sets nothing and imports nothing: entry points call shared.env.setup_offline() themselves.
"""
