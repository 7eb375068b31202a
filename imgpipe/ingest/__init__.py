"""Reading the sources and turning them into validated, deduplicated image files (the download stage)."""
