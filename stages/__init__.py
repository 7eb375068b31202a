"""DVC stage entry points, one short script per stage of dvc.yaml (``python -m stages.NAME``): parse
flags, load and validate params, call the ``imgpipe`` library, print the summary."""
