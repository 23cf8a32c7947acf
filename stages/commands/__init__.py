"""Commands run by hand or by CI around the pipeline (not DVC stages): ``python -m stages.commands.<name>``."""
