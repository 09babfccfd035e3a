"""What a run or a search learned, for a person: the HTML report (pages, sections, figures) and ΔW analysis.

Importing this package imports nothing else."""
