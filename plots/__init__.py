"""Figures redrawn from run folders: one module per figure (``bootstrap``, ``finetune``,
``method_compare``), each with ``python -m plots.<name> RUN_DIR... --out FIG.png`` and a notebook
``plots/<name>.ipynb``; shared drawing in ``common``, reading run folders in ``runs``, the EM
report's ``accuracy.png`` in ``plot_utils``. See docs/figures.md."""
